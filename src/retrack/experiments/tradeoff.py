"""The trade-off plot of an experiment: forgetting against quality, one point per run.

A table of means hides what a user must decide on: whether a method forgets *and* keeps quality
in the same run. Each run is one point (x: a quality column such as FID to the retrained model,
y: a forgetting column such as frequency or NLL), coloured by row, with the row's mean as a
larger marker, so seed-to-seed spread and the overlap of methods are visible at a glance.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib import pyplot as plt

from retrack.errors import require
from retrack.experiments.metrics import Column

TRADEOFF_FILE = "tradeoff.png"
# Preferred axes when the config does not name them: the first column present wins.
X_PREFERENCE = ("fid_reference", "fid")
Y_PREFERENCE = ("frequency", "nll")
TRADEOFF_KEYS = ("x", "y")


def parse_tradeoff(value: Any) -> dict[str, Any]:
    """`tradeoff: {x: KEY, y: [KEY, ...]}` from the config, checked for shape only."""
    if value is None:
        return {}
    require(isinstance(value, dict), "tradeoff: must be a mapping like {x: fid_reference, y: [frequency, nll]}.")
    bad = [k for k in value if k not in TRADEOFF_KEYS]
    require(not bad, f"tradeoff: unknown key {bad[0]!r}; allowed: x, y." if bad else "")
    out: dict[str, Any] = {}
    if "x" in value:
        require(isinstance(value["x"], str), "tradeoff.x must be one column key, e.g. fid_reference.")
        out["x"] = value["x"]
    if "y" in value:
        ys = [value["y"]] if isinstance(value["y"], str) else value["y"]
        require(isinstance(ys, list) and ys and all(isinstance(y, str) for y in ys),
                "tradeoff.y must be a column key or a list of them, e.g. [frequency, nll].")
        out["y"] = list(ys)
    return out


def axes_for(spec: Mapping[str, Any], columns: Sequence[Column]) -> tuple[str, list[str]] | None:
    """The (x, ys) keys to plot: the config's, checked against the table's columns, else the
    preferred ones present; None when the table has no quality or no forgetting column."""
    keys = [c.key for c in columns]
    for key in [spec.get("x"), *spec.get("y", [])]:
        require(key is None or key in keys,
                f"tradeoff: {key!r} is not a column of this experiment; columns: {', '.join(keys)}.")
    x = spec.get("x") or next((k for k in X_PREFERENCE if k in keys), None)
    ys = spec.get("y") or [k for k in Y_PREFERENCE if k in keys]
    return (x, ys) if x and ys else None


def tradeoff_points(results: Mapping[str, Sequence[Mapping[str, Any]]], x: str, y: str) -> dict[str, Any]:
    """Row label → (n, 2) array of (x, y) per run that has both values; rows without any dropped."""

    points = {}
    for label, runs in results.items():
        pts = [(float(r[x]), float(r[y])) for r in runs if r.get(x) is not None and r.get(y) is not None]
        if pts:
            points[label] = np.array(pts, dtype=float)
    return points


MARKERS = ("o", "s", "^", "D")


def row_style(i: int) -> tuple[tuple[float, ...], str]:
    """Colour and marker of the i-th row: ten colours, then the same colours with another marker,
    so no two of up to 40 rows look alike."""

    return colormaps["tab10"](i % 10), MARKERS[(i // 10) % len(MARKERS)]


def draw_tradeoff(results: Mapping[str, Sequence[Mapping[str, Any]]], columns: Sequence[Column],
                  x: str, ys: Sequence[str]) -> bytes:
    """PNG bytes: one panel per y column against x; small dots are runs, large ones row means."""

    matplotlib.use("Agg", force=True)

    titles = {c.key: c.title for c in columns}
    fig, axes = plt.subplots(1, len(ys), figsize=(5.2 * len(ys), 4.2), dpi=100, squeeze=False)
    try:
        for ax, y in zip(axes.flat, ys, strict=True):
            for i, (label, pts) in enumerate(tradeoff_points(results, x, y).items()):
                colour, marker = row_style(i)
                ax.scatter(pts[:, 0], pts[:, 1], s=14, color=colour, marker=marker, alpha=0.6)
                mean = pts.mean(axis=0)
                ax.scatter([mean[0]], [mean[1]], s=90, color=colour, marker=marker, edgecolor="black",
                           label=f"{label} ({len(pts)})")
            xs = [v for pts in tradeoff_points(results, x, y).values() for v in pts[:, 0]]
            if xs and min(xs) > 0 and max(xs) / min(xs) > 100:  # a destroyed model would hide the rest
                ax.set_xscale("log")
            ax.set_xlabel(titles.get(x, x))
            ax.set_ylabel(titles.get(y, y))
            ax.grid(alpha=0.3)
        axes.flat[-1].legend(fontsize=7, loc="best", title="row (runs)", title_fontsize=7)
        fig.suptitle("each small dot is one run; the large dot is the row's mean", fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()
