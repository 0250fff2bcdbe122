"""MONAI Label sample app of monai_histodiff: classify H&E tiles with the exported bundle, fine-tune it, and
synthesise tiles of a class with HistoDiffusion's guided latent diffusion.

Configuration (``--conf KEY VALUE`` of ``monailabel start_server``), all of it fixed when the app starts; see
:data:`CONF_KEYS`. A request can never choose where files are written: ``synthesize`` writes only inside
``synthesize_dir`` and training only into the bundle's ``models/``. A refused request gets HTTP 422 (a field out of
range or malformed, named with its allowed values) or 409 (it conflicts with what is on disk, e.g. a trained model
less accurate than the current one), with the reason as the response's ``detail``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.infers import RequestError, SynthesizeTilesInfer, TileClassifierInfer
from lib.trainers import TileClassifierTrain

__all__ = ["CONF_KEYS", "HistoDiffusionApp"]

logger = logging.getLogger(__name__)

#: the app's configuration keys and what they set (README: "Configuration")
CONF_KEYS = {
    "bundle": "the exported classifier bundle (default <app>/model/histodiff_tile_classifier)",
    "autoencoder": "pretrain_autoencoder checkpoint (synthesize)",
    "diffusion": "pretrain_diffusion checkpoint (synthesize)",
    "latent_classifier": "train_latent_classifier checkpoint (synthesize)",
    "decoder": "optional finetune checkpoint of the decoder D' (synthesize)",
    "synthesize_dir": "the only folder synthesize writes into (default <app>/synthetic)",
    "synthesize_keep": "results of synthesize requests without output_dir kept (default 16)",
    "synthesize_max_samples": "the largest num_samples of a synthesize request (default 256)",
    "num_inference_steps": "synthesize default (default: bundles/generate.json)",
    "guidance_scale": "synthesize default (default: bundles/generate.json)",
    "guidance_interval": "synthesize default (default: bundles/generate.json)",
    "train_max_epochs": "the largest max_epochs of a training request (default 1000)",
    "force_replace": "install a trained model even when it is less accurate than the current one (default false)",
}


class HistoDiffusionApp(MONAILabelApp):
    """The app: tasks ``tile_classifier`` (infer and train) and ``synthesize`` (infer).

    Args:
        app_dir: this folder.
        studies: the studies folder (tiles; a class-folder tree gives training labels).
        conf: configuration, see :data:`CONF_KEYS`.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str], **kwargs: Any) -> None:
        self.bundle = conf.get("bundle", os.path.join(app_dir, "model", "histodiff_tile_classifier"))
        self.synthesize_dir = os.path.realpath(conf.get("synthesize_dir", os.path.join(app_dir, "synthetic")))
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="HistoDiffusion",
                         description="H&E tile classification and HistoDiffusion tile synthesis", version="0.1.0",
                         **kwargs)

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        if os.path.isdir(self.bundle):
            infers["tile_classifier"] = TileClassifierInfer(self.bundle, self.conf)
        else:
            logger.warning(f"no classifier bundle at {self.bundle}: run python -m monai_histodiff export-bundle")
        ckpts = {k: self.conf.get(k) for k in ("autoencoder", "diffusion", "latent_classifier")}
        if all(ckpts.values()):
            infers["synthesize"] = SynthesizeTilesInfer(
                output_root=self.synthesize_dir, decoder=self.conf.get("decoder"),
                max_samples=self.conf.get("synthesize_max_samples", 256),
                keep_requests=self.conf.get("synthesize_keep", 16),
                num_inference_steps=self.conf.get("num_inference_steps"),
                guidance_scale=self.conf.get("guidance_scale"),
                guidance_interval=self.conf.get("guidance_interval"), **ckpts)
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        if not os.path.isdir(self.bundle):
            return {}
        return {"tile_classifier": TileClassifierTrain(self.bundle, self.conf)}

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's inference; a refused request becomes an HTTP error carrying the reason."""
        try:
            return super().infer(request, datastore)
        except RequestError as e:
            raise HTTPException(status_code=e.status_code, detail=str(e)) from e

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        """MONAI Label's training; a refused request (or a model not installed) becomes an HTTP error, with the
        reason."""
        try:
            return super().train(request)
        except RequestError as e:
            raise HTTPException(status_code=e.status_code, detail=str(e)) from e
