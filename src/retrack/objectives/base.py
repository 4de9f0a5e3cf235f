"""What every unlearning objective shares: the batch it reads, noising, and gradient rules.

An objective is a pure function of tensors. `prepare` turns clean images into the one batch of
noisy inputs the model sees (a single forward per step); `terms` turns the model's ε prediction
into named scalar loss terms (squared error summed over C,H,W, averaged over the batch: the
reduction the paper's learning rates assume). The trainer owns models, gradients and devices and
combines the terms with the objective's `GradientRule`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from retrack.models import Schedule


@dataclass
class TrainBatch:
    """Clean images in model range for one step; which parts are filled depends on the method.

    `neighbours` holds, per forget row, indices into `bank` (the remain images as uint8 NCHW, or
    float NCHW latents);
    None with a bank means "every remain image" (ReTrack's untruncated objective).
    """

    remain: torch.Tensor | None = None
    forget: torch.Tensor | None = None
    neighbours: torch.Tensor | None = None
    bank: torch.Tensor | None = None
    replayed: torch.Tensor | None = None  # (B,) bool: remain rows drawn from replay samples (--replay)


@dataclass
class Prepared:
    """Noisy inputs for one forward pass, their timesteps and whatever the loss compares against.

    Layout every objective keeps, so a batch can be cut into micro-batches without knowing the
    method: every target has B rows (one per draw), and x and t stack S segments of B rows each
    (e.g. ReTrack's forget block then remain block); row i of every segment belongs to draw i.
    """

    x: torch.Tensor
    t: torch.Tensor
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    split: int | None = None  # rows x[:split] feed the first term of a SplitRule, the rest the second

    @property
    def rows(self) -> int:
        sizes = {v.shape[0] for v in self.targets.values()}
        if len(sizes) != 1 or self.x.shape[0] % next(iter(sizes)) or self.x.shape[0] != self.t.shape[0]:
            raise ValueError(f"Prepared batch breaks the segment layout: x {tuple(self.x.shape)}, "
                             f"targets {[tuple(v.shape) for v in self.targets.values()]}")
        return sizes.pop()


def split_prepared(prepared: Prepared, k: int) -> list[Prepared]:
    """Cut a batch into k micro-batches of B/k draws each, in order.

    Every loss term is a mean over draws, so the mean of the micro-batches' terms is exactly the
    full batch's term: gradient accumulation then reproduces the full batch's gradient, draws
    included, because the draws were made once for the whole batch.
    """
    if k == 1:
        return [prepared]
    b = prepared.rows
    if k < 1 or b % k or (prepared.split is not None and prepared.split % b):
        raise ValueError(f"{k} micro-batches do not divide a batch of {b} (split at {prepared.split})")
    m, segments = b // k, prepared.x.shape[0] // b
    split = None if prepared.split is None else prepared.split // b * m
    out = []
    for j in range(k):
        rows = torch.cat([torch.arange(s * b + j * m, s * b + (j + 1) * m) for s in range(segments)])
        rows = rows.to(prepared.x.device)
        out.append(Prepared(prepared.x[rows], prepared.t[rows],
                            {name: v[j * m : (j + 1) * m] for name, v in prepared.targets.items()}, split))
    return out


@dataclass(frozen=True)
class WeightedSum:
    """g = ∇ Σ_i w_i·term_i: one backward pass.

    With two terms, an objective that has `term` and sets `Prepared.split` lists them in row order
    (the first reads x[:split]), so the trainer may take each from its own rows' forward.
    """

    weights: dict[str, float]


@dataclass(frozen=True)
class TwoGradientRule:
    """g = g_main + c·g_corr with c = coefficient(⟨g_main, g_corr⟩, ‖g_corr‖²).

    EraseDiff and SISS both have this form, so the trainer keeps one extra copy of the gradients
    (g_main) and combines in place, instead of the three copies of the reference code.
    """

    main: str
    corr: str
    kind: str  # "erasediff" or "siss"
    value: float  # η for EraseDiff, s for SISS

    def coefficient(self, dot: float, sq_norm: float) -> float:
        if sq_norm <= 0.0:
            return 0.0
        if self.kind == "erasediff":
            return max(self.value - dot / sq_norm, 0.0)
        if self.kind == "siss":
            return -self.value / sq_norm**0.5
        raise ValueError(f"unknown two-gradient rule {self.kind!r}")


BALANCES: tuple[str, ...] = ("none", "nash")


@dataclass(frozen=True)
class SplitRule:
    """g = λ·g_first' + (1−λ)·g_second, each gradient from its own forward over its own rows.

    The two gradients are taken separately at the cost of one fused step (the rows of each term
    go through the model on their own, so nothing is computed twice). Optional changes to
    ReTrack's plain weighted sum use them:
    - surgery (PCGrad, Yu et al. 2020): g_first' = g_first − (⟨g_first, g_second⟩/‖g_second‖²)·g_second
      when the inner product is negative, so the unlearning step never undoes remain fit;
    - lam=None ("auto"): λ solves λ‖g_first'‖ = ratio·(1−λ)‖g_second‖ at every step, i.e. the
      paper's "two terms of similar order" without tuning λ per model and data set;
    - balance="nash" (MUNBa, Wu & Harandi, ICCV 2025): g = α1·g_first + α2·g_second with α the
      two-player Nash bargaining solution (see `nash_alphas`); `lam` is then only the fallback
      where no bargain exists (None: ½).
    """

    first: str
    second: str
    lam: float | None = None
    ratio: float = 1.0
    surgery: bool = False
    balance: str = "none"

    def coefficients(self, dot: float, sq_first: float, sq_second: float) -> tuple[float, float, float]:
        """(a, b, λ) with g = a·g_first + b·g_second, from ⟨g1, g2⟩, ‖g1‖², ‖g2‖²; with
        balance="nash", (α1, α2, the λ of the same direction, α1/(α1 + α2))."""
        if self.balance == "nash":
            alphas = nash_alphas(dot, sq_first, sq_second)
            if alphas is None:  # a zero or exactly opposed gradient: fall back to the fixed λ
                lam = 0.5 if self.lam is None else self.lam
                return lam, 1.0 - lam, lam
            a, b = alphas
            return a, b, a / (a + b)
        c = -dot / sq_second if self.surgery and dot < 0.0 and sq_second > 0.0 else 0.0
        norm_first = max(sq_first + 2.0 * c * dot + c * c * sq_second, 0.0) ** 0.5
        lam = self.lam
        if lam is None:
            pull = self.ratio * sq_second**0.5
            lam = pull / (norm_first + pull) if norm_first > 0.0 else 0.5
        return lam, lam * c + (1.0 - lam), lam


def nash_alphas(dot: float, sq_first: float, sq_second: float) -> tuple[float, float] | None:
    """The Nash bargaining weights of two gradients: α ∈ R²₊ with α_i·(Kα)_i = 1, K their Gram
    matrix [[‖g1‖², ⟨g1,g2⟩], [⟨g1,g2⟩, ‖g2‖²]]; None where none exists.

    Closed form: subtracting the two equations gives ‖g1‖α1 = ‖g2‖α2, and then
    α_i = 1 / (‖g_i‖·√(1 + cos)), cos the cosine between g1 and g2. So g = α1·g1 + α2·g2 is the sum
    of the two unit gradients over √(1 + cos): it makes the same progress ⟨g, g_i⟩/‖g_i‖ = √(1 + cos)
    on both terms (each player's utility), whether they agree or conflict, and its norm is always
    √2. No positive solution exists when a gradient is zero or cos = −1 (no direction helps both).
    This is MUNBa's closed form, written as α_i·‖g_i‖ = 1/√(1 + cos) instead of their square roots
    of differences, which lose precision when the gradients nearly agree.
    """
    if not (sq_first > 0.0 and sq_second > 0.0):
        return None
    n1, n2 = sq_first**0.5, sq_second**0.5
    s = 1.0 + dot / (n1 * n2)
    if not s > 1e-12:
        return None
    r = s**-0.5
    return r / n1, r / n2


GradientRule = WeightedSum | TwoGradientRule | SplitRule


class Objective(Protocol):
    """One unlearning method; see objectives/<name>.py."""

    name: ClassVar[str]
    needs_remain: ClassVar[bool]
    needs_forget: ClassVar[bool]
    needs_neighbours: ClassVar[bool]

    def prepare(self, batch: TrainBatch, schedule: Schedule, gen: torch.Generator) -> Prepared: ...

    def terms(self, eps: torch.Tensor, prepared: Prepared) -> dict[str, torch.Tensor]: ...

    @property
    def rule(self) -> GradientRule: ...


class SplitObjective(Objective, Protocol):
    """An objective whose rule may be a SplitRule: each term is computed from its own rows' ε."""

    def term(self, name: str, eps: torch.Tensor, prepared: Prepared) -> torch.Tensor: ...


def noise_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn on the CPU generator, so a seed gives the same run on any device."""
    return torch.randn(x.shape, generator=gen).to(x.device, x.dtype)


def draw_timesteps(n: int, schedule: Schedule, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, schedule.num_steps, (n,), generator=gen).to(device)


def noisy(
    x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: Schedule
) -> torch.Tensor:
    """x_t = γ_t·x0 + σ_t·ε."""
    gamma, sigma = schedule.gamma_sigma(t, x0)
    return gamma * x0 + sigma * eps


def sse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error summed over C, H, W: shape (B,)."""
    return (pred - target).pow(2).flatten(1).sum(1)


FROZEN = "frozen"  # Prepared.targets key: the frozen input model's ε on the keep rows (--distill)
REPLAYED = "replayed"  # Prepared.targets key: 1.0 on keep rows drawn from replay samples (--replay), else 0.0


def keep_sse(eps: torch.Tensor, target: torch.Tensor, prepared: Prepared, distill: float) -> torch.Tensor:
    """Per row a‖ε_θ − target‖² + W‖ε_θ − ε_frozen‖² (W = `distill`; a = 1, or 0 on a row drawn from
    the frozen model's own samples, whose only target is ε_frozen), as ONE squared error against
    the mixed target ε̃ = (a·target + W·ε_frozen)/(a + W):

        a‖e − p‖² + W‖e − q‖² = (a + W)‖e − ε̃‖² + aW/(a + W)·‖p − q‖²,

    the last part a constant without gradient, kept so the term's value is the loss it stands for.
    W = 0 is the plain `sse(eps, target)`. The trainer fills ε_frozen (`FROZEN`), and the replay
    rows (`REPLAYED`) where there are any, on the rows the objective's `keep_rows` names before the
    terms are computed.
    """
    if not distill:
        return sse(eps, target)
    frozen = prepared.targets.get(FROZEN)
    if frozen is None:
        raise ValueError("distillation needs the frozen model's ε of the remain rows in the batch "
                         f"(targets[{FROZEN!r}]); the trainer fills it")
    w = float(distill)
    replayed = prepared.targets.get(REPLAYED)
    if replayed is None:
        mixed = (target + w * frozen) / (1.0 + w)
        return (1.0 + w) * sse(eps, mixed) + (w / (1.0 + w)) * sse(target, frozen)
    a = (1.0 - replayed).to(eps.dtype)
    a_ = a.view(-1, *([1] * (eps.ndim - 1)))
    mixed = (a_ * target + w * frozen) / (a_ + w)
    return (a + w) * sse(eps, mixed) + (a * w / (a + w)) * sse(target, frozen)


def keep_loss(eps: torch.Tensor, prepared: Prepared, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The keep loss for the log: mean over the keep rows of [weight ×] ‖ε_θ − ε_frozen‖², no gradient."""
    per_row = sse(eps.detach(), prepared.targets[FROZEN])
    return (per_row if weight is None else weight.detach() * per_row).mean()
