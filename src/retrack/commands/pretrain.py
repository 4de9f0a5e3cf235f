"""`retrack pretrain`: train the small model of a YAML recipe (how the shipped model was made)."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrack.validation import POSITIVE_INT, Device, Optional


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train a small diffusers UNet from a YAML recipe",
                       description="Train a small unconditional diffusers UNet from a YAML recipe. "
                       "Resumable: re-running the same command continues from the last checkpoint.")
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/mnist_tshirt/pretrain.yaml)")
    p.add_argument("--out", required=True, help="output pipeline folder (EMA weights, provenance.json)")
    p.add_argument("--steps", type=Optional(POSITIVE_INT), default=None,
                   help="override the recipe's number of steps")
    p.add_argument("--device", default="cpu", type=Device(), help="torch device (default: cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrack.pretrain import PretrainRecipe, check_recipe_data, pretrain
    from retrack.runrecord import check_output

    recipe = PretrainRecipe.from_yaml(args.config)
    check_recipe_data(recipe.data)
    check_output(Path(args.out), overwrite=False)
    out = pretrain(recipe, Path(args.out), args.device, args.steps)
    print(f"wrote {out}")
    return 0
