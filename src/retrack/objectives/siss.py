"""SISS (Alberti et al., ICLR 2025): importance-sampled mixture of remain and forget noising.

Each remain image r_i is paired with a forget image f_i under a shared ε and t; the noisy input m
comes from r with probability 1−λ, else from f, and one forward serves both terms. The weights
are computed in log space, so λ = 0 and λ = 1 are finite (the reference code overflowed there).

With `distill` W > 0 (off by default) the main term distils the frozen input model on every row,
under the same importance weights: mean_i w_r,i(‖ε_θ(m) − v_r‖² + W‖ε_θ(m) − ε_frozen(m)‖²), so
the keep term, like the main term, estimates an expectation over the remain images' noising (rows
noised from a forget image, far from r, weigh little).
"""

from __future__ import annotations

import math
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
    sse,
)


@register
@dataclass(frozen=True)
class SISS:
    lam: float = 0.5
    s: float = 5.0
    distill: float = 0.0

    name: ClassVar[str] = "siss"
    needs_remain: ClassVar[bool] = True
    needs_forget: ClassVar[bool] = True
    needs_neighbours: ClassVar[bool] = False
    keep_term: ClassVar[str] = "main"  # --distill distils on every row, importance-weighted by w_r

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"SISS needs 0 ≤ λ ≤ 1, got {self.lam}")

    def prepare(self, batch: TrainBatch, schedule, gen: torch.Generator) -> Prepared:
        r, f = batch.remain, batch.forget
        t = draw_timesteps(r.shape[0], schedule, gen, r.device)
        eps = noise_like(r, gen)
        from_forget = torch.rand(r.shape[0], generator=gen).to(r.device) < self.lam
        gamma, sigma = schedule.gamma_sigma(t, r)
        m = gamma * torch.where(from_forget.view(-1, 1, 1, 1), f, r) + sigma * eps
        return Prepared(m, t, {"remain": r, "forget": f, "gamma": gamma, "sigma": sigma})

    def terms(self, eps: torch.Tensor, prepared: Prepared) -> dict[str, torch.Tensor]:
        m, tg = prepared.x, prepared.targets
        v_r = (m - tg["gamma"] * tg["remain"]) / tg["sigma"]
        v_f = (m - tg["gamma"] * tg["forget"]) / tg["sigma"]
        w_r, w_f = siss_weights(v_r, v_f, self.lam)
        terms = {"main": (w_r * keep_sse(eps, v_r, prepared, self.distill)).mean(),
                 "corr": (w_f * sse(eps, v_f)).mean()}
        return {**terms, "keep": keep_loss(eps, prepared, w_r)} if self.distill else terms

    def keep_rows(self, prepared: Prepared) -> slice:
        return slice(None)

    @property
    def rule(self) -> TwoGradientRule:
        return TwoGradientRule("main", "corr", "siss", self.s)


def siss_weights(v_r: torch.Tensor, v_f: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w_r = 1/((1−λ) + λ·e^{d_r−d_f}), w_f = 1/((1−λ)·e^{d_f−d_r} + λ), with d = ‖v‖²/2.

    ‖m − γa‖²/(2σ²) = ‖v‖²/2 for v = (m − γa)/σ. Evaluated as exp(−logaddexp(...)) in float64.
    """
    d_r = 0.5 * v_r.detach().double().pow(2).flatten(1).sum(1)
    d_f = 0.5 * v_f.detach().double().pow(2).flatten(1).sum(1)
    log_keep = torch.full_like(d_r, math.log1p(-lam) if lam < 1 else -math.inf)
    log_lam = torch.full_like(d_r, math.log(lam) if lam > 0 else -math.inf)
    log_w_r = -torch.logaddexp(log_keep, log_lam + d_r - d_f)
    log_w_f = -torch.logaddexp(log_keep + d_f - d_r, log_lam)
    return log_w_r.exp().to(v_r.dtype), log_w_f.exp().to(v_r.dtype)
