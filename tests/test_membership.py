"""Membership scores and their calibration: exact on scripted scores and on a model whose ε
prediction has a closed form; the attacks separate a tiny overfitted model's training images."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from retrack.errors import UserError
from retrack.metrics import calibration as cal
from retrack.metrics.membership import AttackSettings, ddim_move, membership_scores, row_noise
from retrack.models import Denoiser, Schedule

# ---------------------------------------------------------------------------------------------
# Calibration on scripted scores
# ---------------------------------------------------------------------------------------------

NULL = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.3, 0.2, 0.8, 0.6, 0.4])  # 10 non-members


def test_percentile_and_p_values_count_exactly():
    # 0.3: two non-members at 0.3, 0.1 and 0.2 below: 4 of 10 at most 0.3
    assert cal.percentile(0.3, NULL) == pytest.approx(40.0)
    assert cal.p_member(0.3, NULL) == pytest.approx(5 / 11)
    assert cal.p_unfamiliar(0.3, NULL) == pytest.approx(9 / 11)  # 0.3 ×2 and the 6 above, plus one
    # below every non-member: percentile 0, the smallest p the (n + 1) correction allows
    assert cal.percentile(0.0, NULL) == 0.0
    assert cal.p_member(0.0, NULL) == pytest.approx(1 / 11)
    assert cal.p_unfamiliar(0.0, NULL) == pytest.approx(11 / 11)
    assert cal.p_member(1.0, NULL) == pytest.approx(1.0)
    assert cal.p_unfamiliar(1.0, NULL) == pytest.approx(1 / 11)
    np.testing.assert_allclose(cal.percentile(np.array([0.1, 0.95]), NULL), [10.0, 100.0])


def test_verdict_flags_at_the_level_and_not_above():
    null = np.arange(1, 40, dtype=float)  # 39 non-members: p of a score below all = 1/40 = 0.025
    assert cal.test_image(0.0, null, 0.025)["member"] is True
    assert cal.test_image(0.0, null, 0.0249)["member"] is False
    out = cal.test_image(1.0, null, 0.05)  # ties with the smallest: (1 + 1)/40 = 0.05 → flagged
    assert out["p_member"] == pytest.approx(0.05) and out["member"] is True
    assert cal.test_image(2.0, null, 0.05)["member"] is False  # (1 + 2)/40


def test_auc_is_mann_whitney_with_half_ties():
    assert cal.auc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert cal.auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    # pairs (m, n): (0.1, 0.1) tie ½, (0.1, 0.3) 1, (0.5, 0.1) 0, (0.5, 0.3) 0 → 1.5 / 4
    assert cal.auc([0.1, 0.5], [0.1, 0.3]) == pytest.approx(0.375)
    rng = np.random.default_rng(0)
    m, n = rng.normal(size=37), rng.normal(size=23)
    brute = np.mean([(a < b) + 0.5 * (a == b) for a in m for b in n])
    assert cal.auc(m, n) == pytest.approx(brute)


def test_too_few_nonmembers_are_refused_with_the_number_needed():
    assert cal.needed_nonmembers(0.05) == 20
    assert cal.needed_nonmembers(0.05, 3) == 59  # 1/(59 + 1) = α/3
    assert cal.needed_nonmembers(0.01) == 99
    cal.check_nonmembers(20, 0.05)
    with pytest.raises(UserError, match="gives 19 non-member images.*at least 20"):
        cal.check_nonmembers(19, 0.05)
    with pytest.raises(UserError, match="at least 59"):
        cal.check_nonmembers(58, 0.05, 3)


# ---------------------------------------------------------------------------------------------
# Scores on a model with a closed-form ε prediction
# ---------------------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    """Stands in for a UNet: `fn(x, t)` as its output (float64)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.config = SimpleNamespace(sample_size=4, in_channels=1)

    def forward(self, x, t):
        return SimpleNamespace(sample=self.fn(x, t) + 0 * self.w)


ABAR = DDPMScheduler().alphas_cumprod.double()


def _denoiser(fn) -> Denoiser:
    return Denoiser(_Net(fn), Schedule(ABAR))


def _images(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)


def _model_range(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1


def _single_point_denoiser(x_star: torch.Tensor) -> Denoiser:
    """The exact ε-predictor of a data set holding one image x*: ε̂(x_t, t) = (x_t − γ_t·x*)/σ_t."""
    def fn(x, t):
        a = ABAR[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x_star) / (1 - a).sqrt()
    return _denoiser(fn)


def test_loss_score_of_the_single_point_denoiser_in_closed_form():
    images = _images(0, 5)
    x_star = _model_range(images[:1])
    d = _single_point_denoiser(x_star)
    s = AttackSettings(loss_timesteps=(10, 100, 500), loss_draws=2, batch_size=2)
    got = membership_scores(d, images, ("loss",), s)["loss"]
    # ε̂ − ε = γ_t (x₀ − x*)/σ_t for any noise: the loss is mean((x₀ − x*)²) · mean_t ᾱ_t/(1 − ᾱ_t)
    ratio = np.mean([float(ABAR[t] / (1 - ABAR[t])) for t in (10, 100, 500)])
    want = ((_model_range(images) - x_star) ** 2).flatten(1).mean(1).numpy() * ratio
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert got[0] == pytest.approx(0.0, abs=1e-12)  # the training image itself


def test_loss_score_of_the_zero_predictor_is_the_drawn_noise_energy():
    images = _images(1, 3)
    d = _denoiser(lambda x, t: torch.zeros_like(x))
    s = AttackSettings(loss_timesteps=(7,), loss_draws=3, seed=5, batch_size=2)
    got = membership_scores(d, images, ("loss",), s)["loss"]
    want = [np.mean([float((row_noise(5, [i], k, (1, 4, 4)) ** 2).mean()) for k in range(3)]) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_pia_score_of_the_single_point_denoiser_in_closed_form():
    images = _images(2, 4)
    x_star = _model_range(images[:1])
    d = _single_point_denoiser(x_star)
    s = AttackSettings(pia_t=200, pia_p=4.0)
    got = membership_scores(d, images, ("pia",), s)["pia"]
    # ε̂(x_t, t) − ε̂(x₀, 0) = γ_t (x₀ − x*)/σ_t → (γ_t/σ_t) · (mean |x₀ − x*|⁴)^(1/4)
    diff = (_model_range(images) - x_star).abs().flatten(1)
    want = float((ABAR[200] / (1 - ABAR[200])).sqrt()) * (diff ** 4).mean(1) ** 0.25
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)


def test_secmi_t_error_of_a_linear_predictor_in_closed_form():
    """ε̂ = c·x makes every DDIM move a multiplication: x ↦ m(s, t)·x with
    m = √(ᾱ_t/ᾱ_s)(1 − c√(1−ᾱ_s)) + c√(1−ᾱ_t); the t-error is mean(x_t²)·(m(t,t+k)·m(t+k,t) − 1)²."""
    c = 0.3
    d = _denoiser(lambda x, t: c * x)

    def m(s, t):
        a_s, a_t = float(ABAR[s]), float(ABAR[t])
        return math.sqrt(a_t / a_s) * (1 - c * math.sqrt(1 - a_s)) + c * math.sqrt(1 - a_t)

    images = _images(3, 3)
    t, k = 40, 10
    got = membership_scores(d, images, ("secmi",), AttackSettings(secmi_t=t, secmi_k=k))["secmi"]
    carry = np.prod([m(s, s + k) for s in range(0, t, k)])
    x0 = _model_range(images).flatten(1).numpy()
    want = (x0 ** 2).mean(1) * carry ** 2 * (m(t, t + k) * m(t + k, t) - 1) ** 2
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert (got > 0).all()


def test_secmi_of_the_exact_denoiser_is_zero_and_ddim_moves_invert():
    images = _images(4, 3)
    d = _single_point_denoiser(_model_range(images[:1]))
    got = membership_scores(d, images, ("secmi",), AttackSettings(secmi_t=30, secmi_k=10))["secmi"]
    np.testing.assert_allclose(got, 0.0, atol=1e-20)
    x, eps = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    back = ddim_move(d, ddim_move(d, x, eps, 10, 300), eps, 300, 10)
    torch.testing.assert_close(back, x)


def test_scores_do_not_depend_on_the_batch():
    from conftest import tiny_denoiser

    d = tiny_denoiser()
    images = _images(5, 7).repeat(2, axis=1).repeat(2, axis=2)  # 8×8 for the tiny UNet
    a = membership_scores(d, images, settings=AttackSettings(batch_size=7, secmi_t=20, secmi_k=10))
    b = membership_scores(d, images, settings=AttackSettings(batch_size=3, secmi_t=20, secmi_k=10))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5)
    c = membership_scores(d, images[:2], settings=AttackSettings(batch_size=3, secmi_t=20, secmi_k=10))
    for name in a:
        np.testing.assert_allclose(c[name], a[name][:2], rtol=1e-5)
    assert d.training  # restored


def test_bad_attack_settings_are_one_sentence():
    d = _denoiser(lambda x, t: x)
    with pytest.raises(UserError, match="SecMI needs"):
        membership_scores(d, _images(0, 1), ("secmi",), AttackSettings(secmi_t=995, secmi_k=10))
    with pytest.raises(UserError, match="loss attack's timesteps"):
        membership_scores(d, _images(0, 1), ("loss",), AttackSettings(loss_timesteps=(1000,)))
    with pytest.raises(UserError, match="unknown attack"):
        membership_scores(d, _images(0, 1), ("lira",))


# ---------------------------------------------------------------------------------------------
# As evaluate metrics, evaluation during fine-tuning and experiment columns
# ---------------------------------------------------------------------------------------------


def test_membership_metrics_are_registered_evaluate_metrics(tiny_model, tiny_data):
    from retrack.backends import load
    from retrack.evaluate import evaluate
    from retrack.metrics import registry

    for name in ("membership_loss", "membership_secmi", "membership_pia"):
        assert name in registry.during_training() and registry.stop_metrics()[name] == "above"
        assert registry.get(name).better == "higher" and not registry.get(name).samples
    res = evaluate(tiny_model, tiny_data, "3,7", ["membership_loss", "membership_pia"], progress=False,
                   device="cpu", seed=2, batch_size=5)
    images = np.load(tiny_data)["images"][[3, 7], ..., None]
    want = membership_scores(load(str(tiny_model), "cpu").denoiser, images, ("loss", "pia"),
                             AttackSettings(seed=2, batch_size=5))
    np.testing.assert_allclose(res["membership_loss"]["per_image"], want["loss"], rtol=1e-6)
    np.testing.assert_allclose(res["membership_pia"]["per_image"], want["pia"], rtol=1e-6)
    assert res["membership_loss"]["mean"] == pytest.approx(float(want["loss"].mean()))
    assert res["membership_loss"]["settings"] == {"seed": 2, "loss": {"timesteps": [100], "draws": 4}}
