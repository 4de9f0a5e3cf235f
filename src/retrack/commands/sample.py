"""`retrack sample`: draw images from a diffusers model into an .npz (and optionally a grid)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="draw images from a model",
        description="Draw images with the DDPM (ancestral) or DDIM sampler and write them as a "
        "uint8 (N,H,W,C) 'images' array in an .npz. Sample i depends only on --seed and i.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="diffusers pipeline folder, bare UNet folder, or hub id; "
                   "a text-to-image pipeline (SD, SDXL, SD3, Flux) with --prompt")
    p.add_argument("--num", required=True, help="number of images")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--steps", default=50, help="sampling steps")
    p.add_argument("--sampler", default="ddim", help="reverse process: ddpm or ddim")
    p.add_argument("--seed", default=0, help="sampling seed")
    p.add_argument("--batch-size", default=256, help="images per forward pass")
    p.add_argument("--grid", default=None, help="also write the first 64 images as a PNG grid here (.png)")
    p.add_argument("--prompt", default=None,
                   help="text-to-image models (an SD, SDXL, SD3 or Flux pipeline folder or a `unlearn --lora` "
                   "output): the prompt; sampled by the pipeline itself with its guidance")
    p.add_argument("--guidance", default=7.5, help="classifier-free guidance scale with --prompt")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrack.generate import SampleConfig, resolve_sample, run_sample
    from retrack.validation import config_from_args

    cfg = resolve_sample(config_from_args(SampleConfig, args))
    out = run_sample(cfg, progress=not args.quiet)
    print(f"wrote {out}" + (f" and {cfg.grid}" if cfg.grid else ""))
    return 0
