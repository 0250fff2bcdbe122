"""Infer tasks: classify a tile with the exported bundle, synthesise tiles of a class with guided latent diffusion."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import AsDiscreted, SaveImaged
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.tasks.infer.bundle import BundleInferTask

__all__ = ["TileClassifierInfer", "SynthesizeTilesInfer"]


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
    """Synthesise tiles of a requested class with HistoDiffusion's classifier-guided latent diffusion.

    Networks come from the monai_histodiff checkpoints (checked to belong together by their recorded parents):
    the pre-trained autoencoder (with the fine-tuned decoder when given), the diffusion model, and the time-dependent
    latent classifier. A request ``{"label": class name or index, "num_samples": 4, "guidance_scale": 3.0,
    "num_inference_steps": 50, "seed": 0, "output_dir": optional}`` writes PNG tiles and returns a preview (the
    tiles side by side, in a temporary file that MONAI Label deletes once it has sent it) and
    ``{"label", "class_index", "files"}``.

    Args:
        autoencoder: ``pretrain_autoencoder`` checkpoint.
        diffusion: ``pretrain_diffusion`` checkpoint.
        latent_classifier: ``train_latent_classifier`` checkpoint.
        decoder: optional ``finetune`` checkpoint of the decoder D'.
        num_inference_steps: default number of DDIM steps.
        guidance_scale: default guidance scale.
    """

    def __init__(self, autoencoder: str, diffusion: str, latent_classifier: str, decoder: str | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 3.0) -> None:
        from monai_histodiff.engines import checkpoint_classes

        self.checkpoints = {"autoencoder": autoencoder, "diffusion": diffusion, "latent_classifier": latent_classifier,
                            "decoder": decoder}
        classes = checkpoint_classes(latent_classifier)
        super().__init__(path=[latent_classifier], network=None, type=InferType.OTHERS, labels=classes, dimension=2,
                         description="Synthesise H&E tiles of a tissue class (classifier-guided latent diffusion)",
                         config={"num_samples": 4, "guidance_scale": guidance_scale,
                                 "num_inference_steps": num_inference_steps, "seed": 0})
        self.classes = list(classes)
        self._models: dict[str, Any] = {}

    def pre_transforms(self, data: Any = None) -> list:
        """None: sampling starts from noise, there is no input image."""
        return []

    def post_transforms(self, data: Any = None) -> list:
        """None: tiles are written by :meth:`__call__`."""
        return []

    def is_valid(self) -> bool:
        return all(p is None or os.path.isfile(p) for p in self.checkpoints.values())

    def _load(self, device: str) -> dict[str, Any]:
        if device not in self._models:
            from monai_histodiff.engines import load_autoencoder, load_diffusion, load_latent_classifier

            c = self.checkpoints
            autoencoder = load_autoencoder(c["autoencoder"], decoder_path=c["decoder"], device=device)
            unet, meta = load_diffusion(c["diffusion"], autoencoder_path=c["autoencoder"], device=device)
            classifier = load_latent_classifier(c["latent_classifier"], diffusion_path=c["diffusion"], device=device)
            self._models[device] = {"autoencoder": autoencoder, "diffusion": unet, "meta": meta,
                                    "classifier": classifier}
        return self._models[device]

    def _class_index(self, label: Any) -> int:
        if isinstance(label, int) or (isinstance(label, str) and label.isdigit()):
            idx = int(label)
        else:
            lower = [c.lower() for c in self.classes]
            if str(label).lower() not in lower:
                raise ValueError(f"unknown class {label!r}; classes: {self.classes}")
            idx = lower.index(str(label).lower())
        if not 0 <= idx < len(self.classes):
            raise ValueError(f"class index {idx} out of range for {len(self.classes)} classes")
        return idx

    def __call__(self, request: Mapping[str, Any], callbacks: Any = None) -> tuple[str | None, dict[str, Any]]:
        from PIL import Image

        from monai_histodiff.data.transforms import to_uint8_image
        from monai_histodiff.engines import scheduler_from_meta
        from monai_histodiff.inferers import ClassifierGuidedLatentDiffusionInferer

        req = {**self._config, **dict(request)}
        device = str(req.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(req.get("device"), list):
            device = req["device"][0]
        device = "cpu" if device.startswith("cuda") and not torch.cuda.is_available() else device
        idx = self._class_index(req.get("label", 0))
        n = int(req.get("num_samples", 4))
        m = self._load(device)
        meta = m["meta"]
        scheduler = scheduler_from_meta(meta, "ddim", int(req.get("num_inference_steps", 50)))
        inferer = ClassifierGuidedLatentDiffusionInferer(scheduler, scale_factor=float(meta.get("scale_factor", 1.0)))
        g = torch.Generator().manual_seed(int(req.get("seed", 0)))
        noise = torch.randn((n, *[int(s) for s in meta["latent_shape"]]), generator=g).to(device)
        labels = torch.full((n,), idx, dtype=torch.long, device=device)
        images = inferer.sample(noise, m["autoencoder"], m["diffusion"], m["classifier"], labels, scheduler=scheduler,
                                guidance_scale=float(req.get("guidance_scale", 3.0)), verbose=False)
        out = req.get("output_dir") or tempfile.mkdtemp(prefix="histodiff_synth_")
        os.makedirs(out, exist_ok=True)
        files, arrays = [], []
        for i, tile in enumerate(images):
            f = os.path.join(out, f"{self.classes[idx]}_{int(req.get('seed', 0))}_{i:03d}.png")
            arrays.append(to_uint8_image(tile))
            Image.fromarray(arrays[-1]).save(f)
            files.append(f)
        # the result file MONAI Label sends back, and deletes after the response: a row of the tiles in its own
        # temporary file, so that the tiles themselves stay where the request asked
        preview = os.path.join(tempfile.mkdtemp(prefix="histodiff_preview_"), f"{self.classes[idx]}_preview.png")
        Image.fromarray(np.concatenate(arrays, axis=1)).save(preview)
        return preview, {"label": self.classes[idx], "class_index": idx, "files": files}
