"""`retrack demo`: the embedded default, MNIST T-shirt unlearning end to end on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrack.recipes.mnist_tshirt.demo import DemoConfig, format_table, run_demo
from retrack.runrecord import check_output


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "demo", help=help,
        description="On the shipped MNIST T-shirt model: sample, unlearn the T-shirt with ReTrack "
        "(the paper's MNIST settings), sample again with the same seeds, and print Frequency, NLL, "
        "FID and IS before and after. Writes the unlearned model, metrics.json, sample grids and "
        "neighbours.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="retrack-demo", help="output folder")
    p.add_argument("--samples", default=500, help="samples before and after (at least 12)")
    p.add_argument("--sampling-steps", default=50, help="DDIM steps per sample")
    p.add_argument("--seed", default=0, help="seed of unlearning and sampling")
    p.add_argument("--no-nll", action="store_true", help="skip the T-shirt's NLL (an ODE solve)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(out=args.out, samples=args.samples, sampling_steps=args.sampling_steps,
                     seed=args.seed, device=args.device, overwrite=args.overwrite, nll=not args.no_nll)
    check_output(Path(cfg.out), cfg.overwrite, [Path(cfg.model)])
    metrics = run_demo(cfg, progress=not args.quiet)
    print()
    print(format_table(metrics))
    b, a = metrics["before"], metrics["after"]
    print(f"\nT-shirt copies: {b['copies']}/{b['samples']} before, {a['copies']}/{a['samples']} after.")
    print(f"wrote {args.out}/ (report.html, model/, metrics.json, samples_before.png, samples_after.png, "
          "neighbours.png)")
    return 0
