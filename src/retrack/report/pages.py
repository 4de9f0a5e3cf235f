"""The pages of an unlearning run and of the demo's output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from retrack.errors import UserError
from retrack.report.draw import DEFAULT_GUIDANCE, draw_samples, is_text_to_image, local_model
from retrack.report.folders import RunFolder, read_json
from retrack.report.html import Page
from retrack.report.options import ReportOptions
from retrack.report.sections import (
    before_after_grids,
    config_section,
    curves_section,
    neighbours_section,
    provenance_section,
    reconstruction_section,
)
from retrack.report.verdict import verdict_section


def _samples_section(page: Page, run: RunFolder, before: Path | None, opts: ReportOptions,
                     seed: int) -> None:
    """The same seeds through the input and the unlearned model."""
    page.heading("Samples before and after")
    if opts.samples == 0:
        page.text("Not drawn (--samples 0).", note=True)
        return
    prompt, guidance = _prompt(run.config)
    try:
        old = draw_samples(before, opts.samples, opts.sampling_steps, seed, opts.device, prompt, guidance,
                           opts.progress) if before else None
        new = draw_samples(run.path, opts.samples, opts.sampling_steps, seed, opts.device, prompt, guidance,
                           opts.progress)
    except UserError as e:  # e.g. the text-to-image extra not installed, or a base model moved away
        page.text(f"Not drawn: {e}", note=True)
        return
    if before is None:
        page.text(f"The input model {run.config.get('model')!r} is not a local folder: no 'before' "
                  "samples.", note=True)
    how = f" through the pipeline under the prompt {prompt!r} (guidance {guidance:g})" \
        if prompt is not None and is_text_to_image(run.path) else ""
    before_after_grids(page, "samples", old, new,
                       f"{opts.samples} DDIM samples ({opts.sampling_steps} steps){how}, the same "
                       f"per-sample seeds (seed {seed}) for the input and the unlearned model")


def _prompt(cfg: dict[str, Any]) -> tuple[str | None, float]:
    """The prompt a text-to-image run was unlearned under, and its evaluation's guidance."""
    prompt, guidance = cfg.get("prompt"), cfg.get("eval_guidance")  # the record's settings, by key
    ok = isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and 0 <= guidance < float("inf")
    return (prompt if isinstance(prompt, str) and prompt else None), (float(guidance) if ok else DEFAULT_GUIDANCE)


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
    _samples_section(page, run, before, opts, seed)
    neighbours_section(page, "neighbours", record, roots, opts.max_forget, opts.max_neighbours)
    models = ([("input model", before)] if before else []) + [("unlearned model", run.path)]
    reconstruction_section(page, record, roots, models, opts, seed)
    verdict_section(page, run.path)
    page.heading("Loss over steps")
    curves_section(page, "curves", run.log, cfg.get("method", "run"))
    config_section(page, "config", {**cfg, "objective": record.get("objective")}, "Resolved config")
    provenance_section(page, "provenance", record, "Provenance")
    return page


def demo_page(path: Path, opts: ReportOptions) -> Page:
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
        reconstruction_section(page, run.record, [path, run.path], models, opts, seed)
    page.heading("Loss over steps")
    curves_section(page, "curves", run.log if run else [], "ReTrack")
    config_section(page, "config", record.get("config"), "Demo settings")
    config_section(page, "unlearn-config", run.config if run else None, "Resolved unlearning config")
    provenance_section(page, "provenance", run.record if run else record, "Provenance")
    return page
