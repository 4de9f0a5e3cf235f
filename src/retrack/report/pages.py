"""One page builder per kind of folder: an unlearning run, the demo, an experiment."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrack.report.draw import draw_reconstructions, draw_samples, local_model, locate_data
from retrack.report.folders import Experiment, RunFolder, read_json
from retrack.report.html import Page
from retrack.report.sections import (
    before_after_grids,
    config_section,
    curves_section,
    key_value_table,
    neighbours_section,
    provenance_section,
    scale_for,
)
from retrack.validation import Bool, Device, Int, Optional, Validated, option


@dataclass(frozen=True)
class ReportOptions(Validated):
    """What the report may compute; every field is a flag of `retrack report` of the same name."""

    samples: int = option(Int(min=0), 16)  # per model, drawn for a run (0: none); experiments reuse theirs
    sampling_steps: int = option(Int(min=1), 50)
    seed: int | None = option(Optional(Int(min=0)), None)  # None: the run's (experiment: first) seed
    reconstruction: bool = option(Bool(), False)  # noise the forget images to T/4 and denoise, per model
    max_forget: int = option(Int(min=1), 4)  # distinct forget images shown
    max_neighbours: int = option(Int(min=0), 10)
    device: str = option(Device(), "cpu")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def _reconstruction_section(page: Page, record: dict[str, Any], roots: list[Path],
                            models: list[tuple[str, Path]], opts: ReportOptions, seed: int) -> None:
    """Rows: the distinct forget images, then each model's reconstruction from t = T/4."""
    from retrack.report.draw import distinct_rows
    from retrack.report.figures import image_rows

    page.heading("Reconstruction from T/4")
    if not opts.reconstruction:
        page.text("Not computed: pass --reconstruction to noise each forget image to t = T/4 and "
                  "denoise it with every model (a memorised image comes back).", note=True)
        return
    images, where = locate_data(record, roots)
    forget = np.asarray((record.get("data") or {}).get("forget_indices") or [], dtype=np.int64)
    if images is None or forget.size == 0 or not models:
        page.text(f"Not shown: {where if images is None else 'no forget images or models'}.", note=True)
        return
    originals = images.images[forget][distinct_rows(images.images[forget], opts.max_forget)]
    rows = [originals] + [draw_reconstructions(path, originals, seed, opts.device) for _, path in models]
    names = ", ".join(["original"] + [label for label, _ in models])
    page.figure("reconstruction", image_rows(rows, scale_for(originals)),
                f"Rows, top to bottom: {names}; each forget image noised to t = T/4 and denoised "
                f"with ancestral DDPM (seed {seed}).")


def run_page(run: RunFolder, opts: ReportOptions) -> Page:
    cfg, record = run.config, run.record
    data = record.get("data") or {}
    page = Page(f"Unlearning run: {cfg.get('method', '?')} — {run.path.name}")
    seed = opts.seed if opts.seed is not None else int(record.get("seed", cfg.get("seed", 0)))
    page.heading("Summary")
    page.table("summary", ("quantity", "value"), [
        ("method", cfg.get("method")), ("input model", cfg.get("model")), ("output", str(run.path)),
        ("data", data.get("source", cfg.get("data"))), ("forget images", data.get("forget_size")),
        ("remain images", data.get("remain_size")), ("steps", cfg.get("steps")), ("seed", record.get("seed")),
        *[(f"final {k}", v) for k, v in (record.get("final_terms") or {}).items() if k != "step"]])
    roots = [run.path, run.path.parent]
    before = local_model(cfg.get("model"), run.path.parent)
    page.heading("Samples before and after")
    if opts.samples == 0:
        page.text("Not drawn (--samples 0).", note=True)
    else:
        old = draw_samples(before, opts.samples, opts.sampling_steps, seed, opts.device) if before else None
        new = draw_samples(run.path, opts.samples, opts.sampling_steps, seed, opts.device)
        if before is None:
            page.text(f"The input model {cfg.get('model')!r} is not a local folder: no 'before' samples.",
                      note=True)
        before_after_grids(page, "samples", old, new,
                           f"{opts.samples} DDIM samples ({opts.sampling_steps} steps), the same "
                           f"per-sample seeds (seed {seed}) for the input and the unlearned model")
    neighbours_section(page, "neighbours", record, roots, opts.max_forget, opts.max_neighbours)
    models = ([("input model", before)] if before else []) + [("unlearned model", run.path)]
    _reconstruction_section(page, record, roots, models, opts, seed)
    page.heading("Loss over steps")
    curves_section(page, "curves", run.log, cfg.get("method", "run"))
    config_section(page, "config", {**cfg, "objective": record.get("objective")}, "Resolved config")
    provenance_section(page, "provenance", record, "Provenance")
    return page


def demo_page(path: Path, opts: ReportOptions) -> Page:
    from PIL import Image

    record = read_json(path / "demo_run.json") or {}
    metrics = read_json(path / "metrics.json") or {}
    run = RunFolder.read(path / "model")
    page = Page("retrack demo: forgetting the memorised T-shirt")
    page.heading("Metrics before and after unlearning")
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    keys = [k for k in dict.fromkeys([*before, *after]) if k != "is_std"]
    if keys:
        page.table("metrics", ("metric", "before", "after"),
                   [(k, before.get(k, "—"), after.get(k, "—")) for k in keys])
    else:
        page.text("metrics.json is missing.", note=True)
    figures = (("samples-before", "samples_before.png", "Samples of the shipped model (before)"),
               ("samples-after", "samples_after.png", "Samples of the unlearned model, same seeds (after)"),
               ("nearest-before", "tshirt_like_before.png", "The 16 samples nearest the T-shirt, before"),
               ("nearest-after", "tshirt_like_after.png", "The 16 samples nearest the T-shirt, after"),
               ("neighbours", "neighbours.png", "The T-shirt beside the K remain images its "
                "trajectories are redirected to"))
    page.heading("Samples and neighbours")
    for name, file, caption in figures:
        if (path / file).is_file():
            with Image.open(path / file) as im:
                page.figure(name, im.convert("RGB"), caption + ".")
        else:
            page.text(f"{file} is missing.", note=True)
    if run is not None:
        seed = opts.seed if opts.seed is not None else int(run.record.get("seed", 0))
        models = [(label, p) for label, p in (("shipped model", local_model(run.config.get("model"))),
                                              ("unlearned model", run.path)) if p is not None]
        _reconstruction_section(page, run.record, [path, run.path], models, opts, seed)
    page.heading("Loss over steps")
    curves_section(page, "curves", run.log if run else [], "ReTrack")
    config_section(page, "config", record.get("config"), "Demo settings")
    config_section(page, "unlearn-config", run.config if run else None, "Resolved unlearning config")
    provenance_section(page, "provenance", run.record if run else record, "Provenance")
    return page


def _summary_rows(exp: Experiment) -> tuple[list[str], list[list[Any]]]:
    """The experiment's table: summary.json where present, else mean ± std over the runs found.

    A key `x_std` beside `x` is the spread of `x` and shares its cell: "mean ± std".
    """
    rows = exp.summary or _summarise(exp)
    every = list(dict.fromkeys(k for r in rows for k in r))
    keys = [k for k in every if not (k.endswith("_std") and k[:-4] in every)]
    cells = [[f"{r[k]:.4g} ± {r[k + '_std']:.2g}" if _number(r.get(k)) and _number(r.get(k + "_std"))
              else r.get(k, "—") for k in keys] for r in rows]
    return keys, cells


def _summarise(exp: Experiment) -> list[dict[str, Any]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in exp.runs:
        grouped.setdefault(r.label, []).append(r.metrics)
    rows = []
    for label, ms in grouped.items():
        row: dict[str, Any] = {"method": label, "runs": len(ms)}
        for key in dict.fromkeys(k for m in ms for k, v in m.items()
                                 if _number(v) and k != "seed" and not k.endswith("_std")):
            vals = [float(m[key]) for m in ms if _number(m.get(key))]
            row[key] = float(np.mean(vals))
            row[f"{key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def experiment_page(exp: Experiment, opts: ReportOptions) -> Page:
    page = Page(f"Experiment: {exp.path.name}")
    seeds = sorted({r.seed for r in exp.runs if r.seed is not None})
    seed = opts.seed if opts.seed is not None else (seeds[0] if seeds else 0)
    labels = list(dict.fromkeys(r.label for r in exp.runs))
    page.text(f"{len(exp.runs)} runs, {len(labels)} rows, seeds {seeds or '—'}.")
    page.heading("Results (mean ± std over seeds)")
    keys, cells = _summary_rows(exp)
    if cells:
        page.table("summary", keys, cells)
    else:
        page.text("No summary.json and no finished runs were found.", note=True)
    page.heading("Runs")
    metric_keys = list(dict.fromkeys(k for r in exp.runs for k, v in r.metrics.items()
                                     if _number(v) and k != "seed"))
    page.table("runs", ["run", "row", "seed", *metric_keys],
               [[r.name, r.label, r.seed, *[r.metrics.get(k, "—") for k in metric_keys]] for r in exp.runs])
    targets = sorted({r.target for r in exp.runs})
    target = targets[0] if targets else ""
    shown: dict[str, Any] = {}
    for r in exp.runs:
        if r.seed == seed and r.target == target:
            shown.setdefault(r.label, r)
    where = f"seed {seed}" + (f", target {target}" if target else "")
    page.heading(f"Samples ({where}: every row draws with the same per-sample seeds)")
    missing = []
    for label, r in shown.items():
        samples = r.samples
        if samples is None:
            missing.append(label)
        elif opts.samples:
            page.figure(f"samples-{slug(label)}", _grid(samples[:opts.samples]),
                        f"{label}: the first {min(opts.samples, len(samples))} samples ({where}).")
    if missing:
        page.text(f"No samples.npz for: {', '.join(missing)}.", note=True)
    models = {label: r.model for label, r in shown.items()}
    with_neighbours = next((m for m in models.values() if m and m.record.get("neighbours")), None)
    any_run = with_neighbours or next((m for m in models.values() if m), None)
    if any_run is not None:
        roots = [exp.path, any_run.path, any_run.path.parent]
        neighbours_section(page, "neighbours", any_run.record, roots, opts.max_forget, opts.max_neighbours)
        base = local_model(exp.config.get("model") or any_run.config.get("model"))
        recon = ([("pretrained", base)] if base else []) + [(label, m.path) for label, m in models.items() if m]
        _reconstruction_section(page, any_run.record, roots, recon, opts, seed)
    page.heading("Loss over steps")
    for label, m in models.items():
        if m is not None:
            curves_section(page, f"curves-{slug(label)}", m.log, f"{label} ({where})")
    if not any(models.values()):
        page.text("No run folder holds an unlearned model with its retrack_log.json.", note=True)
    config_section(page, "config", exp.config, "Resolved config")
    provenance_section(page, "provenance", exp.record, "Provenance")
    return page


def _grid(images: np.ndarray):
    from retrack.grid import grid_image

    return grid_image(images, scale=scale_for(images))


__all__ = ["ReportOptions", "demo_page", "experiment_page", "key_value_table", "run_page"]
