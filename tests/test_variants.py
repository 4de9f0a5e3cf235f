"""ReTrack's options beside the paper's objective, each against a hand-computed case."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_unet
from retrack import objectives
from retrack.cli import main
from retrack.models import Denoiser, Schedule
from retrack.objectives.base import Prepared, SplitRule, TrainBatch, WeightedSum
from retrack.objectives.retrack import min_snr_weight
from retrack.trainer import apply_rule, split_step

FAST = ["--steps", "2", "--batch-size", "4", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


class Quadratic:
    """term("first") = ½‖Aw − a‖² over row 0, term("second") = ½‖w − b‖² over row 1.

    The "model" returns w for every row, so each term's gradient is known in closed form:
    ∇first = Aᵀ(Aw − a), ∇second = w − b.
    """

    A = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    a, b = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 1.0])

    def __init__(self) -> None:
        self.w = torch.nn.Parameter(torch.tensor([1.5, -1.0]))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], 2)

    def term(self, name: str, eps: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        w = eps[0]
        if name == "first":
            return 0.5 * (self.A @ w - self.a).pow(2).sum()
        return 0.5 * (w - self.b).pow(2).sum()

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.w.detach()
        return self.A.T @ (self.A @ w - self.a), w - self.b


def quadratic_step(rule: SplitRule, q: Quadratic, accelerator) -> dict[str, float]:
    prepared = Prepared(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), split=1)
    q.w.grad = None  # as the trainer leaves it after each optimiser step
    _, chosen = split_step(rule, q, q, prepared, [q.w], accelerator)
    return chosen


def test_surgery_removes_the_opposing_component(accelerator):
    q = Quadratic()
    g1, g2 = q.grads()  # g1 = (4, −1.75), g2 = (3.5, −2): ⟨g1, g2⟩ > 0, nothing to remove
    quadratic_step(SplitRule("first", "second", lam=0.25, surgery=True), q, accelerator)
    torch.testing.assert_close(q.w.grad, 0.25 * g1 + 0.75 * g2)
    # Opposing gradients: g1 = (1, 0), g2 = (−1, 1) ⇒ g1' = g1 + ½g2 = (½, ½), orthogonal to g2.
    a, b, lam = SplitRule("u", "r", lam=0.25, surgery=True).coefficients(-1.0, 1.0, 2.0)
    assert (a, b, lam) == (0.25, 0.25 * 0.5 + 0.75, 0.25)
    assert [a * 1 + b * -1, a * 0 + b * 1] == [-0.625, 0.875]
    q.w.data = torch.tensor([0.25, 2.0])  # g1 = (−1, −1), g2 = (2.25, 1): ⟨g1, g2⟩ = −3.25
    g1, g2 = q.grads()
    dot = float(g1 @ g2)
    assert dot == pytest.approx(-3.25)
    quadratic_step(SplitRule("first", "second", lam=0.25, surgery=True), q, accelerator)
    g1p = g1 - dot / float(g2 @ g2) * g2
    assert float(g1p @ g2) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(q.w.grad, 0.25 * g1p + 0.75 * g2)


def test_auto_lambda_by_hand():
    # ‖g1‖ = 5, ‖g2‖ = 1, R = 2: λ·5 = 2(1 − λ) ⇒ λ = 2/7.
    a, b, lam = SplitRule("u", "r", lam=None, ratio=2.0).coefficients(dot=4.0, sq_first=25.0, sq_second=1.0)
    assert lam == pytest.approx(2 / 7) and a == pytest.approx(2 / 7) and b == pytest.approx(5 / 7)


@pytest.mark.parametrize("ratio,surgery", [(1.0, False), (0.3, False), (4.0, True)])
def test_auto_lambda_reaches_the_target_ratio_on_a_quadratic(accelerator, ratio, surgery):
    q = Quadratic()
    q.w.data = torch.tensor([0.25, 2.0])
    opt = torch.optim.SGD([q.w], lr=0.1)
    for _ in range(20):
        g1, g2 = q.grads()
        if surgery and float(g1 @ g2) < 0:
            g1 = g1 - float(g1 @ g2) / float(g2 @ g2) * g2
        chosen = quadratic_step(SplitRule("first", "second", lam=None, ratio=ratio, surgery=surgery), q, accelerator)
        lam = chosen["lam"]
        assert lam * float(g1.norm()) == pytest.approx(ratio * (1 - lam) * float(g2.norm()), rel=1e-4)
        torch.testing.assert_close(q.w.grad, lam * g1 + (1 - lam) * g2)
        opt.step()


def schedule() -> Schedule:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return Schedule(torch.cumprod(1 - betas, 0))


def test_min_snr_weight_by_hand():
    ac = torch.tensor([0.99, 0.5, 0.1], dtype=torch.float64)  # SNR 99, 1, 1/9
    w = min_snr_weight(ac, torch.tensor([0, 1, 2, 0]), 5.0)
    torch.testing.assert_close(w, torch.tensor([5 / 99, 1.0, 1.0, 5 / 99], dtype=torch.float64))


def test_min_snr_weighting_scales_each_forget_row():
    rt = objectives.build("retrack", forget_weighting="min-snr")
    target = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]])
    prep = Prepared(torch.zeros(4, 1, 1, 2), torch.zeros(4, dtype=torch.long),
                    {"target": target, "spread": torch.tensor([0.5, 1.0]), "eps": torch.zeros(2, 1, 1, 2),
                     "weight": torch.tensor([0.1, 1.0])}, split=2)
    eps = torch.zeros(4, 1, 1, 2)
    eps[2:, 0, 0, 0] = 3.0
    terms = rt.terms(eps, prep)
    assert terms["unlearn"].item() == pytest.approx((0.1 * (1 + 0.5) + 1.0 * (4 + 1.0)) / 2)
    assert terms["remain"].item() == pytest.approx(9.0)


def retrack_batch(n: int = 4) -> TrainBatch:
    g = torch.Generator().manual_seed(1)
    bank = torch.randint(0, 256, (12, 1, 8, 8), generator=g, dtype=torch.uint8)
    return TrainBatch(remain=torch.rand(n, 1, 8, 8, generator=g) * 2 - 1,
                      forget=torch.rand(n, 1, 8, 8, generator=g) * 2 - 1,
                      neighbours=torch.randint(0, 12, (n, 3), generator=g), bank=bank)


def test_min_snr_prepare_attaches_the_weight_of_each_forget_timestep():
    sch = schedule()
    prep = objectives.build("retrack", forget_weighting="min-snr", snr_gamma=2.0).prepare(
        retrack_batch(), sch, torch.Generator().manual_seed(0))
    ac = sch.alphas_cumprod[prep.t[:4]]
    snr = ac / (1 - ac)
    torch.testing.assert_close(prep.targets["weight"].double(), torch.clamp(snr, max=2.0) / snr)


def test_forget_t_min_only_moves_forget_timesteps():
    sch = schedule()
    plain = objectives.build("retrack").prepare(retrack_batch(64), sch, torch.Generator().manual_seed(0))
    moved = objectives.build("retrack", forget_t_min=900).prepare(retrack_batch(64), sch,
                                                                  torch.Generator().manual_seed(0))
    assert moved.t[:64].min() >= 900 and plain.t[:64].min() < 900
    assert torch.equal(moved.t[64:], plain.t[64:])


def test_defaults_are_the_papers_weighted_sum():
    assert objectives.build("retrack").rule == WeightedSum({"unlearn": 0.005, "remain": 0.995})
    assert objectives.build("retrack", lam="auto", lam_ratio=2.0).rule == SplitRule("unlearn", "remain", None, 2.0)
    assert objectives.build("retrack", surgery=True).rule == SplitRule("unlearn", "remain", 0.005, 1.0, True)


def test_split_step_with_fixed_lambda_equals_the_fused_paper_step(accelerator):
    """Each term through the model on its own rows gives the paper's one-backward gradient."""
    torch.manual_seed(0)
    model = Denoiser(tiny_unet(), schedule())
    rt = objectives.build("retrack", lam=0.3)
    prep = rt.prepare(retrack_batch(), model.schedule, torch.Generator().manual_seed(0))
    params = list(model.parameters())
    apply_rule(rt.rule, rt.terms(model(prep.x, prep.t), prep), params, accelerator)
    fused = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    terms, chosen = split_step(SplitRule("unlearn", "remain", 0.3), model, rt, prep, params, accelerator)
    split = torch.cat([p.grad.flatten() for p in params])
    fused_ = torch.cat([f.flatten() for f in fused])
    assert float((split - fused_).norm() / fused_.norm()) < 1e-5  # float32 rounding only
    assert chosen["lam"] == 0.3 and set(terms) == {"unlearn", "remain"}


@pytest.mark.parametrize("args,words", [
    (["--method", "vanilla", "--lam", "auto"], "has no such λ"),
    (["--method", "siss", "--lam", "auto"], "has no such λ"),
    (["--method", "siss", "--surgery"], "--surgery is an option of retrack"),
    (["--forget-weighting", "cosine"], "--forget-weighting must be one of none, min-snr, got 'cosine'"),
    (["--lam", "auto", "--lam-ratio", "0"], "--lam-ratio must be a finite number > 0"),
    (["--forget-t-min", "1000"], "--forget-t-min must be below the model's 1000 timesteps"),
])
def test_bad_variant_options_exit_2_with_one_sentence(args, words, tiny_model, tiny_data, tmp_path, capsys):
    code = main([str(a) for a in ["unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "3",
                                  "--out", tmp_path / "out", "--cache-dir", tmp_path / "c", *args, *FAST]])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_variants_run_end_to_end_and_are_recorded(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(a) for a in ["unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "3,7",
                                  "--out", out, "--k", "5", "--cache-dir", tmp_path / "c", "--lam", "auto",
                                  "--lam-ratio", "0.5", "--surgery", "--forget-weighting", "min-snr",
                                  "--snr-gamma", "2", "--forget-t-min", "10", *FAST]])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "retrack_run.json").read_text())
    assert record["objective"] == {"lam": "auto", "chunk": None, "lam_ratio": 0.5, "surgery": True,
                                   "forget_weighting": "min-snr", "snr_gamma": 2.0, "forget_t_min": 10,
                                   "balance": "none"}
    log = json.loads((out / "retrack_log.json").read_text())
    for e in log:
        assert 0 < e["lam"] < 1 and -1 <= e["cos"] <= 1
        assert e["lam"] * e["norm_unlearn"] == pytest.approx(0.5 * (1 - e["lam"]) * e["norm_remain"], rel=1e-3) \
            or e["cos"] < 0  # with surgery the balanced norm is the projected one
