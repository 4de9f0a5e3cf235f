"""Relearning: does a forgotten image come back under ordinary fine-tuning on the remain set?

The model is fine-tuned on the remain images only (the plain DDPM loss, no forget image) and every
`every` steps each signal is measured: the forget images' membership score, copies among samples,
their NLL. A signal *returns to the pretrained level* at the first evaluation where it has covered
`fraction` of the way from where this model started to the pretrained model's value (fraction 1:
all the way); a model that never moved away has returned at step 0. The run stops once every
signal has returned, or after `steps`. The same loop on the retrained model says what fine-tuning
alone brings back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from retrack.models import Denoiser
from retrack.monitor import evaluating
from retrack.objectives.vanilla import Vanilla
from retrack.trainer import TrainData, TrainSettings, train


@dataclass
class Signal:
    """One quantity followed during relearning.

    measure: its value for the model as it is now.
    level: the pretrained model's value (where a remembered image sits).
    remembered_below: True when lower values mean "remembered" (losses, NLL), False when higher do
        (copies).
    """

    name: str
    measure: Callable[[], float]
    level: float
    remembered_below: bool
    start: float | None = None
    threshold: float | None = None
    returned_at: int | None = None
    series: list[tuple[int, float]] = field(default_factory=list)

    def observe(self, step: int, value: float, fraction: float) -> None:
        if self.start is None:
            self.start = value
            self.threshold = self.level + (1.0 - fraction) * (value - self.level)
        self.series.append((step, float(value)))
        back = value <= self.threshold if self.remembered_below else value >= self.threshold
        if back and self.returned_at is None:
            self.returned_at = step

    def record(self) -> dict[str, Any]:
        return {"pretrained_level": self.level, "start": self.start, "threshold": self.threshold,
                "returned_at": self.returned_at, "remembered": "below" if self.remembered_below else "above",
                "steps": [s for s, _ in self.series], "values": [v for _, v in self.series]}


def crossing_step(steps: list[int], values: list[float], level: float, remembered_below: bool,
                  fraction: float = 1.0) -> int | None:
    """The first step at which a series has come `fraction` of the way from its first value to
    `level` (None: never)."""
    s = Signal("series", lambda: 0.0, level, remembered_below)
    for step, value in zip(steps, values, strict=True):
        s.observe(step, value, fraction)
    return s.returned_at


def relearn(denoiser: Denoiser, remain: torch.Tensor, settings: TrainSettings, every: int, signals: list[Signal],
            fraction: float = 0.9, device: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Fine-tune `denoiser` in place on `remain` (uint8 NCHW, or float latents) for `settings.steps`
    steps, measuring every signal at steps 0, every, 2·every, …, last; stops early once all have
    returned to the pretrained level. Returns the record of each signal and the steps done."""
    last = settings.steps

    def between(done: int) -> bool:
        if done % every and done != last:
            return False
        with evaluating(denoiser):
            for s in signals:
                s.observe(done, float(s.measure()), fraction)
        return all(s.returned_at is not None for s in signals)

    empty = remain[:0]
    log = train(denoiser, Vanilla(), TrainData(remain, empty), settings, device, progress, between_steps=between)
    done = len(log)
    stopped = done < last
    return {"steps": last, "steps_done": done, "every": every, "fraction": fraction,
            "stopped_early": stopped, "signals": {s.name: s.record() for s in signals},
            "settings": {"lr": settings.lr, "batch_size": settings.batch_size, "betas": list(settings.betas),
                         "weight_decay": settings.weight_decay, "clip": settings.clip, "seed": settings.seed,
                         "objective": "vanilla (remain only)"}}
