"""The NLL solver against the exact log-density of Gaussian data under its exact ε-predictor.

For data N(μ, Σ), x_t ~ N(γμ, γ²Σ + σ²I) and the exact ε-predictor is
ε*(x, t) = σ(γ²Σ + σ²I)⁻¹(x − γμ), so the probability-flow ODE must return the Gaussian
log-density exactly, up to solver tolerance. The test model computes γ, σ from the discrete ᾱ by
scipy's PchipInterpolator (the documented convention: label τ ↔ t = (τ + 1)/T, log ᾱ the
monotone cubic through log ᾱ_i and ᾱ(0) = 1), independent of the code under test.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.interpolate import PchipInterpolator
from torch import nn

from retrack.metrics.likelihood import (
    VPSchedule,
    bits_per_dim,
    log_likelihood,
    nll_bits_per_dim,
    solve_rk45,
)
from retrack.models import Denoiser, Schedule

T = 1000


def steep_schedule() -> torch.Tensor:
    """β linear in [1e-4, 0.05]: ᾱ_T ≈ 1e-11, so the N(0, I) prior is exact to ~1e-11."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.05, T, dtype=torch.float64), 0)


def log_alpha_bar_curve(alphas_cumprod: torch.Tensor) -> PchipInterpolator:
    """scipy's monotone cubic through log ᾱ(0) = 0 and log ᾱ_i at t_i = (i + 1)/T."""
    grid = np.arange(T + 1) / T
    return PchipInterpolator(grid, np.concatenate([[0.0], np.log(alphas_cumprod.numpy())]))


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.exp(log_alpha_bar_curve(alphas_cumprod)(t.double().numpy())))


class GaussianEps(nn.Module):
    """Exact ε-predictor of N(mu, cov) data, returning diffusers-style `.sample`."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        evals, evecs = torch.linalg.eigh(cov)
        self.register_buffer("mu", mu)
        self.register_buffer("evals", evals)
        self.register_buffer("evecs", evecs)
        self.alphas_cumprod = alphas_cumprod

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> SimpleNamespace:
        ab = alpha_bar_at(self.alphas_cumprod, (label.detach().double() + 1) / T).to(x)
        g, s = ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
        r = (x.flatten(1) - g * self.mu) @ self.evecs
        eps = s * (r / (g**2 * self.evals + s**2)) @ self.evecs.T
        return SimpleNamespace(sample=eps.view_as(x))


def gaussian_setup(dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64) * 0.4
    cov = a @ a.T + 0.05 * torch.eye(dim, dtype=torch.float64)
    mu = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.5
    ac = steep_schedule()
    model = Denoiser(GaussianEps(mu, cov, ac), Schedule(ac))
    x = mu + torch.randn(3, dim, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return model, x.view(3, 1, 2, dim // 2), mu, cov, ac


def exact_log_density(x, mu, cov, ac, t):
    ab = alpha_bar_at(ac, torch.tensor([t]))[0]
    marginal_cov = ab * cov + (1 - ab) * torch.eye(len(mu), dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(ab.sqrt() * mu, marginal_cov)
    return dist.log_prob(x.flatten(1))


def test_exact_divergence_matches_gaussian_log_density():
    model, x, mu, cov, ac = gaussian_setup()
    res = log_likelihood(model, x, divergence="exact")
    expected = exact_log_density(x, mu, cov, ac, 1e-5)
    assert torch.allclose(res.log_p, expected, atol=5e-4, rtol=0), (res.log_p, expected)
    assert torch.allclose(res.bits_per_dim(), -expected / (8 * math.log(2)), atol=1e-4)


def test_hutchinson_is_unbiased_for_the_gaussian_log_density():
    """64 copies of one point, each with its own 16 probes: the mean is within 4 standard errors."""
    model, x, mu, cov, ac = gaussian_setup(seed=1)
    copies = x[:1].expand(64, -1, -1, -1)
    log_p = log_likelihood(model, copies, probes=16, seed=0).log_p
    expected = float(exact_log_density(x[:1], mu, cov, ac, 1e-5)[0])
    mean, se = float(log_p.mean()), float(log_p.std() / 8)
    assert 0.005 < se < 0.1  # the estimate is random, and averaging made it precise
    assert abs(mean - expected) < 4 * se + 1e-3, (mean, se, expected)


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2", "steep"])
def test_schedule_passes_through_discrete_alphas(name):
    from diffusers import DDPMScheduler

    if name == "steep":
        ac = steep_schedule()
    else:
        ac = DDPMScheduler(beta_schedule=name).alphas_cumprod.double()
    vp = VPSchedule.from_alphas_cumprod(ac)
    t = (torch.arange(T, dtype=torch.float64) + 1) / T
    assert torch.allclose(vp.log_alpha_bar(t).exp(), ac, rtol=1e-12)
    assert torch.allclose(vp.label(t), torch.arange(T, dtype=torch.float64))
    curve = log_alpha_bar_curve(ac)
    u = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert np.allclose(vp.log_alpha_bar(u).numpy(), curve(u.numpy()), rtol=1e-10, atol=1e-12)
    assert np.allclose(vp.beta(u).numpy(), -curve.derivative()(u.numpy()), rtol=1e-8, atol=1e-10)
    assert bool((vp.beta(u) >= 0).all())


def test_rk45_matches_closed_form_per_row():
    rates = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64)

    def fun(t, y, rows):
        return rates[rows][:, None] * y * (1 + t[:, None])

    y1, nfe = solve_rk45(fun, torch.ones(3, 2, dtype=torch.float64), 0.0, 1.0, 1e-8, 1e-8)
    assert torch.allclose(y1[:, 0], torch.exp(rates * 1.5), rtol=1e-6)
    assert nfe[2] > nfe[0]  # each row chose its own steps


def tiny_unet_model():
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    return Denoiser(unet, Schedule(DDPMScheduler().alphas_cumprod.double()))


def test_result_of_an_image_does_not_depend_on_its_batch():
    model, x, *_ = gaussian_setup(seed=2)
    together = log_likelihood(model, x, probes=2, seed=5)
    alone = log_likelihood(model, x[2:], probes=2, seed=5, first_index=2)
    assert torch.allclose(together.log_p[2:], alone.log_p, atol=1e-9)
    assert int(together.nfe[2]) == int(alone.nfe[0])


def test_nll_on_a_unet_adds_offset_and_dequantises():
    model = tiny_unet_model()
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    opts = dict(progress=False, rtol=1e-2, atol=1e-2)
    bpd = nll_bits_per_dim(model, images, batch_size=2, **opts)
    raw = nll_bits_per_dim(model, images, offset=0.0, **opts)
    deq = nll_bits_per_dim(model, images, dequantize=True, **opts)
    assert bpd.shape == (2,) and np.all(np.isfinite(bpd))
    assert np.allclose(bpd - raw, 7.0, atol=1e-9)  # same images and probes: only the offset differs
    assert np.all(np.abs(deq - bpd) > 1e-4)


class AsV(nn.Module):
    """The exact Gaussian predictor re-expressed as v-prediction: v = (ε − σx)/γ."""

    def __init__(self, eps_model: GaussianEps):
        super().__init__()
        self.eps_model = eps_model

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> SimpleNamespace:
        eps = self.eps_model(x, label).sample
        ab = alpha_bar_at(self.eps_model.alphas_cumprod, (label.detach().double() + 1) / T).to(x)
        g, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(eps - s * x) / g)


def test_v_prediction_models_are_converted_with_the_continuous_schedule():
    model, x, mu, cov, ac = gaussian_setup(seed=3)
    v_model = Denoiser(AsV(model.unet), Schedule(ac), prediction_type="v_prediction")
    res = log_likelihood(v_model, x, divergence="exact")
    expected = exact_log_density(x, mu, cov, ac, 1e-5)
    assert torch.allclose(res.log_p, expected, atol=5e-4, rtol=0), (res.log_p, expected)


class NaNEps(nn.Module):
    def forward(self, x: torch.Tensor, label: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=x * float("nan"))


def test_a_model_with_non_finite_output_fails_with_one_sentence():
    from retrack.errors import UserError

    model = Denoiser(NaNEps(), Schedule(steep_schedule()))
    with pytest.raises(UserError, match="probability-flow ODE failed"):
        log_likelihood(model, torch.zeros(1, 1, 2, 2), divergence="exact")


def test_bits_per_dim_formula():
    assert float(bits_per_dim(torch.tensor(-2 * math.log(2)), 2, 7.0)) == pytest.approx(8.0)


def test_bad_settings_are_user_errors():
    from retrack.errors import UserError

    model, x, *_ = gaussian_setup()
    with pytest.raises(UserError, match="probes"):
        log_likelihood(model, x, probes=0)


# ---------------------------------------------------------------------------------------------
# The score-SDE convention: β linear from T·β_1 to T·β_T, model label t·(T − 1)
# ---------------------------------------------------------------------------------------------

# steep_schedule() has β_1 = 1e-4 and β_T = 0.05 over T = 1000 steps: β(t) from 0.1 to 50, so
# ᾱ(1) = exp(−25.05) and the N(0, I) prior is exact to ~1e-11.
SONG_BETA_MIN, SONG_BETA_MAX = 0.1, 50.0


def song_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * t**2 * (SONG_BETA_MAX - SONG_BETA_MIN) - t * SONG_BETA_MIN)


class SongGaussianEps(GaussianEps):
    """The exact ε-predictor of N(mu, cov) data on the score-SDE's own linear VP-SDE."""

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> SimpleNamespace:
        ab = song_alpha_bar(label.detach().double().clamp(min=0) / (T - 1)).to(x)
        g, s = ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
        r = (x.flatten(1) - g * self.mu) @ self.evecs
        eps = s * (r / (g**2 * self.evals + s**2)) @ self.evecs.T
        return SimpleNamespace(sample=eps.view_as(x))


def test_score_sde_convention_matches_gaussian_log_density():
    _, x, mu, cov, ac = gaussian_setup(seed=4)
    model = Denoiser(SongGaussianEps(mu, cov, ac), Schedule(ac))
    res = log_likelihood(model, x, divergence="exact", schedule="score-sde")
    ab = song_alpha_bar(torch.tensor(1e-5, dtype=torch.float64))
    marginal = ab * cov + (1 - ab) * torch.eye(len(mu), dtype=torch.float64)
    expected = torch.distributions.MultivariateNormal(ab.sqrt() * mu, marginal).log_prob(x.flatten(1))
    assert torch.allclose(res.log_p, expected, atol=5e-4, rtol=0), (res.log_p, expected)
    # The model's own convention reads a different ODE off this predictor: a wrong answer.
    ours = log_likelihood(model, x, divergence="exact", schedule="model")
    assert float((ours.log_p - expected).abs().max()) > 1e-2


def test_score_sde_schedule_of_the_ddpm_linear_schedule():
    from diffusers import DDPMScheduler

    from retrack.metrics.likelihood import LinearVPSchedule

    vp = LinearVPSchedule.from_alphas_cumprod(DDPMScheduler().alphas_cumprod.double())
    assert vp.num_steps == 1000
    assert vp.beta_min == pytest.approx(0.1, rel=1e-3) and vp.beta_max == pytest.approx(20.0, rel=1e-3)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(vp.label(t), torch.tensor([0.0, 499.5, 999.0], dtype=torch.float64))
    assert torch.allclose(vp.beta(t), vp.beta_min + t * (vp.beta_max - vp.beta_min))
    steep = LinearVPSchedule.from_alphas_cumprod(steep_schedule())
    assert (steep.beta_min, steep.beta_max) == (pytest.approx(0.1, rel=1e-9), pytest.approx(50.0, rel=1e-9))
    g, s = steep.gamma_sigma(torch.tensor([0.3], dtype=torch.float64))
    assert float(g**2) == pytest.approx(float(song_alpha_bar(torch.tensor(0.3))), rel=1e-6)
    assert float(g**2 + s**2) == pytest.approx(1.0, abs=1e-12)


def test_score_sde_convention_needs_a_linear_schedule():
    from diffusers import DDPMScheduler

    from retrack.errors import UserError

    model = Denoiser(GaussianEps(torch.zeros(4), torch.eye(4), steep_schedule()),
                     Schedule(DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()))
    with pytest.raises(UserError, match="linear β schedule"):
        log_likelihood(model, torch.zeros(1, 1, 2, 2), schedule="score-sde")
    with pytest.raises(UserError, match="--nll-schedule must be one of model, score-sde"):
        log_likelihood(model, torch.zeros(1, 1, 2, 2), schedule="song")
