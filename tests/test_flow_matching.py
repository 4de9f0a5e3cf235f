"""Rectified flow as one more Denoiser: the σ table, the exact velocity ↔ ε conversion, and the
untruncated ReTrack objective's minimiser on a toy flow with Gaussian data (docs/flow-matching.md)."""

from __future__ import annotations

import math

import pytest
import torch

from retrack.models import Denoiser, FlowSchedule, logit_normal_sigmas, velocity_from_eps
from retrack.objectives.base import TrainBatch, noisy
from retrack.objectives.retrack import ReTrack, min_snr_weight


class _Out:
    def __init__(self, sample):
        self.sample = sample


class _Velocity(torch.nn.Module):
    """A 'network' that returns a fixed velocity, whatever it is asked."""

    def __init__(self, v: torch.Tensor):
        super().__init__()
        self.v = v

    def forward(self, x, t):
        return _Out(self.v)


def _schedule(steps: int = 1000) -> FlowSchedule:
    return FlowSchedule.from_sigmas(logit_normal_sigmas(steps, math.log(3.0)))


def test_the_velocity_of_a_noisy_input_converts_to_its_noise_exactly():
    g = torch.Generator().manual_seed(0)
    sched = _schedule()
    x0, eps = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(5, 4, 3, 3, generator=g,
                                                                                    dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 998, 999])
    x = noisy(x0, t, eps, sched)
    sigma = sched.sigmas[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x, (1 - sigma) * x0 + sigma * eps, rtol=0, atol=1e-15)
    v = eps - x0
    got = Denoiser(_Velocity(v), sched, "flow")(x, t)
    torch.testing.assert_close(got, eps, rtol=0, atol=1e-12)  # ε = x + (1 − σ)·v
    gamma, _ = sched.gamma_sigma(t, x)
    torch.testing.assert_close(velocity_from_eps(got, x, gamma), v, rtol=0, atol=1e-12)
    torch.testing.assert_close(x - sigma * v, x0, rtol=0, atol=1e-12)  # and x0 = x − σ·v


def test_a_velocity_model_needs_a_flow_schedule():
    from retrack.errors import UserError
    from retrack.models import Schedule

    with pytest.raises(UserError, match="FlowSchedule"):
        Denoiser(_Velocity(torch.zeros(1)), Schedule(torch.linspace(0.99, 0.01, 10, dtype=torch.float64)), "flow")


def test_the_sigma_table_is_the_quantiles_of_the_shifted_logit_normal():
    steps = 1000
    sig = logit_normal_sigmas(steps, 0.3, 1.2)
    assert bool((sig.diff() > 0).all()) and 0 < sig[0] < sig[-1] < 1
    # CDF of the logit-normal at σ_i is (i + ½)/T
    cdf = 0.5 * (1 + torch.special.erf((torch.logit(sig) - 0.3) / (1.2 * math.sqrt(2))))
    torch.testing.assert_close(cdf, (torch.arange(steps, dtype=torch.float64) + 0.5) / steps, rtol=0, atol=1e-12)
    # SD3's static shift s and Flux's exponential shift μ are changes of the logit's mean
    u, s, mu = logit_normal_sigmas(steps), 3.0, 0.8
    torch.testing.assert_close(s * u / (1 + (s - 1) * u), logit_normal_sigmas(steps, math.log(s)), rtol=0, atol=1e-12)
    torch.testing.assert_close(math.exp(mu) / (math.exp(mu) + (1 / u - 1)), logit_normal_sigmas(steps, mu),
                               rtol=0, atol=1e-12)


def test_min_snr_reads_the_flows_own_signal_to_noise_ratio():
    sched = _schedule(50)
    t = torch.arange(50)
    snr = ((1 - sched.sigmas) / sched.sigmas) ** 2
    torch.testing.assert_close(min_snr_weight(sched.alphas_cumprod, t, 5.0), snr.clamp(max=5.0) / snr,
                               rtol=1e-12, atol=0)


def test_the_untruncated_objectives_minimiser_is_the_flow_of_the_remain_data_alone():
    """Proposition 1 for a rectified flow: remain data N(μ, s²I) (a large sample), forget data a
    narrower Gaussian beside it. At forget-noised inputs, the affine velocity field that minimises
    ReTrack's untruncated unlearning term (λ = 1, K = all) is the closed-form flow of the remain
    Gaussian, v*(x) = (x − E[x0|x])/σ, with E[x0|x] = μ + k(x − γμ), k = γs²/(γ²s² + σ²); not the
    flow of the forget data the model memorised."""
    g = torch.Generator().manual_seed(0)
    mu_r, s_r = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5
    mu_f, s_f = torch.tensor([1.4, -0.1], dtype=torch.float64), 0.2
    remain = (mu_r + s_r * torch.randn(20000, 2, generator=g, dtype=torch.float64)).view(-1, 2, 1, 1)
    forget = (mu_f + s_f * torch.randn(4000, 2, generator=g, dtype=torch.float64)).view(-1, 2, 1, 1)
    sched = FlowSchedule.from_sigmas(torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64))
    prepared = ReTrack(lam=1.0).prepare(TrainBatch(remain[:4000], forget, None, remain), sched, g)
    n = forget.shape[0]
    x, t, target = prepared.x[:n].flatten(1), prepared.t[:n], prepared.targets["target"].flatten(1)
    for i, s in enumerate(sched.sigmas.tolist()):
        rows, gamma = t == i, 1.0 - s
        # Σ_k p_k‖x + γ·v(x) − ε_k‖² is least in v at v = (ε̄ − x)/γ: its least-squares affine fit
        v = velocity_from_eps(target[rows], x[rows], torch.tensor(gamma, dtype=torch.float64))
        design = torch.cat([x[rows], torch.ones(int(rows.sum()), 1, dtype=torch.float64)], 1)
        fit = torch.linalg.lstsq(design, v).solution
        k = gamma * s_r**2 / (gamma**2 * s_r**2 + s**2)
        torch.testing.assert_close(fit[:2], (1 - k) / s * torch.eye(2, dtype=torch.float64), rtol=0, atol=0.03)
        torch.testing.assert_close(fit[2], -mu_r * (1 - k * gamma) / s, rtol=0, atol=0.03)
        kf = gamma * s_f**2 / (gamma**2 * s_f**2 + s**2)  # the forget data's own flow is far from it
        assert (fit[2] + mu_f * (1 - kf * gamma) / s).abs().max() > 0.1
