"""The paper's two propositions, checked exactly on small point sets (see docs/methods.md)."""

from __future__ import annotations

import math

import numpy as np
import torch

from retrack.models import Schedule
from retrack.neighbours import nearest_neighbours
from retrack.objectives.base import sse
from retrack.objectives.retrack import weighted_target


def linear_schedule() -> Schedule:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return Schedule(torch.cumprod(1 - betas, 0))


def optimal_denoiser(x: torch.Tensor, points: torch.Tensor, gamma: float, sigma: float) -> torch.Tensor:
    """ε*(x) = Σ_r w(a_r|x)(x − γ a_r)/σ with w ∝ exp(−‖x − γa_r‖²/(2σ²)): closed form, direct."""
    diff = x[:, None, :] - gamma * points[None, :, :]  # (B, N, D)
    w = torch.softmax(-diff.pow(2).sum(-1) / (2 * sigma**2), dim=1)
    return (w[..., None] * diff).sum(1) / sigma


def point_set():
    """Remain points on a coarse pixel grid (uint8 bank) and one forget point between them."""
    g = torch.Generator().manual_seed(0)
    remain_u8 = torch.randint(0, 256, (40, 1, 2, 2), generator=g, dtype=torch.uint8)
    forget_u8 = torch.tensor([[[[128, 100], [90, 200]]]], dtype=torch.uint8)
    to_model = lambda u8: u8.double().div(127.5).sub(1.0).flatten(1)  # noqa: E731
    return remain_u8, to_model(remain_u8), to_model(forget_u8)


def test_remain_optimal_denoiser_is_stationary_for_the_untruncated_objective():
    bank, remain, forget = point_set()
    full = torch.cat([remain, forget])
    sched = linear_schedule()
    g = torch.Generator().manual_seed(1)
    for t in (50, 200, 500, 900):
        gamma = math.sqrt(float(sched.alphas_cumprod[t]))
        sigma = math.sqrt(1 - gamma**2)
        x = gamma * forget + sigma * torch.randn(64, 4, generator=g, dtype=torch.float64)  # x ~ q_t(·|a_u)
        gam = torch.full((64, 1, 1, 1), gamma, dtype=torch.float64)
        sig = torch.full((64, 1, 1, 1), sigma, dtype=torch.float64)
        target, spread = weighted_target(x.view(64, 1, 2, 2), gam, sig, bank, None)
        for denoiser, stationary in ((optimal_denoiser(x, remain, gamma, sigma), True),
                                     (optimal_denoiser(x, full, gamma, sigma), False)):
            eps = denoiser.view(64, 1, 2, 2).clone().requires_grad_(True)
            (sse(eps, target) + spread).mean().backward()
            grad_norm = eps.grad.flatten(1).norm(dim=1)
            if stationary:
                assert grad_norm.max() < 1e-9, (t, grad_norm.max())
            elif t <= 500:  # near pure noise (t = 900) one point of 41 barely moves ε*
                assert grad_norm.mean() > 1e-4, (t, grad_norm.mean())  # ≥ 5 orders above


def test_truncated_target_approaches_the_untruncated_one_as_k_grows():
    bank, remain, forget = point_set()
    sched = linear_schedule()
    g = torch.Generator().manual_seed(2)
    t = 300
    gamma = math.sqrt(float(sched.alphas_cumprod[t]))
    sigma = math.sqrt(1 - gamma**2)
    x = (gamma * forget + sigma * torch.randn(256, 4, generator=g, dtype=torch.float64)).view(256, 1, 2, 2)
    gam = torch.full((256, 1, 1, 1), gamma, dtype=torch.float64)
    sig = torch.full((256, 1, 1, 1), sigma, dtype=torch.float64)
    exact, _ = weighted_target(x, gam, sig, bank, None)
    order, _ = nearest_neighbours(bank.permute(0, 2, 3, 1).numpy(),
                                  np.array([[[[128], [100]], [[90], [200]]]], dtype=np.uint8), 40, progress=False)
    errors = []
    for k in (1, 2, 5, 10, 20, 40):
        nbr = torch.from_numpy(order[:, :k]).expand(256, -1)
        approx, _ = weighted_target(x, gam, sig, bank, nbr)
        errors.append(float((approx - exact).pow(2).flatten(1).sum(1).mean()))
    # Not monotone draw by draw, but the gap shrinks and vanishes at K = |A_r|.
    assert errors[0] > 1e-2 and errors[4] < errors[0] / 3 and errors[-1] < 1e-20, errors


def expected_log_likelihood(a_u: np.ndarray, a_r: np.ndarray, sched: Schedule) -> float:
    """log E_t E_{x~q_t(·|a_u)} q_t(x|a_r): the Gaussian convolution N(γa_u; γa_r, 2σ²I), averaged over t."""
    abar = sched.alphas_cumprod.numpy()[1:]
    d = a_u.size
    sq = float(((a_u - a_r) ** 2).sum())
    log_terms = -0.5 * d * np.log(4 * np.pi * (1 - abar)) - abar * sq / (4 * (1 - abar))
    return float(np.logaddexp.reduce(log_terms) - np.log(len(abar)))


def test_gaussian_convolution_matches_monte_carlo():
    rng = np.random.default_rng(0)
    a_u, a_r = rng.normal(size=3), rng.normal(size=3)
    gamma, sigma = 0.8, 0.6
    x = gamma * a_u + sigma * rng.normal(size=(400_000, 3))
    mc = np.mean(np.exp(-((x - gamma * a_r) ** 2).sum(1) / (2 * sigma**2)) / (2 * np.pi * sigma**2) ** 1.5)
    exact = np.exp(-(gamma**2) * ((a_u - a_r) ** 2).sum() / (4 * sigma**2)) / (4 * np.pi * sigma**2) ** 1.5
    assert abs(mc - exact) / exact < 0.02


def test_proposition2_knn_order_is_expected_likelihood_order():
    rng = np.random.default_rng(4)
    remain = rng.integers(0, 256, (60, 2, 2, 1), dtype=np.uint8)
    forget = rng.integers(0, 256, (3, 2, 2, 1), dtype=np.uint8)
    sched = linear_schedule()
    knn, _ = nearest_neighbours(remain, forget, k=60, chunk=7, progress=False)
    scale = lambda u8: u8.astype(np.float64).ravel() / 127.5 - 1  # noqa: E731
    for j in range(len(forget)):
        ll = np.array([expected_log_likelihood(scale(forget[j]), scale(r), sched) for r in remain])
        by_likelihood = np.argsort(-ll, kind="stable")
        assert np.array_equal(by_likelihood, knn[j])
