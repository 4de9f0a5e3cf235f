"""EraseDiff (Wu et al.): keep the remain loss, push forget predictions toward uniform noise.

The two gradients are combined as g = g_main + max(η − ⟨g_main, g_corr⟩/‖g_corr‖², 0)·g_corr.
The corrupting target is u ~ Uniform[0,1)^d, not Gaussian, as in the reference code.
With `distill` W > 0 (off by default) the main term also distils the frozen input model on its
remain rows: ‖ε_θ − ε‖² + W‖ε_θ − ε_frozen‖², one squared error against a mixed target.
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
    keep_loss,
    keep_sse,
    noise_like,
    noisy,
    sse,
)


@register
@dataclass(frozen=True)
class EraseDiff:
    eta: float = 1e-3
    distill: float = 0.0

    name: ClassVar[str] = "erasediff"
    needs_remain: ClassVar[bool] = True
    needs_forget: ClassVar[bool] = True
    needs_neighbours: ClassVar[bool] = False
    keep_term: ClassVar[str] = "main"  # --distill distils on the remain rows, x[:B]

    def prepare(self, batch: TrainBatch, schedule, gen: torch.Generator) -> Prepared:
        x0 = torch.cat([batch.remain, batch.forget])
        t = draw_timesteps(x0.shape[0], schedule, gen, x0.device)
        eps = noise_like(x0, gen)
        uniform = torch.rand(batch.forget.shape, generator=gen).to(x0.device, x0.dtype)
        return Prepared(noisy(x0, t, eps, schedule), t,
                        {"eps": eps[: batch.remain.shape[0]], "uniform": uniform})

    def keep_rows(self, prepared: Prepared) -> slice:
        return slice(0, prepared.targets["eps"].shape[0])

    def terms(self, eps: torch.Tensor, prepared: Prepared) -> dict[str, torch.Tensor]:
        n = prepared.targets["eps"].shape[0]
        terms = {"main": keep_sse(eps[:n], prepared.targets["eps"], prepared, self.distill).mean(),
                 "corr": sse(eps[n:], prepared.targets["uniform"]).mean()}
        return {**terms, "keep": keep_loss(eps[:n], prepared)} if self.distill else terms

    @property
    def rule(self) -> TwoGradientRule:
        return TwoGradientRule("main", "corr", "erasediff", self.eta)
