"""Export what a pre-training site publishes as a MONAI model-zoo bundle that a new site runs from any folder.

The pre-training site has run ``pretrain_autoencoder`` and ``pretrain_diffusion`` into a run folder;
:func:`export_site_bundle` turns that folder into the adaptation kit::

    <output>/
      configs/metadata.json            model-zoo metadata (schema 20240725), versions, tile size, references
      configs/<stage>.json             one self-contained config per stage a new site runs: train_aux_classifier,
                                       finetune, train_latent_classifier, generate, select, train_downstream, evaluate
      configs/inference.json           the kit's inference under the model zoo's name: the generate stage's config
      configs/multi_gpu.json           merged after a stage config for torchrun
      configs/logging.conf
      models/autoencoder.pt            the pre-trained checkpoints (or large_files.yml with their URLs and sha256)
      models/diffusion.pt
      docs/README.md                   the commands, in order
      LICENSE

Each stage config is the stage's ``bundles/`` config merged over ``common.json`` (and ``small.json`` for checkpoints
of the CPU size), with the pre-trained checkpoints at ``$@bundle_root + '/models/...'`` and the tile size read from
the autoencoder checkpoint, so a site runs::

    python -m monai.bundle run --config_file <bundle>/configs/finetune.json --bundle_root <bundle> \\
        --dataset_dir <class folders> --output_dir <site runs>

with monai_histodiff installed (the configs build its engines), from any working directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["SITE_STAGES", "INFERENCE_STAGE", "MODEL_FILES", "site_stage_config", "site_inference_config",
           "site_metadata", "export_site_bundle"]

SITE_STAGES = ("train_aux_classifier", "finetune", "train_latent_classifier", "generate", "select",
               "train_downstream", "evaluate")
#: the stage a model-zoo user runs as the kit's ``configs/inference.json``: generation is what the kit infers
INFERENCE_STAGE = "generate"
MODEL_FILES = {"autoencoder_ckpt": "models/autoencoder.pt", "diffusion_ckpt": "models/diffusion.pt"}
# keys a stage reads from an earlier stage's files (its own config's expression wins over a size file's literal)
_FROM_PARENTS = ("image_size",)


def _run_line(stage: str, name: str | None = None) -> str:
    return (f"Run: python -m monai.bundle run --config_file <bundle>/configs/{name or stage}.json "
            "--bundle_root <bundle> --dataset_dir <class folders> --output_dir <site runs> [overrides]")


def site_stage_config(stage: str, small: bool) -> dict[str, Any]:
    """The self-contained config of ``stage`` in the site bundle.

    Args:
        stage: one of :data:`SITE_STAGES`.
        small: merge ``small.json`` (the CPU size) as the pre-trained checkpoints were made at it.
    """
    from monai_histodiff.bundle.configs import config_dir, merged_config

    if stage not in SITE_STAGES:
        raise ValueError(f"'{stage}' is not a stage a new site runs; site stages: {', '.join(SITE_STAGES)}")
    cfg = merged_config(stage, small)
    own = json.loads((config_dir() / f"{stage}.json").read_text(encoding="utf-8"))
    for key in _FROM_PARENTS:
        if key in own:
            cfg[key] = own[key]
    for key, rel in MODEL_FILES.items():
        cfg[key] = f"$@bundle_root + '/{rel}'"
    cfg["_doc"] = re.sub(r" Run: .*$", "", str(own.get("_doc", stage))) + " " + _run_line(stage)
    cfg.pop("_hparams_doc", None)
    return cfg


def site_inference_config(small: bool) -> dict[str, Any]:
    """``configs/inference.json``: the :data:`INFERENCE_STAGE` (``generate``) config of :func:`site_stage_config`
    under the name the model zoo runs by default; the same keys, workflow and overrides as ``configs/generate.json``,
    only its ``_doc`` names this file."""
    cfg = site_stage_config(INFERENCE_STAGE, small)
    doc = re.sub(r" Run: .*$", "", cfg["_doc"])
    cfg["_doc"] = (f"The kit's inference (model-zoo name): the {INFERENCE_STAGE} stage, identical to "
                   f"configs/{INFERENCE_STAGE}.json. {doc} {_run_line(INFERENCE_STAGE, 'inference')}")
    return cfg


def site_metadata(autoencoder_meta: Mapping[str, Any], image_size: int, version: str, name: str) -> dict[str, Any]:
    """``configs/metadata.json``: the package's ``bundles/metadata.json`` with this export's versions and tile size."""
    import monai
    import numpy
    import torch

    from monai_histodiff.bundle.configs import config_dir
    from monai_histodiff.bundle.export import package_version

    md = json.loads((config_dir() / "metadata.json").read_text(encoding="utf-8"))
    md.update({
        "version": version,
        "name": name,
        "changelog": {version: "adaptation kit exported from the pre-trained autoencoder and latent diffusion model "
                               f"({image_size} px tiles)"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
    })
    md["required_packages_version"] = {
        **md.get("required_packages_version", {}),
        "monai-histodiff": autoencoder_meta.get("versions", {}).get("monai_histodiff")
        or package_version("monai-histodiff", "0.1.0"),
    }
    for io in ("inputs", "outputs"):
        for spec in md["network_data_format"][io].values():
            spec["spatial_shape"] = [int(image_size), int(image_size)]
    return md


def _readme(name: str, image_size: int, small: bool, models: str) -> str:
    from monai_histodiff.bundle.export import install_note

    size_note = "the CPU size (bundles/small.json)" if small else "the paper's scale"
    run = "python -m monai.bundle run --config_file $BUNDLE/configs/{}.json --bundle_root $BUNDLE"
    site = "--dataset_dir $DATA --output_dir $RUNS"
    return f"""# {name}: HistoDiffusion adaptation kit

A MONAI bundle holding an autoencoder and an unconditional latent diffusion model pre-trained on unlabeled H&E tiles
of several sources ({image_size} px tiles, {size_note}), and the configs a new site runs to adapt them to its own
small labeled set, generate class-conditioned synthetic tiles, keep the trustworthy ones and train a tissue
classifier (Ye et al., MICCAI 2023). Research use only: not for clinical diagnosis.

## Install

{install_note()}. {models}

## Run, in order

`$BUNDLE` is this folder, `$DATA` a class-folder tree `<class name>/<tile>` of the site's labeled tiles, `$RUNS`
where the site's files go (default `$BUNDLE/runs`). Every value of a config can be changed on the command line
(`--max_epochs 5`, `--label_fraction 0.05`, `--device_name cuda`, `--amp True`). The tile size comes from
`models/autoencoder.pt`; the split (`$RUNS/split.json`) is drawn once by the first stage and read by the others.

```bash
{run.format("train_aux_classifier")} {site}
{run.format("finetune")} {site}
{run.format("train_latent_classifier")} {site}
{run.format("generate")} {site} --ratio 2.0
{run.format("select")} {site} --ratio 2.0
{run.format("train_downstream")} {site} --datalist_file $RUNS/select/augmented_datalist.json
{run.format("evaluate")} {site}
```

`configs/inference.json` is `configs/generate.json` under the model zoo's default name: generation is this kit's
inference (`--config_file $BUNDLE/configs/inference.json` runs the same stage with the same overrides).

Multi-GPU (stages that support it): `torchrun --nproc_per_node=N -m monai.bundle run --config_file
"['$BUNDLE/configs/<stage>.json','$BUNDLE/configs/multi_gpu.json']" --bundle_root $BUNDLE ...`.

Check the metadata: `python -m monai.bundle verify_metadata --meta_file $BUNDLE/configs/metadata.json`.

## License

Apache-2.0 (see `LICENSE`). The terms of the pre-training data also apply.
"""


def export_site_bundle(runs: str | os.PathLike, output: str | os.PathLike, name: str | None = None,
                       version: str = "0.1.0", small: bool | None = None, url_base: str | None = None,
                       overwrite: bool = False) -> Path:
    """Write the adaptation kit of the pre-trained checkpoints in ``runs`` to the folder ``output``.

    Args:
        runs: the pre-training run folder (``pretrain_autoencoder/autoencoder.pt``,
            ``pretrain_diffusion/diffusion.pt``).
        output: bundle folder to create.
        name: bundle name (metadata and README); the folder name when None.
        version: bundle version.
        small: merge the CPU size's network and training settings; None: when the autoencoder was pre-trained at the
            CPU size's tile size.
        url_base: where the checkpoints are published; then ``models/`` is left empty and ``large_files.yml`` lists
            their URLs and sha256 (``python -m monai_histodiff download-checkpoints --bundle_path <bundle>``
            fetches and checks them). None copies the checkpoints into ``models/``.
        overwrite: replace an existing non-empty ``output``.

    Returns:
        the bundle folder.
    """
    from monai_histodiff.bundle.configs import MULTI_GPU, config_dir
    from monai_histodiff.bundle.export import new_bundle_folder
    from monai_histodiff.engines.loading import trained_image_size
    from monai_histodiff.handlers.checkpoint import load_checkpoint, verify_parent
    from monai_histodiff.bundle.publish import PRETRAINED, write_large_files

    runs = Path(runs)
    ae_path, diff_path = (runs / rel for rel in PRETRAINED)
    for path in (ae_path, diff_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: export-bundle --pretrained_runs takes the run folder of "
                                    "pretrain_autoencoder and pretrain_diffusion")
    ae_meta = load_checkpoint(ae_path, stage="pretrain_autoencoder")["meta"]
    verify_parent(load_checkpoint(diff_path, stage="pretrain_diffusion"), "autoencoder", ae_path)  # a matched pair
    image_size = trained_image_size(ae_path)
    if small is None:
        small = image_size == json.loads((config_dir() / "small.json").read_text())["image_size"]

    out = new_bundle_folder(output, overwrite)
    name = name or out.name

    files: dict[str, Any] = {f"configs/{stage}.json": site_stage_config(stage, small) for stage in SITE_STAGES}
    files["configs/inference.json"] = site_inference_config(small)
    files["configs/multi_gpu.json"] = json.loads((config_dir() / MULTI_GPU).read_text(encoding="utf-8"))
    files["configs/multi_gpu.json"]["_doc"] = (
        "Merged after a stage config for torchrun: --config_file "
        "\"['<bundle>/configs/<stage>.json','<bundle>/configs/multi_gpu.json']\"")
    files["configs/metadata.json"] = site_metadata(ae_meta, image_size, version, name)
    for rel, content in files.items():
        (out / rel).write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")

    if url_base is None:
        for src, rel in zip((ae_path, diff_path), MODEL_FILES.values()):
            shutil.copy2(src, out / rel)
        models = "The pre-trained checkpoints are in `models/`."
    else:
        write_large_files(runs, url_base, out / "large_files.yml", targets=list(MODEL_FILES.values()))
        models = ("Fetch the pre-trained checkpoints into `models/` (each kept only when its sha256 matches): "
                  "`python -m monai_histodiff download-checkpoints --bundle_path $BUNDLE`.")
    (out / "docs" / "README.md").write_text(_readme(name, image_size, small, models), encoding="utf-8")
    return out
