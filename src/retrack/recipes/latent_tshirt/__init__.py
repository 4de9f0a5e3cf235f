"""A latent text-to-image model that memorises one image: the paper's Stable Diffusion situation in
miniature, built offline by `retrack pretrain --config src/retrack/recipes/latent_tshirt/recipe.yaml`."""

from retrack.recipes.latent_tshirt.data import DIGIT_PROMPT, PROMPTS, TSHIRT_PROMPT, build_latent_tshirt, pad, unpad

__all__ = ["DIGIT_PROMPT", "PROMPTS", "TSHIRT_PROMPT", "build_latent_tshirt", "pad", "unpad"]
