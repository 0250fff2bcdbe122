# Copyright (c) MONAI Consortium
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Tests of the respaced DDPM / DDIM schedulers against MONAI's parents and guided-diffusion's respacing formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai_histodiff.schedulers import RespacedDDIMScheduler, RespacedDDPMScheduler, respace_scheduler

T = 100
SCHEDULE = {"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0155}


def _random_chain_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, 4, 4, generator=g), [torch.randn(3, 2, 4, 4, generator=g) for _ in range(n)]


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_ddpm_equals_monai_when_all_timesteps_are_visited(variance_type, prediction_type, clip_sample):
    kwargs = dict(variance_type=variance_type, prediction_type=prediction_type, clip_sample=clip_sample, **SCHEDULE)
    parent, respaced = DDPMScheduler(T, **kwargs), RespacedDDPMScheduler(T, **kwargs)
    parent.set_timesteps(T)
    respaced.set_timesteps(T)
    sample, outputs = _random_chain_inputs(T)
    x_parent, x_respaced = sample.clone(), sample.clone()
    g_parent, g_respaced = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t, out in zip(parent.timesteps, outputs):
        x_parent, x0_parent = parent.step(out, t, x_parent, generator=g_parent)
        x_respaced, x0_respaced = respaced.step(out, t, x_respaced, generator=g_respaced)
        assert torch.equal(x0_parent, x0_respaced)
        assert torch.equal(x_parent, x_respaced)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_equals_monai_when_all_timesteps_are_visited(variance_type):
    parent = DDPMScheduler(T, variance_type=variance_type, clip_sample=False, **SCHEDULE)
    respaced = respace_scheduler(parent)
    sample, outputs = _random_chain_inputs(4)
    for t, out in zip([T - 1, 50, 1, 0], outputs):
        model_output = torch.cat([out, torch.rand_like(out)], dim=1)  # eps and (positive) variance channels
        prev_parent, _ = parent.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
        prev_respaced, _ = respaced.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
        assert torch.equal(prev_parent, prev_respaced)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_equals_monai_when_all_timesteps_are_visited(prediction_type, eta):
    kwargs = dict(prediction_type=prediction_type, clip_sample=True, **SCHEDULE)
    parent, respaced = DDIMScheduler(T, **kwargs), RespacedDDIMScheduler(T, **kwargs)
    parent.set_timesteps(T)
    respaced.set_timesteps(T)
    sample, outputs = _random_chain_inputs(T)
    x_parent, x_respaced = sample.clone(), sample.clone()
    g_parent, g_respaced = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t, out in zip(parent.timesteps, outputs):
        x_parent, x0_parent = parent.step(out, t, x_parent, eta=eta, generator=g_parent)
        x_respaced, x0_respaced = respaced.step(out, t, x_respaced, eta=eta, generator=g_respaced)
        assert torch.equal(x0_parent, x0_respaced)
        assert torch.equal(x_parent, x_respaced)


def _guided_diffusion_respaced_posterior(alphas_cumprod: np.ndarray, use_timesteps: list[int]) -> dict[int, tuple]:
    """
    Independent float64 re-implementation of guided-diffusion's ``SpacedDiffusion`` + ``GaussianDiffusion``
    posterior: new betas from the kept alpha-bars, then ``posterior_mean_coef1/2`` and ``posterior_variance``.
    Keyed by original timestep.
    """
    kept = sorted(use_timesteps)
    last, new_betas = 1.0, []
    for t in kept:
        new_betas.append(1 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    new_betas = np.array(new_betas)
    new_abar = np.cumprod(1.0 - new_betas)
    new_abar_prev = np.append(1.0, new_abar[:-1])
    coef1 = new_betas * np.sqrt(new_abar_prev) / (1.0 - new_abar)
    coef2 = (1.0 - new_abar_prev) * np.sqrt(1.0 - new_betas) / (1.0 - new_abar)
    variance = new_betas * (1.0 - new_abar_prev) / (1.0 - new_abar)
    return {t: (coef1[i], coef2[i], variance[i], new_betas[i]) for i, t in enumerate(kept)}


@pytest.mark.parametrize("num_inference_steps", [1, 7, 25, 60])
def test_ddpm_posterior_matches_guided_diffusion_respacing(num_inference_steps):
    scheduler = RespacedDDPMScheduler(T, clip_sample=False, **SCHEDULE)
    scheduler.set_timesteps(num_inference_steps)
    abar = scheduler.alphas_cumprod.double().numpy()
    expected = _guided_diffusion_respaced_posterior(abar, scheduler.timesteps.tolist())
    g = torch.Generator().manual_seed(num_inference_steps)
    x0, xt = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    for t in scheduler.timesteps:
        coef1, coef2, variance, beta = expected[int(t)]
        mean, var = scheduler.posterior_mean_variance(x0, xt, t)
        # float32 scheduler against a float64 reference: cancelling terms lose ~1e-5 absolute
        torch.testing.assert_close(mean, (coef1 * x0.double() + coef2 * xt.double()).float(), rtol=1e-4, atol=5e-5)
        torch.testing.assert_close(var, torch.tensor(max(variance, 1e-20), dtype=torch.float32), rtol=1e-4, atol=1e-9)
        want_beta = torch.tensor(beta, dtype=torch.float32)
        torch.testing.assert_close(scheduler.respaced_beta(t), want_beta, rtol=1e-4, atol=0)

    # a whole step with eps prediction: x0 from eps, posterior mean, plus sqrt(variance) * noise (none at the end)
    eps = torch.randn(2, 3, 4)
    for t in scheduler.timesteps:
        coef1, coef2, variance, _ = expected[int(t)]
        x0_hat = (xt.double() - np.sqrt(1 - abar[int(t)]) * eps.double()) / np.sqrt(abar[int(t)])
        noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(3)).double()
        is_last = int(t) == int(scheduler.timesteps[-1])
        want = coef1 * x0_hat + coef2 * xt.double() + (0.0 if is_last else np.sqrt(variance)) * noise
        got, _ = scheduler.step(eps, t, xt, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_inference_steps", [3, 10, 33])
def test_ddim_visits_exactly_the_scheduler_timesteps_and_ends_at_zero(num_inference_steps):
    scheduler = RespacedDDIMScheduler(1000, clip_sample=False, **SCHEDULE)
    scheduler.set_timesteps(num_inference_steps)
    visited = scheduler.timesteps.tolist()
    assert len(visited) == num_inference_steps and visited[-1] == 0
    chain = [visited[0]]
    while chain[-1] >= 0:
        chain.append(scheduler.previous_timestep(chain[-1]))
    assert chain == visited + [-1]
    assert float(scheduler.alpha_bar(-1)) == 1.0  # set_alpha_to_one: the last step lands on the clean sample

    # each deterministic step uses abar at the visited t and at the next visited timestep
    abar = scheduler.alphas_cumprod.double()
    x, eps = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randn(4, 2, 4, 4, dtype=torch.float64)
    for t, s in zip(visited, visited[1:] + [-1]):
        a_t, a_s = abar[t], (abar[s] if s >= 0 else torch.tensor(1.0, dtype=torch.float64))
        want = a_s.sqrt() * (x - (1 - a_t).sqrt() * eps) / a_t.sqrt() + (1 - a_s).sqrt() * eps
        got, _ = scheduler.step(eps.float(), t, x.float())
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_reversed_step_equals_monai_when_all_timesteps_are_visited(prediction_type):
    parent = DDIMScheduler(T, prediction_type=prediction_type, **SCHEDULE)
    respaced = respace_scheduler(parent)
    sample, outputs = _random_chain_inputs(3)
    for t, out in zip([0, 40, T - 2], outputs):
        for got, want in zip(respaced.reversed_step(out, t, sample), parent.reversed_step(out, t, sample)):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="noisiest"):
        respaced.reversed_step(outputs[0], T - 1, sample)


def test_ddim_reversed_step_inverts_a_respaced_step():
    scheduler = RespacedDDIMScheduler(T, clip_sample=False, **SCHEDULE)
    scheduler.set_timesteps(12)
    t, s = int(scheduler.timesteps[3]), int(scheduler.timesteps[4])
    assert scheduler.next_timestep(s) == t
    x_t, eps = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    x_s, _ = scheduler.step(eps, t, x_t)  # with the same eps at both ends, inversion is exact
    torch.testing.assert_close(scheduler.reversed_step(eps, s, x_s)[0], x_t)


def test_unvisited_timestep_is_rejected():
    scheduler = RespacedDDIMScheduler(T, **SCHEDULE)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of the visited"):
        scheduler.previous_timestep(50)


def test_respace_scheduler_keeps_betas_options_and_timesteps():
    ddpm = DDPMScheduler(T, variance_type="fixed_large", clip_sample=False, prediction_type="v_prediction", **SCHEDULE)
    ddpm.set_timesteps(20)
    ddim = DDIMScheduler(T, set_alpha_to_one=False, clip_sample_min=-2.0, clip_sample_max=3.0, **SCHEDULE)
    ddim.set_timesteps(20)
    for source, cls in [(ddpm, RespacedDDPMScheduler), (ddim, RespacedDDIMScheduler)]:
        respaced = respace_scheduler(source)
        assert type(respaced) is cls
        for name in ["betas", "alphas", "alphas_cumprod", "timesteps"]:
            assert torch.equal(getattr(respaced, name), getattr(source, name))
        assert respaced.prediction_type == source.prediction_type and respaced.clip_sample == source.clip_sample
        assert respaced.clip_sample_values == source.clip_sample_values
        assert respace_scheduler(respaced) is respaced
    assert respace_scheduler(ddpm).variance_type == "fixed_large"
    assert float(respace_scheduler(ddim).alpha_bar(-1)) == float(ddim.alphas_cumprod[0])
