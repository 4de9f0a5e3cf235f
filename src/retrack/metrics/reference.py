"""How close an unlearned model is to the gold standard, and what else unlearning changed.

The only true reference for "behaves as if it had never seen the forget images" is a model
retrained from scratch without them (same recipe, seed and steps). Against it we measure the FID
between the two models' samples and the forget images' NLL under it (the value an unlearned model
should reach). Against the pretrained model we measure what unlearning changed besides the
forgotten image: samples are drawn from the same per-sample seeds, so sample i of both models
starts from the same noise, and a pair differs *visibly* when the RMS of its pixel difference
(in [0, 1]) exceeds 0.1, i.e. L2 > 0.1·√D (2.8 for a 28×28 image): a moved stroke or a changed
digit, well above what retraining noise of a sampler leaves. A pair whose L2 reaches the copy
threshold scaled to the image size (the paper's 10 for 784 pixels, i.e. 10·√(D/784)) no longer
shows the same picture at all: it is counted as *replaced*.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from retrack.errors import require

VISIBLE_RMS = 0.1
PAPER_L2_THRESHOLD, PAPER_PIXELS = 10.0, 784


def scaled_l2_threshold(shape: tuple[int, ...], paper: float = PAPER_L2_THRESHOLD) -> float:
    """The paper's L2 rule (10 over 28×28×1 pixels in [0, 1]) at the same RMS for another size."""
    return paper * math.sqrt(int(np.prod(shape)) / PAPER_PIXELS)


def paired_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) L2 distance, not squared, between a[i] and b[i], uint8 images scaled to [0, 1]."""
    require(a.shape == b.shape, f"paired samples differ in shape: {a.shape} and {b.shape}.")
    x = torch.from_numpy(a.reshape(len(a), -1)).double() / 255
    y = torch.from_numpy(b.reshape(len(b), -1)).double() / 255
    return (x - y).norm(dim=1).numpy()


def changed_samples(after: np.ndarray, before: np.ndarray, before_is_copy: np.ndarray | None = None,
                    visible_rms: float = VISIBLE_RMS) -> dict:
    """What unlearning changed: samples of the same seeds before and after, uint8 (N, H, W, C).

    `before_is_copy` marks the pretrained samples that copy a forget image: those are meant to
    change, so the headline `value` is the visibly changed fraction among the others.
    """
    d = paired_l2(after, before)
    d_pixels = int(np.prod(after.shape[1:]))
    visible = d > visible_rms * math.sqrt(d_pixels)
    replaced = d >= scaled_l2_threshold(after.shape[1:])
    copy = np.zeros(len(d), bool) if before_is_copy is None else np.asarray(before_is_copy, bool)
    others = ~copy
    return {
        "value": float(visible[others].mean()) if others.any() else 0.0,
        "visible_fraction_all": float(visible.mean()) if len(d) else 0.0,
        "replaced_fraction": float(replaced[others].mean()) if others.any() else 0.0,
        "median_l2": float(np.median(d)) if len(d) else 0.0,
        "num_samples": int(len(d)), "excluded_copies": int(copy.sum()),
        "rule": f"visibly changed: pixel L2 in [0, 1] > {visible_rms:g}·√D = "
                f"{visible_rms * math.sqrt(d_pixels):.3g}; replaced: L2 ≥ "
                f"{scaled_l2_threshold(after.shape[1:]):.3g} (the paper's 10 at 28×28, same RMS)",
    }
