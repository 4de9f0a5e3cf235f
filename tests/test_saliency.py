"""SalUn's weight-saliency mask: the mask on hand-made gradients, and a run in which only the masked
weights move (the others stay bit-identical to the input despite AdamW's weight decay)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_denoiser, tiny_train_data
from retrack import objectives
from retrack.cli import main
from retrack.saliency import WeightMask, forget_gradient, saliency_mask, saliency_threshold
from retrack.trainer import TrainSettings, to_model_range, train

FAST = ["--steps", "2", "--batch-size", "4", "--quiet", "--device", "cpu"]
GRADS = [torch.tensor([[0.5, -4.0], [1.0, 0.0]]), torch.tensor([-3.0, 2.0, 0.25, -0.1])]  # |g|: 8 values


def test_half_keeps_the_four_largest_magnitudes_over_all_tensors():
    keep = saliency_mask(GRADS, 0.5)  # |g| sorted: 4, 3, 2, 1 | 0.5, 0.25, 0.1, 0
    assert saliency_threshold(GRADS, 0.5) == 1.0
    assert keep[0].tolist() == [[False, True], [True, False]]
    assert keep[1].tolist() == [True, True, False, False]


def test_the_threshold_is_global_not_per_tensor():
    # Per tensor, the top quarter would keep one entry of each; globally both come from the second.
    grads = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([5.0, 6.0, 7.0, 8.0])]
    keep = saliency_mask(grads, 0.25)
    assert keep[0].tolist() == [False] * 4 and keep[1].tolist() == [False, False, True, True]


def test_fraction_one_keeps_every_weight_and_ties_at_the_threshold_are_kept():
    assert all(bool(k.all()) for k in saliency_mask(GRADS, 1.0))
    tied = [torch.tensor([2.0, -2.0, 2.0, 1.0])]  # k = 1, threshold 2: all three 2s stay
    assert saliency_mask(tied, 0.25)[0].tolist() == [True, True, True, False]
    assert saliency_mask(tied, 0.01)[0].tolist() == [True, True, True, False]  # at least one is kept
    zeros = [torch.tensor([0.0, 0.0, 0.0, 3.0])]  # threshold 0: only the one weight the forget set reaches
    assert saliency_threshold(zeros, 0.5) == 0.0 and saliency_mask(zeros, 0.5)[0].tolist() == [False] * 3 + [True]
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        saliency_threshold(tied, 0.0)


def test_the_mask_record_and_restore_are_exact():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    mask = WeightMask.from_gradients([torch.tensor([0.0, 9.0, 1.0, 8.0])], 0.5)
    mask.freeze([w])
    with torch.no_grad():
        w.mul_(0.5)
    mask.restore([w])
    assert w.tolist() == [1.0, 1.0, 3.0, 2.0]
    assert mask.record() == {"fraction": 0.5, "threshold": 8.0, "kept": 2, "total": 4, "kept_fraction": 0.5}


def test_forget_gradient_is_the_mean_denoising_loss_gradient_in_any_micro_batches():
    model = tiny_denoiser()
    params = list(model.parameters())
    forget = tiny_train_data().forget
    one, four = (forget_gradient(model, model.schedule, forget, params, 8, k, torch.Generator().manual_seed(3),
                                 lambda x: to_model_range(x, "cpu")) for k in (1, 4))
    assert all(p.grad is None for p in params)  # p.grad left as it was found
    # By hand, from the same generator: 8 uniform forget draws, then t, then ε.
    gen = torch.Generator().manual_seed(3)
    x0 = to_model_range(forget[torch.randint(0, 3, (8,), generator=gen)], "cpu")
    t = torch.randint(0, 1000, (8,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    gamma, sigma = model.schedule.gamma_sigma(t, x0)
    loss = (model(gamma * x0 + sigma * eps, t) - eps).pow(2).sum(dim=(1, 2, 3)).mean()
    expected = torch.autograd.grad(loss, params)
    scale = max(float(g.abs().max()) for g in expected)
    for a, b, e in zip(one, four, expected, strict=True):
        assert float((a - e).abs().max()) <= 1e-5 * scale and float((b - e).abs().max()) <= 1e-5 * scale


def run(saliency: float | None, method: str = "retrack") -> tuple[list[dict], list[torch.Tensor]]:
    model = tiny_denoiser()
    settings = TrainSettings(steps=3, batch_size=4, lr=1e-2, weight_decay=0.1, layout="joint", saliency=saliency)
    log = train(model, objectives.build(method), tiny_train_data(), settings, device="cpu", progress=False)
    return log, [p.detach().clone() for p in model.parameters()]


def test_only_the_masked_weights_move_and_the_rest_stay_bit_identical():
    before = [p.detach().clone() for p in tiny_denoiser().parameters()]
    log, after = run(0.3)
    record = log[0]["saliency"]
    assert record["fraction"] == 0.3 and abs(record["kept_fraction"] - 0.3) < 1e-3 and record["threshold"] > 0
    assert "saliency" not in log[1]
    moved = kept = 0
    for b, a in zip(before, after, strict=True):
        same = a == b
        moved += int((~same).sum())
        kept += int(same.sum())
    # Exactly the masked weights changed: the frozen ones are equal bit for bit despite weight decay 0.1.
    assert moved == record["kept"] and kept == record["total"] - record["kept"]


def test_a_full_mask_leaves_the_run_exactly_as_without_it():
    # The mask's draws come from a generator of its own: the trainer's stream is untouched.
    (log_none, plain), (log_all, masked) = run(None, "vanilla"), run(1.0, "vanilla")
    assert all(torch.equal(a, b) for a, b in zip(plain, masked, strict=True))
    assert [e["grad_norm"] for e in log_none] == [e["grad_norm"] for e in log_all]


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_a_fraction_outside_zero_to_one_exits_2(value, tiny_model, tiny_data, tmp_path, capsys):
    code = main([str(a) for a in ["unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "3",
                                  "--out", tmp_path / "out", "--saliency", value, *FAST]])
    err = capsys.readouterr().err
    assert code == 2 and "--saliency must be a finite number in (0, 1]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_saliency_runs_end_to_end_with_a_baseline_and_is_recorded(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(a) for a in ["unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "3,7",
                                  "--out", out, "--method", "siss", "--saliency", "0.5",
                                  "--cache-dir", tmp_path / "c", *FAST]])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "retrack_run.json").read_text())["config"]["saliency"] == 0.5
    first = json.loads((out / "retrack_log.json").read_text())[0]["saliency"]
    assert first["fraction"] == 0.5 and first["total"] // 2 <= first["kept"] < 0.51 * first["total"]
