"""ReTrack (the paper's Algorithm 1): importance-sampled fine-tuning concentrated on the forget set.

For a forget image a_u and x_t ~ q_t(·|a_u), the unlearning term is Σ_k p_k‖ε_θ(x_t) − v_k‖² with
v_k = (x_t − γ_t a_k)/σ_t over the K nearest remain images a_k and p = softmax_k(−½‖v_k‖²): it
redirects the trajectories that led to a_u toward its neighbours. Because
Σ_k p_k‖e − v_k‖² = ‖e − v̄‖² + (Σ_k p_k‖v_k‖² − ‖v̄‖²) with v̄ = Σ_k p_k v_k, only the weighted
target v̄ ever meets the model output; it is accumulated over neighbour chunks with a running
log-sum-exp, so memory does not grow with K (K = all remain images is the untruncated objective).
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
    noise_like,
    noisy,
    sse,
)


@register
@dataclass(frozen=True)
class ReTrack:
    lam: float = 0.005
    chunk: int | None = None

    name: ClassVar[str] = "retrack"
    needs_remain: ClassVar[bool] = True
    needs_forget: ClassVar[bool] = True
    needs_neighbours: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"ReTrack needs 0 ≤ λ ≤ 1, got {self.lam}")

    def prepare(self, batch: TrainBatch, schedule, gen: torch.Generator) -> Prepared:
        f, r = batch.forget, batch.remain
        x0 = torch.cat([f, r])
        t = draw_timesteps(x0.shape[0], schedule, gen, x0.device)
        eps = noise_like(x0, gen)
        x = noisy(x0, t, eps, schedule)
        n = f.shape[0]
        gamma, sigma = schedule.gamma_sigma(t[:n], f)
        target, spread = weighted_target(x[:n], gamma, sigma, batch.bank, batch.neighbours, self.chunk)
        return Prepared(x, t, {"target": target, "spread": spread, "eps": eps[n:]})

    def terms(self, eps: torch.Tensor, prepared: Prepared) -> dict[str, torch.Tensor]:
        tg = prepared.targets
        n = tg["target"].shape[0]
        unlearn = (sse(eps[:n], tg["target"]) + tg["spread"]).mean()
        return {"unlearn": unlearn, "remain": sse(eps[n:], tg["eps"]).mean()}

    @property
    def rule(self) -> WeightedSum:
        return WeightedSum({"unlearn": self.lam, "remain": 1.0 - self.lam})


@torch.no_grad()
def weighted_target(
    x_t: torch.Tensor,
    gamma: torch.Tensor,
    sigma: torch.Tensor,
    bank: torch.Tensor,
    neighbours: torch.Tensor | None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """v̄ = Σ_k p_k v_k and the spread Σ_k p_k‖v_k‖² − ‖v̄‖², streamed over chunks of neighbours.

    Args:
        x_t: noisy forget images (B, C, H, W).
        gamma, sigma: γ_t, σ_t broadcastable to x_t.
        bank: remain images, uint8 (N, C, H, W) on any device.
        neighbours: (B, K) indices into bank, or None for all N remain images.
        chunk: neighbours per chunk; by default about 4M float64 values (32 MB) per chunk.
    Returns:
        (v̄ of shape (B, C, H, W), spread of shape (B,)); no gradient flows through p.
    """
    b = x_t.shape[0]
    xf = x_t.flatten(1).double()
    g, s = gamma.reshape(b, 1).double(), sigma.reshape(b, 1).double()
    x_sq = xf.pow(2).sum(1, keepdim=True)
    total = bank.shape[0] if neighbours is None else neighbours.shape[1]
    chunk = chunk or max(1, (1 << 22) // (b * xf.shape[1]))
    run_max = torch.full((b,), -torch.inf, dtype=torch.float64, device=x_t.device)
    norm = torch.zeros_like(run_max)
    acc_a = torch.zeros_like(xf)  # Σ w_k a_k
    acc_sq = torch.zeros_like(run_max)  # Σ w_k ‖v_k‖²
    for k0 in range(0, total, chunk):
        a = _gather(bank, neighbours, k0, min(total, k0 + chunk), b, x_t.device)  # (B, c, D)
        # ‖v_k‖² = (‖x‖² − 2γ⟨x, a_k⟩ + γ²‖a_k‖²)/σ², without a (B, c, D) difference tensor.
        cross = torch.einsum("bd,bcd->bc", xf, a)
        sq = ((x_sq - 2 * g * cross + g.pow(2) * a.pow(2).sum(-1)) / s.pow(2)).clamp_min(0.0)
        logits = -0.5 * sq
        new_max = torch.maximum(run_max, logits.max(1).values)
        scale = torch.exp(run_max - new_max)
        w = torch.exp(logits - new_max[:, None])
        norm = norm * scale + w.sum(1)
        acc_a = acc_a * scale[:, None] + torch.einsum("bc,bcd->bd", w, a)
        acc_sq = acc_sq * scale + (w * sq).sum(1)
        run_max = new_max
    mean_a = acc_a / norm[:, None]
    v_bar = (xf - g * mean_a) / s
    spread = (acc_sq / norm - v_bar.pow(2).sum(1)).clamp_min(0.0)
    return v_bar.view_as(x_t).to(x_t.dtype), spread.to(x_t.dtype)


def _gather(
    bank: torch.Tensor, neighbours: torch.Tensor | None, k0: int, k1: int, b: int, device
) -> torch.Tensor:
    """Neighbours k0..k1 of every row as float64 in model range, shape (B, c, D)."""
    if neighbours is None:
        rows = bank[k0:k1].to(device).flatten(1).unsqueeze(0).expand(b, -1, -1)
    else:
        rows = bank[neighbours[:, k0:k1].to(bank.device)].to(device).flatten(2)
    return rows.double().div(127.5).sub(1.0)
