"""Forget just enough: end the run when the forget images look like images the model never saw.

A fixed number of steps either leaves an image half-remembered or pushes it far beyond what a
model that never saw it would show (the paper's 50 MNIST steps leave the T-shirt's denoising
loss above 97% of held-out T-shirts', where the retrained model has it at 28%). Over-forgetting is
not free: it is where the trajectories of other samples are bent. This rule needs no retrained
model, only images of the same kind that the model was not trained on:

1. before the first step, the membership loss score (metrics/membership.py, the score `retrack
   verify` calibrates: denoising loss at fixed timesteps and noise) of every held-out image under
   the input model gives the non-members' distribution;
2. every `every` steps, the same score of each forget image (a few forward passes);
3. the run stops at the first check where every forget image's score reaches the chosen
   percentile of the non-members' (50: it looks as familiar to the model as a typical non-member).

The held-out scores are taken once, under the input model; the record also holds them under the
final model, so the percentile the run ended at can be read against both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from retrack.errors import require
from retrack.metrics.calibration import percentile
from retrack.metrics.membership import AttackSettings, score_batch
from retrack.models import Denoiser

MIN_HELDOUT = 20  # as `retrack verify`: fewer cannot place a score on a percentile scale


def loss_scores(denoiser: Denoiser, x0: torch.Tensor, settings: AttackSettings) -> np.ndarray:
    """The membership loss score of model-range images (N, C, H, W), in batches, in eval mode."""
    was = denoiser.training
    denoiser.eval()
    out = []
    try:
        for start in range(0, x0.shape[0], settings.batch_size):
            stop = min(x0.shape[0], start + settings.batch_size)
            out.append(score_batch(denoiser, x0[start:stop], range(start, stop), ("loss",), settings)["loss"])
    finally:
        denoiser.train(was)
    return torch.cat(out).cpu().numpy()


def reached_level(forget: np.ndarray, heldout: np.ndarray, target: float) -> tuple[bool, np.ndarray]:
    """Whether every forget score sits at or above the `target` percentile of the held-out
    scores, and each one's percentile (share of held-out images scored at most as high)."""
    found = np.atleast_1d(percentile(forget, heldout))
    return bool((found >= target).all()), found


@dataclass
class NonmemberStop:
    """The trainer's between-steps hook for the rule; `forget` and `heldout` are model-range
    tensors on the model's device."""

    denoiser: Denoiser
    forget: torch.Tensor
    heldout: torch.Tensor
    target: float = 50.0
    every: int = 1
    settings: AttackSettings = field(default_factory=AttackSettings)
    heldout_scores: np.ndarray | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    stopped_at: int | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        require(self.heldout.shape[0] >= MIN_HELDOUT,
                f"--stop-heldout gives {self.heldout.shape[0]} images; placing the forget images among "
                f"non-members needs at least {MIN_HELDOUT}.")

    def __call__(self, done: int) -> bool:
        if done % self.every:
            return False
        start = time.perf_counter()
        if self.heldout_scores is None:
            self.heldout_scores = loss_scores(self.denoiser, self.heldout, self.settings)
        scores = loss_scores(self.denoiser, self.forget, self.settings)
        stop, found = reached_level(scores, self.heldout_scores, self.target)
        self.checks.append({"step": done, "scores": scores.tolist(), "percentiles": found.tolist()})
        self.seconds += time.perf_counter() - start
        if stop:
            self.stopped_at = done
        return stop

    def record(self, steps_done: int) -> dict[str, Any]:
        """What the rule saw: the level, every check, where it stopped, and the held-out scores
        under the final model beside those under the input model."""
        start = time.perf_counter()
        final = loss_scores(self.denoiser, self.heldout, self.settings)
        forget = loss_scores(self.denoiser, self.forget, self.settings)
        self.seconds += time.perf_counter() - start  # the rule's whole cost, the final scoring included
        initial = self.heldout_scores if self.heldout_scores is not None else final
        return {
            "rule": f"every forget image's membership loss score at or above the {self.target:g}th percentile "
                    "of the held-out images' (scored under the input model)",
            "heldout": int(self.heldout.shape[0]), "every": self.every, "target_percentile": self.target,
            "attack": self.settings.record(("loss",)),
            "level_input_model": float(np.percentile(initial, self.target)),
            "level_final_model": float(np.percentile(final, self.target)),
            "final_forget_scores": forget.tolist(),
            "final_percentile_input_level": np.atleast_1d(percentile(forget, initial)).tolist(),
            "final_percentile_final_level": np.atleast_1d(percentile(forget, final)).tolist(),
            "checks": self.checks, "stopped_at": self.stopped_at, "steps_done": steps_done,
            "seconds": round(self.seconds, 3),
        }


def with_stop(monitor: Callable[..., bool] | None, stopper: NonmemberStop | None) -> Callable[[int], bool] | None:
    """One between-steps hook for the rule and the evaluation during fine-tuning (if any).

    The evaluation also measures the step the rule is reached at, so the curves end where the
    model does. With `--stop-at` as well, the run stops only where both agree: at an evaluation
    that meets `--stop-at` while every forget image has reached the held-out level (looking unseen
    is not enough if samples still copy the image, and no copy among the samples is not enough
    if the model still treats the image as training data)."""
    if stopper is None:
        return monitor

    def hook(done: int) -> bool:
        unseen = stopper(done)
        if monitor is None:
            return unseen
        met = monitor(done, force=unseen)
        if getattr(monitor, "stop_at", None) is None:
            return unseen
        stop = unseen and met
        monitor.stopped_at = done if stop else None
        stopper.stopped_at = done if stop else None
        return stop

    return hook
