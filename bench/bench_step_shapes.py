"""ReTrack step against one forward+backward on the 2B images it touches, at the paper's shapes:
CIFAR-10 (3×32×32, the google/ddpm-cifar10-32 UNet) and CelebA-HQ (3×256×256, the
google/ddpm-ema-celebahq-256 UNet), both randomly initialised (bench/architectures.py).

    python bench/bench_step_shapes.py [--shapes cifar10,celebahq] [--batch-size 2] [--repeats 3]
                                      [--device cpu] [--k 10]

Three timings per shape, interleaved and reported as medians after one warm-up round:
- gradient: the trainer's own path for one batch (draw, noise, ReTrack's weighted target over K
  neighbours, one forward over the 2B rows, backward: trainer.batch_gradient);
- forward+backward: the same UNet on 2B random inputs with a plain squared-error loss;
- step: the gradient plus clipping and the AdamW update, i.e. one whole optimiser step.
The objective's overhead is gradient / forward+backward; AdamW's share is what step adds to it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from architectures import build  # noqa: E402
from step_timing import time_gradient_step  # noqa: E402


def setup(shape: str, k: int, device: str):
    from retrack import objectives
    from retrack.trainer import TrainData

    model = build(shape).to(device)
    c, h, w = model.sample_shape
    g = torch.Generator().manual_seed(0)
    remain = torch.randint(0, 256, (64, c, h, w), generator=g, dtype=torch.uint8)
    forget = torch.randint(0, 256, (4, c, h, w), generator=g, dtype=torch.uint8)
    table = torch.stack([torch.randperm(64, generator=g)[:k] for _ in range(4)])
    return model, objectives.build("retrack"), TrainData(remain, forget, table)


def time_shape(shape: str, batch: int, repeats: int, device: str, k: int) -> dict[str, float]:
    model, objective, data = setup(shape, k, device)
    opt = torch.optim.AdamW(list(model.parameters()), lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6)
    return time_gradient_step(model, objective, data, batch, model.sample_shape, opt, device, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="cifar10,celebahq")
    ap.add_argument("--batch-size", type=int, default=2, help="B: forget and remain images per step each")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}, B={args.batch_size}, K={args.k}, "
          f"medians of {args.repeats}")
    for shape in args.shapes.split(","):
        m = time_shape(shape, args.batch_size, args.repeats, args.device, args.k)
        fb = m["forward+backward"]
        print(f"{shape}: ReTrack gradient {m['gradient']:.3f} s, forward+backward on 2B={2 * args.batch_size} "
              f"images {fb:.3f} s, ratio {m['gradient'] / fb:.3f} (target ≤ 1.05); whole step with "
              f"clip+AdamW {m['step']:.3f} s ({m['step'] / fb:.3f}×)")


if __name__ == "__main__":
    main()
