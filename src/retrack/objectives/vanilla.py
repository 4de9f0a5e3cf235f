"""Vanilla fine-tuning on the remain set: the simplest baseline (plain DDPM loss)."""

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
    noise_like,
    noisy,
    sse,
)


@register
@dataclass(frozen=True)
class Vanilla:
    name: ClassVar[str] = "vanilla"
    needs_remain: ClassVar[bool] = True
    needs_forget: ClassVar[bool] = False
    needs_neighbours: ClassVar[bool] = False

    def prepare(self, batch: TrainBatch, schedule, gen: torch.Generator) -> Prepared:
        return denoising_batch(batch.remain, schedule, gen)

    def terms(self, eps: torch.Tensor, prepared: Prepared) -> dict[str, torch.Tensor]:
        return {"remain": sse(eps, prepared.targets["eps"]).mean()}

    @property
    def rule(self) -> WeightedSum:
        return WeightedSum({"remain": 1.0})


def denoising_batch(x0: torch.Tensor, schedule, gen: torch.Generator) -> Prepared:
    """The standard DDPM training pair: x_t at a uniform timestep, target ε."""
    t = draw_timesteps(x0.shape[0], schedule, gen, x0.device)
    eps = noise_like(x0, gen)
    return Prepared(noisy(x0, t, eps, schedule), t, {"eps": eps})
