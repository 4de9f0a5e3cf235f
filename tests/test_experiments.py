"""The experiment planner, summary tables and resumability (with a stand-in runner)."""

from __future__ import annotations

import json

import pytest

from retrack import experiments
from retrack.experiments import ExperimentConfig, parse_seeds, plan, summarise, to_markdown

CONFIG = dict(recipe="mnist_tshirt", seeds=[0, 1], train={"steps": 1},
              methods={"vanilla": {}, "retrack": {"k": 10, "lam": 0.005}},
              ablations={"seeds": [0], "k": [1, 10, 100], "lam": [1.0]})


def test_plan_covers_pretrained_methods_and_ablations():
    names = [r.name for r in plan(ExperimentConfig(**CONFIG))]
    assert names == ["pretrained/seed0", "pretrained/seed1", "vanilla/seed0", "vanilla/seed1",
                     "retrack/seed0", "retrack/seed1", "retrack K=1/seed0", "retrack K=100/seed0",
                     "retrack λ=1.0/seed0"]
    lam_run = plan(ExperimentConfig(**CONFIG))[-1]
    assert lam_run.hyper == {"k": 10, "lam": 1.0}


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("1,5,7-8") == [1, 5, 7, 8]


def test_summary_mean_and_sample_std():
    rows = summarise({"a": [{"fid": 1.0, "frequency": 0.01}, {"fid": 3.0, "frequency": 0.03}]})
    assert rows[0]["fid"] == 2.0 and rows[0]["fid_std"] == pytest.approx(2**0.5)
    md = to_markdown(rows)
    assert "| a | 2.0000% ± 1.4142% | — | 2.00 ± 1.41 | — | 2 |" in md


def test_rerun_skips_finished_runs(tmp_path, monkeypatch):
    calls = []

    class FakeRunner:
        def __init__(self, cfg, out):
            pass

        def run(self, spec, run_dir):
            calls.append(spec.name)
            return {"frequency": 0.0, "fid": float(spec.seed), "is": 9.0, "nll": 1.0}

    import retrack.recipes.mnist_tshirt.experiment as module

    monkeypatch.setattr(module, "MnistTshirtRunner", FakeRunner)
    cfg = ExperimentConfig(**CONFIG, out=str(tmp_path))
    experiments.run_experiment(cfg)
    assert len(calls) == 9
    (tmp_path / "vanilla" / "seed1" / "metrics.json").unlink()  # as if interrupted
    md = experiments.run_experiment(cfg)
    assert calls[9:] == ["vanilla/seed1"]
    assert "| vanilla | 0.0000% ± 0.0000% | 1.00 ± 0.00 | 0.50 ± 0.71 | 9.00 ± 0.00 | 2 |" in md
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["method"] for r in rows][:3] == ["pretrained", "vanilla", "retrack"]
    assert (tmp_path / "summary.csv").read_text().startswith("method,runs,frequency,frequency_std")
