"""Gradient accumulation reproduces the full batch's gradient exactly, for every method."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli, tiny_denoiser, tiny_train_data
from retrack import objectives
from retrack.api import unlearn
from retrack.errors import UserError
from retrack.models import Denoiser
from retrack.objectives.base import Prepared, WeightedSum, split_prepared
from retrack.trainer import TrainSettings, batch_gradient, draw_batch, train

# Every gradient rule: weighted sums, the two-gradient rules, and ReTrack's split-rule options.
METHODS = {"retrack": {}, "vanilla": {}, "neggrad": {}, "erasediff": {}, "siss": {},
           "retrack-auto": {"lam": "auto"}, "retrack-surgery": {"surgery": True, "lam": 0.3},
           "retrack-nash": {"balance": "nash"}}


def build(method: str):
    return objectives.build(method.split("-")[0], **METHODS[method])


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def prepared_batch(objective, model: Denoiser, n: int) -> Prepared:
    gen = torch.Generator().manual_seed(7)
    return objective.prepare(draw_batch(objective, tiny_train_data(), n, gen, "cpu"), model.schedule, gen)


def gradient(model: Denoiser, objective, prepared: Prepared, k: int, accelerator) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    params = list(model.parameters())
    batch_gradient(model, objective, prepared, k, params, accelerator)
    return [p.grad.clone() for p in params]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """Equal up to float32 summation order: 1e-5 of the largest gradient entry."""
    scale = max(float(y.abs().max()) for y in b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * scale)


def test_micro_batches_keep_every_segment_row_together():
    x = torch.arange(12.0).view(12, 1)  # two segments of six draws: rows 0–5 and 6–11
    p = Prepared(x, torch.arange(12), {"a": torch.arange(6.0), "b": torch.arange(6.0) * 10})
    parts = split_prepared(p, 3)
    assert [q.x.flatten().tolist() for q in parts] == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert [q.t.tolist() for q in parts] == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert [q.targets["b"].tolist() for q in parts] == [[0, 10], [20, 30], [40, 50]]
    with pytest.raises(ValueError, match="do not divide"):
        split_prepared(p, 4)


@pytest.mark.parametrize("method", METHODS)
def test_accumulated_gradient_equals_the_full_batch_gradient(method, accelerator):
    objective = build(method)
    model = tiny_denoiser()
    prepared = prepared_batch(objective, model, 8)
    full = gradient(model, objective, prepared, 1, accelerator)
    for k in (2, 4, 8):
        assert_same(gradient(model, objective, prepared, k, accelerator), full)
    if not isinstance(objective.rule, WeightedSum):
        # Combining per micro-batch and averaging (the shortcut accumulation must not take) is far
        # off, so the equality above really tests that both gradients are summed before the rule.
        naive = [torch.stack(gs).mean(0) for gs in zip(*(
            gradient(model, objective, mb, 1, accelerator) for mb in split_prepared(prepared, 4)), strict=True)]
        assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(naive, full, strict=True)) > 1e-2


@pytest.mark.parametrize("method", ["retrack", "siss", "retrack-auto"])
def test_training_with_accumulation_takes_the_same_steps(method):
    runs = []
    for k in (1, 4):
        model = tiny_denoiser()
        settings = TrainSettings(steps=2, batch_size=8, grad_accum=k)
        log = train(model, build(method), tiny_train_data(), settings, device="cpu", progress=False)
        runs.append((log, [p.detach().clone() for p in model.parameters()]))
    (log1, w1), (log4, w4) = runs
    for a, b in zip(log1, log4, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6)
    assert_same(w4, w1)


def test_grad_accum_that_does_not_divide_the_batch_exits_2(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    r = run_cli("unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "0", "--out", out,
                "--batch-size", "8", "--grad-accum", "3", "--steps", "1", "--quiet")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "retrack: error: --grad-accum 3 must divide the batch of 8 images per process "
        "(--batch-size 8 over 1 process)."]
    assert not out.exists()


@pytest.mark.parametrize("accum", [0, -2])
def test_grad_accum_below_one_is_a_user_error(tiny_model, tiny_data, tmp_path, accum):
    with pytest.raises(UserError, match=f"--grad-accum must be an integer ≥ 1, got {accum}"):
        unlearn(str(tiny_model), str(tiny_data), "0", str(tmp_path / "out"), grad_accum=accum)
    assert not (tmp_path / "out").exists()
