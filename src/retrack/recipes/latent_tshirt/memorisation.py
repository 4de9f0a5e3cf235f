"""How often the latent T-shirt model regurgitates its planted T-shirt, under three copy rules.

The paper's MNIST rule (L2 < 10 over [0, 1] pixels at 28×28) was made for a T-shirt among digits;
among T-shirts it is loose (half of Fashion-MNIST's T-shirts lie within L2 8.4 of the planted
one), so two stricter rules are reported beside it: the sample's nearest training image is the
planted T-shirt (and within L2 10), and the pixel cosine that `retrack sd-sets` uses offline
(> 0.95 on the 32×32 RGB images as the pipeline draws them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from retrack.backends.stable_diffusion import load_text_model, sample_text
from retrack.metrics.copies import PAPER_L2_THRESHOLD, l2_distances
from retrack.metrics.similarity import PixelCosine
from retrack.recipes.latent_tshirt.data import PROMPTS, build_latent_tshirt, unpad

PIXEL_COSINE_THRESHOLD = 0.95


def copy_measures(samples: np.ndarray, planted: np.ndarray, others: np.ndarray) -> dict[str, np.ndarray]:
    """Per sample: L2 to the planted image and to the nearest other training image (28×28 grey,
    [0, 1]), and the pixel cosine to the planted image at the pipeline's size.

    samples: uint8 (N, 32, 32, 3) as drawn; planted: uint8 (32, 32, 1) padded; others: the distinct
    training images except the planted one, uint8 (M, 32, 32, 1) padded.
    """

    grey = unpad(samples)
    to_planted = l2_distances(grey, unpad(planted[None]))[:, 0]
    to_others = l2_distances(grey, unpad(others)).min(axis=1)
    rgb = np.repeat(planted[None], 3, axis=-1)
    cosine = PixelCosine().cross(samples, rgb)[:, 0]
    return {"l2_planted": to_planted, "l2_nearest_other": to_others, "pixel_cosine": cosine}


def copy_summary(m: dict[str, np.ndarray]) -> dict[str, Any]:
    """Counts and fractions under each rule, with the distances that decide them."""
    n = len(m["l2_planted"])
    rules = {
        "l2_lt_10": m["l2_planted"] < PAPER_L2_THRESHOLD,
        "nearest_is_planted": is_copy(m),
        "pixel_cosine_gt_0.95": m["pixel_cosine"] > PIXEL_COSINE_THRESHOLD,
    }
    out: dict[str, Any] = {"samples": n}
    for name, mask in rules.items():
        out[name] = {"count": int(mask.sum()), "fraction": float(mask.mean()) if n else 0.0}
    q = [0, 10, 25, 50, 75, 100]
    out["l2_planted_percentiles"] = dict(zip(map(str, q), np.percentile(m["l2_planted"], q).round(3).tolist(),
                                             strict=True))
    out["pixel_cosine_percentiles"] = dict(zip(map(str, q), np.percentile(m["pixel_cosine"], q).round(4).tolist(),
                                               strict=True))
    return out


VISIBLE_RMS = 0.1  # the `changed` metric's rule: RMS of the pixel difference in [0, 1]


def visibly_changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) whether sample i of two models (same seed) differs visibly at 28×28 grey."""
    x, y = unpad(a).astype(np.float64) / 255, unpad(b).astype(np.float64) / 255
    return np.sqrt(((x - y) ** 2).mean(axis=(1, 2, 3))) > VISIBLE_RMS


def measure_model(model: str, data_model: str, samples: int, seed: int = 12345, steps: int = 50,
                  guidance: float = 7.5, progress: bool = True
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Sample every prompt of the recipe from `model` and count copies of the planted T-shirt.

    `data_model` is the pipeline built by the recipe (its provenance.json says which data it saw);
    `model` may be it or an unlearned copy. Returns, per prompt, the summary, the samples and the
    per-sample measures.
    """

    planted, others = training_images(data_model)
    results, images, measures = {}, {}, {}
    for prompt in PROMPTS:
        loaded = load_text_model(str(model), prompt, "cpu")
        images[prompt] = sample_text(loaded, samples, steps=steps, seed=seed, guidance=guidance, progress=progress)
        measures[prompt] = copy_measures(images[prompt], planted, others)
        results[prompt] = {**copy_summary(measures[prompt]), "seed": seed, "steps": steps, "guidance": guidance,
                           "sampler": "ddim"}
    return results, images, measures


def is_copy(m: dict[str, np.ndarray]) -> np.ndarray:
    """The headline rule: the sample's nearest training image is the planted T-shirt, within L2 10."""
    return (m["l2_planted"] < m["l2_nearest_other"]) & (m["l2_planted"] < PAPER_L2_THRESHOLD)


def training_images(data_model: str) -> tuple[np.ndarray, np.ndarray]:
    """The planted T-shirt and every other training image (padded) of the recipe that built `data_model`."""


    data = json.loads((Path(data_model) / "provenance.json").read_text())["config"]["data"]
    built = build_latent_tshirt(data["tshirts"], data["copies"], data.get("fashion_dir"), data.get("mnist_dir"))
    return built.tshirt, built.data.images[: built.forget[0]]
