"""`retrack sample`: draw images from a diffusers model into an .npz (and optionally a grid).

Its flags are generated from `SampleConfig`, where each setting is declared once.
"""

from __future__ import annotations

import argparse

from retrack.flags import add_flags
from retrack.generate import SampleConfig, resolve_sample, run_sample
from retrack.validation import config_from_args


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "sample", help=help,
        description="Draw images with the DDPM (ancestral) or DDIM sampler and write them as a "
        "uint8 (N,H,W,C) 'images' array in an .npz. Sample i depends only on --seed and i.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, SampleConfig)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_sample(config_from_args(SampleConfig, args))
    out = run_sample(cfg, progress=not args.quiet)
    print(f"wrote {out}" + (f" and {cfg.grid}" if cfg.grid else ""))
    return 0
