from __future__ import annotations

import math
import warnings

import pytest
import torch
from ignite.engine import Engine, Events

from monai_histodiff.engines import load_diffusion
from monai_histodiff.handlers import (
    SampleGridHandler,
    WarmupEMAHandler,
    ema_initial_weight,
    ema_momentum,
    save_checkpoint,
)
from tests.tiny import tiny_unet

TINY_UNET_ARGS = dict(spatial_dims=2, in_channels=3, out_channels=3, channels=(8, 16), attention_levels=(False, False),
                      num_res_blocks=1, norm_num_groups=8)


def _one_param_run(n: int, momentum: float, warmup: bool = True, values=lambda it: 5.0):
    """Train a 1-parameter model whose weight is set to ``values(iteration)`` each step; return (model, ema, engine)."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(-3.0)  # the "random" initialisation the EMA starts from
    ema = WarmupEMAHandler(model, momentum=momentum, warmup=warmup)

    def step(engine, _):
        with torch.no_grad():
            model.weight.fill_(values(engine.state.iteration))
        return {"loss": 0.0}

    engine = Engine(step)
    ema.attach(engine)
    engine.run([0] * n, max_epochs=1)
    return model, ema, engine


def test_warmup_matches_hand_computed_reference():
    n, m = 50, 1e-4
    values = lambda it: math.sin(it) + 0.1 * it  # noqa: E731
    _, ema, _ = _one_param_run(n, m, values=values)
    ref = -3.0
    for t in range(n):  # LDM / diffusers: decay_t = min(1 - m, (1 + t) / (10 + t))
        decay = min(1 - m, (1 + t) / (10 + t))
        ref = decay * ref + (1 - decay) * values(t + 1)
    assert float(ema.ema_model.weight) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_after_50_updates_the_ema_is_the_model():
    model, ema, _ = _one_param_run(50, 1e-4)
    share = ema_initial_weight(50, 1e-4)
    assert share < 1e-6 and share == pytest.approx(1 / math.comb(59, 9))
    assert float(ema.ema_model.weight) == pytest.approx(5.0 * (1 - share) - 3.0 * share, abs=1e-6)
    assert abs(float(ema.ema_model.weight) - float(model.weight.detach())) < 1e-5
    summary = ema.summary()
    assert summary["num_updates"] == 50 and summary["warmup"] is True and summary["initial_weight"] == share


def test_without_warmup_the_ema_stays_at_its_start():
    _, ema, _ = _one_param_run(50, 1e-4, warmup=False)
    assert float(ema.ema_model.weight) == pytest.approx(-3.0 * 0.9999**50 + 5.0 * (1 - 0.9999**50), rel=1e-5)
    assert ema_initial_weight(2700, 1e-4, warmup=False) == pytest.approx(0.7634, abs=1e-4)


@pytest.mark.parametrize("n,m", [(0, 1e-4), (1, 1e-4), (10, 0.5), (2000, 0.01), (2700, 1e-4)])
def test_initial_weight_closed_form_matches_product(n, m):
    product = 1.0
    for t in range(n):
        product *= 1 - ema_momentum(t, m)
    assert ema_initial_weight(n, m) == pytest.approx(product, rel=1e-9, abs=1e-300)


def test_resumed_run_continues_the_schedule():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = WarmupEMAHandler(model, momentum=1e-4)
    seen = []
    engine = Engine(lambda e, b: None)
    ema.attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.ema_momentum))
    engine.load_state_dict({"iteration": 100, "max_epochs": 1, "epoch_length": 100})
    engine.run([0] * 100, max_epochs=2)
    assert seen[0] == pytest.approx(9 / (10 + 100)) and ema.num_updates == 200


def _diffusion_ckpt(path, meta_extra=None, engine_state=None):
    unet = tiny_unet()
    meta = {"stage": "pretrain_diffusion", "config": {"diffusion_args": TINY_UNET_ARGS}, **(meta_extra or {})}
    save_checkpoint(path, {"diffusion": unet, "ema": unet}, meta, engine_state)
    return path


def test_load_diffusion_warns_for_an_unconverged_ema(tmp_path):
    path = _diffusion_ckpt(tmp_path / "d.pt", {"ema": {"num_updates": 2700, "momentum": 1e-4, "warmup": False,
                                                       "initial_weight": 0.76}})
    with pytest.warns(UserWarning, match=r"d\.pt still holds 76% of its random initialisation after 2700 updates"):
        load_diffusion(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_diffusion(path, use_ema=False)  # the online weights: nothing to warn about


def test_load_diffusion_estimates_old_checkpoints_and_is_quiet_when_converged(tmp_path):
    old = _diffusion_ckpt(tmp_path / "old.pt", engine_state={"iteration": 2700, "epoch": 1})
    with pytest.warns(UserWarning, match=r"76% .* 2700 updates \(estimated"):
        load_diffusion(old)
    good = _diffusion_ckpt(tmp_path / "good.pt", {"ema": {"num_updates": 2700, "momentum": 1e-4, "warmup": True,
                                                          "initial_weight": ema_initial_weight(2700, 1e-4)}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_diffusion(good)


def test_sample_grid_warns_while_the_ema_is_young(tmp_path):
    model = torch.nn.Linear(1, 1)
    ema = WarmupEMAHandler(model, momentum=1e-4, warmup=False)
    engine = Engine(lambda e, b: None)
    ema.attach(engine)
    SampleGridHandler(lambda: torch.zeros(2, 3, 8, 8), tmp_path, ema=ema).attach(engine)
    with pytest.warns(UserWarning, match=r"still holds 100% of its random initialisation after 3 updates"):
        engine.run([0] * 3, max_epochs=1)
    assert (tmp_path / "samples_epoch0001.png").is_file()
