"""What became of the forgotten image's trajectories: each row's samples nearest to it.

FID to the retrained model measures the whole distribution, which a few samples near the
forgotten image hardly move; yet those samples are what a removal request is about. A model
that never saw the image draws digits there, the memorising model draws the image itself, and
an unlearned model may draw anything in between: blotches, or a blurred ghost of the image that
no copy threshold catches. `nearest.png` shows, for the first seed of every row, the forgotten
image and the samples nearest to it (pixel L2); `nearest.md` gives the nearest sample's distance
per seed. Both come from the samples every run saved, and the reference model's from the
experiment's sample cache: nothing is sampled again. Only the first target is shown.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import pyplot as plt

from retrack.metrics.copies import l2_distances

NEAREST_PNG, NEAREST_MD = "nearest.png", "nearest.md"
REFERENCE_ROW = "reference model"  # the retrained model's row, last
SHOWN = 9  # samples per row in the figure


def distances_to(samples: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N,) pixel L2 in [0, 1] units from each uint8 sample to the uint8 target image."""

    return l2_distances(samples, target[None])[:, 0]


def median_markdown(medians: Mapping[str, Mapping[int, float]]) -> str:
    """One line per row: the median distance of its SHOWN nearest samples per seed, their mean over
    seeds, and that mean against the reference model's (the figure's strip, as a number: a row
    whose trajectories end as far from the image as the retrained model's reads about 0%)."""
    seeds = sorted({s for per_seed in medians.values() for s in per_seed})
    ref = medians.get(REFERENCE_ROW)
    ref_mean = float(np.mean(list(ref.values()))) if ref else None
    lines = [f"| row (median L2 of the {SHOWN} samples nearest to the forgotten image) | "
             + " | ".join(f"seed {s}" for s in seeds) + " | mean | against the reference model |",
             "|---" * (len(seeds) + 3) + "|"]
    for label, per_seed in medians.items():
        mean = float(np.mean(list(per_seed.values())))
        against = f"{100 * (mean / ref_mean - 1):+.0f}%" if ref_mean and label != REFERENCE_ROW else ""
        lines.append(f"| {label} | " + " | ".join(f"{per_seed[s]:.2f}" if s in per_seed else "–" for s in seeds)
                     + f" | {mean:.2f} | {against} |")
    return "\n".join(lines) + "\n"


def nearest_markdown(found: Mapping[str, Mapping[int, float]]) -> str:
    """One line per row, one cell per seed: the distance of the row's nearest sample to the image."""
    seeds = sorted({s for per_seed in found.values() for s in per_seed})
    lines = ["| row (L2 of the nearest sample to the forgotten image) | "
             + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for label, per_seed in found.items():
        lines.append(f"| {label} | " + " | ".join(f"{per_seed[s]:.2f}" if s in per_seed else "–" for s in seeds)
                     + " |")
    return "\n".join(lines) + "\n"


def draw_nearest(target: np.ndarray, strips: Mapping[str, np.ndarray], dists: Mapping[str, np.ndarray]) -> bytes:
    """PNG: one line per row: the forgotten image, then its nearest samples with their distances."""

    matplotlib.use("Agg", force=True)

    n = 1 + max(len(s) for s in strips.values())
    fig, axes = plt.subplots(len(strips), n, figsize=(0.9 * n + 1.6, 1.0 * len(strips) + 0.2), dpi=100,
                             squeeze=False)
    cmap = "gray" if target.shape[-1] == 1 else None
    for r, (label, images) in enumerate(strips.items()):
        row = [target, *images]
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                ax.imshow(row[c].squeeze(-1) if cmap else row[c], cmap=cmap, vmin=0, vmax=255)
                ax.set_title("forgotten" if c == 0 else f"{dists[label][c - 1]:.1f}", fontsize=7, pad=2)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def load_samples(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    """A run's saved samples (samples.npz) or a cached companion's (.npy): uint8 (N, H, W, C) images,
    of `shape` (H, W, C) where given; None when absent or damaged (the views then leave them out)."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                images = z["images"]
        else:
            images = np.array(np.load(path, mmap_mode="r", allow_pickle=False))
    except Exception:  # noqa: BLE001 - not a zip, truncated, objects: a damaged file is left out
        return None
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        return None
    return images if shape is None or tuple(images.shape[1:]) == tuple(shape) else None


def nearest_outputs(samples: Mapping[str, Mapping[int, np.ndarray]], target: np.ndarray) -> tuple[str, bytes]:
    """nearest.md and nearest.png from each row's samples per seed (the reference row included)."""
    found, medians, strips, dists = {}, {}, {}, {}
    for label, per_seed in samples.items():
        d = {s: distances_to(x, target) for s, x in per_seed.items()}
        found[label] = {s: float(v.min()) for s, v in d.items()}
        medians[label] = {s: float(np.median(np.sort(v)[:SHOWN])) for s, v in d.items()}
        first = min(per_seed)
        order = np.argsort(d[first], kind="stable")[:SHOWN]
        strips[label], dists[label] = per_seed[first][order], d[first][order]
    return nearest_markdown(found) + "\n" + median_markdown(medians), draw_nearest(target, strips, dists)
