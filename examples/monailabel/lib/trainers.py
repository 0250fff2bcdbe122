"""Train task: fine-tune the exported tile classifier bundle on labels collected in MONAI Label.

The model inference uses, ``models/model.pt``, is replaced only at the end of a training run, and only by a model that
is at least as accurate on this run's validation tiles (unless the request says ``force_replace``); the model it
replaces is kept as ``models/model.previous.pt``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleTrainTask

from .infers import RequestError, bounded_number, check_flag

__all__ = ["CANDIDATE_MODEL", "CURRENT_MODEL", "ModelNotReplacedError", "PREVIOUS_MODEL", "TileClassifierTrain"]

logger = logging.getLogger(__name__)

#: file names in the bundle's ``models/``: the model inference uses, the one it replaced, and what a run trains
CURRENT_MODEL = "model.pt"
PREVIOUS_MODEL = "model.previous.pt"
CANDIDATE_MODEL = "model.candidate.pt"
#: the bundle's checkpoint saver (best validation accuracy), pointed at CANDIDATE_MODEL instead of model.pt
_SAVER_FILENAME = "validate#saver#key_metric_filename"
_MODEL_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.pt")


class ModelNotReplacedError(RequestError):
    """The new model is less accurate than ``models/model.pt`` on the run's validation tiles: not installed (409)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=409)


class TileClassifierTrain(BundleTrainTask):
    """Fine-tune the bundle's classifier with its own ``configs/train.json`` (single GPU/CPU) or
    ``configs/multi_gpu_train.json`` (several GPUs, through MONAI Label's torchrun).

    A datastore item's class is the name of the image's parent folder when that is one of the bundle's classes
    (studies laid out as a class-folder tree), otherwise the content of its label file: a class name, a class index,
    or JSON ``{"label": name or index}``.

    The run's best model by validation accuracy is written to ``models/model.candidate.pt``. Then it and the current
    ``models/model.pt`` are both measured on the run's validation tiles: when the new one is at least as accurate (or
    the request has ``force_replace: true``, or the app was started with ``--conf force_replace true``), the current
    model is copied to ``models/model.previous.pt`` and the new one replaces it; otherwise the current model stays,
    the new one stays in ``model.candidate.pt``, and the request fails with :class:`ModelNotReplacedError` (HTTP 409)
    giving both accuracies.

    Request fields are checked first (HTTP 422 naming the field): ``max_epochs`` in 1..``train_max_epochs`` (conf,
    default 1000), ``val_split`` in 0.01..0.99, ``model_filename`` (the weights training starts from, default
    ``model.pt``; ``model.previous.pt`` starts from the model replaced last) the name of a ``.pt`` file in the
    bundle's ``models/``, ``force_replace`` true or false, ``gpus`` ``"all"`` or comma-separated indices;
    experiment tracking (``tracking`` other than ``"None"``), which would write where the client's ``tracking_uri``
    says, is refused.

    Args:
        path: the bundle folder.
        conf: the app's configuration (``train_max_epochs``, ``force_replace``).
    """

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, conf, load_strict=True, **kwargs)
        with open(os.path.join(path, "configs", "metadata.json")) as f:
            channel_def = json.load(f)["network_data_format"]["outputs"]["pred"]["channel_def"]
        self.classes = [channel_def[str(i)] for i in range(len(channel_def))]
        self.max_epochs = bounded_number(conf.get("train_max_epochs", 1000), "train_max_epochs", 1, 1_000_000,
                                         integer=True)
        self.force_replace = check_flag(conf.get("force_replace", False), "force_replace")
        self.models_dir = os.path.join(path, "models")
        self._val_items: list[dict[str, Any]] = []
        self._start_model: str | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "force_replace": self.force_replace}

    def class_index(self, image: str, label: str | None) -> int:
        """The class index of a datastore item."""
        parent = os.path.basename(os.path.dirname(image))
        if parent in self.classes:
            return self.classes.index(parent)
        if not label or not os.path.isfile(label):
            raise ValueError(f"no class for {image}: not in a class folder and no label file")
        with open(label) as f:
            text = f.read().strip()
        if text.startswith("{"):
            text = str(json.loads(text)["label"])
        return int(text) if text.isdigit() else self.classes.index(text)

    def check_request(self, request: dict[str, Any]) -> bool:
        """Check (and normalise in place) the fields of a training request; returns whether to replace the model
        whatever its validation accuracy.

        Raises:
            RequestError: naming the first field out of range or malformed.
        """
        request["max_epochs"] = bounded_number(request.get("max_epochs", 50), "max_epochs", 1, self.max_epochs,
                                               integer=True)
        request["val_split"] = bounded_number(request.get("val_split", 0.2), "val_split", 0.01, 0.99)
        name = request.get("model_filename", CURRENT_MODEL)
        name = name[0] if isinstance(name, (list, tuple)) and name else name
        path = os.path.join(self.models_dir, name) if isinstance(name, str) and _MODEL_FILE.fullmatch(name) else None
        if path is None or os.path.realpath(os.path.dirname(path)) != os.path.realpath(self.models_dir) or \
                not os.path.isfile(path):
            known = sorted(n for n in os.listdir(self.models_dir) if n.endswith(".pt"))
            raise RequestError(f"model_filename must name a .pt file in the bundle's models/ folder {known}, got "
                               f"{name!r}")
        request["model_filename"] = name
        gpus = request.get("gpus", "all")
        if gpus != "all" and not (isinstance(gpus, str) and re.fullmatch(r"\d{1,3}(,\d{1,3})*", gpus)):
            raise RequestError(f"gpus must be 'all' or comma-separated GPU indices such as '0,1', got {gpus!r}")
        tracking = request.get("tracking")
        tracking = tracking[0] if isinstance(tracking, (list, tuple)) and tracking else tracking
        if tracking not in (None, "", "None", "none"):
            raise RequestError(f"tracking must be 'None', got {tracking!r}: experiment tracking is not offered by this "
                               "app (it would write where the request's tracking_uri says)")
        request["tracking"] = ""  # off, and so is tracking_uri
        request.pop("tracking_uri", None)
        return check_flag(request.get("force_replace", self.force_replace), "force_replace")

    def _fetch_datalist(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, Any]]:
        return [{"image": d["image"], "label": self.class_index(d["image"], d.get("label"))}
                for d in datastore.datalist() if d]

    def _partition_datalist(self, datalist: list[dict[str, Any]], request: dict[str, Any],
                            shuffle: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        train, val = super()._partition_datalist(datalist, request, shuffle=shuffle)
        if not train or not val:
            raise RequestError(f"val_split {request.get('val_split')} leaves {len(train)} training and "
                               f"{len(val or [])} validation tiles of the {len(datalist)} labeled: both need at least "
                               "one")
        self._val_items = list(val)
        return train, val

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        overrides[_SAVER_FILENAME] = CANDIDATE_MODEL  # model.pt is replaced after the comparison, not during training
        if self._start_model and self.bundle_config.get("ckpt_path") is not None:
            overrides["ckpt_path"] = self._start_model  # the weights the bundle's own CheckpointLoader starts from
        return overrides

    def run_multi_gpu(self, request: dict[str, Any], cmd: list[str], env: dict[str, str]) -> None:
        # multi_gpu_train.json replaces the whole validate section, so the saver's file name goes on the command line
        super().run_multi_gpu(request, [*cmd, f"--{_SAVER_FILENAME}", CANDIDATE_MODEL], env)

    def validation_accuracy(self, model_path: str, items: Sequence[Mapping[str, Any]],
                            device: str | torch.device = "cpu") -> tuple[int, int]:
        """``(correct, total)`` of the bundle's network with the weights of ``model_path`` on ``items``
        (``{"image", "label"}``), pre-processed as the bundle's validation does."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(self.bundle_config_path)
        parser["bundle_root"] = self.bundle_path
        network = parser.get_parsed_content("network_def")
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and set(state) == {"model"}:  # saved as {"model": state dict}
            state = state["model"]
        network.load_state_dict(state, strict=True)
        network = network.to(device).eval()
        preprocessing = parser.get_parsed_content("validate#preprocessing")
        correct = 0
        with torch.no_grad():
            for start in range(0, len(items), 16):
                batch = [preprocessing(dict(item)) for item in items[start:start + 16]]
                images = torch.stack([torch.as_tensor(b["image"]) for b in batch]).to(device)
                labels = torch.as_tensor([int(b["label"]) for b in batch])
                correct += int((network(images).argmax(1).cpu() == labels).sum())
        return correct, len(items)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        request = dict(request)
        force = self.check_request(request)
        candidate = os.path.join(self.models_dir, CANDIDATE_MODEL)
        if os.path.exists(candidate):
            os.remove(candidate)
        self._val_items = []
        self._start_model = os.path.join(self.models_dir, request["model_filename"])
        super().__call__(request, datastore)
        if not os.path.isfile(candidate):
            raise RuntimeError(f"training wrote no model ({candidate} is missing): see the training log")
        device = "cuda" if torch.cuda.is_available() and "cuda" in str(request.get("device", "cuda")) else "cpu"
        return self.install(candidate, force, device)

    def install(self, candidate: str, force: bool = False, device: str | torch.device = "cpu") -> dict[str, Any]:
        """Replace ``models/model.pt`` with ``candidate`` (keeping it as ``models/model.previous.pt``) unless the
        candidate is less accurate on the run's validation tiles and ``force`` is false.

        Returns:
            ``{"replaced", "forced", "model", "previous_model", "val_accuracy", "previous_val_accuracy",
            "val_tiles"}`` (``forced``: installed although less accurate).

        Raises:
            ModelNotReplacedError: the candidate is less accurate and not ``force``; it stays in ``candidate``.
        """
        current = os.path.join(self.models_dir, CURRENT_MODEL)
        previous = os.path.join(self.models_dir, PREVIOUS_MODEL)
        items = self._val_items
        if not items:
            raise RuntimeError("no validation tiles to compare the models on: install() runs after a training run")
        new, total = self.validation_accuracy(candidate, items, device)
        old = self.validation_accuracy(current, items, device)[0] if os.path.isfile(current) else None
        result = {"val_tiles": total, "val_accuracy": new / total,
                  "previous_val_accuracy": None if old is None else old / total}
        if old is not None and new < old and not force:
            raise ModelNotReplacedError(
                f"not replacing models/{CURRENT_MODEL}: the new model's validation accuracy {new / total:.3f} is lower "
                f"than the current model's {old / total:.3f} (same {total} validation tiles). The current model stays; "
                f"the new one is kept as models/{CANDIDATE_MODEL}. Send \"force_replace\": true to replace it anyway.")
        if os.path.isfile(current):
            shutil.copy2(current, previous + ".tmp")
            os.replace(previous + ".tmp", previous)
        os.replace(candidate, current)
        os.utime(current)  # inference reloads a model whose modification time changed
        logger.info(f"models/{CURRENT_MODEL} replaced (validation accuracy {result['previous_val_accuracy']} -> "
                    f"{result['val_accuracy']} on {total} tiles{', forced' if force else ''}); the previous model is "
                    f"models/{PREVIOUS_MODEL}")
        return {"replaced": True, "model": current, "previous_model": previous if old is not None else None,
                "forced": bool(force and old is not None and new < old), **result}
