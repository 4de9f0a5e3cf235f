"""Evaluation during fine-tuning: which steps are evaluated, that evaluating changes nothing, the stop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_denoiser, tiny_train_data
from retrack.cli import main
from retrack.monitor import Monitor, StopAt, merge_log, reached
from retrack.objectives import build
from retrack.trainer import TrainSettings, train


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def unlearn(model, data, out, tmp_path, *extra) -> list[str]:
    return [str(a) for a in ["unlearn", "--model", model, "--data", data, "--forget", "3,7", "--out", out,
                             "--steps", "5", "--batch-size", "4", "--k", "5", "--quiet", "--device", "cpu",
                             "--cache-dir", tmp_path / "cache", *extra]]


EVAL = ["--eval-every", "2", "--eval-samples", "6", "--eval-steps", "2"]


def test_eval_every_logs_steps_0_n_2n_last_and_leaves_the_weights_as_without(tiny_model, tiny_data, tmp_path,
                                                                               capsys):
    plain, evald = tmp_path / "plain", tmp_path / "eval"
    assert main(unlearn(tiny_model, tiny_data, plain, tmp_path)) == 0, capsys.readouterr().err
    # A threshold above any L2 distance of 8×8 images in [0, 1] (at most 8): every sample is a copy.
    assert main(unlearn(tiny_model, tiny_data, evald, tmp_path, *EVAL, "--copy-threshold", "100")) == 0
    a, b = weights(plain), weights(evald)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((evald / "retrack_log.json").read_text())
    evals = [e for e in log if e.get("kind") == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4, 5]
    assert all(e["eval"] == {"copies": 1.0} and e["details"]["copies"]["count"] == 6 for e in evals)
    losses = [e for e in log if e.get("kind") != "eval"]
    assert losses == json.loads((plain / "retrack_log.json").read_text())
    assert [(e["step"], e.get("kind")) for e in log[:3]] == [(0, "eval"), (0, None), (1, None)]
    from retrack.report.folders import split_log  # the report's reader plots these as metric curves

    train_series, eval_series = split_log(log)
    assert eval_series == {"copies": ([0, 2, 4, 5], [1.0] * 4)} and "copies" not in train_series
    record = json.loads((evald / "retrack_run.json").read_text())["evaluation"]
    assert record == {"every": 2, "steps": [0, 2, 4, 5], "stop_at": None, "stopped_at": None, "steps_done": 5,
                      "curves": "eval_curves.png"}
    with Image.open(evald / "eval_curves.png") as im:
        assert im.format == "PNG" and im.width > 100


def test_stop_at_the_first_evaluation_that_reaches_the_target(tiny_model, tiny_data, tmp_path, capsys):
    # Threshold 0: no sample is strictly closer than 0, so copies = 0 already at step 0.
    out = tmp_path / "stop0"
    args = unlearn(tiny_model, tiny_data, out, tmp_path, *EVAL, "--copy-threshold", "0", "--stop-at", "copies=0")
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((out / "retrack_run.json").read_text())["evaluation"]
    assert record["stopped_at"] == 0 and record["steps_done"] == 0 and record["stop_at"] == ["copies", 0.0]
    assert json.loads((out / "retrack_log.json").read_text())[0]["step"] == 0
    a, b = weights(tiny_model), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Every sample a copy: copies=0 is never reached, the run goes to the end.
    out = tmp_path / "never"
    args = unlearn(tiny_model, tiny_data, out, tmp_path, *EVAL, "--copy-threshold", "100", "--stop-at", "copies=0")
    assert main(args) == 0
    record = json.loads((out / "retrack_run.json").read_text())["evaluation"]
    assert record["stopped_at"] is None and record["steps_done"] == 5


def _fake_monitor(values: list[float], every: int, last: int, model, seen: list) -> Monitor:
    """A monitor whose 'copies' are given in advance; it also spends the global RNG and checks modes."""
    queue = iter(values)

    def measure():
        seen.append(model.training)
        torch.randn(1000)  # global RNG, forked by the monitor
        return {"copies": {"fraction": next(queue)}}

    return Monitor(every, last, measure, model, StopAt()("copies=0.1"))


def test_trainer_stops_after_the_evaluation_that_reaches_it_with_the_weights_of_that_step():
    settings = TrainSettings(steps=9, batch_size=4, seed=3)
    objective = build("retrack", lam=0.5)
    stopped, seen, modes = tiny_denoiser(), [], []
    monitor = _fake_monitor([0.9, 0.5, 0.1, 0.0], 3, 9, stopped, seen)
    log = train(stopped, objective, tiny_train_data(), settings, "cpu", progress=False, between_steps=monitor,
                on_gradient=lambda step, params: modes.append(stopped.training))
    assert [e["step"] for e in monitor.entries] == [0, 3, 6] and monitor.stopped_at == 6 and len(log) == 6
    assert seen == [False, False, False] and modes == [True] * 6  # eval mode to evaluate, train mode to train
    reference = tiny_denoiser()
    ref_log = train(reference, objective, tiny_train_data(), TrainSettings(steps=6, batch_size=4, seed=3), "cpu",
                    progress=False)
    assert log == ref_log
    for p, q in zip(stopped.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_evaluation_steps_without_a_repeated_last_and_log_order():
    m = Monitor(2, 4, lambda: {}, torch.nn.Linear(1, 1))
    assert [d for d in range(5) if m.due(d)] == [0, 2, 4]
    assert [d for d in range(8) if Monitor(3, 7, lambda: {}, torch.nn.Linear(1, 1)).due(d)] == [0, 3, 6, 7]
    train_log = [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 2.0}]
    evals = [{"step": 0, "kind": "eval"}, {"step": 2, "kind": "eval"}]
    assert merge_log(train_log, evals) == [evals[0], train_log[0], train_log[1], evals[1]]


@pytest.mark.parametrize("spec, values, want", [
    ("copies=0", {"copies": 0.0}, True), ("copies=0", {"copies": 1 / 6}, False),
    ("nll=5.5", {"nll": 5.5}, True), ("nll=5.5", {"nll": 5.4}, False),
    (" Reconstruction = 0.3", {"reconstruction": 0.29}, True),
])
def test_stop_direction_per_metric(spec, values, want):
    assert reached(StopAt()(spec), values) is want


def test_fid_real_features_are_taken_once_and_match_a_fresh_fid():
    from retrack.metrics.quality import FrechetReference, frechet_distance

    class FirstPixels(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3].float()

    rng = np.random.default_rng(0)
    real, f1, f2 = (rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8) for n in (20, 9, 11))
    ref = FrechetReference(real, FirstPixels(), progress=False)
    for fake in (f1, f2, f1):
        assert ref(fake, progress=False) == pytest.approx(
            frechet_distance(real, fake, FirstPixels(), progress=False), rel=1e-6, abs=1e-6)
