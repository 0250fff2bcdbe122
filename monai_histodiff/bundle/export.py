"""Export the trained downstream tissue classifier as a self-contained MONAI model-zoo bundle.

The downstream stage (``train_downstream``) writes a monai_histodiff checkpoint: ``state["classifier"]`` is a
:class:`~monai_histodiff.networks.TileClassifier` state dict, ``meta["config"]["network_args"]`` rebuilds it and
``meta["classes"]`` names its outputs. :func:`export_bundle` turns it into a bundle that other sites (MONAI Label, the
model zoo, ``python -m monai.bundle run``) can use without this package where possible::

    <output>/
      configs/metadata.json         network_data_format, versions, classes, references
      configs/inference.json        tiles (PNG/JPEG/TIFF files) -> predictions.csv
      configs/train.json            fine-tune on a site's labels (class-folder tree or JSON datalist)
      configs/multi_gpu_train.json  the same, complete, for torchrun (DDP, DistributedSampler, rank-0 saving)
      configs/logging.conf
      models/model.pt               plain state dict of ``network_def``
      docs/README.md
      LICENSE

For the ``resnet`` backbone ``network_def`` is MONAI's own ``ResNet`` (the ``backbone.`` prefix is stripped from the
weights), so the bundle needs MONAI only. MONAI's ``ViT`` returns ``(logits, hidden_states)``, which neither the
inferers nor ``verify_net_in_out`` accept, so for the ``vit`` backbone ``network_def`` is
``monai_histodiff.networks.TileClassifier`` and monai_histodiff must be installed where the bundle runs.

The preprocessing mirrors :func:`monai_histodiff.data.transforms.tile_transforms` with MONAI classes only: PIL
reader without index reversal, any 8-bit mode (grey, palette, RGBA) converted to RGB with transparency composited on
white, area resize to ``image_size``, intensity [0, 255] -> [-1, 1]. 16-bit tiles are not supported by the bundle
(convert them to 8-bit first, or use monai_histodiff's own transforms).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "META_SCHEMA_URL",
    "META_SCHEMA_FILE",
    "HISTODIFFUSION_REFERENCE",
    "install_note",
    "package_version",
    "new_bundle_folder",
    "export_bundle",
    "bundle_network_def",
    "bundle_state_dict",
    "bundle_metadata",
    "inference_config",
    "train_config",
    "multi_gpu_train_config",
]

META_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
META_SCHEMA_FILE = Path(__file__).resolve().parent / "resources" / "meta_schema.json"
def install_note() -> str:
    """How a machine gets monai_histodiff (it is not on PyPI), for the READMEs of exported bundles; the wheel route
    is what ``tests/test_packaging.py`` builds, installs and runs."""
    from monai_histodiff import __version__

    wheel = f"monai_histodiff-{__version__}-py3-none-any.whl"
    return ("monai_histodiff is not on PyPI. In a checkout of its repository, `pip install .` installs it; or build a "
            f"wheel there once with `pip wheel --no-deps --no-build-isolation -w dist .` (`dist/{wheel}`), copy it to "
            f"the machine that runs this bundle and `pip install {wheel}` (install the torch build of that machine "
            "first; pip brings MONAI, pytorch-ignite and the other dependencies)")


HISTODIFFUSION_REFERENCE = (
    "Ye, J., Ni, H., Jin, P., Huang, S. X., Xue, Y.: Synthetic Augmentation with Large-Scale Unconditional "
    "Pre-training. MICCAI 2023, LNCS 14221, pp. 754-764. https://doi.org/10.1007/978-3-031-43895-0_71"
)

_LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

_LICENSE = """Copyright (c) monai_histodiff developers

Licensed under the Apache License, Version 2.0 (the "License");
you may not use the files of this bundle except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.

The weights in models/ were trained on the data named in docs/README.md; the terms of that data apply as well.
"""

# converter of the PIL reader: any 8-bit mode -> RGB, transparency composited on white (as pil_to_rgb does)
_TO_RGB = ("$lambda im: Image.alpha_composite(Image.new('RGBA', im.size, (255, 255, 255, 255)), "
           "im.convert('RGBA')).convert('RGB')")


def bundle_network_def(network_args: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle's ``network_def`` for the ``TileClassifier`` arguments of a downstream checkpoint.

    ``resnet``: MONAI ``ResNet`` with the arguments TileClassifier gives it; ``vit``: ``TileClassifier`` itself.
    """
    from monai_histodiff.networks.tile_classifier import SMALL_RESNET

    args = dict(network_args)
    backbone = args.get("backbone", "vit")
    if backbone == "resnet":
        cfg = {**SMALL_RESNET, **dict(args.get("backbone_args") or {})}
        return {"_target_": "monai.networks.nets.ResNet", "spatial_dims": 2,
                "n_input_channels": int(args.get("in_channels", 3)), "num_classes": int(args["num_classes"]), **cfg}
    if backbone == "vit":
        return {"_target_": "monai_histodiff.networks.TileClassifier", **args}
    raise ValueError(f"unknown TileClassifier backbone {backbone!r}")


def bundle_state_dict(state: Mapping[str, torch.Tensor], network_args: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The TileClassifier state dict converted for :func:`bundle_network_def` (``backbone.`` stripped for resnet)."""
    if network_args.get("backbone", "vit") != "resnet":
        return {k: v.detach().cpu().clone() for k, v in state.items()}
    prefix = "backbone."
    bad = [k for k in state if not k.startswith(prefix)]
    if bad:
        raise ValueError(f"unexpected keys in a resnet TileClassifier state dict: {bad[:5]}")
    return {k[len(prefix):]: v.detach().cpu().clone() for k, v in state.items()}


def _preprocessing(image_size: int) -> list[dict[str, Any]]:
    return [
        {"_target_": "LoadImaged", "keys": "image", "reader": "PILReader", "reverse_indexing": False,
         "converter": _TO_RGB, "image_only": True, "ensure_channel_first": True},
        {"_target_": "Resized", "keys": "image", "spatial_size": [image_size, image_size], "mode": "area"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0.0, "a_max": 255.0, "b_min": -1.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]


def bundle_metadata(meta: Mapping[str, Any], classes: Sequence[str], image_size: int, in_channels: int = 3,
                    version: str = "0.1.0", name: str = "histodiff_tile_classifier") -> dict[str, Any]:
    """``configs/metadata.json`` of the bundle (MONAI model-zoo conventions, meta schema 20240725)."""
    import monai
    import numpy

    versions = dict(meta.get("versions", {}))
    backbone = meta.get("config", {}).get("network_args", {}).get("backbone", "vit")
    required = {"pytorch-ignite": package_version("pytorch-ignite", "0.5.5"),
                "pillow": package_version("pillow", "10.0")}
    if backbone != "resnet":
        required["monai-histodiff"] = versions.get("monai_histodiff", package_version("monai-histodiff", "0.1.0"))
    class_list = ", ".join(f"{i}: {c}" for i, c in enumerate(classes))
    return {
        "schema": META_SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported from the monai_histodiff downstream checkpoint ({len(classes)} classes)"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": required,
        "name": name,
        "task": "Tissue-class classification of H&E histology tiles",
        "description": (
            f"A {backbone} tile classifier ({len(classes)} classes) trained with HistoDiffusion synthetic "
            "augmentation: "
            "real labeled tiles plus class-conditioned tiles sampled from a latent diffusion model pre-trained on "
            "unlabeled tiles of several sources and selected by feature centroids."
        ),
        "authors": "monai_histodiff developers",
        "copyright": "Copyright (c) monai_histodiff developers",
        "data_source": meta.get("data_source", "labeled H&E tiles of the training site (see docs/README.md)"),
        "data_type": "png/jpeg/tiff RGB tiles",
        "image_classes": "RGB H&E tile, intensity scaled to [-1, 1]",
        "label_classes": class_list,
        "pred_classes": class_list,
        "eval_metrics": dict(meta.get("metrics", {})),
        "intended_use": "Research only: not for clinical diagnosis. Validate on your own site's data before use.",
        "references": [HISTODIFFUSION_REFERENCE],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "RGB",
                    "modality": "histology (H&E)",
                    "num_channels": int(in_channels),
                    "spatial_shape": [int(image_size), int(image_size)],
                    "dtype": "float32",
                    "value_range": [-1, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "R", "1": "G", "2": "B"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(classes),
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [],
                    "is_onehot": True,
                    "channel_def": {str(i): c for i, c in enumerate(classes)},
                }
            },
        },
    }


def package_version(dist: str, default: str) -> str:
    """The installed version of the distribution ``dist``, ``default`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return default


def _common(network_def: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    return {
        "imports": ["$import glob", "$import os", "$from PIL import Image", "$import torch"],
        "bundle_root": ".",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "image_size": image_size,
        "network_def": dict(network_def),
    }


def inference_config(network_def: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """``configs/inference.json``: classify tile files into ``output_dir/predictions.csv`` (class index per file)."""
    return {
        **_common(network_def, image_size),
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/samples'",
        "extensions": [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"],
        "datalist": "$sorted(f for f in glob.glob(os.path.join(@dataset_dir, '**', '*'), recursive=True) "
                    "if os.path.splitext(f)[1].lower() in @extensions)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(image_size)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 16, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ]},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "@ckpt_path",
                             "load_dict": {"model": "@network"}, "map_location": "@device"},
        "handlers": [
            "@checkpointloader",
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "ClassificationSaver", "output_dir": "@output_dir", "filename": "predictions.csv",
             "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
             "output_transform": "$monai.handlers.from_engine(['pred'])"},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def _train_config(network_def: Mapping[str, Any], image_size: int, classes: Sequence[str],
                  distributed: bool) -> dict[str, Any]:
    augment = [
        {"_target_": "RandFlipd", "keys": "image", "prob": 0.5, "spatial_axis": 0},
        {"_target_": "RandFlipd", "keys": "image", "prob": 0.5, "spatial_axis": 1},
        {"_target_": "RandRotate90d", "keys": "image", "prob": 0.5, "max_k": 3},
    ]
    label = {"_target_": "EnsureTyped", "keys": "label", "dtype": "$torch.long", "track_meta": False}
    rank0 = " if dist.get_rank() == 0 else []" if distributed else ""
    cfg: dict[str, Any] = {
        **_common(network_def, image_size),
        "output_dir": "$@bundle_root + '/train_output'",
        "classes": list(classes),
        "dataset_dir": "/path/to/class_folder_tree",
        "datalist_file": "",
        "val_every": 5,
        "extensions": [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"],
        "folder_datalist": "$[{'image': f, 'label': i} for i, c in enumerate(@classes) "
                           "for f in sorted(glob.glob(os.path.join(@dataset_dir, c, '*'))) "
                           "if os.path.splitext(f)[1].lower() in @extensions]",
        "train_datalist": "$monai.data.load_decathlon_datalist(@datalist_file, True, 'training') if @datalist_file "
                          "else [d for j, d in enumerate(@folder_datalist) if j % @val_every != 0]",
        "val_datalist": "$monai.data.load_decathlon_datalist(@datalist_file, True, 'validation') if @datalist_file "
                        "else [d for j, d in enumerate(@folder_datalist) if j % @val_every == 0]",
        "max_epochs": 10,
        "batch_size": 16,
        "learning_rate": 1e-4,
        "num_workers": 0,
        "loss": {"_target_": "torch.nn.CrossEntropyLoss"},
        "optimizer": {"_target_": "torch.optim.AdamW", "params": "$@network.parameters()", "lr": "@learning_rate"},
        "train": {
            "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(image_size) + augment + [label]},
            "dataset": {"_target_": "Dataset", "data": "@train_datalist", "transform": "@train#preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": "@batch_size",
                           "shuffle": not distributed, "num_workers": "@num_workers"},
            "inferer": {"_target_": "SimpleInferer"},
            # a plain list of components, as MONAI Label's BundleTrainTask expects: set
            # --train#handlers#0#_disabled_ true to train from scratch instead of fine-tuning models/model.pt
            "handlers": [
                {"_target_": "CheckpointLoader", "_disabled_": False, "load_path": "@ckpt_path",
                 "load_dict": {"model": "@network"}, "map_location": "@device"},
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": 1},
            ],
            "trainer": {"_target_": "SupervisedTrainer", "device": "@device", "max_epochs": "@max_epochs",
                        "train_data_loader": "@train#dataloader", "network": "@network",
                        "optimizer": "@optimizer", "loss_function": "@loss", "inferer": "@train#inferer",
                        "train_handlers": "$@train#handlers + @train#rank0_handlers", "amp": False},
            "rank0_handlers": "$[@train#stats]" + rank0,
            "stats": {"_target_": "StatsHandler", "tag_name": "train_loss",
                      "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(image_size) + [label]},
            "dataset": {"_target_": "Dataset", "data": "@val_datalist", "transform": "@validate#preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": "@batch_size",
                           "shuffle": False, "num_workers": "@num_workers"},
            "inferer": {"_target_": "SimpleInferer"},
            "key_metric": {"val_accuracy": {
                "_target_": "ignite.metrics.Accuracy",
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'], first=False)"}},
            "stats": {"_target_": "StatsHandler", "iteration_log": False},
            "saver": {"_target_": "CheckpointSaver", "save_dir": "$@bundle_root + '/models'",
                      "save_dict": {"model": "@network"}, "save_key_metric": True, "key_metric_filename": "model.pt"},
            "handlers": "$[@validate#stats, @validate#saver]" + rank0,
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "key_val_metric": "@validate#key_metric",
                          "val_handlers": "@validate#handlers", "amp": False},
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@train#trainer.run()"],
    }
    cfg["imports"] = cfg["imports"] + ["$import ignite"]
    if not distributed:
        cfg["device"] = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
        cfg["network"] = "$@network_def.to(@device)"
        return cfg
    cfg["imports"] = cfg["imports"] + ["$import torch.distributed as dist"]
    cfg["device"] = "$torch.device('cuda:' + os.environ.get('LOCAL_RANK', '0') if torch.cuda.is_available() else 'cpu')"
    cfg["network"] = ("$torch.nn.parallel.DistributedDataParallel(@network_def.to(@device), "
                      "device_ids=[@device] if @device.type == 'cuda' else None)")
    cfg["train"]["sampler"] = {"_target_": "DistributedSampler", "dataset": "@train#dataset", "even_divisible": True,
                               "shuffle": True}
    cfg["train"]["dataloader"]["sampler"] = "@train#sampler"
    cfg["validate"]["sampler"] = {"_target_": "DistributedSampler", "dataset": "@validate#dataset",
                                  "even_divisible": False, "shuffle": False}
    cfg["validate"]["dataloader"]["sampler"] = "@validate#sampler"
    cfg["initialize"] = [
        "$dist.is_initialized() or dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')",
        "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
        "$monai.utils.set_determinism(seed=0)",
    ]
    cfg["run"] = ["$@train#trainer.add_event_handler(ignite.engine.Events.EPOCH_STARTED, "
                  "lambda engine: @train#sampler.set_epoch(engine.state.epoch))", "$@train#trainer.run()"]
    cfg["finalize"] = ["$dist.is_initialized() and dist.destroy_process_group()"]
    return cfg


def train_config(network_def: Mapping[str, Any], image_size: int, classes: Sequence[str]) -> dict[str, Any]:
    """``configs/train.json``: fine-tune the classifier (starting from ``models/model.pt``) on a site's labels.

    Laid out as the model-zoo training configs (``train#...`` and ``validate#...`` sections), which MONAI Label's
    ``BundleTrainTask`` overrides (``train#dataset#data``, ``validate#dataset#data``, ``train#handlers``, ...). The
    data is a class-folder tree ``dataset_dir/<class>/<tile>`` (folders named as ``classes``; every ``val_every``-th
    tile held out for validation) or, when ``datalist_file`` is set, a JSON datalist with ``training`` and
    ``validation`` lists of ``{"image": path, "label": class index}``. The best model by validation accuracy is written
    to ``models/model.pt``.
    """
    return _train_config(network_def, image_size, classes, distributed=False)


def multi_gpu_train_config(network_def: Mapping[str, Any], image_size: int, classes: Sequence[str]) -> dict[str, Any]:
    """``configs/multi_gpu_train.json``: :func:`train_config` for ``torchrun`` as one complete file.

    DDP around the network, ``DistributedSampler`` for training and validation (``set_epoch`` every epoch), process
    group ``nccl`` on GPU and ``gloo`` on CPU, checkpoints and logs written by rank 0 only.
    """
    return _train_config(network_def, image_size, classes, distributed=True)


def _readme(name: str, meta: Mapping[str, Any], md: Mapping[str, Any], classes: Sequence[str], image_size: int,
            backbone: str) -> str:
    cfg = meta.get("config", {})
    class_rows = "\n".join(f"| {i} | {c} |" for i, c in enumerate(classes))
    needs = ("MONAI, PyTorch, pytorch-ignite and Pillow only (the network is MONAI's `ResNet`)." if backbone == "resnet"
             else "MONAI, PyTorch, pytorch-ignite, Pillow **and monai_histodiff**: the network is "
                  "`monai_histodiff.networks.TileClassifier` wrapping MONAI's `ViT`, whose `(logits, hidden_states)` "
                  f"output MONAI's inferers cannot use directly. {install_note()}.")
    training = json.dumps({k: v for k, v in cfg.items() if k != "network_args"}, indent=2, default=str)
    return f"""# {name}

A tissue-class classifier of H&E histology tiles, exported from a monai_histodiff downstream checkpoint. It was
trained with **HistoDiffusion** synthetic augmentation (Ye et al., MICCAI 2023): the small labeled set was
augmented with class-conditioned tiles sampled from a
latent diffusion model pre-trained on unlabeled tiles of several sources, guided by a time-dependent latent classifier
and kept by feature-centroid selection.

**Intended use:** {md['intended_use']}

## Model

- network: {backbone} (`configs/inference.json#network_def`), weights `models/model.pt` (plain state dict)
- requires: {needs}
- exported from: `{meta.get('path', 'downstream checkpoint')}` (stage `{meta.get('stage', 'train_downstream')}`,
  monai_histodiff {meta.get('versions', {}).get('monai_histodiff', '?')})

## Input

One RGB tile file (PNG, JPEG, TIFF, BMP; 8-bit; grey, palette and RGBA are converted to RGB, transparency composited
on white; 16-bit tiles are not supported: convert them to 8-bit first). Preprocessing: read with PIL (rows first),
resize to {image_size} x {image_size} (area), intensity [0, 255] -> [-1, 1]. The network sees `[B, 3, {image_size},
{image_size}]` float32.

## Output

`pred`: `[B, {len(classes)}]` logits; the inference config applies softmax and argmax and writes the class index of
each file to `eval/predictions.csv` (`file,class_index`).

| index | class |
| --- | --- |
{class_rows}

## Training

Trained by monai_histodiff's `train_downstream` stage; its settings:

```json
{training}
```

Evaluation metrics recorded in the checkpoint: `{json.dumps(md.get('eval_metrics', {}))}`.

## Run

Inference on a folder of tiles (any depth) or a list of files:

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . --dataset_dir /path/to/tiles
python -m monai.bundle run --config_file configs/inference.json --bundle_root . --datalist "['a.png', 'b.png']"
```

Fine-tune on a site's labels (class-folder tree `<dataset_dir>/<class name>/<tile>` with the class names above, every
5th tile held out for validation; or a JSON datalist with `training`/`validation` lists of
`{{"image": path, "label": index}}`); the best model by validation accuracy replaces `models/model.pt`:

```bash
python -m monai.bundle run --config_file configs/train.json --bundle_root . --dataset_dir /path/to/tree
python -m monai.bundle run --config_file configs/train.json --bundle_root . --datalist_file datalist.json
torchrun --nproc_per_node=2 -m monai.bundle run --config_file configs/multi_gpu_train.json --bundle_root . \\
    --dataset_dir /path/to/tree
```

Add `--train#handlers#0#_disabled_ true` to train from scratch instead of fine-tuning `models/model.pt`.
Verify and export:

```bash
python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath meta_schema.json
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.json
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json
```

## References

{chr(10).join('- ' + r for r in md['references'])}

## License

Apache-2.0 (see `LICENSE`). The terms of the training data also apply.
"""


def new_bundle_folder(output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Create the model-zoo layout every exported bundle shares: ``configs/`` (with ``logging.conf``), ``models/``,
    ``docs/`` and ``LICENSE``.

    Raises:
        FileExistsError: ``output`` exists and is not empty, unless ``overwrite`` (then it is replaced).
    """
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (use overwrite=True / --overwrite)")
        shutil.rmtree(out)
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "configs" / "logging.conf").write_text(_LOGGING_CONF, encoding="utf-8")
    (out / "LICENSE").write_text(_LICENSE, encoding="utf-8")
    return out


def export_bundle(checkpoint: str | os.PathLike, output: str | os.PathLike, name: str | None = None,
                  version: str = "0.1.0", overwrite: bool = False) -> Path:
    """Write a MONAI bundle of the downstream classifier in ``checkpoint`` to the folder ``output``.

    Args:
        checkpoint: a ``train_downstream`` checkpoint (``state["classifier"]``, ``meta["config"]["network_args"]``,
            ``meta["classes"]``).
        output: bundle folder to create.
        name: bundle name (metadata ``name`` and README title); the folder name when None.
        version: bundle version.
        overwrite: replace an existing non-empty ``output``.

    Returns:
        the bundle folder.
    """
    from monai_histodiff.handlers.checkpoint import load_checkpoint
    from monai_histodiff.networks import TileClassifier

    ckpt = load_checkpoint(checkpoint, stage="train_downstream")
    meta = ckpt["meta"]
    config = meta.get("config", {})
    network_args = dict(config.get("network_args") or {})
    if not network_args:
        raise ValueError(f"{checkpoint} has no meta['config']['network_args'] to rebuild the classifier")
    if "classifier" not in ckpt["state"]:
        raise KeyError(f"{checkpoint} has no 'classifier' state (has {sorted(ckpt['state'])})")
    classes = [str(c) for c in meta.get("classes") or []]
    num_classes = int(network_args.get("num_classes", len(classes)))
    if not classes:
        classes = [f"class_{i}" for i in range(num_classes)]
    if len(classes) != num_classes:
        raise ValueError(f"{checkpoint}: {len(classes)} class names for a {num_classes}-class classifier")
    image_size = int(network_args.get("image_size", config.get("image_size", 224)))
    network_args.setdefault("image_size", image_size)
    network_args.setdefault("num_classes", num_classes)
    backbone = network_args.get("backbone", "vit")

    TileClassifier(**network_args).load_state_dict(ckpt["state"]["classifier"])  # fail early on a bad checkpoint
    out = new_bundle_folder(output, overwrite)
    name = name or out.name

    network_def = bundle_network_def(network_args)
    state = bundle_state_dict(ckpt["state"]["classifier"], network_args)
    from monai.bundle import ConfigParser

    net = ConfigParser({"network_def": network_def}).get_parsed_content("network_def")
    net.load_state_dict(state)  # the converted weights fit the bundle's network
    torch.save(state, out / "models" / "model.pt")

    md = bundle_metadata(meta, classes, image_size, int(network_args.get("in_channels", 3)), version, name)
    files = {
        "configs/metadata.json": md,
        "configs/inference.json": inference_config(network_def, image_size),
        "configs/train.json": train_config(network_def, image_size, classes),
        "configs/multi_gpu_train.json": multi_gpu_train_config(network_def, image_size, classes),
    }
    for rel, content in files.items():
        (out / rel).write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")
    (out / "docs" / "README.md").write_text(_readme(name, meta, md, classes, image_size, backbone), encoding="utf-8")
    return out
