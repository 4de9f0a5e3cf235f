"""`retrack prepare-data`: convert a data set once into a memory-mapped store."""

from __future__ import annotations

import argparse

from retrack.api import prepare_data


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "prepare-data", help=help,
        description="Write the images of DATA as one uint8 (N,H,W,C) array on disk (images.u8) with "
        "a small header.json (shape, layout, content digest, source). Every command accepts the "
        "store as --data and reads it memory-mapped, so nearest neighbours and hashing stream it in "
        "chunks instead of loading it into RAM. Image folders are converted a few files at a time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", help="an image folder, an .npz with 'images', or an MNIST/CIFAR-10 folder")
    p.add_argument("--out", required=True, help="store folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    header = prepare_data(args.data, args.out, args.overwrite, progress=not args.quiet)
    shape = "×".join(str(s) for s in header["shape"])
    print(f"wrote {args.out}: {shape} uint8 (N×H×W×C), sha256 {header['digest']}")
    return 0
