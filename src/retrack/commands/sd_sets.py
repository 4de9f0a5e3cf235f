"""`retrack sd-sets`: the forget and remain sets of a Stable Diffusion prompt, from its own samples.

Its flags are generated from `SetsConfig`, where each setting is declared once.
"""

from __future__ import annotations

import argparse

from retrack.flags import add_flags
from retrack.sdsets import SetsConfig, resolve_sets, run_sets
from retrack.validation import config_from_args


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "sd-sets", help=help,
        description="Sample --samples images for a prompt, compare each with the training image under a "
        "descriptor (SSCD with --sscd, else the offline pixel_cosine stand-in, named in every file), and "
        "split them: the samples that copy the training image are the forget set, the others the remain "
        "set. Writes forget/ and remain/ (PNG, named by sampling seed), training.png, contact_sheet.png "
        "(the forget set framed red), sets.json, and data.npz with forget.txt, which "
        "`retrack unlearn --prompt P --data DIR/data.npz --forget @DIR/forget.txt` takes as they are. "
        "With --prompts, one subfolder per prompt and index.json. The output appears only when complete.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, SetsConfig)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plan = resolve_sets(config_from_args(SetsConfig, args))
    records = run_sets(plan, progress=not args.quiet)
    for job, r in zip(plan.jobs, records, strict=True):
        n = r["sampling"]["samples"]
        print(f"{job.prompt!r}: forget {r['forget']['count']}/{n}, remain {r['remain']['count']}/{n} "
              f"({r['rule']['text']}; highest {max(r['similarity']):.3f})")
    print(f"wrote {args.out}" + ("" if plan.cfg.descriptor != "pixel_cosine" else
                                 " (descriptor pixel_cosine: an offline stand-in, not SSCD)"))
    return 0
