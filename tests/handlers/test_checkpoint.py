from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from monai_histodiff.handlers import (
    CheckpointMismatchError,
    NaNGuard,
    StageCheckpointHandler,
    checkpoint_meta,
    load_checkpoint,
    loss_terms,
    save_checkpoint,
    to_plain,
    verify_parent,
)


def _engine(model, opt, stop_at=None, loss=1.0):
    def step(engine, batch):
        if stop_at is not None and engine.state.iteration == stop_at:
            raise KeyboardInterrupt
        opt.zero_grad()
        out = model(torch.ones(1, 2)).sum() * loss
        out.backward()
        opt.step()
        return {"loss": float(out.detach()), "lr": 0.1}

    return Engine(step)


def test_interrupt_saves_and_resume_continues(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    engine = _engine(model, opt, stop_at=5)
    StageCheckpointHandler(tmp_path, {"model": model, "optimizer": opt}, meta={"stage": "t"}, final_name="m.pt").attach(engine)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0] * 3, max_epochs=3)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["engine"]["iteration"] == 4  # nothing lost: progress up to the interrupted iteration
    assert not (tmp_path / ".lock").exists()  # an interrupted run gives its lock back
    assert torch.equal(saved["state"]["model"]["weight"], model.weight.detach())
    model2 = torch.nn.Linear(2, 1)
    opt2 = torch.optim.SGD(model2.parameters(), 0.1)
    seen = []
    engine2 = _engine(model2, opt2)
    engine2.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.iteration))
    StageCheckpointHandler(tmp_path, {"model": model2, "optimizer": opt2}, meta={"stage": "t"}, final_name="m.pt",
                           resume=True).attach(engine2)
    engine2.run([0] * 3, max_epochs=3)
    assert seen == [5, 6, 7, 8, 9] and (tmp_path / "m.pt").is_file()
    assert load_checkpoint(tmp_path / "m.pt")["engine"]["iteration"] == 9


def test_second_training_run_on_the_same_folder_is_refused(tmp_path):
    """One writer per stage folder: while a live process holds ``<save_dir>/.lock`` a second run stops at its start,
    naming that pid, and writes nothing; the lock is held while training and given back at the end."""
    import os
    import socket
    import subprocess
    import sys

    from monai_histodiff.engines.locking import OutputLockedError

    first = tmp_path / "m.pt"
    first.write_bytes(b"the first run's checkpoint")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        model = torch.nn.Linear(2, 1)
        engine = _engine(model, torch.optim.SGD(model.parameters(), 0.1))
        StageCheckpointHandler(tmp_path, {"model": model}, meta={"stage": "finetune"}, final_name="m.pt").attach(engine)
        with pytest.raises(OutputLockedError, match=rf"in use by process {holder.pid}.*stage 'finetune' refuses"):
            engine.run([0] * 2, max_epochs=2)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "m.pt"]
        assert first.read_bytes() == b"the first run's checkpoint"
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over by the next run; during the run the lock names its process
    engine = _engine(model, torch.optim.SGD(model.parameters(), 0.1))
    StageCheckpointHandler(tmp_path, {"model": model}, meta={"stage": "finetune"}, final_name="m.pt").attach(engine)
    held = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: held.append((tmp_path / ".lock").read_text().split()[0]))
    with pytest.warns(UserWarning, match=f"process {holder.pid} that held it no longer runs"):
        engine.run([0] * 2, max_epochs=2)
    assert set(held) == {str(os.getpid())} and not (tmp_path / ".lock").exists()
    assert load_checkpoint(first)["engine"]["iteration"] == 4


def test_resume_without_checkpoint_is_clear_error(tmp_path):
    model = torch.nn.Linear(2, 1)
    engine = _engine(model, torch.optim.SGD(model.parameters(), 0.1))
    StageCheckpointHandler(tmp_path, {"model": model}, resume=True).attach(engine)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        engine.run([0], max_epochs=1)


def test_nan_guard_names_term_and_iteration():
    model = torch.nn.Linear(2, 1)
    engine = _engine(model, torch.optim.SGD(model.parameters(), 0.1), loss=float("nan"))
    NaNGuard(stage="demo").attach(engine)
    with pytest.raises(FloatingPointError, match=r"\[demo\] loss term 'loss' is nan at iteration 1"):
        engine.run([0], max_epochs=1)
    assert loss_terms([{"loss": torch.tensor(2.0), "pred": torch.zeros(3)}]) == {"loss": 2.0}


def test_parent_hash_verification(tmp_path):
    parent = tmp_path / "parent.pt"
    save_checkpoint(parent, {"m": torch.nn.Linear(1, 1)}, {"stage": "a"})
    child_path = save_checkpoint(tmp_path / "child.pt", {}, checkpoint_meta("b", parents={"ae": parent}))
    child = load_checkpoint(child_path, stage="b")
    verify_parent(child, "ae", parent)
    save_checkpoint(parent, {"m": torch.nn.Linear(1, 1)}, {"stage": "a"})  # retrained parent: new bytes
    with pytest.raises(CheckpointMismatchError, match="child.pt.*parent.pt"):
        verify_parent(child, "ae", parent)
    with pytest.raises(ValueError, match="written by stage 'b', expected 'a'"):
        load_checkpoint(child_path, stage="a")


def test_to_plain_converts_config_values_and_names_the_bad_key():
    import enum
    from collections import OrderedDict
    from pathlib import Path

    import numpy as np

    class Mode(str, enum.Enum):
        A = "a"

    plain = to_plain({"p": Path("/x/y"), "f": np.float32(0.5), "i": np.int64(3), "arr": np.arange(2),
                      "dt": torch.float16, "dev": torch.device("cpu"), "t": (1, [2, None]), "mode": Mode.A,
                      "od": OrderedDict(a=1), "w": torch.ones(2)})
    assert plain["p"] == "/x/y" and plain["f"] == 0.5 and type(plain["f"]) is float and type(plain["i"]) is int
    assert plain["arr"] == [0, 1] and plain["dt"] == "torch.float16" and plain["dev"] == "cpu"
    assert plain["t"] == (1, [2, None]) and type(plain["mode"]) is str and plain["mode"] == "a"
    assert type(plain["od"]) is OrderedDict and torch.equal(plain["w"], torch.ones(2))
    with pytest.raises(TypeError, match=r"meta\['config'\]\['net'\] is a torch.nn.modules.linear.Linear"):
        checkpoint_meta("a", config={"lr": 1.0, "net": torch.nn.Linear(1, 1)})


def test_save_checkpoint_writes_only_safe_files(tmp_path):
    import numpy as np

    path = save_checkpoint(tmp_path / "c.pt", {"m": torch.nn.Linear(2, 1)},
                           {"stage": "a", "scale": np.float64(0.2), "dir": tmp_path})
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["meta"] == {"stage": "a", "scale": 0.2, "dir": str(tmp_path)}
    with pytest.raises(TypeError, match=r"meta\['bad'\] is a builtins.set"):
        save_checkpoint(tmp_path / "d.pt", {}, {"stage": "a", "bad": {1, 2}})
    # a state that weights_only loading could not read is not written at all
    with pytest.raises(TypeError, match=r"not writing .*e\.pt.*Linear"):
        save_checkpoint(tmp_path / "e.pt", {"whole_module": {"m": torch.nn.Linear(1, 1)}}, {"stage": "a"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_previous_version_files_load_or_say_how_to_convert(tmp_path):
    from collections import OrderedDict

    import numpy as np

    from monai_histodiff.handlers import UnsafeCheckpointError, convert_checkpoint

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    # written the way the previous version did (plain torch.save of the same layout): plain values load as they are
    old = tmp_path / "old.pt"
    torch.save({"state": {"model": model.state_dict(), "optimizer": opt.state_dict()},
                "meta": {"stage": "a", "config": {"lr": 1e-3, "channels": (8, 16)}},
                "engine": OrderedDict(iteration=3, epoch_length=3, max_epochs=2)}, old)
    assert load_checkpoint(old, stage="a")["engine"]["iteration"] == 3
    # a non-plain value (here a numpy scalar) is refused with the way out
    odd = tmp_path / "odd.pt"
    torch.save({"state": {}, "meta": {"stage": "a", "scale_factor": np.float32(0.18)}}, odd)
    with pytest.raises(UnsafeCheckpointError, match=r"odd\.pt.*numpy.*convert-checkpoint .*odd\.pt"):
        load_checkpoint(odd)
    with pytest.raises(UnsafeCheckpointError, match="only when asked"):
        convert_checkpoint(odd, tmp_path / "new.pt")
    with pytest.warns(UserWarning, match="weights_only=False"):
        convert_checkpoint(odd, tmp_path / "new.pt", trust_source=True)
    new = load_checkpoint(tmp_path / "new.pt", stage="a")
    assert type(new["meta"]["scale_factor"]) is float and abs(new["meta"]["scale_factor"] - 0.18) < 1e-6
    # a safe file converts without the flag (read with weights_only=True), the optimizer state still loads
    convert_checkpoint(old, tmp_path / "old_plain.pt")
    plain = load_checkpoint(tmp_path / "old_plain.pt")
    torch.optim.Adam(model.parameters()).load_state_dict(plain["state"]["optimizer"])


# --- faults a site can meet: a file cut short, a full disk ------------------------------------------------------


def _cut(path, how: str) -> None:
    """Damage a saved file the way a copy cut short, an empty write or stray bytes would."""
    import os

    data = path.read_bytes()
    damaged = {"half": data[: len(data) // 2], "tail": data[:-64], "head": data[:10], "empty": b"",
               "garbage": bytes(range(256)) * 20}[how]
    path.write_bytes(damaged)
    assert os.path.getsize(path) == len(damaged)


@pytest.mark.parametrize("how", ["half", "tail", "head", "empty", "garbage"])
def test_corrupt_checkpoint_names_file_and_stage_to_rerun(tmp_path, how):
    import re

    from monai_histodiff.data.validation import CorruptFileError

    path = save_checkpoint(tmp_path / "autoencoder.pt", {"model": torch.nn.Linear(30, 30)},
                           checkpoint_meta("pretrain_autoencoder"))
    _cut(path, how)
    with pytest.raises(CorruptFileError, match=rf"{re.escape(str(path))} \(read by load_autoencoder.*\) is truncated "
                                               rf"or corrupt .*delete it and rerun stage 'pretrain_autoencoder'") as e:
        load_checkpoint(path, stage="pretrain_autoencoder", reader="load_autoencoder")
    assert isinstance(e.value, ValueError) and e.value.path == str(path)


def test_corrupt_last_checkpoint_on_resume_says_what_to_do(tmp_path):
    from monai_histodiff.data.validation import CorruptFileError

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    engine = _engine(model, opt)
    StageCheckpointHandler(tmp_path, {"model": model}, meta={"stage": "t"}).attach(engine)
    engine.run([0] * 2, max_epochs=1)
    _cut(tmp_path / "last.pt", "half")
    engine2 = _engine(model, opt)
    StageCheckpointHandler(tmp_path, {"model": model}, meta={"stage": "t"}, resume=True).attach(engine2)
    with pytest.raises(CorruptFileError, match=r"last\.pt \(read by resume=True of stage 't'.*restore it from a copy, "
                                               r"or delete it and rerun without resume=True"):
        engine2.run([0] * 2, max_epochs=2)


@pytest.mark.parametrize("raised", ["oserror", "torch_writer"])
def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch, raised):
    """A save that runs out of space names the file and the cause; the previous checkpoint and no partial file stay."""
    import errno
    import os
    from collections import namedtuple

    import monai_histodiff.data.validation as validation

    old_model = torch.nn.Linear(4, 4)
    path = save_checkpoint(tmp_path / "last.pt", {"model": old_model}, {"stage": "t"})
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # leave a partial file, as a full disk does
            fh.truncate(100)
        if raised == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # what torch says

    monkeypatch.setattr(torch, "save", full_disk)
    if raised == "torch_writer":  # torch's writer does not say why; the file system does
        vfs = namedtuple("vfs", "f_bavail f_frsize")
        monkeypatch.setattr(validation.os, "statvfs", lambda p: vfs(0, 4096), raising=False)
    with pytest.raises(OSError, match=r"No space left on device.*last\.pt") as e:
        save_checkpoint(path, {"model": torch.nn.Linear(4, 4)}, {"stage": "t"})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["state"]["model"]["weight"], old_model.weight.detach())


def test_other_writer_errors_are_not_called_disk_full(tmp_path, monkeypatch):
    def broken(obj, f, *args, **kwargs):
        raise RuntimeError("some other writer failure")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="some other writer failure"):
        save_checkpoint(tmp_path / "x.pt", {"model": torch.nn.Linear(2, 2)}, {"stage": "t"})
    assert list(tmp_path.iterdir()) == []
