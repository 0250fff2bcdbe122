from __future__ import annotations

import yaml
from monai.bundle import download_large_files

from monai_histodiff.__main__ import main
from monai_histodiff.handlers import file_sha256


def test_large_files_lists_checkpoints_and_monai_downloads_them(pretrained, tmp_path):
    out = tmp_path / "large_files.yml"
    assert main(["large-files", "--runs", str(pretrained), "--url_base", pretrained.as_uri(), "--output", str(out)]) == 0
    entries = yaml.safe_load(out.read_text())["large_files"]
    assert [e["path"] for e in entries] == ["runs/pretrain_autoencoder/autoencoder.pt",
                                            "runs/pretrain_diffusion/diffusion.pt"]
    assert entries[0]["hash_val"] == file_sha256(pretrained / "pretrain_autoencoder" / "autoencoder.pt")
    # a new site fetches and verifies them with MONAI's own tool (here from a file:// address)
    site = tmp_path / "site"
    site.mkdir()
    (site / "large_files.yml").write_text(out.read_text())
    download_large_files(bundle_path=str(site))
    assert file_sha256(site / "runs" / "pretrain_diffusion" / "diffusion.pt") == entries[1]["hash_val"]
