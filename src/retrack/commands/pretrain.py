"""`retrack pretrain`: train the small model of a YAML recipe (how the shipped model was made)."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrack.backends.stable_diffusion import quiet_libraries, require_sd_extra
from retrack.errors import require
from retrack.pretrain import PretrainRecipe, check_recipe_data, pretrain
from retrack.recipes.latent_flow.recipe import KIND as FLOW_KIND
from retrack.recipes.latent_flow.recipe import FlowRecipe
from retrack.recipes.latent_flow.train import build_flow_model
from retrack.recipes.latent_tshirt.recipe import KIND, LatentRecipe, recipe_kind
from retrack.recipes.latent_tshirt.train import build_latent_model
from retrack.runrecord import check_output
from retrack.validation import POSITIVE_INT, Device, Optional, default_device


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "pretrain", help=help,
        description="Train a small unconditional diffusers UNet from a YAML recipe, or, for a "
                       "recipe with `kind: latent-text`, a small StableDiffusionPipeline (VAE, then UNet on its "
                       "latents), or with `kind: latent-flow` a small StableDiffusion3Pipeline (the same VAE, then an "
                       "SD3 transformer trained by flow matching). Resumable: re-running the same command "
                       "continues from the last checkpoint. "
                       "The checkpoint is kept in OUT.training, so `--extend --steps N` later trains a finished "
                       "model longer.")
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/mnist_tshirt/pretrain.yaml)")
    p.add_argument("--out", required=True, help="output pipeline folder (EMA weights, provenance.json)")
    p.add_argument("--steps", type=Optional(POSITIVE_INT), default=None,
                   help="override the recipe's number of steps (of the UNet or transformer stage for a latent recipe)")
    p.add_argument("--extend", action="store_true",
                   help="train the finished model in --out longer, to --steps, from its kept checkpoint; the "
                   "learning rate is constant after warm-up, so this equals training --steps at once")
    p.add_argument("--device", default=None, type=Optional(Device()),
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if recipe_kind(args.config) in (KIND, FLOW_KIND):
        return run_latent(args)
    recipe = PretrainRecipe.from_yaml(args.config)
    check_recipe_data(recipe.data)
    require(not args.extend or args.steps is not None, "--extend needs --steps: the total number of steps to "
            "train to.")
    out = pretrain(recipe, Path(args.out), default_device(args.device), args.steps, extend=args.extend,
                   progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def run_latent(args: argparse.Namespace) -> int:
    require(not args.extend, "--extend trains pixel recipes longer; a latent recipe is rebuilt with --steps.")
    require_sd_extra()
    flow = recipe_kind(args.config) == FLOW_KIND
    with quiet_libraries():
        recipe = FlowRecipe.from_yaml(args.config) if flow else LatentRecipe.from_yaml(args.config)
    require(not Path(args.out).exists(), f"--out {args.out!r} exists; choose another --out.")
    check_output(Path(args.out), overwrite=False)
    with quiet_libraries():
        out = (build_flow_model if flow else build_latent_model)(recipe, Path(args.out), default_device(args.device),
                                                                 args.steps, progress=not args.quiet)
    print(f"wrote {out}")
    return 0
