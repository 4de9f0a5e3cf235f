"""The report's pictures: loss and metric curves (retrack.curves, shared with the evaluation
during fine-tuning) and labelled image rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrack.curves import Series, curves
from retrack.grid import grid_image

__all__ = ["Series", "curves", "image_rows"]


def image_rows(rows: Sequence[np.ndarray], scale: int = 3, pad: int = 2):
    """Rows of uint8 (N_i, H, W, C) images, one row each, left-aligned on a white canvas."""

    width = max(len(r) for r in rows)
    padded = []
    for r in rows:
        blank = np.full((width - len(r), *r.shape[1:]), 255, dtype=np.uint8)
        padded.append(np.concatenate([r, blank]))
    return grid_image(np.concatenate(padded), ncol=width, pad=pad, scale=scale)
