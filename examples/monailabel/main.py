"""MONAI Label sample app of monai_histodiff: classify H&E tiles with the exported bundle, fine-tune it, and
synthesise tiles of a class with HistoDiffusion's guided latent diffusion.

Configuration (``--conf KEY VALUE`` of ``monailabel start_server``):

- ``bundle``: the exported classifier bundle (default ``<app>/model/histodiff_tile_classifier``);
- ``autoencoder``, ``diffusion``, ``latent_classifier``, optional ``decoder``: monai_histodiff checkpoints; the
  ``synthesize`` task is offered when the first three are given;
- ``num_inference_steps``, ``guidance_scale``: defaults of the ``synthesize`` task.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib import SynthesizeTilesInfer, TileClassifierInfer, TileClassifierTrain

__all__ = ["HistoDiffusionApp"]

logger = logging.getLogger(__name__)


class HistoDiffusionApp(MONAILabelApp):
    """The app: tasks ``tile_classifier`` (infer and train) and ``synthesize`` (infer).

    Args:
        app_dir: this folder.
        studies: the studies folder (tiles; a class-folder tree gives training labels).
        conf: configuration, see the module docstring.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str], **kwargs: Any) -> None:
        self.bundle = conf.get("bundle", os.path.join(app_dir, "model", "histodiff_tile_classifier"))
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
                decoder=self.conf.get("decoder"), num_inference_steps=int(self.conf.get("num_inference_steps", 50)),
                guidance_scale=float(self.conf.get("guidance_scale", 3.0)), **ckpts)
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        if not os.path.isdir(self.bundle):
            return {}
        return {"tile_classifier": TileClassifierTrain(self.bundle, self.conf)}

