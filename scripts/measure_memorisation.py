"""Measure how often a planted-image MNIST model regurgitates its planted image; record it beside
the model.

    python scripts/measure_memorisation.py --model src/retrack/recipes/mnist_tshirt/model --samples 2000
    python scripts/measure_memorisation.py --model src/retrack/recipes/mnist_boot/model --image boot
    python scripts/measure_memorisation.py --model src/retrack/recipes/mnist_bag/model --image bag

Writes MODEL/memorisation.json (frequency by the paper's rule: L2 < 10 in [0, 1]), a grid of the
samples nearest to the planted image (nearest_to_IMAGE.png), and prints the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from retrack.backends.pixel import load_model
from retrack.grid import save_grid
from retrack.metrics.copies import l2_copies, l2_distances
from retrack.recipes.mnist_tshirt.builder import PLANTED, load_fashion
from retrack.runrecord import environment_record, write_json
from retrack.sampling import sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--image", default="tshirt", choices=sorted(PLANTED), help="the planted image")
    ap.add_argument("--record", default=None, help="where to write the JSON (default MODEL/memorisation.json)")
    args = ap.parse_args()
    loaded = load_model(args.model, "cpu")
    planted = load_fashion(args.image)
    images = sample(loaded.denoiser, loaded.scheduler.config, args.samples, args.steps, args.sampler, args.seed)
    copies = l2_copies(images, planted)
    dist = l2_distances(images, planted[None])[:, 0]
    model = Path(args.model)
    save_grid(images[np.argsort(dist, kind="stable")[:32]], model / f"nearest_to_{args.image}.png", ncol=8, scale=3)
    record = environment_record(vars(args), frequency=float(copies.mean()), copies=int(copies.sum()),
                                samples=len(images), rule=f"L2 < 10 to the {args.image}, pixels in [0, 1]",
                                nearest_non_copy_l2=float(dist[~copies].min()) if (~copies).any() else None)
    write_json(Path(args.record) if args.record else model / "memorisation.json", record)
    print(f"{args.image} frequency: {copies.sum()}/{len(images)} = {100 * copies.mean():.3f}%")


if __name__ == "__main__":
    main()
