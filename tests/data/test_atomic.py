"""atomic_write: the one way the package writes a file whole."""

from __future__ import annotations

import errno

import pytest

from monai_histodiff.data import validation
from monai_histodiff.data.atomic import atomic_write


def test_writes_whole_and_replaces(tmp_path):
    path = tmp_path / "sub" / "a.json"
    assert atomic_write(path, lambda p: p.write_text("first"), fsync=True) == path
    atomic_write(path, lambda p: p.write_text("second"))
    assert path.read_text() == "second" and sorted(q.name for q in path.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("previous")

    def half(p):
        p.write_text("half")
        raise ValueError("writer failed")

    with pytest.raises(ValueError, match="writer failed"):
        atomic_write(path, half)
    assert path.read_text() == "previous" and [q.name for q in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("raised", ["enospc", "torch_runtime_error"])
def test_a_full_disk_is_named(tmp_path, monkeypatch, raised):
    """Python's own ENOSPC and torch.save's RuntimeError on a full file system both become ENOSPC naming the file;
    a RuntimeError with space left stays what it was."""
    path = tmp_path / "model.pt"

    def full(p):
        p.write_bytes(b"partial")
        if raised == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("unexpected pos 704 vs 598")

    class Vfs:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(validation.os, "statvfs", lambda p: Vfs(), raising=False)
    with pytest.raises(OSError) as e:
        atomic_write(path, full)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path) and not list(tmp_path.iterdir())
    Vfs.f_bavail = 1 << 20
    if raised == "torch_runtime_error":
        with pytest.raises(RuntimeError, match="unexpected pos"):
            atomic_write(path, full)
