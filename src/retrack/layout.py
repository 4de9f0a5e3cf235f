"""How a batch's rows go through the model: one forward over all of them, or one forward per part.

Every objective stacks its rows in parts (the segments of `Prepared`: ReTrack's forget rows then
its remain rows, EraseDiff's remain rows then its forget rows). The UNets here treat each row on
its own (convolutions, GroupNorm and attention act within a sample), so one forward per part
("split") gives the ε, the loss terms and the gradient of one forward over all rows ("joint") up
to float summation order. Where each loss term reads its own part (ReTrack: `per_term`), a part's
backward follows its forward, so only one part's activations are alive at a time; otherwise the
parts' outputs are concatenated for one backward. Which layout is faster depends on the device and
the shapes: on a 2-core CPU a forward+backward per B rows ran about 20% faster than one on 2B,
while a GPU usually prefers the larger batch. `auto` times both once per process for a device,
architecture, dtype and row shapes, and keeps the faster; it never changes a result beyond float
rounding, and the run that follows is bit for bit the run forced to the layout it picked.

Measuring costs three forward+backward passes at the first step (joint, split, joint; the first
is as cold as the run's own first step would have been), so a run measures only where it has
`MIN_PASSES` passes to win them back, and a batch of `MIN_ROWS` rows. Nothing is cached on disk:
the timing depends on what else the machine is running, which changes from one run to the next.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import broadcast

from retrack.errors import UserError, require
from retrack.objectives.base import Objective, Prepared, SplitRule, WeightedSum

LAYOUTS = ("auto", "joint", "split")
MIN_ROWS = 32  # rows per micro-batch below which per-forward overheads dominate and timing is noise
MIN_PASSES = 20  # steps × micro-batches below which measuring cannot pay for itself
ORDER = (False, True, False)  # the timed passes: joint (cold), split, joint
MARGIN = 0.03  # split must beat joint by this fraction; within it, joint (one forward) is kept


@dataclass(frozen=True)
class Layout:
    """The layout a run uses, why, and (when timed) the seconds of one forward+backward in each."""

    split: bool
    why: str  # "forced", "measured", "cache", "split rule", "one part", "batch norm", "small batch", "short run"
    joint_s: float | None = None
    split_s: float | None = None

    def record(self) -> dict[str, Any] | None:
        """What the step log keeps: the layout, why, and the timings it rests on. None where the
        layout is the method's own (joint; split for a SplitRule) because nothing was chosen (one
        part, a small batch, ...): then the log is the log of a run from before layouts existed."""
        if self.why not in ("forced", "measured", "cache"):
            return None
        out: dict[str, Any] = {"layout": "split" if self.split else "joint", "why": self.why}
        if self.joint_s is not None:
            out.update(joint_s=round(self.joint_s, 6), split_s=round(self.split_s, 6))
        return out


_MEASURED: dict[tuple, Layout] = {}  # in this process: cache key → the measured layout
_DECIDED = ("measured", "cache", "short run")  # the reasons that may differ between processes


def parts(prepared: Prepared) -> int:
    """How many parts (segments of B rows each) the batch stacks."""
    return prepared.x.shape[0] // prepared.rows


def forward(model, prepared: Prepared, split: bool) -> torch.Tensor:
    """ε of every row, in row order: from one forward, or from one forward per part."""
    b, k = prepared.rows, parts(prepared)
    if not split or k == 1:
        return model(prepared.x, prepared.t)
    return torch.cat([model(prepared.x[s * b:(s + 1) * b], prepared.t[s * b:(s + 1) * b]) for s in range(k)])


def per_term(objective: Objective, prepared: Prepared) -> bool:
    """Whether each loss term can come from its own part's forward, with its backward right after:
    a SplitRule, or a two-term weighted sum, of an objective with `term` whose batch says where the
    first term's rows end (`Prepared.split`; the weights name the terms in row order). Otherwise
    the split layout concatenates the parts' outputs and runs one backward."""
    rule = objective.rule
    two = isinstance(rule, SplitRule) or isinstance(rule, WeightedSum) and len(rule.weights) == 2
    return two and prepared.split is not None and callable(getattr(objective, "term", None))


def has_batch_norm(model: torch.nn.Module) -> bool:
    """BatchNorm (in training) normalises over the rows of each forward, so splitting the forward
    would change every output; GroupNorm, LayerNorm and the rest are per sample."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def choose(setting: str, model, objective: Objective, prepared: Prepared, params: list[torch.nn.Parameter],
           accelerator, passes: int) -> Layout:
    """The layout of this run, from `setting` ("auto", "joint" or "split") and the first micro-batch.

    `passes` is the run's steps × micro-batches. Every process returns the same layout: a measured
    choice is the main process's, broadcast.
    """
    require(setting in LAYOUTS, f"--layout must be one of {', '.join(LAYOUTS)}, got {setting!r}.")
    split_rule = isinstance(objective.rule, SplitRule)
    if setting != "auto":
        if setting == "split" and not split_rule and parts(prepared) > 1 and has_batch_norm(model):
            raise UserError("--layout split would change the results of a model with BatchNorm layers, "
                            "which normalise over the rows of each forward; use --layout joint or auto.")
        return Layout(setting == "split", "forced")
    # A SplitRule needs its two gradients apart: joint would take two backward passes over all rows.
    # (With BatchNorm, too, split is then the method's definition, as it was before layouts.)
    fixed = (Layout(True, "split rule") if split_rule else
             Layout(False, "one part") if parts(prepared) == 1 else
             Layout(False, "batch norm") if has_batch_norm(model) else
             Layout(False, "small batch") if prepared.x.shape[0] < MIN_ROWS else None)
    if fixed is not None:
        return fixed
    key = cache_key(model, objective, prepared, accelerator)
    local = _MEASURED.get(key)
    if local is None and passes < MIN_PASSES:
        local = Layout(False, "short run")
    elif local is None:
        joint_s, split_s = measure(model, prepared, params, accelerator, per_term(objective, prepared))
        local = _MEASURED[key] = Layout(split_s < (1.0 - MARGIN) * joint_s, "measured", joint_s, split_s)
    else:
        local = Layout(local.split, "cache", local.joint_s, local.split_s)
    return _from_main(local, accelerator)


def cache_key(model, objective: Objective, prepared: Prepared, accelerator) -> tuple:
    """Device (CUDA device name, or the CPU with torch's thread count), architecture (class and every
    parameter's name, shape, dtype and trainability, i.e. also which ones a LoRA adapter trains),
    mixed precision, the shapes of the parts and whether each part gets its own backward."""
    dev = prepared.x.device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type}, {torch.get_num_threads()} threads"
    net = accelerator.unwrap_model(model)
    layout = [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in net.named_parameters()]
    arch = hashlib.sha256(repr((type(net).__qualname__, layout)).encode()).hexdigest()
    b = prepared.rows
    shapes = (parts(prepared), tuple(prepared.x[:b].shape), str(prepared.x.dtype), str(prepared.t.dtype),
              per_term(objective, prepared))
    return where, arch, str(accelerator.mixed_precision), shapes


def measure(model, prepared: Prepared, params: list[torch.nn.Parameter], accelerator,
            per_part: bool = False) -> tuple[float, float]:
    """Seconds of one forward+backward of this batch in each layout: (joint, split), the split one
    with a backward per part if `per_part` (as `per_term` objectives run it), else one backward.

    Passes run in `ORDER` (joint, split, joint) and each layout counts its fastest: the first pass
    doubles as the warm-up, since a cold pass (first allocations, kernel selection) is only ever
    slower, and the split pass sits between the two joint ones, so that a drift in the machine's
    load hits both layouts alike. The batch's own inputs serve both layouts, so the run's generator
    is not touched; gradients go to torch.autograd.grad, never to p.grad, under no_sync (no
    collective), and the global RNG (dropout) is forked: weights, optimiser, gradients and every
    draw after this are as without it.
    """
    times: dict[bool, list[float]] = {False: [], True: []}
    with _fork_rng(prepared.x.device), accelerator.no_sync(model):
        for split in ORDER:
            times[split].append(_time_pass(model, prepared, params, split, per_part))
    return min(times[False]), min(times[True])


def _time_pass(model, prepared: Prepared, params: list[torch.nn.Parameter], split: bool, per_part: bool) -> float:
    dev, b = prepared.x.device, prepared.rows
    _sync(dev)
    t0 = time.perf_counter()
    if split and per_part:
        for s in range(parts(prepared)):
            loss = model(prepared.x[s * b:(s + 1) * b], prepared.t[s * b:(s + 1) * b]).float().square().mean()
            torch.autograd.grad(loss, params, allow_unused=True)
    else:
        torch.autograd.grad(forward(model, prepared, split).float().square().mean(), params, allow_unused=True)
    _sync(dev)
    return time.perf_counter() - t0


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _fork_rng(dev: torch.device):
    if dev.type == "cuda":
        return torch.random.fork_rng(devices=[dev.index if dev.index is not None else torch.cuda.current_device()])
    return torch.random.fork_rng(devices=[])


def _from_main(local: Layout, accelerator) -> Layout:
    """The main process's layout on every process (each measured its own; only one may decide)."""
    if accelerator.num_processes <= 1:
        return local

    times = [float("nan") if s is None else s for s in (local.joint_s, local.split_s)]
    sent = torch.tensor([float(local.split), float(_DECIDED.index(local.why)), *times], dtype=torch.float64,
                        device=accelerator.device)
    split, why, joint_s, split_s = broadcast(sent).tolist()
    timed = joint_s == joint_s  # not NaN
    return Layout(bool(split), _DECIDED[int(why)], joint_s if timed else None, split_s if timed else None)
