"""Weight saliency (SalUn, Fan et al., ICLR 2024): fine-tune only the weights that matter to the
forget set, so that unlearning moves as little of the network as it must.

Before the first step the gradient of the plain denoising loss on the forget images is taken once;
the weights whose |gradient| lies in the top fraction F over all trainable weights together (one
global threshold, as SalUn's public code ranks them) are the only ones that may change. Masking the
gradient alone would not freeze the others: AdamW's decoupled weight decay shrinks every weight, so
the unmasked entries are written back after each optimiser step and stay bit-identical to the input.

Where we differ from SalUn's public DDPM script: it sums |g| over the forget batches (and steps its
optimiser while doing so); here |g| is that of the mean gradient over one batch of `batch_size`
forget draws, taken in eval mode (no dropout, so the global random state is untouched) from a
generator of its own, so the trainer's draws are exactly those of a run without the mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from retrack.objectives.base import draw_timesteps, noise_like, noisy, sse


def saliency_threshold(grads: list[torch.Tensor], fraction: float) -> float:
    """The k-th largest |g| over all tensors together, k = max(1, ⌊F·N⌋) as SalUn counts them.

    One global threshold, not one per tensor: layers whose gradients are small give up more of
    their weights, which is the point of ranking by saliency.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the saliency fraction must be in (0, 1], got {fraction}")
    flat = torch.cat([g.detach().abs().flatten().float() for g in grads])
    k = max(1, math.floor(fraction * flat.numel()))
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


def saliency_mask(grads: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Per tensor, True where |g| ≥ the global threshold: the top `fraction` of all weights (ties
    at the threshold are all kept, so slightly more than F·N may be). F = 1 keeps every weight;
    below 1, a weight whose gradient is exactly zero is never kept (the forget images do not reach
    it, e.g. a LoRA A matrix under a zero B), so fewer than F·N are kept when more than 1 − F of
    the gradient is zero, instead of a threshold of 0 keeping them all."""
    return _at_least(grads, saliency_threshold(grads, fraction), fraction)


def _at_least(grads: list[torch.Tensor], threshold: float, fraction: float) -> list[torch.Tensor]:
    if fraction >= 1.0:
        return [torch.ones_like(g, dtype=torch.bool) for g in grads]
    return [(a >= threshold) & (a > 0) for a in (g.detach().abs().float() for g in grads)]


def forget_gradient(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule,
                    forget: torch.Tensor, params: list[torch.nn.Parameter], n: int, micro: int,
                    gen: torch.Generator, to_model: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """∇ of mean_i ‖ε_θ(x_t, t) − ε‖² (summed over C,H,W) over n uniform draws of forget images.

    Draws, timesteps and noise all come from `gen`; the n rows go through the model in `micro`
    micro-batches whose gradients add up to the full batch's (the memory --grad-accum was chosen
    for). p.grad is left as it was found.
    """
    before = [p.grad for p in params]
    for p in params:
        p.grad = None
    idx = torch.randint(0, forget.shape[0], (n,), generator=gen)
    x0 = to_model(forget[idx])
    t = draw_timesteps(n, schedule, gen, x0.device)
    eps = noise_like(x0, gen)
    x = noisy(x0, t, eps, schedule)
    for rows in torch.arange(n).chunk(micro):
        rows = rows.to(x.device)
        (sse(model(x[rows], t[rows]), eps[rows]).sum() / n).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, before, strict=True):
        p.grad = g
    return grads


@dataclass
class WeightMask:
    """Which weights may change, and the input's values of those that may not."""

    keep: list[torch.Tensor]
    fraction: float
    threshold: float
    frozen: list[torch.Tensor] | None = None

    @classmethod
    def from_gradients(cls, grads: list[torch.Tensor], fraction: float) -> WeightMask:
        threshold = saliency_threshold(grads, fraction)
        return cls(_at_least(grads, threshold, fraction), fraction, threshold)

    def freeze(self, params: list[torch.nn.Parameter]) -> None:
        """Remember the values of the weights outside the mask (only those: 1 − F of a copy)."""
        self.frozen = [p.detach().masked_select(~k) for p, k in zip(params, self.keep, strict=True)]

    def mask_gradient(self, params: list[torch.nn.Parameter]) -> None:
        """Zero the gradient outside the mask, so that clipping and AdamW's moments see only the
        weights that move."""
        for p, k in zip(params, self.keep, strict=True):
            if p.grad is not None:
                p.grad.mul_(k)

    @torch.no_grad()
    def restore(self, params: list[torch.nn.Parameter]) -> None:
        """Write back the frozen weights (AdamW's weight decay moved them), bit for bit."""
        for p, k, v in zip(params, self.keep, self.frozen, strict=True):
            p.masked_scatter_(~k, v)

    def record(self) -> dict[str, float | int]:
        kept = sum(int(k.sum()) for k in self.keep)
        total = sum(k.numel() for k in self.keep)
        return {"fraction": self.fraction, "threshold": self.threshold, "kept": kept, "total": total,
                "kept_fraction": kept / total}
