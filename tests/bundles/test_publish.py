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


def test_download_checkpoints_keeps_only_matching_files(pretrained, tmp_path):
    """``python -m monai_histodiff download-checkpoints``: files whose sha256 matches are kept; a mismatch names the
    file, the expected and the actual hash, and leaves nothing a stage would read."""
    import pytest

    from monai_histodiff.bundle.publish import ChecksumMismatchError

    listing = tmp_path / "large_files.yml"
    main(["large-files", "--runs", str(pretrained), "--url_base", pretrained.as_uri(), "--output", str(listing)])
    site = tmp_path / "site"
    site.mkdir()
    (site / "large_files.yml").write_text(listing.read_text())
    assert main(["download-checkpoints", "--bundle_path", str(site)]) == 0
    ae = site / "runs" / "pretrain_autoencoder" / "autoencoder.pt"
    assert file_sha256(ae) == file_sha256(pretrained / "pretrain_autoencoder" / "autoencoder.pt")

    # the published diffusion file is not the one listed (e.g. replaced or corrupted on the host)
    entries = yaml.safe_load(listing.read_text())["large_files"]
    expected = entries[1]["hash_val"]
    tampered = tmp_path / "host" / "pretrain_diffusion" / "diffusion.pt"
    tampered.parent.mkdir(parents=True)
    tampered.write_bytes((pretrained / "pretrain_diffusion" / "diffusion.pt").read_bytes() + b"\0")
    entries[1]["url"] = tampered.as_uri()
    other = tmp_path / "other_site"
    other.mkdir()
    (other / "large_files.yml").write_text(yaml.safe_dump({"large_files": entries}))
    target = other / "runs" / "pretrain_diffusion" / "diffusion.pt"
    with pytest.raises(ChecksumMismatchError) as err:
        main(["download-checkpoints", "--bundle_path", str(other)])
    assert f"{target}: sha256 {file_sha256(tampered)} but large_files.yml expects {expected}" in str(err.value)
    assert not target.exists() and not list(target.parent.glob("*.download"))

    # a file already in place with other bytes is refused, not used
    target.write_bytes(tampered.read_bytes())
    with pytest.raises(ChecksumMismatchError, match=rf"existing file {target}: sha256 {file_sha256(tampered)}"):
        main(["download-checkpoints", "--bundle_path", str(other)])
