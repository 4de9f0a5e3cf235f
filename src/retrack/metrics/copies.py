"""How often generated samples copy a forgotten image: the paper's "frequency" metric.

Paper rule (MNIST T-shirt): a sample copies a target when their L2 distance, not squared, over
pixels in [0, 1], is below 10; MNIST digits lie ≥ 11.5 from the T-shirt (mean 14.6). For other
data a descriptor rule is offered: similarity above a threshold (0.5 is the usual SSCD copy
threshold).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from retrack.errors import require
from retrack.metrics.similarity import Descriptor

Rule = Literal["l2", "descriptor"]
PAPER_L2_THRESHOLD = 10.0
SSCD_COPY_THRESHOLD = 0.5
# Default copy thresholds per descriptor. pixel_cosine (the offline stand-in) needs a far higher
# one: unrelated Fashion-MNIST images score 0.42 at the median and up to 0.92 against the T-shirt
# (scripts/calibrate_pixel_cosine.py), so 0.5 would call most samples copies.
DESCRIPTOR_COPY_THRESHOLDS = {"sscd": SSCD_COPY_THRESHOLD, "pixel_cosine": 0.95}


@dataclass(frozen=True)
class CopyResult:
    """Which samples copy a target, and the score that decided it."""

    rule: str  # "l2" or the descriptor's name
    threshold: float
    is_copy: np.ndarray  # (N,) bool
    score: np.ndarray  # (N,) nearest-target L2 (rule l2) or best similarity (descriptor)
    nearest: np.ndarray  # (N,) index of the nearest / most similar target
    num_targets: int

    @property
    def fraction(self) -> float:
        return float(self.is_copy.mean()) if len(self.is_copy) else 0.0

    def summary(self) -> dict:
        return {"rule": self.rule, "threshold": self.threshold, "fraction": self.fraction,
                "count": int(self.is_copy.sum()), "num_samples": int(len(self.is_copy)),
                "per_target": np.bincount(self.nearest[self.is_copy],
                                          minlength=self.num_targets).tolist()}


def _check(samples: np.ndarray, targets: np.ndarray) -> None:
    for name, arr in (("samples", samples), ("targets", targets)):
        require(arr.ndim == 4 and arr.dtype == np.uint8, f"{name} must be uint8 (N, H, W, C).")
    require(samples.shape[1:] == targets.shape[1:],
            f"samples {samples.shape[1:]} and targets {targets.shape[1:]} differ in size or "
            "channels.")
    require(len(targets) > 0, "there are no target images to compare samples with.")


def l2_distances(samples: np.ndarray, targets: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(N, M) L2 distances, not squared, between uint8 images scaled to [0, 1]."""
    _check(samples, targets)
    t = torch.from_numpy(targets.reshape(len(targets), -1)).double() / 255
    flat = samples.reshape(len(samples), -1)
    out = [torch.cdist(torch.from_numpy(flat[s:s + chunk]).double() / 255, t)
           for s in range(0, len(samples), chunk)]
    return torch.cat(out).numpy() if out else np.zeros((0, len(targets)))


def copies_l2(samples: np.ndarray, targets: np.ndarray,
              threshold: float = PAPER_L2_THRESHOLD) -> CopyResult:
    """Samples whose nearest target is closer than `threshold` (strictly) in [0, 1] L2."""
    d = l2_distances(samples, targets)
    nearest = d.argmin(1) if len(d) else np.zeros(0, dtype=np.int64)
    score = d[np.arange(len(d)), nearest]
    return CopyResult("l2", float(threshold), score < threshold, score, nearest, len(targets))


def copies_descriptor(samples: np.ndarray, targets: np.ndarray, descriptor: Descriptor,
                      threshold: float = SSCD_COPY_THRESHOLD) -> CopyResult:
    """Samples whose most similar target scores strictly above `threshold` under `descriptor`."""
    _check(samples, targets)
    sim = descriptor.cross(samples, targets) if len(samples) else np.zeros((0, len(targets)))
    nearest = sim.argmax(1) if len(sim) else np.zeros(0, dtype=np.int64)
    score = sim[np.arange(len(sim)), nearest]
    return CopyResult(descriptor.name, float(threshold), score > threshold, score, nearest,
                      len(targets))


def l2_copies(samples: np.ndarray, targets: np.ndarray,
              threshold: float = PAPER_L2_THRESHOLD) -> np.ndarray:
    """(N,) bool mask of the paper's rule; `targets` is one image (H, W, C) or a stack of them."""
    targets = targets[None] if targets.ndim == 3 else targets
    return copies_l2(samples, targets, threshold).is_copy
