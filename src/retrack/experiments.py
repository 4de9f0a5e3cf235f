"""Paper-style experiments: methods × seeds (+ ablations) from a YAML config, resumable.

Every run lives in its own folder and is finished when its metrics.json exists, so a rerun of the
same command skips finished runs and redoes interrupted ones. The summary (mean ± std over
seeds) is written as Markdown, CSV and JSON, laid out like the paper's Table 1.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from retrack.errors import require
from retrack.runrecord import environment_record, write_json

COLUMNS = (("frequency", "Frequency ↓", lambda v: f"{100 * v:.4f}%"), ("nll", "NLL ↑", "{:.2f}".format),
           ("fid", "FID ↓", "{:.2f}".format), ("is", "IS ↑", "{:.2f}".format))


@dataclass(frozen=True)
class RunSpec:
    """One row-entry of the table: a method with its hyperparameters under one seed."""

    label: str
    method: str | None  # None = the pretrained model itself
    seed: int
    hyper: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.label}/seed{self.seed}"


@dataclass(frozen=True)
class ExperimentConfig:
    recipe: str
    methods: dict[str, dict[str, Any]]
    seeds: list[int]
    train: dict[str, Any]
    samples: int = 1000
    sampling_steps: int = 50
    sampler: str = "ddim"
    nll: bool = True
    ablations: dict[str, Any] = field(default_factory=dict)
    out: str = "runs/mnist_tshirt"

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> ExperimentConfig:
        p = Path(path)
        require(p.is_file(), f"experiment config {str(p)!r} does not exist.")
        raw = yaml.safe_load(p.read_text()) or {}
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        require(not unknown, f"experiment config {str(p)!r} has unknown keys: {', '.join(unknown)}.")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**raw)


def plan(cfg: ExperimentConfig) -> list[RunSpec]:
    """The pretrained row, every method × seed, then the ablations (on ReTrack, first seed only
    unless the config says `ablation_seeds`)."""
    runs = [RunSpec("pretrained", None, s) for s in cfg.seeds]
    runs += [RunSpec(m, m, s, dict(hp or {})) for m, hp in cfg.methods.items() for s in cfg.seeds]
    base = dict(cfg.methods.get("retrack") or {})
    ab_seeds = cfg.ablations.get("seeds", cfg.seeds)
    for k in cfg.ablations.get("k", []):
        if k != base.get("k"):
            runs += [RunSpec(f"retrack K={k}", "retrack", s, {**base, "k": k}) for s in ab_seeds]
    for lam in cfg.ablations.get("lam", []):
        runs += [RunSpec(f"retrack λ={lam}", "retrack", s, {**base, "lam": lam}) for s in ab_seeds]
    return runs


def parse_seeds(text: str) -> list[int]:
    """'0-9' or '0,3,5' → list of ints."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        require(lo.isdigit() and (not hi or hi.isdigit()), f"--seeds must look like 0-9 or 0,3,5, got {text!r}.")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def summarise(results: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Mean and std over seeds for each label, in the order of first appearance."""
    rows = []
    for label, runs in results.items():
        row: dict[str, Any] = {"method": label, "runs": len(runs)}
        for key, _, _ in COLUMNS:
            values = [r[key] for r in runs if key in r]
            if values:
                row[key] = float(np.mean(values))
                row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    header = "| Method | " + " | ".join(title for _, title, _ in COLUMNS) + " | runs |"
    lines = [header, "|---" * (len(COLUMNS) + 2) + "|"]
    for row in rows:
        cells = [f"{fmt(row[k])} ± {fmt(row[k + '_std'])}" if k in row else "—" for k, _, fmt in COLUMNS]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['runs']} |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    keys = ["method", "runs"] + [f"{k}{s}" for k, _, _ in COLUMNS for s in ("", "_std")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_summary(out: Path, results: dict[str, list[dict[str, float]]]) -> str:
    rows = summarise(results)
    md = to_markdown(rows)
    (out / "summary.md").write_text(md)
    (out / "summary.csv").write_text(to_csv(rows))
    write_json(out / "summary.json", rows)
    return md


def run_experiment(cfg: ExperimentConfig, methods: list[str] | None = None, progress: bool = True) -> str:
    """Run (or resume) every planned run and write the summary; returns the Markdown table."""
    require(cfg.recipe == "mnist_tshirt", f"recipe {cfg.recipe!r} is not available (mnist_tshirt).")
    from retrack.recipes.mnist_tshirt.experiment import MnistTshirtRunner

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "experiment.json", environment_record(cfg))
    runner = MnistTshirtRunner(cfg, out)
    results: dict[str, list[dict[str, float]]] = {}
    for spec in plan(cfg):
        if methods and spec.method is not None and spec.method not in methods:
            continue
        done = out / spec.name / "metrics.json"
        if not done.is_file():
            print(f"run {spec.name}", flush=True)
            shutil.rmtree(out / spec.name, ignore_errors=True)  # an interrupted run starts over
            write_json(done, runner.run(spec, out / spec.name))
        results.setdefault(spec.label, []).append(json.loads(done.read_text()))
        write_summary(out, results)
    return write_summary(out, results)
