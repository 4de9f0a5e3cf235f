"""EraseDiff (Wu et al.): keep the remain loss, push forget predictions toward uniform noise.

The two gradients are combined as g = g_main + max(η − ⟨g_main, g_corr⟩/‖g_corr‖², 0)·g_corr.
The corrupting target is u ~ Uniform[0,1)^d, not Gaussian, as in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from retrack.objectives import register
from retrack.objectives.base import (
    Prepared,
    TrainBatch,
    TwoGradientRule,
    draw_timesteps,
    noise_like,
    noisy,
    sse,
)


@register
@dataclass(frozen=True)
class EraseDiff:
    eta: float = 1e-3

    name: ClassVar[str] = "erasediff"
    needs_remain: ClassVar[bool] = True
    needs_forget: ClassVar[bool] = True
    needs_neighbours: ClassVar[bool] = False

    def prepare(self, batch: TrainBatch, schedule, gen: torch.Generator) -> Prepared:
        x0 = torch.cat([batch.remain, batch.forget])
        t = draw_timesteps(x0.shape[0], schedule, gen, x0.device)
        eps = noise_like(x0, gen)
        uniform = torch.rand(batch.forget.shape, generator=gen).to(x0.device, x0.dtype)
        return Prepared(noisy(x0, t, eps, schedule), t,
                        {"eps": eps[: batch.remain.shape[0]], "uniform": uniform})

    def terms(self, eps: torch.Tensor, prepared: Prepared) -> dict[str, torch.Tensor]:
        n = prepared.targets["eps"].shape[0]
        return {"main": sse(eps[:n], prepared.targets["eps"]).mean(),
                "corr": sse(eps[n:], prepared.targets["uniform"]).mean()}

    @property
    def rule(self) -> TwoGradientRule:
        return TwoGradientRule("main", "corr", "erasediff", self.eta)
