"""The report's pictures: loss and metric curves (matplotlib, Agg) and labelled image rows.

matplotlib comes with the package (mlxtend depends on it); it draws proper axes and log scales,
which the loss terms need: the unlearning term of ReTrack is 10³–10⁴ times the remain term.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # name -> (steps, values)


def curves(series: Series, ylabel: str = "value", ncols: int = 3):
    """One small panel per series over the step axis; log y where a series spans > 2 decades."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from PIL import Image

    names = list(series)
    ncols = max(1, min(ncols, len(names)))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.4 * nrows), dpi=90, squeeze=False)
    try:
        for ax, name in zip(axes.flat, names, strict=False):
            steps, values = (np.asarray(v, dtype=float) for v in series[name])
            ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, lw=1.2)
            finite = values[np.isfinite(values)]
            if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
                ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
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


def image_rows(rows: Sequence[np.ndarray], scale: int = 3, pad: int = 2):
    """Rows of uint8 (N_i, H, W, C) images, one row each, left-aligned on a white canvas."""
    from retrack.grid import grid_image

    width = max(len(r) for r in rows)
    padded = []
    for r in rows:
        blank = np.full((width - len(r), *r.shape[1:]), 255, dtype=np.uint8)
        padded.append(np.concatenate([r, blank]))
    return grid_image(np.concatenate(padded), ncol=width, pad=pad, scale=scale)
