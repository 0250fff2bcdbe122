"""Infer tasks: classify a tile with the exported bundle, synthesise tiles of a class with guided latent diffusion.

Everything a client sends is checked before anything runs (:func:`check_synthesize_request`): numbers must lie in
stated ranges, and tiles are written only inside the folder the app was started with (``--conf synthesize_dir``); a
request may name a sub-folder of it, never a path of its own.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import AsDiscreted, SaveImaged
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.tasks.infer.bundle import BundleInferTask

__all__ = [
    "MAX_GUIDANCE_INTERVAL",
    "MAX_GUIDANCE_SCALE",
    "MAX_INFERENCE_STEPS",
    "MAX_SEED",
    "REQUESTS_FOLDER",
    "RequestError",
    "SynthesizeTilesInfer",
    "TileClassifierInfer",
    "bounded_number",
    "check_flag",
    "check_synthesize_request",
    "generate_defaults",
    "resolve_subfolder",
]

logger = logging.getLogger(__name__)

#: bounds of the numeric fields of a ``synthesize`` request (``num_samples``'s upper bound is the app's
#: ``synthesize_max_samples``)
MAX_INFERENCE_STEPS = 1000
MAX_GUIDANCE_SCALE = 20.0
MAX_GUIDANCE_INTERVAL = 1000
MAX_SEED = 2**32 - 1
#: where results of requests that name no ``output_dir`` go, inside the app's synthesis folder (a name no request
#: can give: names starting with a dot are refused)
REQUESTS_FOLDER = ".requests"
#: one segment of a requested sub-folder: letters, digits, ``_``, ``-`` and ``.``, not starting with a dot
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MAX_DEPTH = 8
#: the settings of bundles/generate.json that the synthesize task uses as its defaults
_GENERATE_KEYS = ("num_inference_steps", "guidance_scale", "guidance_interval", "eta", "scheduler", "batch_size",
                  "seed", "use_ema")


class RequestError(ValueError):
    """A request (or a configuration value) the app refuses; the message names the field and what is allowed.

    Args:
        message: the reason, sent back to the client.
        status_code: the HTTP status the app answers with: 422 (a field out of range or malformed) or 409 (the request
            conflicts with what is on disk).
    """

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def bounded_number(value: Any, name: str, low: float, high: float, integer: bool = False) -> int | float:
    """``value`` as an ``int`` (``integer``) or ``float`` checked to lie in ``[low, high]``.

    Numbers and numeric strings are accepted (MONAI Label's ``--conf`` values are strings); booleans, NaN, infinities
    and non-integral values for an integer field are not.

    Raises:
        RequestError: naming ``name``, the allowed range and the value.
    """
    allowed = f"an integer in {int(low)}..{int(high)}" if integer else f"a number in {low:g}..{high:g}"
    problem = RequestError(f"{name} must be {allowed}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise problem
    if isinstance(value, int):
        number: int | float = value
    else:
        try:
            number = float(value)
        except ValueError:
            raise problem from None
        if not math.isfinite(number) or (integer and not number.is_integer()):
            raise problem
    if not low <= number <= high:
        raise problem
    return int(number) if integer else float(number)


def check_flag(value: Any, name: str) -> bool:
    """A yes/no field: a JSON boolean, or ``"true"`` / ``"false"`` (any case; ``--conf`` values are strings).

    Raises:
        RequestError: naming ``name`` when ``value`` is anything else.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RequestError(f"{name} must be true or false, got {value!r}")


def generate_defaults() -> dict[str, Any]:
    """The sampling settings of the ``generate`` stage (``bundles/generate.json`` merged over ``common.json``, found
    with :func:`monai_histodiff.bundle.configs.config_files`): ``num_inference_steps``, ``guidance_scale``,
    ``guidance_interval``, ``eta``, ``scheduler``, ``batch_size``, ``seed`` and ``use_ema``; the synthesize task's
    defaults, so that it samples as the stage does."""
    from monai_histodiff.bundle.configs import merged_config

    cfg = merged_config("generate")
    values = {k: cfg.get(k) for k in _GENERATE_KEYS}
    computed = [k for k, v in values.items() if v is None or (isinstance(v, str) and v[:1] in "$@%")]
    if computed:
        raise ValueError(f"bundles/generate.json gives no plain value for {computed}: the synthesize task reads its "
                         "defaults from there")
    return values


def resolve_subfolder(root: str | os.PathLike, name: Any, field: str = "output_dir") -> str:
    """The folder ``name`` inside ``root``, refusing anything that could reach outside it.

    Args:
        root: the app's folder (resolved, symbolic links followed).
        name: a relative sub-folder name, ``/``-separated segments of letters, digits, ``_``, ``-`` and ``.`` that do
            not start with a dot (so ``..`` and hidden names are refused), at most 8 deep.
        field: the request field named in errors.

    Returns:
        the absolute path, with symbolic links followed, strictly inside ``root``.

    Raises:
        RequestError: when ``name`` is not a string, is absolute, has ``..`` segments or other malformed segments, or
            resolves outside ``root`` (e.g. through a symbolic link).
    """
    root = os.path.realpath(root)
    if not isinstance(name, str) or not name.strip():
        raise RequestError(f"{field} must be a sub-folder name inside the app's synthesis folder, got {name!r}")
    if os.path.isabs(name) or name.startswith(("~", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise RequestError(f"{field} {name!r} is an absolute path: a request may only name a sub-folder of the app's "
                           "synthesis folder (which is set when the app starts: --conf synthesize_dir)")
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        raise RequestError(f"{field} {name!r} has '..' segments: a request may only name a sub-folder of the app's "
                           "synthesis folder")
    bad = [p for p in parts if not _SEGMENT.fullmatch(p)]
    if bad or len(parts) > _MAX_DEPTH:
        why = f"segment {bad[0]!r}" if bad else f"{len(parts)} levels deep (at most {_MAX_DEPTH})"
        raise RequestError(f"{field} {name!r}: {why} is not allowed; use '/'-separated names of letters, digits, '_', "
                           "'-' and '.' that do not start with '.'")
    target = os.path.realpath(os.path.join(root, *parts))
    if target == root or os.path.commonpath([root, target]) != root:
        raise RequestError(f"{field} {name!r} resolves outside the app's synthesis folder (symbolic links are "
                           "followed): refused")
    return target


def check_synthesize_request(request: Mapping[str, Any], classes: Sequence[str], root: str | os.PathLike,
                             max_samples: int) -> dict[str, Any]:
    """The checked fields of a ``synthesize`` request (defaults already merged in).

    Args:
        request: ``label`` (class name or index), ``num_samples`` (1..``max_samples``), ``num_inference_steps``
            (1..1000), ``guidance_scale`` (0..20), ``guidance_interval`` (1..1000), ``seed`` (0..2**32-1) and an
            optional ``output_dir`` (a sub-folder of ``root``, see :func:`resolve_subfolder`).
        classes: the class names, in index order.
        root: the app's synthesis folder.
        max_samples: the largest ``num_samples`` allowed.

    Returns:
        ``{"class_index", "num_samples", "num_inference_steps", "guidance_scale", "guidance_interval", "seed",
        "output_dir"}`` with ``output_dir`` the resolved folder, or None when the request names none.

    Raises:
        RequestError: for the first field out of range or malformed, naming it and its allowed values.
    """
    out = request.get("output_dir")
    return {
        "class_index": _class_index(request.get("label", 0), classes),
        "num_samples": bounded_number(request.get("num_samples"), "num_samples", 1, max_samples, integer=True),
        "num_inference_steps": bounded_number(request.get("num_inference_steps"), "num_inference_steps", 1,
                                              MAX_INFERENCE_STEPS, integer=True),
        "guidance_scale": bounded_number(request.get("guidance_scale"), "guidance_scale", 0.0, MAX_GUIDANCE_SCALE),
        "guidance_interval": bounded_number(request.get("guidance_interval"), "guidance_interval", 1,
                                            MAX_GUIDANCE_INTERVAL, integer=True),
        "seed": bounded_number(request.get("seed"), "seed", 0, MAX_SEED, integer=True),
        "output_dir": None if out is None or out == "" else resolve_subfolder(root, out),
    }


def _class_index(label: Any, classes: Sequence[str]) -> int:
    """The index of a requested class: its name (any case) or its index."""
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise RequestError(f"label must be a class name or index, got {label!r}; classes: {list(classes)}")
    if isinstance(label, int) or label.isdigit():
        idx = int(label)
        if not 0 <= idx < len(classes):
            raise RequestError(f"label {idx} is not a class index: 0..{len(classes) - 1} ({list(classes)})")
        return idx
    lower = [c.lower() for c in classes]
    if label.lower() not in lower:
        raise RequestError(f"label {label!r} is not a class; classes: {list(classes)}")
    return lower.index(label.lower())


class TileClassifierInfer(BundleInferTask):
    """Tissue class of one tile, with the bundle written by ``python -m monai_histodiff export-bundle``.

    The bundle's own pre-processing, inferer and network are used; its argmax is dropped so that MONAI Label's
    classification writer reports the softmax score of every class (``{"prediction": [{"idx", "label", "score"}]}``).

    Args:
        path: the bundle folder.
        conf: the app's configuration (``preload`` etc.).
    """

    def __init__(self, path: str, conf: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(path, dict(conf), type=InferType.CLASSIFICATION, add_post_restore=False,
                         post_filter=[SaveImaged, AsDiscreted], load_strict=True, **kwargs)


class SynthesizeTilesInfer(BasicInferTask):
    """Synthesise tiles of a requested class with HistoDiffusion's classifier-guided latent diffusion, as the
    ``generate`` stage does.

    Networks come from the monai_histodiff checkpoints (checked to belong together by their recorded parents): the
    pre-trained autoencoder (with the fine-tuned decoder when given), the diffusion model, and the time-dependent
    latent classifier. Sampling runs :class:`monai_histodiff.engines.GuidedTileGenerator`, the ``generate`` stage's
    engine, with the stage's defaults (:func:`generate_defaults`), so a folder it writes is a generation folder
    like the stage's: ``<CLASS>/<CLASS>_<index:06d>.png``, ``manifest.jsonl`` (what ``select`` and the judge read),
    ``grids/<CLASS>.png`` and ``classes.json``.

    A request ``{"label": class name or index, "num_samples": 4, "num_inference_steps": ..., "guidance_scale": ...,
    "guidance_interval": ..., "seed": ..., "output_dir": optional sub-folder name}`` (ranges: :func:`
    check_synthesize_request`) makes tiles ``0..num_samples-1`` of the class and returns a preview (the tiles in a
    grid, in a temporary file that MONAI Label deletes once it has sent it) and ``{"label", "class_index", "files",
    "output_dir", "manifest", "generated", "reused", ...settings}``.

    Where tiles go. Only inside ``output_root``, set when the app starts:

    - with ``output_dir``, in that sub-folder, which is kept (like a ``generate`` folder: a later request with the
      same settings reuses its tiles and adds missing ones; one with other settings for tiles already there is
      refused);
    - without, in a new folder under ``<output_root>/.requests/``; only the newest ``keep_requests`` of those are
      kept, older ones are deleted after each such request (a failed request's folder at once).

    Args:
        autoencoder: ``pretrain_autoencoder`` checkpoint.
        diffusion: ``pretrain_diffusion`` checkpoint.
        latent_classifier: ``train_latent_classifier`` checkpoint.
        output_root: the only folder the task writes tiles into (created on first use).
        decoder: optional ``finetune`` checkpoint of the decoder D'.
        max_samples: the largest ``num_samples`` a request may ask.
        keep_requests: how many results of requests without ``output_dir`` are kept.
        num_inference_steps: default number of DDIM steps (None: the generate stage's).
        guidance_scale: default guidance scale (None: the generate stage's).
        guidance_interval: default guidance interval (None: the generate stage's).
    """

    def __init__(self, autoencoder: str, diffusion: str, latent_classifier: str, output_root: str | os.PathLike,
                 decoder: str | None = None, max_samples: int = 256, keep_requests: int = 16,
                 num_inference_steps: int | str | None = None, guidance_scale: float | str | None = None,
                 guidance_interval: int | str | None = None) -> None:
        from monai_histodiff.engines import checkpoint_classes

        self.checkpoints = {"autoencoder": autoencoder, "diffusion": diffusion, "latent_classifier": latent_classifier,
                            "decoder": decoder}
        self.output_root = os.path.realpath(output_root)
        self.max_samples = bounded_number(max_samples, "synthesize_max_samples", 1, 100_000, integer=True)
        self.keep_requests = bounded_number(keep_requests, "synthesize_keep", 1, 100_000, integer=True)
        self.stage_defaults = generate_defaults()
        classes = checkpoint_classes(latent_classifier)
        given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                 "guidance_interval": guidance_interval}
        defaults = {"label": classes[0], "num_samples": min(4, self.max_samples),
                    **{k: self.stage_defaults[k] if v is None else v for k, v in given.items()},
                    "seed": self.stage_defaults["seed"]}
        # the defaults obey the request bounds (a bad --conf value fails at app start, naming the key), as numbers
        checked = check_synthesize_request(defaults, classes, self.output_root, self.max_samples)
        defaults.update({k: checked[k] for k in defaults if k != "label"})
        super().__init__(path=[latent_classifier], network=None, type=InferType.OTHERS, labels=classes, dimension=2,
                         description="Synthesise H&E tiles of a tissue class (classifier-guided latent diffusion)",
                         config=defaults)
        self.classes = list(classes)
        self._models: dict[str, Any] = {}
        self._guard = threading.Lock()
        self._folder_locks: dict[str, threading.Lock] = {}

    def pre_transforms(self, data: Any = None) -> list:
        """None: sampling starts from noise, there is no input image."""
        return []

    def post_transforms(self, data: Any = None) -> list:
        """None: tiles are written by :meth:`__call__`."""
        return []

    def is_valid(self) -> bool:
        return all(p is None or os.path.isfile(p) for p in self.checkpoints.values())

    def _load(self, device: str) -> dict[str, Any]:
        """The networks on ``device`` (loaded once per device), the diffusion checkpoint's meta and the checkpoints'
        hashes (recorded in every manifest row, as the generate stage records them)."""
        if device not in self._models:
            from monai_histodiff.engines import load_autoencoder, load_diffusion, load_latent_classifier
            from monai_histodiff.handlers import file_sha256

            c = self.checkpoints
            autoencoder = load_autoencoder(c["autoencoder"], decoder_path=c["decoder"], device=device)
            unet, meta = load_diffusion(c["diffusion"], autoencoder_path=c["autoencoder"], device=device,
                                        use_ema=bool(self.stage_defaults["use_ema"]))
            classifier = load_latent_classifier(c["latent_classifier"], diffusion_path=c["diffusion"], device=device)
            hashes = {k: file_sha256(p) for k, p in c.items() if p is not None}
            self._models[device] = {"autoencoder": autoencoder, "diffusion": unet, "meta": meta,
                                    "classifier": classifier, "hashes": hashes}
        return self._models[device]

    def _generator(self, models: Mapping[str, Any], params: Mapping[str, Any], output_dir: str, device: str) -> Any:
        """The ``generate`` stage's engine for this request: tiles ``0..num_samples-1`` of the requested class."""
        from monai_histodiff.engines import GuidedTileGenerator, scheduler_from_meta
        from monai_histodiff.inferers import ClassifierGuidedLatentDiffusionInferer

        meta = models["meta"]
        steps = params["num_inference_steps"]
        trained = int(meta["config"]["scheduler_args"].get("num_train_timesteps", 1000))
        if steps > trained:
            raise RequestError(f"num_inference_steps must be an integer in 1..{min(trained, MAX_INFERENCE_STEPS)} "
                               f"for this diffusion model (trained with {trained} timesteps), got {steps}")
        scheduler = scheduler_from_meta(meta, str(self.stage_defaults["scheduler"]))
        inferer = ClassifierGuidedLatentDiffusionInferer(scheduler, scale_factor=float(meta.get("scale_factor", 1.0)))
        return GuidedTileGenerator(
            inferer=inferer, autoencoder=models["autoencoder"], diffusion_model=models["diffusion"],
            classifier=models["classifier"], scheduler=scheduler, num_inference_steps=steps,
            class_names=self.classes, counts={self.classes[params["class_index"]]: params["num_samples"]},
            latent_shape=meta["latent_shape"], output_dir=output_dir, guidance_scale=params["guidance_scale"],
            guidance_interval=params["guidance_interval"], eta=float(self.stage_defaults["eta"]),
            batch_size=int(self.stage_defaults["batch_size"]), seed=params["seed"], device=device,
            checkpoint_hashes=models["hashes"], rank=0, world_size=1, progress=False)

    @staticmethod
    def _refuse_other_settings(generator: Any, class_index: int, num_samples: int, name: str) -> None:
        """Refuse (409) when a named folder already holds some of the requested tiles made with other settings: the
        stage would keep them (it only warns), and the request would get tiles it did not ask for."""
        from monai_histodiff.data.manifest import MERGED_MANIFEST, RANK_MANIFEST_GLOB, read_manifest
        from monai_histodiff.engines import tile_seed

        folder = generator.output_dir
        paths = glob.glob(os.path.join(glob.escape(folder), RANK_MANIFEST_GLOB))
        paths.append(os.path.join(folder, MERGED_MANIFEST))
        settings = json.loads(json.dumps(generator._settings()))  # as the rows hold them
        cls = generator.class_names[class_index]
        for path in paths:
            for row in read_manifest(path, on_bad_line="skip", missing_ok=True, reader="synthesize"):
                index = row.get("index")
                if row.get("class") != cls or not isinstance(index, int) or not 0 <= index < num_samples:
                    continue
                expected = {**settings, "seed": tile_seed(generator.seed, class_index, index)}
                changed = [k for k, v in expected.items() if row.get(k, generator.setting_defaults.get(k)) != v]
                if changed:
                    raise RequestError(f"output_dir {name!r} already holds tile {row['file']} made with other settings "
                                       f"({', '.join(changed)}): use another output_dir, or the settings it was made "
                                       "with to reuse it", status_code=409)

    def _request_folder(self) -> str:
        """A new folder for a request without ``output_dir``: ``<output_root>/.requests/<time in ns>_<random>`` (names
        sort by creation time)."""
        path = os.path.join(self.output_root, REQUESTS_FOLDER, f"{time.time_ns():020d}_{uuid.uuid4().hex[:8]}")
        os.makedirs(path)
        return path

    def prune_requests(self) -> list[str]:
        """Delete all but the newest ``keep_requests`` folders of requests without ``output_dir`` (a folder a request
        is still writing, i.e. holding a live lock, is kept). Returns the folders deleted."""
        from monai_histodiff.engines.locking import LOCK_NAME, pid_alive

        area = os.path.join(self.output_root, REQUESTS_FOLDER)
        try:
            names = sorted(n for n in os.listdir(area) if os.path.isdir(os.path.join(area, n)))
        except FileNotFoundError:
            return []
        removed = []
        for name in names[:max(0, len(names) - self.keep_requests)]:
            path = os.path.join(area, name)
            try:
                with open(os.path.join(path, LOCK_NAME), encoding="utf-8") as f:
                    pid = f.read().split()[0]
                if pid.isdigit() and pid_alive(int(pid)):
                    continue
            except (OSError, IndexError):
                pass
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        if removed:
            logger.info(f"synthesize: removed {len(removed)} old request folder(s) of {area} (keeping "
                        f"{self.keep_requests})")
        return removed

    @staticmethod
    def _preview(files: Sequence[str], name: str) -> str:
        """The tiles in a square-ish grid, in a temporary file of its own (MONAI Label deletes the result file after
        sending it, so nothing is left behind)."""
        from PIL import Image

        from monai_histodiff.handlers.image_grid import tile_mosaic

        tiles = []
        for f in files:
            with Image.open(f) as img:
                tiles.append(np.asarray(img.convert("RGB")))
        grid = tile_mosaic(tiles)
        fd, preview = tempfile.mkstemp(prefix="histodiff_preview_", suffix=f"_{name}.png")
        os.close(fd)
        try:
            Image.fromarray(grid).save(preview, format="PNG")
        except BaseException:
            os.unlink(preview)
            raise
        return preview

    def __call__(self, request: Mapping[str, Any], callbacks: Any = None) -> tuple[str | None, dict[str, Any]]:
        """Check the request, make (or reuse) its tiles, and return the preview file and the result (class docstring).

        Raises:
            RequestError: a field out of range or malformed (422), or a named folder that holds the requested tiles
                made with other settings or is being written by another request (409).
        """
        from monai_histodiff.data import save_class_map
        from monai_histodiff.data.manifest import MERGED_MANIFEST
        from monai_histodiff.engines.locking import OutputLockedError

        req = {**self._config, **dict(request)}
        params = check_synthesize_request(req, self.classes, self.output_root, self.max_samples)
        device = str(req.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(req.get("device"), list):
            device = req["device"][0]
        device = "cpu" if device.startswith("cuda") and not torch.cuda.is_available() else device
        models = self._load(device)
        idx, n = params["class_index"], params["num_samples"]
        named = params["output_dir"] is not None
        out = params["output_dir"] if named else self._request_folder()
        busy = RequestError(f"output_dir {req.get('output_dir')!r} is being written by another request: wait for it "
                            "or use another output_dir", status_code=409)
        with self._guard:  # one request at a time per folder: the settings check and the run see the same tiles
            folder_lock = self._folder_locks.setdefault(out, threading.Lock())
        if not folder_lock.acquire(blocking=False):
            raise busy
        try:
            generator = self._generator(models, params, out, device)
            if named:
                self._refuse_other_settings(generator, idx, n, str(req["output_dir"]))
            save_class_map(self.classes, out)
            try:
                summary = generator.run()
            except OutputLockedError as e:  # another process (a second server on the same folder)
                raise busy from e
            files = [generator.tile_path(idx, i) for i in range(n)]
            preview = self._preview(files, self.classes[idx])
        except BaseException:
            if not named:
                shutil.rmtree(out, ignore_errors=True)
            raise
        finally:
            folder_lock.release()
            if not named:
                with self._guard:
                    self._folder_locks.pop(out, None)
                self.prune_requests()
        return preview, {
            "label": self.classes[idx], "class_index": idx, "files": files, "output_dir": out,
            "manifest": os.path.join(out, MERGED_MANIFEST), "generated": summary["generated"],
            "reused": summary["skipped_existing"],
            **{k: params[k] for k in ("num_samples", "num_inference_steps", "guidance_scale", "guidance_interval",
                                      "seed")},
        }
