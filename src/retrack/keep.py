"""The keep term of `--distill`: the trainer's frozen copy of the input model, whose ε on the remain
rows becomes part of their target (as Selective Amnesia, Heng & Soh 2023, and generative replay
distil the original model to keep what is not forgotten).

The objectives stay pure functions of tensors: each names the rows that carry its remain term
(`keep_rows`) and mixes the frozen model's ε into their target (`objectives.base.keep_sse`); this
module owns the frozen copy and fills that ε into the prepared batch (`FROZEN`) before the terms
are computed. The cost is one forward without gradient over the remain rows per step.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import numpy as np
import torch

from retrack.errors import require
from retrack.objectives.base import FROZEN, REPLAYED, Objective, Prepared

MARGIN = 0.1  # the frozen copy needs its weights' bytes plus this fraction …
MARGIN_BYTES = 64 << 20  # … plus this much for the allocator and the forward's activations
REPLAY_SHARE = 0.5  # --replay: the probability that a remain draw is a replay sample instead
REPLAY_STEPS, REPLAY_SAMPLER = 50, "ddim"  # as the evaluation samples
REPLAY_SEED_OFFSET = 0x7265706C6179  # "replay": its samples' seeds differ from the evaluation's


def distills(objective: Objective) -> bool:
    return float(getattr(objective, "distill", 0.0) or 0.0) > 0.0


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers: what a deep copy of it holds."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def available_memory(device: torch.device | str) -> int | None:
    """Free bytes where a copy on `device` would live: CUDA's free memory, or MemAvailable of
    /proc/meminfo for the CPU; None where it cannot be read (the copy is then attempted)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(model: torch.nn.Module, device: torch.device | str) -> None:
    """Refuse, in one sentence, a frozen copy that does not fit the free memory of `device`."""
    need = int(weight_bytes(model) * (1.0 + MARGIN)) + MARGIN_BYTES
    free = available_memory(device)  # looked up at call time, so a test can replace it
    require(free is None or need <= free,
            f"--distill keeps a frozen copy of the input model on {torch.device(device)}, which needs about "
            f"{_size(need)} (its weights plus a margin) but only {_size(free or 0)} is free; free memory or "
            "leave --distill at 0.")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def frozen_copy(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """A deep copy of `model` (before any training) on `device`, in eval mode, without gradients."""
    check_fits(model, device)
    frozen = copy.deepcopy(model).to(device).eval()
    frozen.requires_grad_(False)
    return frozen


class Teacher:
    """The frozen input model and the one thing it does each step: its ε on the keep rows."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str) -> None:
        self.model = frozen_copy(model, device)

    @torch.no_grad()
    def fill(self, objective: Objective, prepared: Prepared, chunk: int | None = None,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             replayed: torch.Tensor | None = None) -> Prepared:
        """Put the frozen model's ε of the rows `objective.keep_rows` names into
        `prepared.targets[FROZEN]`, in forwards of at most `chunk` rows (a micro-batch's share), and
        which of those rows are replay samples (`replayed`, one per draw) into `targets[REPLAYED]`.
        Every objective's keep rows are one segment of B rows, row i from remain draw i."""
        rows = objective.keep_rows(prepared)
        x, t = prepared.x[rows], prepared.t[rows]
        chunk = chunk or x.shape[0]
        with autocast():
            eps = [self.model(x[i:i + chunk], t[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
        prepared.targets[FROZEN] = torch.cat(eps).to(x.dtype)
        if replayed is not None:
            prepared.targets[REPLAYED] = replayed.to(x.device, x.dtype)
        return prepared


def teacher_for(model: torch.nn.Module, objective: Objective, device: torch.device | str) -> Teacher | None:
    """The run's teacher: a frozen copy of `model` where the objective distils, else None."""
    return Teacher(model, device) if distills(objective) else None


def replay_seed(seed: int) -> int:
    """The sampling seed of a run's replay samples: its own, apart from the trainer's generator
    (seeded by the run seed) and from the evaluation's samples (seeded by the run seed too)."""
    return (seed + REPLAY_SEED_OFFSET) % 2**63


def replay_samples(sample: Callable[..., object], num: int, seed: int, batch_size: int,
                   progress: bool = False) -> torch.Tensor:
    """`num` samples of the input model before training (= the frozen model), drawn by the
    family's own sampler (`Backend.sample`: DDIM, 50 steps, as the evaluation draws), as uint8
    NCHW pixels like the remain images they stand beside."""
    images = np.asarray(sample(num, REPLAY_STEPS, REPLAY_SAMPLER, replay_seed(seed), batch_size, 0.0, progress))
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
