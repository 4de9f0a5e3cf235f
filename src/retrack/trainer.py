"""The unlearning loop: draw a batch, one forward, combine gradients, clip, step, log.

The trainer owns the model, optimiser and devices; objectives stay pure functions of tensors.
Several GPUs go through Hugging Face Accelerate (`accelerate launch`): every process draws its
own share of the batch from a generator seeded by (seed, process index), and gradients are
averaged across processes before they are combined and clipped.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from retrack.errors import UserError, require
from retrack.models import Denoiser
from retrack.objectives.base import (
    Objective,
    Prepared,
    SplitRule,
    TrainBatch,
    TwoGradientRule,
    WeightedSum,
)


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser settings of the paper's runs: AdamW, constant LR, no warm-up, clip 1.0, fp32."""

    steps: int = 50
    batch_size: int = 128
    lr: float = 5e-5
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    clip: float = 1.0
    seed: int = 0


@dataclass
class TrainData:
    """Images the sampler draws from: uint8 NCHW tensors on the CPU, plus the kNN table."""

    remain: torch.Tensor
    forget: torch.Tensor
    neighbours: torch.Tensor | None = None  # (F, K) indices into remain; None = all (if needed)


def _to_model(images_uint8: torch.Tensor, device) -> torch.Tensor:
    return images_uint8.to(device).float().div(127.5).sub(1.0)


def draw_batch(objective: Objective, data: TrainData, n: int, gen: torch.Generator, device) -> TrainBatch:
    """Uniform draws (with replacement) of what the objective reads, all from one generator."""
    batch = TrainBatch()
    if objective.needs_forget:
        u = torch.randint(0, data.forget.shape[0], (n,), generator=gen)
        batch.forget = _to_model(data.forget[u], device)
        if objective.needs_neighbours:
            batch.bank = data.remain
            batch.neighbours = None if data.neighbours is None else data.neighbours[u]
    if objective.needs_remain:
        r = torch.randint(0, data.remain.shape[0], (n,), generator=gen)
        batch.remain = _to_model(data.remain[r], device)
    return batch


def apply_rule(rule, terms: dict[str, torch.Tensor], params: list[torch.nn.Parameter], accelerator) -> None:
    """Leave the combined gradient of the objective in p.grad for every parameter."""
    if isinstance(rule, WeightedSum):
        accelerator.backward(sum(w * terms[name] for name, w in rule.weights.items()))
        return
    require(isinstance(rule, TwoGradientRule), f"unknown gradient rule {rule!r}")
    accelerator.backward(terms[rule.main], retain_graph=True)
    g_main = [accelerator.reduce(_grad(p).clone(), "mean") for p in params]
    for p in params:
        p.grad = None
    accelerator.backward(terms[rule.corr])
    g_corr = [accelerator.reduce(_grad(p), "mean") for p in params]
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g_main, g_corr, strict=True))
    sq = sum(float(b.double().pow(2).sum()) for b in g_corr)
    c = rule.coefficient(dot, sq)
    for p, gm, gc in zip(params, g_main, g_corr, strict=True):
        p.grad = gc.mul_(c).add_(gm)


def split_step(
    rule: SplitRule, model, objective, prepared: Prepared, params: list[torch.nn.Parameter], accelerator,
    step: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each term from its own rows' forward and backward, then g = a·g_first + b·g_second in p.grad.

    Costs what one fused step costs (every row goes through the model once) and keeps one extra
    copy of the gradients. Returns the terms and what the rule chose (λ, cosine, norms) for the log.
    """
    n = prepared.split
    terms, grads = {}, []
    for name, rows in ((rule.first, slice(0, n)), (rule.second, slice(n, None))):
        terms[name] = objective.term(name, model(prepared.x[rows], prepared.t[rows]), prepared)
        _check_finite({name: terms[name]}, step)
        accelerator.backward(terms[name])
        grads.append([accelerator.reduce(_grad(p).clone(), "mean") for p in params])
        for p in params:
            p.grad = None
    g1, g2 = grads
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g1, g2, strict=True))
    sq1 = sum(float(a.double().pow(2).sum()) for a in g1)
    sq2 = sum(float(b.double().pow(2).sum()) for b in g2)
    a, b, lam = rule.coefficients(dot, sq1, sq2)
    for p, x, y in zip(params, g1, g2, strict=True):
        p.grad = x.mul_(a).add_(y, alpha=b)
    cos = dot / (sq1 * sq2) ** 0.5 if sq1 > 0 and sq2 > 0 else 0.0
    return terms, {"lam": lam, "cos": cos, f"norm_{rule.first}": sq1**0.5, f"norm_{rule.second}": sq2**0.5}


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def train(
    denoiser: Denoiser,
    objective: Objective,
    data: TrainData,
    settings: TrainSettings,
    device: str | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Fine-tune `denoiser` in place with `objective`; returns the per-step log."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=(device == "cpu"))
    n = settings.batch_size // accelerator.num_processes
    require(n * accelerator.num_processes == settings.batch_size and n > 0,
            f"--batch-size {settings.batch_size} must be a multiple of the "
            f"{accelerator.num_processes} processes.")
    gen = torch.Generator().manual_seed(settings.seed * 1_000 + accelerator.process_index)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=settings.lr, betas=settings.betas,
                            weight_decay=settings.weight_decay)
    model, opt = accelerator.prepare(denoiser, opt)
    params = [p for p in model.parameters() if p.requires_grad]
    rule = objective.rule
    two_grads = isinstance(rule, TwoGradientRule | SplitRule)
    log: list[dict[str, float]] = []
    model.train()
    bar = tqdm(range(settings.steps), desc=f"unlearn ({objective.name})", dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process))
    for step in bar:
        batch = draw_batch(objective, data, n, gen, accelerator.device)
        prepared = objective.prepare(batch, denoiser.schedule, gen)
        # Two-gradient rules average the gradients themselves, so DDP must not sync each backward.
        ctx = accelerator.no_sync(model) if two_grads else contextlib.nullcontext()
        chosen: dict[str, float] = {}
        with ctx:
            if isinstance(rule, SplitRule):
                terms, chosen = split_step(rule, model, objective, prepared, params,
                                             accelerator, step)
            else:
                terms = objective.terms(model(prepared.x, prepared.t), prepared)
                _check_finite(terms, step)
                apply_rule(rule, terms, params, accelerator)
        grad_norm = float(accelerator.clip_grad_norm_(params, settings.clip))
        require(math.isfinite(grad_norm), f"the gradient norm became {grad_norm} at step {step}; "
                "the input model is untouched and nothing was written.")
        opt.step()
        opt.zero_grad(set_to_none=True)
        entry = {"step": step, **{k: float(v.detach()) for k, v in terms.items()}, **chosen,
                 "grad_norm": grad_norm}
        log.append(entry)
        bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k != "step"})
    model.eval()
    return log


def _check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise UserError(f"the {name} loss became {float(value.detach())} at step {step}; "
                            "the input model is untouched and nothing was written.")


def neighbour_table(indices: np.ndarray | None) -> torch.Tensor | None:
    return None if indices is None else torch.from_numpy(np.ascontiguousarray(indices))
