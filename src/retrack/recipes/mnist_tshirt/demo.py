"""`retrack demo`: forget the memorised T-shirt of the shipped MNIST model, on a laptop CPU.

Samples before and after with the same seeds, runs ReTrack with the paper's MNIST settings, and
writes the unlearned model, metrics.json, sample grids, the T-shirt beside the K remain images
its trajectories are redirected to, and report.html, which shows all of it on one page. The data
set and forget list are written too, so the unlearning step can be rerun by hand with
`retrack unlearn`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from retrack.api import unlearn
from retrack.errors import require
from retrack.grid import save_grid
from retrack.metrics.copies import l2_distances
from retrack.neighbours import nearest_neighbours
from retrack.recipes.mnist_tshirt import build_mnist_tshirt
from retrack.recipes.mnist_tshirt.evaluation import evaluate_model
from retrack.report import write_report
from retrack.runrecord import atomic_directory, check_output, environment_record, final_paths, write_json, write_text
from retrack.validation import (
    POSITIVE_INT,
    SEED,
    Bool,
    Choice,
    Device,
    Float,
    Int,
    Optional,
    Text,
    Validated,
    default_device,
    option,
)

HERE = Path(__file__).resolve().parent
SHIPPED_MODEL = HERE / "model"


# IS uses 10 splits of the samples that are not T-shirt copies (the shipped model copies ≈1.4%).
MIN_SAMPLES = 12


@dataclass(frozen=True)
class DemoConfig(Validated):
    """Every setting of `retrack demo`, checked on creation (flags: --samples, --sampling-steps, ...)."""

    out: str = option(Text(), "retrack-demo")
    samples: int = option(Int(min=MIN_SAMPLES), 500)
    sampling_steps: int = option(Int(min=1, max=1000), 50)
    sampler: str = option(Choice("ddpm", "ddim"), "ddim")
    seed: int = option(SEED, 0)
    k: int = option(POSITIVE_INT, 10)
    lam: float = option(Float(0.0, 1.0), 0.005)
    steps: int = option(POSITIVE_INT, 50)
    batch_size: int = option(POSITIVE_INT, 128)
    lr: float = option(Float(0.0, min_open=True), 5e-5)
    model: str = option(Text(), str(SHIPPED_MODEL))
    device: str | None = option(Optional(Device()), None)  # None: cuda if available, else cpu
    overwrite: bool = option(Bool(), False)
    nll: bool = option(Bool(), True)


@dataclass(frozen=True)
class DemoData:
    """The built set as files (for `retrack unlearn`) and as the arrays the metrics need."""

    data_path: Path
    forget_path: Path
    tshirt: np.ndarray
    remain: np.ndarray


def write_data(out: Path) -> DemoData:
    """Build MNIST T-shirt into out/data/: the .npz and the forget list (one index per line)."""

    built = build_mnist_tshirt()
    (out / "data").mkdir(parents=True, exist_ok=True)
    data_path, forget_path = out / "data" / "mnist_tshirt.npz", out / "data" / "forget.txt"
    np.savez(data_path, images=built.data.images)
    forget_path.write_text("".join(f"{i}\n" for i in built.forget))
    remain = np.delete(built.data.images, built.forget, axis=0)
    return DemoData(data_path, forget_path, built.tshirt, remain)


def neighbours_figure(tshirt: np.ndarray, remain: np.ndarray, k: int, path: Path) -> None:
    idx, _ = nearest_neighbours(remain, tshirt[None], k, progress=False)
    save_grid(np.concatenate([tshirt[None], remain[idx[0]]]), path, ncol=k + 1, scale=4)


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Everything `retrack demo` does; returns the metrics written to metrics.json."""

    cfg = replace(cfg, device=default_device(cfg.device))
    out = Path(cfg.out)
    require(Path(cfg.model).is_dir(), f"model {cfg.model!r} does not exist.")
    check_output(out, cfg.overwrite, [Path(cfg.model)])
    with atomic_directory(out) as tmp:
        data = write_data(tmp)
        tshirt, remain = data.tshirt, data.remain
        measure = dict(samples=cfg.samples, steps=cfg.sampling_steps, sampler=cfg.sampler, seed=cfg.seed,
                       nll=cfg.nll, device=cfg.device, progress=progress)
        print("1/4 evaluating the shipped model")
        before, samples_before = evaluate_model(cfg.model, tshirt, remain, **measure)
        print("2/4 unlearning the T-shirt with ReTrack as published (the default method of retrack unlearn)")
        unlearn(cfg.model, str(data.data_path), f"@{data.forget_path}", str(tmp / "model"), method="retrack",
                steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, k=cfg.k, lam=cfg.lam,
                seed=cfg.seed, device=cfg.device, cache_dir=str(tmp / "cache"), progress=progress)
        print("3/4 evaluating the unlearned model")
        after, samples_after = evaluate_model(str(tmp / "model"), tshirt, remain, **measure)
        print("4/4 writing figures")
        save_grid(samples_before[:100], tmp / "samples_before.png", scale=3)
        save_grid(samples_after[:100], tmp / "samples_after.png", scale=3)
        save_grid(_nearest_to(samples_before, tshirt)[:16], tmp / "tshirt_like_before.png", scale=4)
        save_grid(_nearest_to(samples_after, tshirt)[:16], tmp / "tshirt_like_after.png", scale=4)
        neighbours_figure(tshirt, remain, cfg.k, tmp / "neighbours.png")
        metrics = {"before": before, "after": after}
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "demo_run.json", environment_record(cfg, seed=cfg.seed))
        record = tmp / "model" / "retrack_run.json"  # unlearn() wrote it inside the staging folder
        write_json(record, final_paths(json.loads(record.read_text()), tmp, out))
        write_report(tmp, reconstruction=True, seed=cfg.seed, device=cfg.device)
        report = tmp / "report.html"
        write_text(report, final_paths(report.read_text(encoding="utf-8"), tmp, out))
        shutil.rmtree(tmp / "cache", ignore_errors=True)
    return metrics


def _nearest_to(samples: np.ndarray, tshirt: np.ndarray) -> np.ndarray:
    """Samples ordered by L2 distance to the T-shirt: its copies, if any, come first."""

    return samples[np.argsort(l2_distances(samples, tshirt[None])[:, 0], kind="stable")]


def format_table(metrics: dict) -> str:
    rows = [("Frequency ↓", "frequency", lambda v: f"{100 * v:.3f}%"), ("NLL ↑ (bits/dim)", "nll", "{:.2f}".format),
            ("FID ↓", "fid", "{:.2f}".format), ("IS ↑", "is", "{:.2f}".format)]
    lines = ["| metric | before | after |", "|---|---|---|"]
    for label, key, fmt in rows:
        if key in metrics["before"]:
            cells = [fmt(v) if v is not None else "undefined" for v in (metrics["before"][key], metrics["after"][key])]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def load_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())
