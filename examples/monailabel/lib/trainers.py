"""Train task: fine-tune the exported tile classifier bundle on labels collected in MONAI Label."""

from __future__ import annotations

import json
import os
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleTrainTask

__all__ = ["TileClassifierTrain"]


class TileClassifierTrain(BundleTrainTask):
    """Fine-tune the bundle's classifier with its own ``configs/train.json`` (single GPU/CPU) or
    ``configs/multi_gpu_train.json`` (several GPUs, through MONAI Label's torchrun).

    A datastore item's class is the name of the image's parent folder when that is one of the bundle's classes
    (studies laid out as a class-folder tree), otherwise the content of its label file: a class name, a class index,
    or JSON ``{"label": name or index}``.

    Args:
        path: the bundle folder.
        conf: the app's configuration.
    """

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, conf, load_strict=True, **kwargs)
        with open(os.path.join(path, "configs", "metadata.json")) as f:
            channel_def = json.load(f)["network_data_format"]["outputs"]["pred"]["channel_def"]
        self.classes = [channel_def[str(i)] for i in range(len(channel_def))]

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

    def _fetch_datalist(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, Any]]:
        return [{"image": d["image"], "label": self.class_index(d["image"], d.get("label"))}
                for d in datastore.datalist() if d]
