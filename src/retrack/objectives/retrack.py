"""ReTrack (the paper's Algorithm 1): importance-sampled fine-tuning concentrated on the forget set.

For a forget image a_u and x_t ~ q_t(·|a_u), the unlearning term is Σ_k p_k‖ε_θ(x_t) − v_k‖² with
v_k = (x_t − γ_t a_k)/σ_t over the K nearest remain images a_k and p = softmax_k(−½‖v_k‖²): it
redirects the trajectories that led to a_u toward its neighbours. Because
Σ_k p_k‖e − v_k‖² = ‖e − v̄‖² + (Σ_k p_k‖v_k‖² − ‖v̄‖²) with v̄ = Σ_k p_k v_k, only the weighted
target v̄ ever meets the model output; it is accumulated over neighbour chunks with a running
log-sum-exp, so memory does not grow with K (K = all remain images is the untruncated objective).

Options beside the paper's objective (all off by default, so the defaults are Algorithm 1):
- `lam="auto"` with `lam_ratio` R: λ per step such that λ‖∇L_unlearn‖ = R·(1−λ)‖∇L_remain‖;
- `surgery`: drop the component of ∇L_unlearn that opposes ∇L_remain (PCGrad);
- `forget_weighting="min-snr"` with `snr_gamma` γ: each forget row's term is weighted by
  min(SNR_t, γ)/SNR_t. The target error of a forget row grows like SNR_t·‖a_u − ā‖², so near
  t = 0 (SNR ≈ 10⁴) a handful of rows dominate the whole loss; the cap bounds every row's term
  by γ·‖a_u − ā‖², as min-SNR weighting (Hang et al. 2023) does for training;
- `forget_t_min`: forget rows draw t from {t_min, …, T−1} instead of {0, …, T−1};
- `balance="nash"`: the two gradients are weighted by their Nash bargaining solution (MUNBa, Wu &
  Harandi, ICCV 2025) instead of λ and 1−λ; λ is then only the fallback where no bargain exists.
- `level` (`--forget-level`): each forget row's target moves from the true noise ε toward v̄ only
  until its error ‖target − ε‖² reaches L_t, the input model's denoising error on unseen images of
  the forget images' kind at that timestep (levels.py): v̄ where it is closer than that (high
  noise, where trajectories are decided), ε + √(L_t/‖v̄ − ε‖²)·(v̄ − ε) where the paper's target
  would make the image far less familiar than an image never seen (low noise);
- `distill` W: the remain term becomes ‖ε_θ − ε‖² + W‖ε_θ − ε_frozen‖² on the remain rows (the
  frozen input model's ε, filled in by the trainer), one squared error against a mixed target.
  It rides on the remain term, so the loss is λ·L_unlearn + (1−λ)(L_remain + W·L_keep): `surgery`
  protects and `lam="auto"` balances the keep term together with the remain term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from retrack.objectives import register
from retrack.objectives.base import (
    BALANCES,
    Prepared,
    SplitRule,
    TrainBatch,
    WeightedSum,
    draw_timesteps,
    keep_loss,
    keep_sse,
    noise_like,
    noisy,
    sse,
)

ForgetWeighting = Literal["none", "min-snr"]
FORGET_WEIGHTINGS: tuple[str, ...] = ("none", "min-snr")


@register
@dataclass(frozen=True)
class ReTrack:
    lam: float | Literal["auto"] = 0.005
    chunk: int | None = None
    lam_ratio: float = 1.0
    surgery: bool = False
    forget_weighting: ForgetWeighting = "none"
    snr_gamma: float = 5.0
    forget_t_min: int = 0
    balance: str = "none"
    distill: float = 0.0
    level: tuple[float, ...] | None = None  # L_t for t = 0 … T−1 (levels.unseen_levels), or None

    name: ClassVar[str] = "retrack"
    needs_remain: ClassVar[bool] = True
    needs_forget: ClassVar[bool] = True
    needs_neighbours: ClassVar[bool] = True
    keep_term: ClassVar[str] = "remain"  # --distill distils on the remain rows, x[split:]

    def __post_init__(self) -> None:
        if self.lam != "auto" and not (isinstance(self.lam, int | float) and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"ReTrack needs 0 ≤ λ ≤ 1 or 'auto', got {self.lam}")
        if not self.lam_ratio > 0.0:
            raise ValueError(f"ReTrack needs a positive λ ratio, got {self.lam_ratio}")
        if self.forget_weighting not in FORGET_WEIGHTINGS:
            raise ValueError(f"unknown forget weighting {self.forget_weighting!r}; choose one of "
                             f"{', '.join(FORGET_WEIGHTINGS)}")
        if not self.snr_gamma > 0.0:
            raise ValueError(f"ReTrack needs a positive SNR cap γ, got {self.snr_gamma}")
        if self.forget_t_min < 0:
            raise ValueError(f"the forget t-min must be ≥ 0, got {self.forget_t_min}")
        if self.balance not in BALANCES:
            raise ValueError(f"unknown balance {self.balance!r}; choose one of {', '.join(BALANCES)}")
        if self.balance == "nash" and (self.surgery or self.lam == "auto"):
            raise ValueError("the Nash balance sets both weights itself; it does not combine with surgery or λ auto")
        if not self.distill >= 0.0:
            raise ValueError(f"the distillation weight must be ≥ 0, got {self.distill}")

    def prepare(self, batch: TrainBatch, schedule, gen: torch.Generator) -> Prepared:
        f, r = batch.forget, batch.remain
        x0 = torch.cat([f, r])
        n = f.shape[0]
        t = draw_timesteps(x0.shape[0], schedule, gen, x0.device)
        if self.forget_t_min > 0:
            if self.forget_t_min >= schedule.num_steps:
                raise ValueError(f"the forget t-min must be below the model's {schedule.num_steps} "
                                 f"timesteps, got {self.forget_t_min}")
            t[:n] = torch.randint(self.forget_t_min, schedule.num_steps, (n,), generator=gen).to(t.device)
        eps = noise_like(x0, gen)
        x = noisy(x0, t, eps, schedule)
        gamma, sigma = schedule.gamma_sigma(t[:n], f)
        target, spread = weighted_target(x[:n], gamma, sigma, batch.bank, batch.neighbours, self.chunk)
        if self.level is not None:
            if len(self.level) != schedule.num_steps:
                raise ValueError(f"the forget level has {len(self.level)} timesteps, the model {schedule.num_steps}")
            level = torch.tensor(self.level, dtype=torch.float64, device=t.device)[t[:n]]
            target, spread = level_target(eps[:n], target, spread, level)
        targets = {"target": target, "spread": spread, "eps": eps[n:]}
        if self.forget_weighting == "min-snr":
            targets["weight"] = min_snr_weight(schedule.alphas_cumprod, t[:n], self.snr_gamma).to(f)
        return Prepared(x, t, targets, split=n)

    def keep_rows(self, prepared: Prepared) -> slice:
        return slice(prepared.split, None)

    def terms(self, eps: torch.Tensor, prepared: Prepared) -> dict[str, torch.Tensor]:
        n = prepared.targets["target"].shape[0]
        terms = {"unlearn": self.term("unlearn", eps[:n], prepared),
                 "remain": self.term("remain", eps[n:], prepared)}
        return {**terms, "keep": self.term("keep", eps[n:], prepared)} if self.distill else terms

    def term(self, name: str, eps: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """One term from the ε of its own rows: forget rows for "unlearn", remain rows for "remain"
        (and "keep", the logged distillation loss, without gradient)."""
        tg = prepared.targets
        if name == "remain":
            return keep_sse(eps, tg["eps"], prepared, self.distill).mean()
        if name == "keep":
            return keep_loss(eps, prepared)
        per_row = sse(eps, tg["target"]) + tg["spread"]
        if "weight" in tg:
            per_row = per_row * tg["weight"]
        return per_row.mean()

    @property
    def rule(self) -> WeightedSum | SplitRule:
        if self.lam == "auto" or self.surgery or self.balance != "none":
            lam = None if self.lam == "auto" else float(self.lam)
            return SplitRule("unlearn", "remain", lam, self.lam_ratio, self.surgery, self.balance)
        return WeightedSum({"unlearn": self.lam, "remain": 1.0 - self.lam})


def level_target(eps: torch.Tensor, target: torch.Tensor, spread: torch.Tensor,
                 level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ε + s·(v̄ − ε) with s = min(1, √(L/‖v̄ − ε‖²)) per row, so that ‖target − ε‖² = min(‖v̄ − ε‖², L),
    and the spread of the scaled neighbour targets, s²·spread (the loss's constant stays exact)."""
    d = (target - eps).double()
    far = d.flatten(1).pow(2).sum(1)
    s = (level.to(far) / far.clamp_min(1e-30)).sqrt().clamp(max=1.0)
    scaled = (eps.double() + s.view(-1, *([1] * (d.dim() - 1))) * d).to(target.dtype)
    near = (s >= 1.0).view(-1, *([1] * (d.dim() - 1)))  # rows already within the level: exactly v̄
    scaled_spread = (s.pow(2) * spread.double()).to(spread.dtype)
    return torch.where(near, target, scaled), torch.where(s >= 1.0, spread, scaled_spread)


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR_t, γ)/SNR_t with SNR_t = ᾱ_t/(1 − ᾱ_t), per timestep."""
    a = alphas_cumprod.to(t.device)[t].double()
    snr = a / (1.0 - a)
    return snr.clamp(max=gamma) / snr


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
        bank: remain images, uint8 (N, C, H, W) pixels or float latents, on any device.
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
    """Neighbours k0..k1 of every row as float64 in model range, shape (B, c, D); uint8 pixels
    are mapped to [-1, 1], float latents are used as they are."""
    if neighbours is None:
        rows = bank[k0:k1].to(device).flatten(1).unsqueeze(0).expand(b, -1, -1)
    else:
        rows = bank[neighbours[:, k0:k1].to(bank.device)].to(device).flatten(2)
    return rows.double().div(127.5).sub(1.0) if rows.dtype == torch.uint8 else rows.double()
