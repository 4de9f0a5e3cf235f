"""`retrack audit`: which training images does a model regurgitate, and how often?"""

from __future__ import annotations

import argparse

from retrack.audit import FORGET_FILE, audit
from retrack.validation import Float, Int


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "audit", help=help,
        description="Sample --num images, find each sample's nearest training images (L2 over "
        "pixels in [0, 1], identical training images grouped), and report the copied ones with "
        "their counts and the rule used. With --out, also write audit.json, contact_sheet.png "
        "(each copied image followed by the samples that copy it), samples.npz and forget.txt, "
        "which `retrack unlearn --forget @DIR/forget.txt` accepts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder, bare UNet folder, or hub id")
    p.add_argument("--data", required=True, help="the model's training images (folder, .npz, MNIST/CIFAR folder)")
    p.add_argument("--num", type=Int(min=1), default=500, help="samples to draw")
    p.add_argument("--out", default=None, help="output folder (report, contact sheet, forget file)")
    p.add_argument("--seed", type=Int(min=0), default=0, help="sampling seed")
    p.add_argument("--steps", type=Int(min=1), default=50, help="sampling steps")
    p.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"), help="reverse process")
    p.add_argument("--batch-size", type=Int(min=1), default=64, help="images per forward pass")
    p.add_argument("--threshold", type=Float(min=0.0, min_open=True), default=None,
                   help="absolute rule: L2 below this (default: the paper's 10 at 28×28, scaled to "
                   "the same RMS, 10·√(D/784))")
    p.add_argument("--ratio", type=Float(min=0.0), default=0.5,
                   help="relative rule: L2 below this × the mean L2 to the next --next training "
                   "images (0: absolute rule only)")
    p.add_argument("--next", type=Int(min=1), default=50,
                   help="how many next-nearest images the relative rule averages")
    p.add_argument("--samples", default=None,
                   help="audit the images of this .npz (e.g. from `retrack sample`) instead of drawing --num")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = {k: getattr(args, k) for k in ("num", "out", "seed", "steps", "sampler", "batch_size",
                                              "threshold", "ratio", "next", "device", "overwrite",
                                              "samples")}
    report = audit(args.model, args.data, progress=not args.quiet, **settings)
    print(f"rule: {report['rule']['text']}")
    print(f"copies: {report['copies']}/{report['num_samples']} samples "
          f"({100 * report['fraction']:.2f}%) of {len(report['groups'])} training image(s)")
    for g in report["groups"]:
        idx = g["indices"]
        shown = ",".join(map(str, idx[:5])) + (f",… ({len(idx)} identical)" if len(idx) > 5 else "")
        print(f"  training image {shown}: {g['count']} samples, closest L2 {g['min_l2']:.2f}")
    if args.out:
        print(f"wrote {args.out} (forget file: {args.out}/{FORGET_FILE})")
    return 0
