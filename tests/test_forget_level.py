"""--forget-level: ReTrack's forget target moved toward the neighbours only as far as an unseen
image's denoising error, on hand-computed targets, a scripted denoiser, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_denoiser, tiny_train_data
from retrack.cli import main
from retrack.levels import unseen_levels
from retrack.objectives import build
from retrack.objectives.base import TrainBatch
from retrack.objectives.retrack import level_target
from test_stopping import refused, unlearn


def test_the_target_stops_at_the_level_and_keeps_its_direction():
    eps = torch.zeros(3, 1, 2, 2)
    eps[:, 0, 0, 0] = 1.0
    target = eps.clone()
    target[0, 0, 0, 1] = 3.0  # ‖v̄ − ε‖² = 9: above the level 4, scaled to 2/3 of the way
    target[1, 0, 1, 1] = 1.0  # 1: below the level, unchanged
    target[2] = -eps[2]  # 4: exactly the level, unchanged
    spread = torch.tensor([6.0, 5.0, 7.0])
    level = torch.full((3,), 4.0, dtype=torch.float64)
    got, got_spread = level_target(eps, target, spread, level)
    assert got[0, 0, 0, 1].item() == pytest.approx(2.0) and got[0, 0, 0, 0].item() == 1.0
    assert (got - eps).pow(2).flatten(1).sum(1).tolist() == pytest.approx([4.0, 1.0, 4.0])
    assert torch.equal(got[1:], target[1:])
    assert got_spread.tolist() == pytest.approx([6.0 * 4 / 9, 5.0, 7.0])
    zero, zero_spread = level_target(eps, target, spread, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(zero, eps) and zero_spread.abs().max() == 0  # level 0: the true noise, nothing forgotten


class Zero(torch.nn.Module):
    """ε_θ ≡ 0 on the tiny model's schedule: an image's denoising error is ‖ε‖² of its noise draw."""

    def __init__(self):
        super().__init__()
        self.schedule = tiny_denoiser().schedule

    def forward(self, x, t):
        return torch.zeros_like(x)


def test_the_unseen_level_is_the_mean_error_at_each_grid_timestep_linear_in_between():
    d = Zero()
    images = torch.rand(5, 1, 4, 4) * 2 - 1
    found = unseen_levels(d, images, seed=3, stride=250, images=4)
    assert found["timesteps"] == [0, 250, 500, 750, 999] and found["images"] == 4
    gen = torch.Generator().manual_seed(3)
    expected = [float(torch.randn((4, 1, 4, 4), generator=gen).pow(2).flatten(1).sum(1).double().mean())
                for _ in found["timesteps"]]
    assert found["grid_levels"] == pytest.approx(expected)
    levels = found["levels"]
    assert len(levels) == 1000 and levels[250] == pytest.approx(expected[1])
    assert levels[100] == pytest.approx(expected[0] + 0.4 * (expected[1] - expected[0]))


def _prepared(objective):
    data = tiny_train_data()
    batch = TrainBatch(forget=data.forget.float().div(127.5).sub(1), remain=data.remain[:3].float().div(127.5).sub(1),
                       bank=data.remain, neighbours=data.neighbours)
    return objective.prepare(batch, tiny_denoiser().schedule, torch.Generator().manual_seed(0))


def test_with_an_unreachable_level_the_objective_is_the_papers_and_with_zero_the_true_noise():
    paper = _prepared(build("retrack"))
    high = _prepared(build("retrack", level=(1e30,) * 1000))
    assert torch.equal(paper.targets["target"], high.targets["target"]) and torch.equal(paper.x, high.x)
    assert torch.equal(paper.targets["spread"], high.targets["spread"])
    none = _prepared(build("retrack", level=(0.0,) * 1000))
    n = none.split
    torch.testing.assert_close(none.targets["target"], _noise(none), atol=1e-4, rtol=0)
    assert none.targets["spread"].abs().max() == 0 and n == 3
    with pytest.raises(ValueError, match="timesteps"):
        _prepared(build("retrack", level=(1.0,) * 10))


def _noise(prepared) -> torch.Tensor:
    """The ε the batch was noised with, recovered from x_t = γ x0 + σ ε for the forget rows."""
    data = tiny_train_data()
    x0 = data.forget.float().div(127.5).sub(1)
    gamma, sigma = tiny_denoiser().schedule.gamma_sigma(prepared.t[:prepared.split], x0)
    return (prepared.x[:prepared.split] - gamma * x0) / sigma


def test_unlearn_measures_the_level_once_and_records_its_grid(tiny_model, tiny_data, tmp_path):
    held = tmp_path / "held.npz"
    np.savez(held, images=np.random.default_rng(7).integers(0, 256, (24, 8, 8), dtype=np.uint8))
    out = tmp_path / "level"
    assert main(unlearn(tiny_model, tiny_data, out, tmp_path, "--forget-level", held)) == 0
    record = json.loads((out / "retrack_run.json").read_text())
    level = record["forget_level"]
    assert level["heldout"] == str(held) and level["images"] == 24 and level["timesteps"][:3] == [0, 10, 20]
    assert len(level["grid_levels"]) == len(level["timesteps"]) and all(v > 0 for v in level["grid_levels"])
    assert "level" not in record["objective"] and record["config"]["forget_level"] == str(held)
    plain = tmp_path / "plain"
    assert main(unlearn(tiny_model, tiny_data, plain, tmp_path)) == 0
    assert "forget_level" not in json.loads((plain / "retrack_run.json").read_text())


@pytest.mark.parametrize("extra, words", [
    (["--forget-level", "HELD", "--method", "vanilla"], "has no such target"),
    (["--forget-level", "missing.npz"], "do not exist"),
    (["--forget-level", "FEW"], "needs at least 20"),
    (["--forget-level", "TRAINED"], "occurs in --data"),
])
def test_bad_level_inputs_exit_2_with_one_sentence_and_write_nothing(tiny_model, tiny_data, tmp_path, capsys,
                                                                     extra, words):
    images = np.load(tiny_data)["images"]
    rng = np.random.default_rng(7)
    sets = {"HELD": rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), "FEW": rng.integers(0, 256, (12, 8, 8),
                                                                                          dtype=np.uint8)}
    sets["TRAINED"] = np.concatenate([sets["HELD"][:23], images[5:6]])
    for name, arr in sets.items():
        np.savez(tmp_path / f"{name}.npz", images=arr)
    extra = [str(tmp_path / f"{a}.npz") if a in sets else a for a in extra]
    assert words in refused(tiny_model, tiny_data, tmp_path, capsys, extra)
