"""The timing both step benches share: a ReTrack gradient, one forward+backward of the same
model on its 2B rows, and the whole step (gradient, clip, AdamW), interleaved, median of repeats."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_gradient_step(model, objective, data, batch: int, sample_shape: tuple[int, ...],
                       opt: torch.optim.Optimizer, device: str, repeats: int) -> dict[str, float]:
    """Median seconds of "gradient", "forward+backward" and "step"; the first round is warm-up."""
    from accelerate import Accelerator

    from retrack.trainer import batch_gradient, draw_batch

    accelerator = Accelerator(cpu=(device == "cpu"))
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, *sample_shape, device=device)
    t = torch.randint(0, 1000, (2 * batch,), device=device)

    def gradient() -> None:
        prepared = objective.prepare(draw_batch(objective, data, batch, gen, device), model.schedule, gen)
        batch_gradient(model, objective, prepared, 1, params, accelerator)

    def step() -> None:
        gradient()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def plain() -> None:
        (model(x, t) - x).pow(2).flatten(1).sum(1).mean().backward()

    runs = {"gradient": gradient, "forward+backward": plain, "step": step}
    return median_seconds(runs, repeats, device, before=lambda: opt.zero_grad(set_to_none=True))


def median_seconds(runs: dict[str, Callable[[], None]], repeats: int, device: str,
                   before: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds of each function, run interleaved (so drift in the machine's load hits all
    alike) `repeats` times after one warm-up round; `before` runs untimed ahead of each call."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats + 1):
        for name, fn in runs.items():
            if before is not None:
                before()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}
