"""`retrack unlearn`: fine-tune a diffusers model so it forgets some of its training images.

Its flags are generated from `UnlearnConfig`, where each setting is declared once with its
default, check and help; this file adds only what is not a setting of the run (`--quiet`).
"""

from __future__ import annotations

import argparse

from retrack.flags import add_flags, given_settings
from retrack.unlearn_config import UnlearnConfig, config_of, resolve_unlearn
from retrack.unlearning import run_unlearn


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "unlearn", help=help,
        description="Fine-tune a trained diffusion model so that it behaves as if the forget "
        "images had never been in its training set. The input model is never modified; the "
        "output is written atomically in the same diffusers layout, with retrack_run.json "
        "(resolved config, seed, versions, data hashes) and retrack_log.json (per-step losses, and "
        "with --eval-every the evaluations).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = add_flags(p, UnlearnConfig)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run, flag_defaults=defaults)


def run(args: argparse.Namespace) -> int:
    # Only what was typed goes in: a recipe fills the rest before the config's own defaults do.
    cfg = resolve_unlearn(config_of(given_settings(UnlearnConfig, args, args.flag_defaults)))
    out = run_unlearn(cfg, progress=not args.quiet)
    print(f"wrote {out}")
    return 0
