"""Metric-vs-step panels (matplotlib, Agg): the report's loss and metric curves and the curves a
run with --eval-every writes beside its output, drawn by one function.

matplotlib is already a dependency through mlxtend; it draws the axes and ticks a reader needs to
read a value off the curve, and log scales, which the loss terms need: the unlearning term of
ReTrack is 10³–10⁴ times the remain term.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib import pyplot as plt
from matplotlib.ticker import MaxNLocator
from PIL import Image

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # title -> (steps, values)


def curves(series: Series, ylabel: str | None = "value", ncols: int = 3, xlabel: str = "step",
           stopped_at: int | None = None, size: tuple[float, float] = (3.4, 2.4), dpi: int = 90):
    """One small panel per series over the step axis, as a PIL image; log y where a positive series
    spans more than two decades; a dashed line at `stopped_at` where a run stopped early."""

    matplotlib.use("Agg", force=True)

    names = list(series)
    ncols = max(1, min(ncols, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), dpi=dpi, squeeze=False)
    try:
        for ax, name in zip(axes.flat, names, strict=False):
            steps, values = (np.asarray(v, dtype=float) for v in series[name])
            ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, lw=1.2)
            finite = values[np.isfinite(values)]
            if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
                ax.set_yscale("log")
            if stopped_at is not None:
                ax.axvline(stopped_at, color="tab:red", ls="--", lw=1, label=f"stopped at step {stopped_at}")
                ax.legend(fontsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            if ylabel:
                ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
