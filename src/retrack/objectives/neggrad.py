"""NegGrad: gradient ascent on the denoising loss of the forget images, nothing else.

It forgets quickly and wrecks quality (the paper's Table 1: FID 276); kept as a baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from retrack.objectives import register
from retrack.objectives.base import Prepared, TrainBatch, WeightedSum, sse
from retrack.objectives.vanilla import denoising_batch


@register
@dataclass(frozen=True)
class NegGrad:
    name: ClassVar[str] = "neggrad"
    needs_remain: ClassVar[bool] = False
    needs_forget: ClassVar[bool] = True
    needs_neighbours: ClassVar[bool] = False

    def prepare(self, batch: TrainBatch, schedule, gen: torch.Generator) -> Prepared:
        return denoising_batch(batch.forget, schedule, gen)

    def terms(self, eps: torch.Tensor, prepared: Prepared) -> dict[str, torch.Tensor]:
        return {"forget": sse(eps, prepared.targets["eps"]).mean()}

    @property
    def rule(self) -> WeightedSum:
        return WeightedSum({"forget": -1.0})
