"""The unlearning loop: draw a batch, one forward, combine gradients, clip, step, log.

The trainer owns the model, optimiser and devices; objectives stay pure functions of tensors.
Several GPUs go through Hugging Face Accelerate (`accelerate launch`): every process draws its
own share of the batch from a generator seeded by (seed, process index), and gradients are
averaged across processes before they are combined and clipped. A batch too large for memory is
split into micro-batches (`grad_accum`) whose gradients add up to exactly the full batch's.
The rows of a batch go through the model in one forward or in one forward per part (forget rows,
remain rows), whichever `retrack.layout` found faster; both give the same gradient.
With `--distill` the trainer also holds a frozen copy of the input model (`retrack.keep`) and fills
its ε on the remain rows into each prepared batch before any term is computed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from tqdm.auto import tqdm

from retrack import keep
from retrack import layout as layouts
from retrack.errors import UserError, require
from retrack.models import Denoiser
from retrack.objectives.base import (
    Objective,
    Prepared,
    SplitRule,
    TrainBatch,
    TwoGradientRule,
    WeightedSum,
    split_prepared,
)
from retrack.saliency import WeightMask, forget_gradient


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
    grad_accum: int = 1  # micro-batches per step; they sum to batch_size
    mixed_precision: str = "no"  # accelerate's: "no", "bf16" or "fp16" (GPU only)
    layout: str = "auto"  # "auto", "joint" (one forward over all rows) or "split" (one per part)
    saliency: float | None = None  # SalUn: only this top fraction of weights by forget saliency may change


@dataclass
class TrainData:
    """Images the sampler draws from: uint8 NCHW pixels (or float NCHW latents) on the CPU, plus
    the kNN table."""

    remain: torch.Tensor
    forget: torch.Tensor
    neighbours: torch.Tensor | None = None  # (F, K) indices into remain; None = all (if needed)
    replay: torch.Tensor | None = None  # --replay: samples of the frozen input model, stored as remain is


def to_model_range(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 pixels to [-1, 1]; float tensors (VAE latents) are already in the model's space."""
    if images.dtype != torch.uint8:
        return images.to(device).float()
    return images.to(device).float().div(127.5).sub(1.0)


def draw_batch(objective: Objective, data: TrainData, n: int, gen: torch.Generator, device) -> TrainBatch:
    """Uniform draws (with replacement) of what the objective reads, all from one generator."""
    batch = TrainBatch()
    if objective.needs_forget:
        u = torch.randint(0, data.forget.shape[0], (n,), generator=gen)
        batch.forget = to_model_range(data.forget[u], device)
        if objective.needs_neighbours:
            batch.bank = data.remain
            batch.neighbours = None if data.neighbours is None else data.neighbours[u]
    if objective.needs_remain:
        r = torch.randint(0, data.remain.shape[0], (n,), generator=gen)
        batch.remain = to_model_range(data.remain[r], device)
        if data.replay is not None:  # each remain draw is a replay sample with probability REPLAY_SHARE
            use = torch.rand(n, generator=gen) < keep.REPLAY_SHARE
            j = torch.randint(0, data.replay.shape[0], (n,), generator=gen)
            batch.remain[use.to(batch.remain.device)] = to_model_range(data.replay[j[use]], device)
            batch.replayed = use.to(device)
    return batch


def apply_rule(rule, terms: dict[str, torch.Tensor], params: list[torch.nn.Parameter], accelerator) -> None:
    """Leave the combined gradient of the objective in p.grad for every parameter."""
    acc = GradientAccumulator(rule, params, accelerator)
    acc.add(terms)
    acc.finish()


def split_step(
    rule: SplitRule, model, objective, prepared: Prepared, params: list[torch.nn.Parameter], accelerator,
    step: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each term from its own rows' forward and backward, then g = a·g_first + b·g_second in p.grad.

    Costs what one fused step costs (every row goes through the model once) and keeps one extra
    copy of the gradients. Returns the terms and what the rule chose (λ, cosine, norms) for the log.
    """
    acc = GradientAccumulator(rule, params, accelerator)
    terms = acc.add_split(model, objective, prepared, step)
    return terms, acc.finish()


class GradientAccumulator:
    """Sums the gradients of micro-batches and applies the gradient rule once, to the totals.

    A weighted sum is linear, so its micro-batch gradients simply add up in p.grad. The
    two-gradient rules (EraseDiff, SISS, ReTrack's SplitRule options) are not: their coefficients
    depend on the whole batch's inner product and norms, so their two gradients are accumulated
    apart (the first in one extra copy of the parameters, the second in p.grad), averaged across
    processes, and combined once.
    """

    def __init__(self, rule, params: list[torch.nn.Parameter], accelerator) -> None:
        require(isinstance(rule, WeightedSum | TwoGradientRule | SplitRule), f"unknown gradient rule {rule!r}")
        self.rule, self.params, self.accelerator = rule, params, accelerator
        self.g_first: list[torch.Tensor] | None = None

    def add(self, terms: dict[str, torch.Tensor], scale: float = 1.0) -> None:
        """Add the gradient of `scale` × terms that share one graph: a weighted sum in one backward,
        a two-gradient rule (or a SplitRule under the joint layout) in two."""
        rule = self.rule
        if isinstance(rule, WeightedSum):
            self.accelerator.backward(scale * sum(w * terms[name] for name, w in rule.weights.items()))
            return
        first, second = (rule.main, rule.corr) if isinstance(rule, TwoGradientRule) else (rule.first, rule.second)
        self._add_first(scale * terms[first], retain_graph=True)
        self.accelerator.backward(scale * terms[second])

    def add_split(self, model, objective, prepared: Prepared, step: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Add each term's gradient from a forward over its own rows only, its backward right after
        (so one part's activations are alive at a time): a SplitRule keeps the first gradient apart;
        a weighted sum adds both to p.grad, the first under no_sync, so that DDP's one all-reduce
        carries their sum."""
        rule, n = self.rule, prepared.split
        names = (rule.first, rule.second) if isinstance(rule, SplitRule) else tuple(rule.weights)
        terms = {}
        for name, rows in zip(names, (slice(0, n), slice(n, None)), strict=True):
            first = name == names[0]
            with self.accelerator.no_sync(model) if first else contextlib.nullcontext():
                eps = model(prepared.x[rows], prepared.t[rows])
                terms[name] = objective.term(name, eps, prepared)
                if name == getattr(objective, "keep_term", None) and keep.distills(objective):
                    terms["keep"] = objective.term("keep", eps, prepared)  # logged only
                _check_finite({name: terms[name]}, step)
                if isinstance(rule, SplitRule) and first:
                    self._add_first(scale * terms[name])
                else:
                    weight = rule.weights[name] if isinstance(rule, WeightedSum) else 1.0
                    self.accelerator.backward(scale * weight * terms[name])
        return terms

    def _add_first(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        second_so_far = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        self.accelerator.backward(loss, retain_graph=retain_graph)
        g = [_grad(p) for p in self.params]
        self.g_first = g if self.g_first is None else [a.add_(b) for a, b in zip(self.g_first, g, strict=True)]
        for p, h in zip(self.params, second_so_far, strict=True):
            p.grad = h

    def finish(self) -> dict[str, float]:
        """Leave the rule's combined gradient in p.grad; returns what a SplitRule chose, for the log."""
        rule = self.rule
        if isinstance(rule, WeightedSum):
            return {}
        require(self.g_first is not None, "no micro-batch was added before finish().")
        reduce = self.accelerator.reduce
        g1 = [reduce(g, "mean") for g in self.g_first]
        g2 = [reduce(_grad(p), "mean") for p in self.params]
        self.g_first = None
        dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g1, g2, strict=True))
        sq2 = sum(float(b.double().pow(2).sum()) for b in g2)
        if isinstance(rule, TwoGradientRule):
            c = rule.coefficient(dot, sq2)
            for p, gm, gc in zip(self.params, g1, g2, strict=True):
                p.grad = gc.mul_(c).add_(gm)
            return {}
        sq1 = sum(float(a.double().pow(2).sum()) for a in g1)
        a, b, lam = rule.coefficients(dot, sq1, sq2)
        for p, x, y in zip(self.params, g1, g2, strict=True):
            p.grad = x.mul_(a).add_(y, alpha=b)
        cos = dot / (sq1 * sq2) ** 0.5 if sq1 > 0 and sq2 > 0 else 0.0
        chosen = {"lam": lam, "cos": cos, f"norm_{rule.first}": sq1**0.5, f"norm_{rule.second}": sq2**0.5}
        return chosen if rule.balance == "none" else {**chosen, f"alpha_{rule.first}": a, f"alpha_{rule.second}": b}


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def batch_gradient(model, objective: Objective, prepared: Prepared, grad_accum: int,
                   params: list[torch.nn.Parameter], accelerator, step: int = 0,
                   split: bool | None = None) -> dict[str, float]:
    """Leave the combined gradient of one batch in p.grad, one micro-batch at a time.

    DDP averages gradients across processes on a backward outside `no_sync`: for a weighted sum
    that is the last micro-batch's (the sum so far travels once); the two-gradient rules keep
    every backward local and average their two gradients themselves. `split` feeds each part of
    the rows through its own forward, each term's backward right after it where the objective
    computes terms per part (`layout.per_term`); None: only for a SplitRule, which needs its terms
    apart.
    Returns the batch's terms and, for a SplitRule, what it chose.
    """
    rule = objective.rule
    split = isinstance(rule, SplitRule) if split is None else split
    acc = GradientAccumulator(rule, params, accelerator)
    local = not isinstance(rule, WeightedSum)
    micro = split_prepared(prepared, grad_accum)
    totals: dict[str, float] = {}
    for j, mb in enumerate(micro):
        last = j == len(micro) - 1
        with accelerator.no_sync(model) if local or not last else contextlib.nullcontext():
            if split and layouts.per_term(objective, mb):
                terms = acc.add_split(model, objective, mb, step, 1.0 / grad_accum)
            else:
                terms = objective.terms(layouts.forward(model, mb, split), mb)
                _check_finite(terms, step)
                acc.add(terms, 1.0 / grad_accum)
        for name, v in terms.items():
            totals[name] = totals.get(name, 0.0) + float(v.detach()) / grad_accum
    return {**totals, **acc.finish()}


def train(
    denoiser: Denoiser,
    objective: Objective,
    data: TrainData,
    settings: TrainSettings,
    device: str | None = None,
    progress: bool = True,
    on_gradient: Callable[[int, list[torch.nn.Parameter]], None] | None = None,
    between_steps: Callable[[int], bool] | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune `denoiser` in place with `objective`; returns the per-step log.

    Where a layout was forced or `auto` chose one by timing, the first entry also holds it under
    "layout" (`Layout.record()`: the layout, why, and the timings it was chosen by). With
    `settings.saliency` F, only the top F of the weights by forget saliency change (the rest stay
    bit-identical to the input); the first entry holds the mask's record under "saliency".

    `on_gradient(step, params)`, if given, sees every step's combined gradient in p.grad (averaged
    across processes, masked where `saliency` is set, before clipping) and the weights it will update.
    `between_steps(done)`, if given, runs on the main process with the number of optimiser steps
    done (0 before the first, then after each); returning True ends the run there, on every
    process. It may look at `denoiser` but must leave the generator stream and weights alone.
    """

    accelerator = Accelerator(cpu=(device == "cpu"), mixed_precision=settings.mixed_precision)
    n = per_process_batch(settings, accelerator.num_processes)
    gen = torch.Generator().manual_seed((settings.seed * 1_000 + accelerator.process_index) % 2**64)
    # Only trainable weights reach the optimiser: a LoRA adapter's, not the frozen UNet under it.
    opt = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=settings.lr, betas=settings.betas,
                            weight_decay=settings.weight_decay)
    # --distill: the frozen input model, copied before the first step (None without it).
    teacher = keep.teacher_for(denoiser, objective, accelerator.device)
    require(data.replay is None or teacher is not None,
            "replay samples are distilled toward the frozen model, so they need --distill W > 0.")
    model, opt = accelerator.prepare(denoiser, opt)
    params = [p for p in model.parameters() if p.requires_grad]
    log: list[dict[str, Any]] = []
    mask = None if settings.saliency is None else _saliency_mask(model, denoiser, data, settings, n, params,
                                                                   accelerator)
    model.train()
    bar = tqdm(range(settings.steps), desc=f"unlearn ({objective.name})", dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process))
    stop = _between_steps(between_steps, 0, model, accelerator)
    done = 0
    for step in bar:
        if stop:
            break
        # The whole batch is drawn and noised at once, so accumulation changes no draw.
        batch = draw_batch(objective, data, n, gen, accelerator.device)
        prepared = objective.prepare(batch, denoiser.schedule, gen)
        if teacher is not None:  # the frozen model's ε on the remain rows, before any term
            teacher.fill(objective, prepared, n // settings.grad_accum, accelerator.autocast, batch.replayed)
        if step == 0:  # timed on the first batch's own rows, if at all; the generator is not touched
            layout = layouts.choose(settings.layout, model, objective, split_prepared(prepared, settings.grad_accum)[0],
                                    params, accelerator, settings.steps * settings.grad_accum)
        terms = batch_gradient(model, objective, prepared, settings.grad_accum, params, accelerator, step,
                               layout.split)
        grad_norm = _update(opt, params, accelerator, settings, step, mask, on_gradient)
        entry = {"step": step, **terms, "grad_norm": grad_norm}
        bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k != "step"})
        log.append({**entry, **_first_notes(layout, mask)} if step == 0 else entry)
        done = step + 1
        stop = _between_steps(between_steps, done, model, accelerator)
    model.eval()
    _check_weights(params, done)
    if done > 0:
        _check_last_step(model, objective, split_prepared(prepared, settings.grad_accum)[0], done)
    return log


def _update(opt, params: list[torch.nn.Parameter], accelerator, settings: TrainSettings, step: int,
            mask: WeightMask | None, on_gradient: Callable[[int, list[torch.nn.Parameter]], None] | None) -> float:
    """From the combined gradient in p.grad to the updated weights: mask, show, clip, AdamW, write
    back the frozen weights; returns the gradient norm before clipping."""
    if mask is not None:
        mask.mask_gradient(params)
    if on_gradient is not None:
        on_gradient(step, params)
    grad_norm = float(accelerator.clip_grad_norm_(params, settings.clip))
    require(math.isfinite(grad_norm), f"the gradient norm became {grad_norm} at step {step}; "
            "the input model is untouched and nothing was written.")
    _step(opt, settings.lr, step)
    if mask is not None:
        mask.restore(params)
    opt.zero_grad(set_to_none=True)
    return grad_norm


def _check_last_step(model, objective: Objective, mb: Prepared, done: int) -> None:
    """A step's loss check runs before it, so the last step's result is checked here, on the last
    batch's first micro-batch (the memory --grad-accum was chosen for)."""
    with torch.no_grad():
        _check_finite(objective.terms(model(mb.x, mb.t), mb), done, after_last=True)


def _saliency_mask(model, denoiser: Denoiser, data: TrainData, settings: TrainSettings, n: int,
                   params: list[torch.nn.Parameter], accelerator) -> WeightMask:
    """SalUn's mask from the input model's forget gradient, taken before the first step.

    Each process draws its share of the batch from a generator of its own (never the trainer's),
    in eval mode (no dropout draws from the global state), and the gradients are averaged, so
    every process holds the same mask.
    """
    gen = torch.Generator().manual_seed(((settings.seed * 1_000 + accelerator.process_index) ^ SALIENCY_SEED) % 2**64)
    model.eval()
    with accelerator.no_sync(model):
        grads = forget_gradient(model, denoiser.schedule, data.forget, params, n, settings.grad_accum, gen,
                                lambda x: to_model_range(x, accelerator.device))
    grads = [accelerator.reduce(g, "mean") for g in grads]
    require(all(bool(torch.isfinite(g).all()) for g in grads), "the forget images' gradient for --saliency is not "
            "finite; the input model is untouched and nothing was written.")
    mask = WeightMask.from_gradients(grads, float(settings.saliency))
    mask.freeze(params)
    return mask


SALIENCY_SEED = 0x5A11 << 48  # sets the mask's generator apart from every (seed, process) stream


def _first_notes(layout, mask: WeightMask | None) -> dict[str, Any]:
    """What the first log entry also holds: the layout chosen (if any) and the saliency mask."""
    noted = layout.record()
    return {**({"layout": noted} if noted is not None else {}), **({"saliency": mask.record()} if mask else {})}


def _between_steps(hook: Callable[[int], bool] | None, done: int, model, accelerator) -> bool:
    """The hook on the main process only; its verdict reaches every process, so all stop together."""
    if hook is None:
        return False
    stop = bool(hook(done)) if accelerator.is_main_process else False
    if accelerator.num_processes > 1:
        stop = bool(broadcast(torch.tensor([int(stop)], device=accelerator.device)).item())
    model.train()  # whatever mode the hook left the model in
    return stop


def per_process_batch(settings: TrainSettings, processes: int) -> int:
    """Draws per process and step; the batch must split evenly over processes and micro-batches."""
    n, k = settings.batch_size // processes, settings.grad_accum
    require(settings.batch_size % processes == 0 and n > 0,
            f"--batch-size {settings.batch_size} must be a multiple of the {processes} processes.")
    require(k >= 1 and n % k == 0,
            f"--grad-accum {k} must divide the batch of {n} images per process "
            f"(--batch-size {settings.batch_size} over {processes} process{'es' if processes > 1 else ''}).")
    return n


def _step(opt: torch.optim.Optimizer, lr: float, step: int) -> None:
    try:
        opt.step()
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        raise UserError(f"the AdamW update overflowed float32 at step {step}: --lr {lr:g} is too large "
                        "(the input model is untouched and nothing was written).") from None


def _check_finite(terms: dict[str, torch.Tensor], step: int, after_last: bool = False) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            when = f"after the last step ({step})" if after_last else f"at step {step}"
            raise UserError(f"the {name} loss became {float(value.detach())} {when}; lower --lr "
                            "(the input model is untouched and nothing was written).")


def _check_weights(params: list[torch.nn.Parameter], steps: int) -> None:
    # A step can turn finite losses into non-finite weights (a huge --lr); the loss check of the
    # next step never comes after the last one, so the weights themselves are checked here.
    bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in params)
    total = sum(p.numel() for p in params)
    if bad:
        raise UserError(f"after the last of {steps} steps {bad} of {total} weights are NaN or infinite; "
                        "lower --lr (the input model is untouched and nothing was written).")


def neighbour_table(indices: np.ndarray | None) -> torch.Tensor | None:
    return None if indices is None else torch.from_numpy(np.ascontiguousarray(indices))
