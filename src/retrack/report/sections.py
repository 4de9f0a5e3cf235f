"""Sections every kind of report shares: curves, forget neighbours, grids, config, provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retrack.errors import UserError
from retrack.grid import grid_image
from retrack.report.draw import (
    distinct_rows,
    draw_reconstructions,
    forget_and_neighbours,
    is_text_to_image,
    locate_data,
)
from retrack.report.figures import curves, image_rows
from retrack.report.folders import split_log
from retrack.report.html import Page
from retrack.report.options import ReportOptions

# Keys of a run record shown in sections of their own (or too long for a table cell).
NOT_PROVENANCE = ("config", "neighbours", "final_terms", "objective")


def scale_for(images: np.ndarray, target: int = 84) -> int:
    """Nearest-neighbour upscaling so small images (28×28) are visible and large ones stay as is."""
    return max(1, target // max(images.shape[1], 1))


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as dotted keys; long lists summarised so a table stays readable."""
    if isinstance(obj, dict):
        out: list[tuple[str, Any]] = []
        for k, v in obj.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out or [(prefix, "{}")]
    if isinstance(obj, list) and len(obj) > 12:
        head = ", ".join(str(v) for v in obj[:8])
        return [(prefix, f"[{head}, … {len(obj)} items]")]
    if isinstance(obj, list):
        return [(prefix, "[" + ", ".join(str(v) for v in obj) + "]")]
    return [(prefix, obj)]


def key_value_table(page: Page, name: str, obj: dict[str, Any]) -> None:
    page.table(name, ("key", "value"), flatten(obj))


def config_section(page: Page, name: str, config: dict[str, Any] | None, title: str) -> None:
    page.heading(title)
    if config:
        key_value_table(page, name, config)
    else:
        page.text("No resolved config was recorded here.", note=True)


def provenance_section(page: Page, name: str, record: dict[str, Any] | None, title: str) -> None:
    page.heading(title)
    shown = {k: v for k, v in (record or {}).items() if k not in NOT_PROVENANCE}
    if shown:
        key_value_table(page, name, shown)
    else:
        page.text("No provenance was recorded here.", note=True)


def curves_section(page: Page, name: str, log: list[dict[str, Any]], what: str) -> None:
    """Loss terms and gradient norm per step; evaluation metrics per step where the log has them."""
    train, evals = split_log(log)
    if not train and not evals:
        page.text(f"{what}: no per-step log (retrack_log.json) was found.", note=True)
        return
    if train:
        page.figure(f"{name}-loss", curves(train, "loss"),
                    f"{what}: loss terms and gradient norm over the unlearning steps "
                    "(log scale where a term spans more than two decades).")
    if evals:
        page.figure(f"{name}-metrics", curves(evals, "metric"),
                    f"{what}: metrics measured during fine-tuning, over steps.")


def neighbours_section(page: Page, name: str, record: dict[str, Any], roots: list[Path],
                       max_forget: int, max_k: int) -> None:
    """The forget image(s) beside the K remain images their trajectories are redirected to."""
    page.heading("Forget images and their neighbours")
    images, where = locate_data(record, roots)
    if images is None:
        page.text(f"Not shown: {where}.", note=True)
        return
    rows, k = forget_and_neighbours(images, record, max_forget, max_k)
    if not rows:
        page.text("Not shown: the run record holds no forget indices within its data set.", note=True)
        return
    if k is None:
        caption = (f"The first {len(rows)} distinct forget image(s) (this method uses no "
                   "neighbours).")
    else:
        caption = (f"Left: each distinct forget image (first {len(rows)}); right: its "
                   f"{min(k, max_k)} nearest remain images of K = {k}, nearest first "
                   f"(data: {Path(where).name}, digest checked).")
    page.figure(name, image_rows(rows, scale_for(rows[0])), caption)


def before_after_grids(page: Page, name: str, before: np.ndarray | None, after: np.ndarray | None,
                       caption: str, labels: tuple[str, str] = ("before", "after")) -> None:
    for tag, images in zip(labels, (before, after), strict=True):
        if images is not None and len(images):
            page.figure(f"{name}-{tag}", grid_image(images, scale=scale_for(images)),
                        f"{caption}: {tag}.")


def reconstruction_section(page: Page, record: dict[str, Any], roots: list[Path],
                            models: list[tuple[str, Path]], opts: ReportOptions, seed: int) -> None:
    """Rows: the distinct forget images, then each model's reconstruction from t = T/4."""
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
    drawn = [label for label, path in models if is_text_to_image(path)]
    if drawn:
        page.text(f"Not shown: the {drawn[0]} is a text-to-image model, and this probe noises pixel images "
                  "(it is run on pixel-space models only).", note=True)
        return
    originals = images.images[forget][distinct_rows(images.images[forget], opts.max_forget)]
    try:
        rows = [originals] + [draw_reconstructions(path, originals, seed, opts.device) for _, path in models]
    except UserError as e:  # e.g. a text-to-image pipeline, which this probe does not run
        page.text(f"Not shown: {e}", note=True)
        return
    names = ", ".join(["original"] + [label for label, _ in models])
    page.figure("reconstruction", image_rows(rows, scale_for(originals)),
                f"Rows, top to bottom: {names}; each forget image noised to t = T/4 and denoised "
                f"with ancestral DDPM (seed {seed}).")
