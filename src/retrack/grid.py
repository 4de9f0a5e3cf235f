"""Sample grids a person can look at (PNG)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def grid_image(images: np.ndarray, ncol: int | None = None, pad: int = 2, scale: int = 1):
    """Tile uint8 (N, H, W, C) images into one PIL image, `ncol` per row (square by default)."""

    n, h, w, c = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y : y + h, x : x + w] = im
    pil = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return pil


def save_grid(images: np.ndarray, path: str | Path, ncol: int | None = None, pad: int = 2,
              scale: int = 1, fmt: str | None = None) -> Path:
    """grid_image() written to `path` (`fmt`: PIL's format name, when the suffix does not say)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, ncol, pad, scale).save(path, format=fmt)
    return path
