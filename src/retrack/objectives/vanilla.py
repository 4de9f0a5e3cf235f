"""Vanilla fine-tuning on the remain set: the simplest baseline (plain DDPM loss).

With `distill` W > 0 (off by default) every row also distils the frozen input model: the remain
term is ‖ε_θ − ε‖² + W‖ε_θ − ε_frozen‖², taken as one squared error against a mixed target
(`keep_sse`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from retrack.objectives import register
from retrack.objectives.base import (
    Prepared,
    TrainBatch,
    WeightedSum,
    draw_timesteps,
    keep_loss,
    keep_sse,
    noise_like,
    noisy,
)


@register
@dataclass(frozen=True)
class Vanilla:
    distill: float = 0.0

    name: ClassVar[str] = "vanilla"
    needs_remain: ClassVar[bool] = True
    needs_forget: ClassVar[bool] = False
    needs_neighbours: ClassVar[bool] = False
    keep_term: ClassVar[str] = "remain"  # the term whose rows --distill distils on: all of them

    def prepare(self, batch: TrainBatch, schedule, gen: torch.Generator) -> Prepared:
        return denoising_batch(batch.remain, schedule, gen)

    def keep_rows(self, prepared: Prepared) -> slice:
        return slice(None)

    def terms(self, eps: torch.Tensor, prepared: Prepared) -> dict[str, torch.Tensor]:
        terms = {"remain": keep_sse(eps, prepared.targets["eps"], prepared, self.distill).mean()}
        return {**terms, "keep": keep_loss(eps, prepared)} if self.distill else terms

    @property
    def rule(self) -> WeightedSum:
        return WeightedSum({"remain": 1.0})


def denoising_batch(x0: torch.Tensor, schedule, gen: torch.Generator) -> Prepared:
    """The standard DDPM training pair: x_t at a uniform timestep, target ε."""
    t = draw_timesteps(x0.shape[0], schedule, gen, x0.device)
    eps = noise_like(x0, gen)
    return Prepared(noisy(x0, t, eps, schedule), t, {"eps": eps})
