"""The paper's MNIST T-shirt metrics: Frequency, NLL of the T-shirt, FID and IS.

Frequency counts samples within L2 < 10 of the T-shirt (pixels in [0, 1]; digits lie ≥ 11.5
away). Those samples are removed before FID and IS, as in the paper. FID's real set is the remain
set and both FID and IS use the shipped digit classifier (eval mode) instead of Inception.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from retrack.backends.pixel import load_model
from retrack.errors import require
from retrack.metrics.copies import l2_copies
from retrack.metrics.likelihood import nll_bits_per_dim
from retrack.metrics.quality import frechet_distance, inception_score
from retrack.recipes.mnist_tshirt.classifier import DigitFeatures, DigitLogits, load_digit_classifier
from retrack.sampling import sample

TSHIRT_L2_THRESHOLD = 10.0
IS_SPLITS = 10


@lru_cache(maxsize=1)
def _classifier():
    return load_digit_classifier("cpu")


def sample_metrics(samples: np.ndarray, tshirt: np.ndarray, remain: np.ndarray,
                   progress: bool = True) -> dict[str, float]:
    """Frequency (fraction), FID and IS of uint8 (N, 28, 28, 1) samples."""
    is_copy = l2_copies(samples, tshirt, TSHIRT_L2_THRESHOLD)
    kept = samples[~is_copy]
    require(len(kept) >= 2, f"only {len(kept)} of {len(samples)} samples are not T-shirt copies; FID and IS "
                            "need at least 2: draw more samples (--samples).")
    clf = _classifier()
    fid = frechet_distance(remain, kept, features=DigitFeatures(clf), progress=progress)
    # Ten splits as usual; fewer only when so many samples were copies that ten cannot be filled.
    splits = min(IS_SPLITS, len(kept))
    is_mean, is_std = inception_score(kept, classifier=DigitLogits(clf), splits=splits, progress=progress)
    return {"frequency": float(is_copy.mean()), "copies": int(is_copy.sum()), "samples": int(len(samples)),
            "fid": float(fid), "is": float(is_mean), "is_std": float(is_std), "is_splits": splits}


def tshirt_nll(denoiser: torch.nn.Module, tshirt: np.ndarray, seed: int = 0, probes: int = 1,
               progress: bool = True) -> float:
    """NLL of the T-shirt in bits/dim (probability-flow ODE, RK45 1e-5, one Rademacher probe)."""

    return float(nll_bits_per_dim(denoiser, tshirt[None], seed=seed, probes=probes, progress=progress).mean())


def evaluate_model(model: str, tshirt: np.ndarray, remain: np.ndarray, samples: int, steps: int = 50,
                   sampler: str = "ddim", seed: int = 0, nll: bool = True,
                   device: str = "cpu", progress: bool = True) -> tuple[dict[str, float], np.ndarray]:
    """Sample a model with a fixed seed and measure it: (metrics, uint8 samples)."""

    loaded = load_model(model, device)
    images = sample(loaded.denoiser, loaded.scheduler.config, samples, steps, sampler, seed, progress=progress)
    metrics = sample_metrics(images, tshirt, remain, progress)
    if nll:
        metrics["nll"] = tshirt_nll(loaded.denoiser, tshirt, seed=seed, progress=progress)
    return metrics, images
