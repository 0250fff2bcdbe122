"""The steps the adversarial trainers share: one discriminator forward per step, the weighting, the NaN stop."""

from __future__ import annotations

import contextlib

import pytest
import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator

from monai_histodiff.engines.steps import optimizer_step, patch_discriminator_step, patch_generator_term


def _disc() -> PatchDiscriminator:
    torch.manual_seed(0)
    return PatchDiscriminator(spatial_dims=2, num_layers_d=2, channels=4, in_channels=3, out_channels=1)


def test_discriminator_step_one_forward_weighted_and_unweighted_value():
    disc, loss = _disc(), PatchAdversarialLoss(criterion="least_squares")
    real, fake = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16, requires_grad=True)
    calls = []
    disc.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    seen = {}
    opt = torch.optim.SGD(disc.parameters(), lr=0.0)
    opt.step = lambda: seen.setdefault("grad", next(disc.parameters()).grad.clone())  # type: ignore[method-assign]
    value = patch_discriminator_step(disc, opt, loss, real=real, fake=fake, weight=0.5,
                                     amp_context=contextlib.nullcontext(), scaler=None, stage="test", iteration=3)
    assert calls == [4]  # fake and real in one forward (one DDP reduction per backward)
    assert fake.grad is None  # the fakes are detached: the generator gets no gradient from this step

    logits_fake, logits_real = disc(torch.cat([fake.detach(), real]))[-1].chunk(2)
    expected = 0.5 * (loss(logits_fake, target_is_real=False, for_discriminator=True)
                      + loss(logits_real, target_is_real=True, for_discriminator=True))
    assert value == pytest.approx(float(expected.detach()))
    disc.zero_grad()
    (0.5 * expected).backward()
    torch.testing.assert_close(seen["grad"], next(disc.parameters()).grad)  # the step used weight * loss


def test_non_finite_discriminator_loss_stops_before_the_step():
    disc, loss = _disc(), PatchAdversarialLoss(criterion="least_squares")
    before = [p.detach().clone() for p in disc.parameters()]
    opt = torch.optim.SGD(disc.parameters(), lr=1.0)
    real = torch.full((1, 3, 16, 16), float("nan"))
    with pytest.raises(FloatingPointError, match=r"\[finetune\] loss term 'adv_d' is nan at iteration 7; no optimizer"):
        patch_discriminator_step(disc, opt, loss, real=real, fake=torch.rand(1, 3, 16, 16), weight=1.0,
                                 amp_context=contextlib.nullcontext(), scaler=None, stage="finetune", iteration=7)
    assert all(torch.equal(a, b) for a, b in zip(before, disc.parameters()))


def test_generator_term_and_optimizer_step_order():
    disc, loss = _disc(), PatchAdversarialLoss(criterion="least_squares")
    fake = torch.rand(2, 3, 16, 16, requires_grad=True)
    term = patch_generator_term(disc, loss, fake, contextlib.nullcontext())
    assert term.ndim == 0 and term.requires_grad
    events = []
    opt = torch.optim.SGD([fake], lr=0.1)
    real_step = opt.step
    opt.step = lambda: (events.append("step"), real_step())  # type: ignore[method-assign]
    optimizer_step(term, opt, None, on_backward=lambda: events.append("backward"))
    assert events == ["backward", "step"] and fake.grad is not None
