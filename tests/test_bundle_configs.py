"""The stage configs as a user's command merges them: common.json first, the stage, then size and multi-GPU files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from monai_histodiff.bundle.configs import config_dir, config_files, merged_config, stage_names
from monai_histodiff.apps.pipeline import bundle_command

REPO = Path(__file__).resolve().parents[1]
STAGES = ["pretrain_autoencoder", "pretrain_diffusion", "train_aux_classifier", "finetune", "train_latent_classifier",
          "finetune_conditional", "generate", "select", "train_downstream", "evaluate", "train_stylegan2",
          "generate_stylegan2"]


def test_config_dir_is_the_checkout_and_lists_every_stage():
    assert config_dir() == REPO / "bundles"  # an editable install reads the checkout's configs
    assert stage_names() == sorted(STAGES)


def test_config_files_order_and_extra_files():
    files = config_files("generate", small=True, extra=["bundles/multi_gpu.json"])
    assert [Path(f).name for f in files] == ["common.json", "generate.json", "small.json", "multi_gpu.json"]
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in files)
    assert config_files("generate", extra=["/elsewhere/dump.json"])[-1] == "/elsewhere/dump.json"
    with pytest.raises(FileNotFoundError, match="no stage config 'genrate'.*generate"):
        config_files("genrate")
    with pytest.raises(FileNotFoundError, match="no stage config 'small'"):
        config_files("small")


def test_bundle_command_uses_the_installed_list_form():
    cmd = bundle_command("select", small=True, ratio=0.5)
    files = json.loads(cmd[cmd.index("--config_file") + 1].replace("'", '"'))
    assert files == config_files("select", small=True) and cmd[-2:] == ["--ratio", "0.5"]
    assert cmd[1:4] == ["-m", "monai.bundle", "run"]


def test_multi_gpu_is_an_override_merged_after_the_stage_config():
    """Model-zoo style: multi_gpu.json only overrides (distributed: true) and comes after the stage config and the
    size file; the helpers build that order and torchrun's command."""
    multi = json.loads((config_dir() / "multi_gpu.json").read_text())
    assert {k for k in multi if not k.startswith("_")} == {"distributed"} and multi["distributed"] is True
    assert "['bundles/common.json','bundles/<stage>.json','bundles/multi_gpu.json']" in multi["_doc"]
    files = config_files("generate", small=True, multi_gpu=True, extra=["bundles/multi_gpu.json", "/x/dump.json"])
    assert [Path(f).name for f in files] == ["common.json", "generate.json", "small.json", "multi_gpu.json",
                                             "dump.json"]
    assert merged_config("generate", multi_gpu=True)["distributed"] is True
    assert merged_config("generate")["distributed"] is False
    cmd = bundle_command("train_latent_classifier", small=True, nproc_per_node=2, max_epochs=1)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "-m"] and cmd[5:7] == ["monai.bundle",
                                                                                                     "run"]
    files = json.loads(cmd[cmd.index("--config_file") + 1].replace("'", '"'))
    assert files == config_files("train_latent_classifier", small=True, multi_gpu=True)
    assert Path(files[-1]).name == "multi_gpu.json"


def _resolved_ids(config: dict) -> set[str]:
    """Every ``@id`` the workflow reaches from ``initialize``, ``run`` and ``finalize``; fails on an undefined one."""
    todo = [config.get(k, []) for k in ("initialize", "run", "finalize")]
    seen: set[str] = set()
    while todo:
        for ref in set(re.findall(r"@([A-Za-z_][\w#]*)", json.dumps(todo.pop()))) - seen:
            seen.add(ref)
            node = config
            for part in ref.split("#"):
                assert isinstance(node, (dict, list)), f"@{ref}: '{part}' of a value that is not a section"
                node = node[int(part)] if isinstance(node, list) else node.get(part, KeyError)
                assert node is not KeyError, f"@{ref} is not defined"
            todo.append(node)
    return seen


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_refers_to_another_file_and_every_reference_resolves(stage):
    """Stages name no file by path (no '%bundles/common.json#' macro); after the merge every '@id' the workflow
    reaches is defined, at the paper's scale and at the CPU size."""
    text = (config_dir() / f"{stage}.json").read_text()
    assert "%" + "bundles/" not in text
    for small in (False, True):
        reached = _resolved_ids(merged_config(stage, small=small))
        assert {"device", "output_dir"} <= reached, sorted(reached)


TRAINING_STAGES = ["pretrain_autoencoder", "pretrain_diffusion", "train_aux_classifier", "finetune",
                   "train_latent_classifier", "finetune_conditional", "train_stylegan2", "train_downstream"]


def test_every_stage_that_trains_defines_network_def():
    """The model-zoo convention: a stage that trains a network defines it as ``network_def`` (built from arguments,
    from a shared definition of common.json such as ``@autoencoder_def`` / ``@diffusion_def``, or rebuilt from a
    pre-trained checkpoint) and trains ``network``, that definition on the device (DDP when distributed)."""
    trains = [s for s in STAGES if "trainer" in merged_config(s).get("train", {})]
    assert sorted(trains) == sorted(TRAINING_STAGES)
    for stage in trains:
        own = json.loads((config_dir() / f"{stage}.json").read_text())
        assert "network_def" in own and "@network_def" in own["network"], stage
        assert not [k for k in own if k.endswith("_def") and k not in ("network_def", "discriminator_def")], stage
    shared = merged_config("pretrain_autoencoder")
    assert shared["network_def"] == "@autoencoder_def" and merged_config("pretrain_diffusion")["network_def"] == (
        "@diffusion_def")


def test_small_size_replaces_the_paper_scale():
    paper, small = merged_config("pretrain_diffusion"), merged_config("pretrain_diffusion", small=True)
    assert paper["image_size"] == 256 and small["image_size"] == 64
    assert paper["diffusion_args"]["channels"] == [192, 384, 384, 768, 768]
    assert small["hparams"]["pretrain_diffusion"]["lr"] == 1e-3 and paper["hparams"]["pretrain_diffusion"]["lr"] == 5e-5


@pytest.mark.parametrize("stage", ["train_aux_classifier", "finetune", "train_latent_classifier", "generate"])
def test_adaptation_stages_read_the_tile_size_from_the_autoencoder(stage):
    assert merged_config(stage)["image_size"] == "$monai_histodiff.engines.trained_image_size(@autoencoder_ckpt)"


def _data_formats(md: dict) -> dict[str, dict]:
    return {k: v for k, v in md.items() if k.endswith("_data_format")}


def test_stage_metadata_passes_verify_metadata_and_describes_every_trained_network(tmp_path):
    """bundles/metadata.json passes MONAI's verify_metadata with the shipped schema (offline), names itself, requires
    this package at its version, and has one '<stage>_data_format' per network a stage trains (network_data_format:
    the autoencoder), with the shapes of common.json (the paper's scale)."""
    from monai.bundle import verify_metadata

    from monai_histodiff import __version__
    from monai_histodiff.bundle.export import META_SCHEMA_FILE

    meta = config_dir() / "metadata.json"
    verify_metadata(meta_file=str(meta), filepath=str(META_SCHEMA_FILE))
    md = json.loads(meta.read_text())
    assert md["name"] and md["required_packages_version"]["monai-histodiff"] == __version__
    assert re.search(r'\bversion="([^"]+)"', (REPO / "setup.py").read_text()).group(1) == __version__

    def own(stage: str) -> dict:
        return json.loads((config_dir() / f"{stage}.json").read_text())

    trained = [s for s in stage_names() if "network_def" in own(s) and s != "pretrain_autoencoder"]
    assert sorted(_data_formats(md)) == sorted(["network_data_format", *(f"{s}_data_format" for s in trained)])
    common = json.loads((config_dir() / "common.json").read_text())
    size = common["image_size"]
    latent = size // 2 ** (len(common["autoencoder_args"]["channels"]) - 1)
    for key, fmt in _data_formats(md).items():
        for spec in [*fmt["inputs"].values(), *fmt["outputs"].values()]:
            if spec["type"] == "image":
                assert spec["spatial_shape"] == [size, size] and spec["value_range"] == [-1, 1], key
            if spec["type"] == "latent":
                assert spec["spatial_shape"] == [latent, latent], key
                assert spec["num_channels"] == common["latent_channels"], key
            if spec["type"] == "timestep":
                assert spec["value_range"] == [0, common["num_train_timesteps"] - 1], key
    assert md["train_stylegan2_data_format"]["inputs"]["z"]["num_channels"] == common["hparams"]["train_stylegan2"][
        "z_dim"]

    del md["train_latent_classifier_data_format"]["inputs"]["timesteps"]["dtype"]  # a stage's format is checked too
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(md))
    with pytest.raises(ValueError, match="'dtype' is a required property"):
        verify_metadata(meta_file=str(bad), filepath=str(META_SCHEMA_FILE))


def test_site_kit_metadata_from_the_stage_metadata_passes_verify_metadata(tmp_path):
    """The adaptation kit's configs/metadata.json (bundles/metadata.json with the export's name, versions and tile
    size) passes as well."""
    from monai.bundle import verify_metadata

    from monai_histodiff import __version__
    from monai_histodiff.bundle.export import META_SCHEMA_FILE
    from monai_histodiff.bundle.site_kit import site_metadata

    md = site_metadata({"versions": {"monai_histodiff": __version__}}, 64, "1.2.0", "lung_kit")
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps(md))
    verify_metadata(meta_file=str(meta), filepath=str(META_SCHEMA_FILE))
    assert md["name"] == "lung_kit" and md["required_packages_version"]["monai-histodiff"] == __version__
    assert md["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 64]
