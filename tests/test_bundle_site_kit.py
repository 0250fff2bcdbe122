"""The adaptation kit's layout and configs, exported from a small pre-trained pair written here (no training): every
stage a site runs, and configs/inference.json (the generate stage under the model zoo's default name), which MONAI's
ConfigParser reads and resolves without running anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from monai.networks.nets import AutoencoderKL

from monai_histodiff.bundle import InvalidSettingError, config_files
from monai_histodiff.bundle.site_kit import INFERENCE_STAGE, SITE_STAGES, export_site_bundle
from monai_histodiff.errors import root_cause
from monai_histodiff.handlers.checkpoint import checkpoint_meta, save_checkpoint
from tests.test_bundle_configs import _resolved_ids


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kit exported from an untrained autoencoder at the CPU size and a diffusion checkpoint that names it as its
    parent (the export reads metadata, sizes and hashes only)."""
    runs = tmp_path_factory.mktemp("pretrained")
    parser = ConfigParser()
    parser.read_config(config_files("pretrain_autoencoder", small=True))
    ae_args, size = parser.get_parsed_content("autoencoder_args"), parser.get_parsed_content("image_size")
    ae = save_checkpoint(runs / "pretrain_autoencoder" / "autoencoder.pt", {"autoencoder": AutoencoderKL(**ae_args)},
                         checkpoint_meta("pretrain_autoencoder", config={"autoencoder_args": ae_args,
                                                                         "image_size": size}))
    save_checkpoint(runs / "pretrain_diffusion" / "diffusion.pt", {"diffusion": {}},
                    checkpoint_meta("pretrain_diffusion", config={}, parents={"autoencoder": ae}))
    return export_site_bundle(runs, tmp_path_factory.mktemp("export") / "kit")


def test_kit_has_every_site_stage_and_inference_json(kit: Path) -> None:
    configs = sorted(p.name for p in (kit / "configs").iterdir())
    assert configs == sorted([f"{s}.json" for s in SITE_STAGES]
                             + ["inference.json", "metadata.json", "multi_gpu.json", "logging.conf"])
    inference = json.loads((kit / "configs" / "inference.json").read_text())
    generate = json.loads((kit / "configs" / f"{INFERENCE_STAGE}.json").read_text())
    assert INFERENCE_STAGE == "generate" and inference["stage"] == "generate"
    assert {k: v for k, v in inference.items() if k != "_doc"} == {k: v for k, v in generate.items() if k != "_doc"}
    assert "configs/inference.json" in inference["_doc"] and "configs/generate.json" in generate["_doc"]
    assert "configs/inference.json" in (kit / "docs" / "README.md").read_text()


def test_inference_json_parses_with_monai_config_parser(kit: Path) -> None:
    """Read as ``python -m monai.bundle run --config_file <kit>/configs/inference.json --bundle_root <kit>`` reads
    it (with the kit's metadata), every id its workflow reaches is defined, and the cheap ones resolve: the kit's
    checkpoints, the tile size read from the autoencoder, the output folder under --output_dir."""
    parser = ConfigParser()
    parser.read_config(str(kit / "configs" / "inference.json"))
    parser.read_meta(str(kit / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(kit), "output_dir": str(kit / "site_runs")})
    parser.parse()
    reached = _resolved_ids(parser.get())
    assert {"generator", "autoencoder", "diffusion_model", "classifier", "device"} <= reached, sorted(reached)
    assert parser.get_parsed_content("_meta_#name") == "kit"
    assert Path(parser.get_parsed_content("autoencoder_ckpt")) == kit / "models" / "autoencoder.pt"
    assert Path(parser.get_parsed_content("diffusion_ckpt")) == kit / "models" / "diffusion.pt"
    assert parser.get_parsed_content("image_size") == 64
    assert Path(parser.get_parsed_content("synthetic_dir")) == kit / "site_runs" / "generate"


def test_a_kit_config_exported_before_the_bundle_package_still_checks_its_settings(kit: Path, tmp_path: Path) -> None:
    """Kits exported before ``check_settings`` moved to ``monai_histodiff.bundle`` call it through
    ``monai_histodiff.engines`` and do not import ``monai_histodiff.bundle``: their first initialize entry still runs
    the check (a bad value is refused, naming it)."""
    text = (kit / "configs" / "generate.json").read_text()
    assert "$monai_histodiff.bundle.check_settings(" in text
    config = json.loads(text.replace("$monai_histodiff.bundle.check_settings(",
                                     "$monai_histodiff.engines.check_settings("))
    config["imports"] = [i for i in config["imports"] if i != "$import monai_histodiff.bundle"]
    old = tmp_path / "generate.json"
    old.write_text(json.dumps(config))
    for ratio, ok in ((2.0, True), (-1.0, False)):
        parser = ConfigParser()
        parser.read_config(str(old))
        parser.update({"bundle_root": str(kit), "ratio": ratio})
        parser.parse()
        if ok:
            parser.get_parsed_content("initialize#0")
        else:
            with pytest.raises(RuntimeError) as err:  # MONAI wraps the expression's error
                parser.get_parsed_content("initialize#0")
            cause = root_cause(err.value)
            assert isinstance(cause, InvalidSettingError) and "--ratio=-1.0" in str(cause), cause
