"""The experiment page: the summary and per-run tables, then one seed's runs side by side."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from retrack.grid import grid_image
from retrack.report.draw import local_model
from retrack.report.folders import Experiment, ExperimentRun
from retrack.report.html import Page
from retrack.report.options import ReportOptions
from retrack.report.sections import (
    config_section,
    curves_section,
    neighbours_section,
    provenance_section,
    reconstruction_section,
    scale_for,
)


def experiment_page(exp: Experiment, opts: ReportOptions) -> Page:
    page = Page(f"Experiment: {exp.path.name}")
    seeds = sorted({r.seed for r in exp.runs if r.seed is not None})
    seed = opts.seed if opts.seed is not None else (seeds[0] if seeds else 0)
    labels = list(dict.fromkeys(r.label for r in exp.runs))
    page.text(f"{len(exp.runs)} runs, {len(labels)} rows, seeds {seeds or '—'}.")
    _tables(page, exp)
    targets = sorted({r.target for r in exp.runs})
    target = targets[0] if targets else ""
    shown: dict[str, ExperimentRun] = {}
    for r in exp.runs:
        if r.seed == seed and r.target == target:
            shown.setdefault(r.label, r)
    where = f"seed {seed}" + (f", target {target}" if target else "")
    _samples(page, shown, where, opts)
    _model_sections(page, exp, shown, where, opts, seed)
    config_section(page, "config", exp.config, "Resolved config")
    provenance_section(page, "provenance", exp.record, "Provenance")
    return page


def _tables(page: Page, exp: Experiment) -> None:
    page.heading("Results (mean ± std over seeds)")
    keys, cells = summary_table(exp)
    if cells:
        page.table("summary", keys, cells)
    else:
        page.text("No summary.json and no finished runs were found.", note=True)
    page.heading("Runs")
    metric_keys = list(dict.fromkeys(k for r in exp.runs for k, v in r.metrics.items()
                                     if _number(v) and k != "seed"))
    page.table("runs", ["run", "row", "seed", *metric_keys],
               [[r.name, r.label, r.seed, *[r.metrics.get(k, "—") for k in metric_keys]] for r in exp.runs])


def _samples(page: Page, shown: dict[str, ExperimentRun], where: str, opts: ReportOptions) -> None:
    page.heading(f"Samples ({where}: every row draws with the same per-sample seeds)")
    missing = []
    for label, r in shown.items():
        samples = r.samples
        if samples is None:
            missing.append(label)
        elif opts.samples:
            shown_samples = samples[:opts.samples]
            page.figure(f"samples-{slug(label)}", grid_image(shown_samples, scale=scale_for(shown_samples)),
                        f"{label}: the first {len(shown_samples)} samples ({where}).")
    if missing:
        page.text(f"No samples.npz for: {', '.join(missing)}.", note=True)


def _model_sections(page: Page, exp: Experiment, shown: dict[str, ExperimentRun], where: str,
                    opts: ReportOptions, seed: int) -> None:
    """Neighbours, reconstructions and loss curves: from the runs that kept their model folder."""
    models = {label: m for label, r in shown.items() if (m := r.model) is not None}
    first = next((m for m in models.values() if m.record.get("neighbours")), None)
    first = first or next(iter(models.values()), None)
    if first is not None:
        roots = [exp.path, first.path, first.path.parent]
        neighbours_section(page, "neighbours", first.record, roots, opts.max_forget, opts.max_neighbours)
        base = local_model(exp.config.get("model") or first.config.get("model"))
        recon = ([("pretrained", base)] if base else []) + [(label, m.path) for label, m in models.items()]
        reconstruction_section(page, first.record, roots, recon, opts, seed)
    page.heading("Loss over steps")
    for label, m in models.items():
        curves_section(page, f"curves-{slug(label)}", m.log, f"{label} ({where})")
    if not models:
        page.text("No run folder holds an unlearned model with its retrack_log.json.", note=True)


def summary_table(exp: Experiment) -> tuple[list[str], list[list[Any]]]:
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


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"
