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
