"""`retrack verify`: membership inference, relearning and the retrained model, into verdict.json.

Its flags are generated from `VerifyConfig`, where each setting is declared once.
"""

from __future__ import annotations

import argparse

from retrack.flags import add_flags
from retrack.validation import config_from_args
from retrack.verify import VerifyConfig, resolve_verify, run_verify


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "verify", help=help,
        description="Score the distinct --forget images, a sample of remain images (members) and --heldout "
        "images the model never saw (non-members) with three membership attacks (denoising loss, SecMI, PIA) "
        "under --model, --pretrained and --reference-model; place each forget image among the non-members "
        "(percentile, one-sided empirical p-value, Bonferroni over the attacks) and give each its verdict; "
        "optionally fine-tune on the remain set only (--relearn-steps) and report when the forget images come "
        "back. Writes OUT/verdict.json and OUT/verdict.run.json; never modifies its inputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, VerifyConfig)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_verify(config_from_args(VerifyConfig, args))
    verdict = run_verify(cfg, progress=not args.quiet)
    print(verdict["summary"])
    for image in verdict["images"]:
        print(f"  data {image['data_indices'][0]}: {image['verdict']} ({image['why']})")
    print(f"wrote {cfg.out}/verdict.json")
    return 0
