"""Each method's loss on hand-built tensors against the formulas of docs/methods.md."""

from __future__ import annotations

import math

import pytest
import torch

from retrack import objectives
from retrack.models import Schedule
from retrack.objectives.base import Prepared, TrainBatch, TwoGradientRule, WeightedSum, sse
from retrack.objectives.retrack import weighted_target
from retrack.objectives.siss import siss_weights


def schedule() -> Schedule:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return Schedule(torch.cumprod(1 - betas, 0))


def test_registry_lists_the_five_methods():
    assert objectives.available() == ["erasediff", "neggrad", "retrack", "siss", "vanilla"]


def test_sse_sums_over_pixels_per_sample():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]], [[[3.0, 0.0], [0.0, 0.0]]]])
    assert sse(pred, target).tolist() == [5.0, 9.0]


def test_vanilla_and_neggrad_are_sse_over_batch_with_signs():
    eps = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]])
    prep = Prepared(torch.zeros(2, 1, 1, 2), torch.zeros(2, dtype=torch.long), {"eps": torch.zeros(2, 1, 1, 2)})
    van, neg = objectives.build("vanilla"), objectives.build("neggrad")
    assert van.terms(eps, prep)["remain"].item() == pytest.approx((1 + 4) / 2)
    assert neg.terms(eps, prep)["forget"].item() == pytest.approx((1 + 4) / 2)
    assert van.rule == WeightedSum({"remain": 1.0})
    assert neg.rule == WeightedSum({"forget": -1.0})


def test_erasediff_terms_and_rule():
    method = objectives.build("erasediff", eta=0.1)
    eps = torch.tensor([[[[1.0]]], [[[0.5]]]])
    prep = Prepared(eps, torch.zeros(2, dtype=torch.long),
                    {"eps": torch.tensor([[[[0.0]]]]), "uniform": torch.tensor([[[[0.25]]]])})
    terms = method.terms(eps, prep)
    assert terms["main"].item() == pytest.approx(1.0)
    assert terms["corr"].item() == pytest.approx(0.0625)
    rule = method.rule
    # g = g_main + max(η − <g_main, g_corr>/‖g_corr‖², 0)·g_corr
    assert rule.coefficient(dot=-2.0, sq_norm=4.0) == pytest.approx(0.1 + 0.5)
    assert rule.coefficient(dot=2.0, sq_norm=4.0) == 0.0


def test_erasediff_corrupting_target_is_uniform_on_unit_interval():
    method = objectives.build("erasediff")
    batch = TrainBatch(remain=torch.zeros(64, 1, 4, 4), forget=torch.zeros(64, 1, 4, 4))
    u = method.prepare(batch, schedule(), torch.Generator().manual_seed(0)).targets["uniform"]
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02


def test_siss_rule_subtracts_forget_gradient_rescaled_to_norm_s():
    rule = TwoGradientRule("main", "corr", "siss", 5.0)
    assert rule.coefficient(dot=123.0, sq_norm=4.0) == pytest.approx(-5.0 / 2.0)


def _siss_direct(v_r, v_f, lam):
    d_r = 0.5 * v_r.pow(2).flatten(1).sum(1)
    d_f = 0.5 * v_f.pow(2).flatten(1).sum(1)
    w_r = 1 / ((1 - lam) + lam * torch.exp(d_r - d_f))
    w_f = 1 / ((1 - lam) * torch.exp(d_f - d_r) + lam)
    return w_r, w_f


@pytest.mark.parametrize("lam", [0.2, 0.5, 0.9])
def test_siss_weights_match_reference_formula(lam):
    g = torch.Generator().manual_seed(0)
    v_r, v_f = torch.randn(6, 1, 2, 2, generator=g), torch.randn(6, 1, 2, 2, generator=g)
    w_r, w_f = siss_weights(v_r, v_f, lam)
    e_r, e_f = _siss_direct(v_r.double(), v_f.double(), lam)
    torch.testing.assert_close(w_r.double(), e_r, rtol=1e-6, atol=0)
    torch.testing.assert_close(w_f.double(), e_f, rtol=1e-6, atol=0)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_siss_is_finite_at_the_ends(lam):
    # At λ = 0 the noisy input comes from the remain image, at λ = 1 from the forget image; the
    # other image lies far away (d differs by 0.5·9·256 = 1152 > log(float max) ≈ 709), where a
    # direct evaluation of e^{d_f − d_r} or e^{d_r − d_f} overflows.
    near, far = torch.zeros(3, 1, 16, 16), torch.full((3, 1, 16, 16), 3.0)
    v_r, v_f = (near, far) if lam == 0.0 else (far, near)
    w_r, w_f = siss_weights(v_r, v_f, lam)
    assert torch.isfinite(w_r).all() and torch.isfinite(w_f).all()
    kept, other = (w_r, w_f) if lam == 0.0 else (w_f, w_r)
    assert torch.all(kept == 1.0) and torch.all(other == 0.0)  # e^{-1152} underflows to 0
    method = objectives.build("siss", lam=lam, s=5.0)
    m = torch.zeros(3, 1, 16, 16)
    prep = Prepared(m, torch.full((3,), 500),
                    {"remain": m - v_r, "forget": m - v_f,
                     "gamma": torch.ones(3, 1, 1, 1), "sigma": torch.ones(3, 1, 1, 1)})
    terms = method.terms(torch.randn(3, 1, 16, 16), prep)
    assert all(math.isfinite(v.item()) for v in terms.values())


def test_siss_loss_terms_are_weighted_sse():
    lam = 0.5
    method = objectives.build("siss", lam=lam)
    g = torch.Generator().manual_seed(1)
    r, f, m = (torch.randn(4, 1, 2, 2, generator=g) for _ in range(3))
    gamma, sigma = torch.full((4, 1, 1, 1), 0.8), torch.full((4, 1, 1, 1), 0.6)
    eps = torch.randn(4, 1, 2, 2, generator=g)
    prep = Prepared(m, torch.zeros(4, dtype=torch.long),
                    {"remain": r, "forget": f, "gamma": gamma, "sigma": sigma})
    terms = method.terms(eps, prep)
    v_r, v_f = (m - gamma * r) / sigma, (m - gamma * f) / sigma
    w_r, w_f = _siss_direct(v_r.double(), v_f.double(), lam)
    assert terms["main"].item() == pytest.approx((w_r * sse(eps, v_r).double()).mean().item(), rel=1e-5)
    assert terms["corr"].item() == pytest.approx((w_f * sse(eps, v_f).double()).mean().item(), rel=1e-5)


def _per_neighbour_loss(eps, x_t, gamma, sigma, neighbours):
    """Σ_k p_k‖ε − v_k‖² written the direct way: B×K×D tensors against the output."""
    v = (x_t[:, None] - gamma[:, None] * neighbours) / sigma[:, None]  # (B, K, C, H, W)
    p = torch.softmax(-0.5 * v.pow(2).flatten(2).sum(2), dim=1).detach()
    return (p * (eps[:, None] - v).pow(2).flatten(2).sum(2)).sum(1).mean()


def test_weighted_target_loss_equals_per_neighbour_form_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    bank = torch.randint(0, 256, (30, 1, 3, 3), generator=g, dtype=torch.uint8)
    nbr = torch.randint(0, 30, (5, 7), generator=g)
    x_t = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64)
    gamma = torch.rand(5, 1, 1, 1, generator=g, dtype=torch.float64) * 0.9 + 0.05
    sigma = (1 - gamma**2).sqrt()
    eps1 = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    eps2 = eps1.detach().clone().requires_grad_(True)
    a = bank[nbr].double() / 127.5 - 1
    direct = _per_neighbour_loss(eps1, x_t, gamma, sigma, a)
    target, spread = weighted_target(x_t, gamma, sigma, bank, nbr, chunk=3)
    ours = (sse(eps2, target) + spread).mean()
    direct.backward()
    ours.backward()
    assert ours.item() == pytest.approx(direct.item(), rel=1e-10)
    torch.testing.assert_close(eps2.grad, eps1.grad, rtol=1e-10, atol=1e-12)


def test_weighted_target_does_not_depend_on_chunking():
    g = torch.Generator().manual_seed(3)
    bank = torch.randint(0, 256, (50, 1, 4, 4), generator=g, dtype=torch.uint8)
    x_t = torch.randn(4, 1, 4, 4, generator=g)
    gamma, sigma = torch.full((4, 1, 1, 1), 0.3), torch.full((4, 1, 1, 1), math.sqrt(1 - 0.09))
    ref = weighted_target(x_t, gamma, sigma, bank, None, chunk=50)
    for chunk in (1, 7, 13):
        got = weighted_target(x_t, gamma, sigma, bank, None, chunk=chunk)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-4)


def test_retrack_terms_mix_unlearn_and_remain_with_lambda():
    method = objectives.build("retrack", lam=0.25)
    assert method.rule == WeightedSum({"unlearn": 0.25, "remain": 0.75})
    batch = TrainBatch(forget=torch.zeros(3, 1, 4, 4), remain=torch.zeros(3, 1, 4, 4),
                       bank=torch.full((5, 1, 4, 4), 127, dtype=torch.uint8),
                       neighbours=torch.zeros(3, 2, dtype=torch.long))
    prep = method.prepare(batch, schedule(), torch.Generator().manual_seed(0))
    assert prep.x.shape == (6, 1, 4, 4)  # one forward for both terms
    terms = method.terms(torch.zeros(6, 1, 4, 4), prep)
    assert set(terms) == {"unlearn", "remain"}
    assert terms["remain"].item() == pytest.approx(sse(torch.zeros(3, 1, 4, 4), prep.targets["eps"]).mean().item())


@pytest.mark.parametrize("name,kw", [("retrack", {"lam": 1.5}), ("siss", {"lam": -0.1})])
def test_out_of_range_lambda_is_refused(name, kw):
    with pytest.raises(ValueError):
        objectives.build(name, **kw)
