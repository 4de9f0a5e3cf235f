"""How similar distinct images look to the offline pixel_cosine descriptor: the basis of its
default copy threshold in `retrack sd-sets` (0.95).

    python scripts/calibrate_pixel_cosine.py --fashion /usr/share/datasets/fashion-mnist --num 20000

Scores the paper's T-shirt (Fashion-MNIST train index 1) against the first --num Fashion-MNIST
training images other than itself and prints the percentiles, overall and within its class. A copy
threshold must lie above what distinct images reach.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from retrack.data import read_idx, read_idx_labels
from retrack.metrics.similarity import PixelCosine
from retrack.recipes.mnist_tshirt.builder import TSHIRT_INDEX


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist", help="folder of the IDX files")
    ap.add_argument("--num", type=int, default=20000)
    args = ap.parse_args()
    root = Path(args.fashion)
    images = np.array(read_idx(root / "train-images-idx3-ubyte.gz")[: args.num, ..., None])
    labels = read_idx_labels(root / "train-labels-idx1-ubyte.gz")[: args.num]
    sim = PixelCosine().cross(images, images[[TSHIRT_INDEX]])[:, 0]
    others = np.arange(len(images)) != TSHIRT_INDEX
    same = others & (labels == labels[TSHIRT_INDEX])
    for name, mask in (("all other images", others), ("other T-shirts (its class)", same)):
        q = np.percentile(sim[mask], [50, 99, 99.9])
        print(f"{name} ({mask.sum()}): median {q[0]:.3f}, 99th {q[1]:.3f}, 99.9th {q[2]:.3f}, "
              f"max {sim[mask].max():.3f}")


if __name__ == "__main__":
    main()
