"""MUNBa's Nash bargaining balance of ReTrack's two gradients, against hand-solved cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_denoiser, tiny_train_data
from retrack import objectives
from retrack.cli import main
from retrack.objectives.base import SplitRule, nash_alphas
from retrack.trainer import TrainSettings, draw_batch, split_step, train
from retrack.unlearn_config import build_objective, config_of, resolve_method
from test_variants import Quadratic, quadratic_step

FAST = ["--steps", "2", "--batch-size", "4", "--quiet", "--device", "cpu"]
NASH = SplitRule("unlearn", "remain", 0.005, balance="nash")


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def newton(dot: float, sq1: float, sq2: float) -> tuple[float, float]:
    """α with α_i·(Kα)_i = 1 by Newton's method on F(α) = α ⊙ Kα − 1, from (1/‖g1‖, 1/‖g2‖)."""
    k = torch.tensor([[sq1, dot], [dot, sq2]], dtype=torch.float64)
    a = torch.tensor([sq1**-0.5, sq2**-0.5], dtype=torch.float64)
    for _ in range(50):
        f = a * (k @ a) - 1.0
        jac = torch.diag(k @ a) + a[:, None] * k
        a = a - torch.linalg.solve(jac, f)
    return float(a[0]), float(a[1])


def test_orthogonal_gradients_get_one_over_their_norms():
    assert nash_alphas(0.0, 4.0, 9.0) == (0.5, 1 / 3)
    assert NASH.coefficients(0.0, 4.0, 9.0) == (0.5, 1 / 3, 0.5 / (0.5 + 1 / 3))


@pytest.mark.parametrize(("g1", "g2"), [((3.0, 0.0), (1.0, 2.0)),  # agreeing: ⟨g1, g2⟩ = 3
                                        ((3.0, 0.0), (-1.0, 2.0)),  # conflicting: ⟨g1, g2⟩ = −3
                                        ((1e-3, 2e-3), (-40.0, 5.0)),  # norms 5 orders apart, conflicting
                                        ((0.3, 0.4), (0.31, 0.39))])  # nearly parallel
def test_the_closed_form_solves_the_bargaining_equations(g1, g2):
    u, v = torch.tensor(g1, dtype=torch.float64), torch.tensor(g2, dtype=torch.float64)
    dot, sq1, sq2 = float(u @ v), float(u @ u), float(v @ v)
    a1, a2 = nash_alphas(dot, sq1, sq2)
    n1, n2 = newton(dot, sq1, sq2)
    assert a1 == pytest.approx(n1, rel=1e-9) and a2 == pytest.approx(n2, rel=1e-9)
    assert a1 * (sq1 * a1 + dot * a2) == pytest.approx(1.0, rel=1e-12)
    assert a2 * (dot * a1 + sq2 * a2) == pytest.approx(1.0, rel=1e-12)
    g = a1 * u + a2 * v  # the same progress on both terms, and norm √2
    assert float(g @ u) / sq1**0.5 == pytest.approx(float(g @ v) / sq2**0.5, rel=1e-12)
    assert float(g.norm()) == pytest.approx(math.sqrt(2.0), rel=1e-12)


def test_the_closed_form_is_munbas():
    # MUNBa's code (g1 = ‖g_r‖², g2 = ⟨g_r, g_u⟩, g3 = ‖g_u‖²): α_r = √((g1g3 − g2√(g1g3))/(g1²g3 − g1g2²)).
    dot, sq_r, sq_u = -3.0, 5.0, 9.0
    theirs = math.sqrt((sq_r * sq_u - dot * math.sqrt(sq_r * sq_u)) / (sq_r**2 * sq_u - sq_r * dot**2))
    assert nash_alphas(dot, sq_r, sq_u)[0] == pytest.approx(theirs, rel=1e-12)


@pytest.mark.parametrize(("dot", "sq1", "sq2"), [(0.0, 0.0, 4.0), (0.0, 4.0, 0.0), (-6.0, 4.0, 9.0)])
def test_no_bargain_falls_back_to_the_fixed_lambda(dot, sq1, sq2):
    # A zero gradient, or exactly opposed ones (cos = −1): no α > 0 solves the equations.
    assert nash_alphas(dot, sq1, sq2) is None
    assert NASH.coefficients(dot, sq1, sq2) == (0.005, 0.995, 0.005)


def test_the_split_step_leaves_the_bargained_gradient(accelerator):
    q = Quadratic()
    q.w.data = torch.tensor([0.25, 2.0])  # g1 = (−1, −1), g2 = (2.25, 1): conflicting
    g1, g2 = q.grads()
    chosen = quadratic_step(SplitRule("first", "second", 0.005, balance="nash"), q, accelerator)
    a1, a2 = nash_alphas(float(g1 @ g2), float(g1 @ g1), float(g2 @ g2))
    torch.testing.assert_close(q.w.grad, a1 * g1 + a2 * g2)
    assert (chosen["alpha_first"], chosen["alpha_second"]) == (a1, a2)
    assert chosen["lam"] == pytest.approx(a1 / (a1 + a2))


def test_nash_is_a_split_rule_of_retrack_and_the_default_is_the_papers():
    assert objectives.build("retrack").rule == objectives.build("retrack", balance="none").rule
    assert objectives.build("retrack", balance="nash").rule == SplitRule("unlearn", "remain", 0.005, 1.0, False, "nash")
    with pytest.raises(ValueError, match="does not combine with surgery"):
        objectives.build("retrack", balance="nash", surgery=True)


def test_a_trainer_step_leaves_alpha1_g1_plus_alpha2_g2_before_clipping():
    data, seen = tiny_train_data(), {}
    objective = objectives.build("retrack", balance="nash")
    settings = TrainSettings(steps=1, batch_size=4, layout="split", seed=5)

    def keep(step, params):
        seen[step] = [p.grad.clone() for p in params]

    train(tiny_denoiser(), objective, data, settings, device="cpu", progress=False, on_gradient=keep)
    # The same first batch by hand: the trainer's generator is seeded (seed · 1000 + process index).
    gen = torch.Generator().manual_seed(5 * 1000)
    prep = objective.prepare(draw_batch(objective, data, 4, gen, "cpu"), tiny_denoiser().schedule, gen)
    model = tiny_denoiser()
    params = list(model.parameters())
    g1 = torch.autograd.grad(objective.term("unlearn", model(prep.x[:4], prep.t[:4]), prep), params)
    g2 = torch.autograd.grad(objective.term("remain", model(prep.x[4:], prep.t[4:]), prep), params)
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g1, g2, strict=True))
    a1, a2 = nash_alphas(dot, sum(float(a.double().pow(2).sum()) for a in g1),
                         sum(float(b.double().pow(2).sum()) for b in g2))
    expected = [a1 * x + a2 * y for x, y in zip(g1, g2, strict=True)]
    scale = max(float(e.abs().max()) for e in expected)
    assert max(float((s - e).abs().max()) for s, e in zip(seen[0], expected, strict=True)) <= 1e-5 * scale


def test_split_step_with_nash_matches_the_trainers_accumulator(accelerator):
    model = tiny_denoiser()
    objective = objectives.build("retrack", balance="nash")
    gen = torch.Generator().manual_seed(0)
    prep = objective.prepare(draw_batch(objective, tiny_train_data(), 4, gen, "cpu"), model.schedule, gen)
    _, chosen = split_step(objective.rule, model, objective, prep, list(model.parameters()), accelerator)
    a1, a2 = chosen["alpha_unlearn"], chosen["alpha_remain"]
    n1, n2, cos = chosen["norm_unlearn"], chosen["norm_remain"], chosen["cos"]
    assert a1 * (a1 * n1**2 + a2 * cos * n1 * n2) == pytest.approx(1.0, rel=1e-9)
    assert a2 * (a1 * cos * n1 * n2 + a2 * n2**2) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("args,words", [
    (["--balance", "nash", "--surgery"], "--balance nash weighs the two gradients by bargaining; it does not "
                                         "combine with --surgery."),
    (["--balance", "nash", "--lam", "auto"], "--balance nash chooses both weights at every step; --lam auto "
                                             "cannot combine with it (a fixed --lam is its fallback where no "
                                             "bargain exists)."),
    (["--method", "siss", "--balance", "nash"], "--balance is an option of retrack; method 'siss' does not have it."),
    (["--method", "vanilla", "--balance", "nash"], "--balance is an option of retrack"),
    (["--balance", "pareto"], "--balance must be one of none, nash, got 'pareto'"),
])
def test_nash_that_cannot_compose_exits_2_with_one_sentence(args, words, tiny_model, tiny_data, tmp_path, capsys):
    code = main([str(a) for a in ["unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "3",
                                  "--out", tmp_path / "out", *args, *FAST]])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_nash_takes_the_recipes_lambda_as_its_fallback():
    cfg = resolve_method(config_of({"model": "m", "data": "d", "forget": "0", "out": "o",
                                    "recipe": "stable-diffusion", "balance": "nash"}), processes=1)
    assert build_objective(cfg).rule == SplitRule("unlearn", "remain", 0.5, 1.0, False, "nash")


def test_nash_runs_end_to_end_with_saliency_and_is_logged(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(a) for a in ["unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "3,7",
                                  "--out", out, "--k", "5", "--cache-dir", tmp_path / "c", "--balance", "nash",
                                  "--lam", "0.3", "--saliency", "0.5", *FAST]])
    assert code == 0, capsys.readouterr().err
    objective = json.loads((out / "retrack_run.json").read_text())["objective"]
    assert (objective["balance"], objective["lam"]) == ("nash", 0.3)  # λ: the fallback where no bargain exists
    log = json.loads((out / "retrack_log.json").read_text())
    assert "saliency" in log[0] and len(log) == 2
    for e in log:
        a1, a2, n1, n2, c = e["alpha_unlearn"], e["alpha_remain"], e["norm_unlearn"], e["norm_remain"], e["cos"]
        assert a1 * n1 == pytest.approx(a2 * n2, rel=1e-9) and a1 * n1 == pytest.approx((1 + c) ** -0.5, rel=1e-9)
        assert e["lam"] == pytest.approx(a1 / (a1 + a2), rel=1e-12)


@pytest.mark.parametrize("dot, sq1, sq2", [(0.0, 4.0, 9.0), (3.0, 4.0, 9.0), (-5.0, 4.0, 9.0), (1e-3, 1e6, 1e-4)])
def test_for_two_gradients_nash_points_where_lam_auto_with_ratio_1_points(dot, sq1, sq2):
    a, b, lam = NASH.coefficients(dot, sq1, sq2)
    auto_a, auto_b, auto_lam = SplitRule("unlearn", "remain", None, 1.0).coefficients(dot, sq1, sq2)
    assert lam == pytest.approx(auto_lam, rel=1e-12)  # the λ of the same direction
    assert a / b == pytest.approx(auto_a / auto_b, rel=1e-12)  # parallel steps, lengths apart
    assert auto_lam == pytest.approx(sq2**0.5 / (sq1**0.5 + sq2**0.5), rel=1e-12)
