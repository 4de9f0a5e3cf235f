"""Evaluation during fine-tuning: chosen metrics at steps 0, N, 2N, …, last, and an early stop.

The paper follows forgetting over the optimiser steps (its Figure 4). Every evaluation draws its
samples from the same seeds (`--eval-seed`, never the step), so a curve compares model states, not
draws. Evaluating must not change the run: it happens on the main process only, in eval mode, with
torch's global random state forked, and the trainer's own generator is never touched, so a run
with `--eval-every` ends in exactly the weights of one without. The metrics themselves are
retrack.evaluate's (copies by the paper's L2 rule or a descriptor, FID in the configured features,
NLL, ...), measured on the model being trained; a text-to-image model is sampled through its own
pipeline under the run's prompt, and its samples compared with the training image(s).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from retrack.curves import curves
from retrack.metrics import registry
from retrack.validation import Check, Float, InvalidValue

EVAL_KIND = "eval"
CURVES_FILE = "eval_curves.png"
class StopAt(Check):
    """'copies=0': a forgetting metric and the value at which the run has forgotten enough."""

    def describe(self) -> str:
        return "METRIC=VALUE with METRIC one of " + ", ".join(registry.stop_metrics())

    def __call__(self, value: Any, name: str | None = None) -> tuple[str, float]:
        flag = name or "--stop-at"
        if isinstance(value, list | tuple) and len(value) == 2:
            metric, target = value
        elif isinstance(value, str) and value.count("=") == 1:
            metric, target = value.split("=")
        else:
            raise InvalidValue(f"{flag} must be {self.describe()} (e.g. copies=0), got {value!r}.")
        metric = str(metric).strip().lower()
        if metric not in registry.stop_metrics():
            raise InvalidValue(f"{flag}: {metric!r} is not a forgetting metric; stop at one of "
                               f"{', '.join(registry.stop_metrics())} (e.g. copies=0).")
        target = Float()(target, f"the value of {flag} {metric}")
        spec = registry.get(metric)
        if spec.stop == "below" and spec.lowest is not None and target < spec.lowest:
            raise InvalidValue(f"{flag} {metric}={target:g} is never met: {metric} is never below "
                               f"{spec.lowest:g}; give a value ≥ {spec.lowest:g} (e.g. {metric}={spec.lowest:g}).")
        return metric, target


def reached(stop_at: tuple[str, float], values: dict[str, float]) -> bool:
    """Similarity, copies and reconstruction similarity fall as a model forgets; the forget
    images' NLL rises."""
    metric, target = stop_at
    value = values[metric]
    return value <= target if registry.get(metric).stop == "below" else value >= target


@dataclass
class Monitor:
    """The trainer's between-steps hook: evaluates when due, keeps the entries, decides the stop.

    `measure()` returns {metric: its result dict} for the model as it is now (retrack.evaluate's
    `measure` on the training model); `module` is that model, put in eval mode meanwhile.
    """

    every: int
    last: int
    measure: Callable[[], dict[str, dict[str, Any]]]
    module: torch.nn.Module
    stop_at: tuple[str, float] | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)
    stopped_at: int | None = None

    def due(self, done: int) -> bool:
        return done % self.every == 0 or done == self.last

    def __call__(self, done: int, force: bool = False) -> bool:
        if not (force or self.due(done)):
            return False
        start = time.perf_counter()
        with evaluating(self.module):
            results = self.measure()
        values = {name: registry.get(name).value(r) for name, r in results.items()}
        details = {name: {k: v for k, v in r.items() if k != "settings"} for name, r in results.items()}
        self.entries.append({"step": done, "kind": EVAL_KIND, "eval": values,
                             "details": {**details, "seconds": round(time.perf_counter() - start, 3)}})
        if self.stop_at is not None and reached(self.stop_at, values):
            self.stopped_at = done
            return True
        return False


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and a forked global RNG (CPU and the module's GPU), both restored afterwards."""
    was = module.training
    device = next(module.parameters()).device
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=gpus):
            module.eval()
            yield
    finally:
        module.train(was)


def merge_log(train_log: list[dict[str, Any]], evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One log in step order; the evaluation after s steps comes before step s's loss entry (which
    is measured before that step's update), so both read "the model after s updates"."""
    keyed = [((e["step"], 0), e) for e in evals] + [((e["step"], 1), e) for e in train_log]
    return [e for _, e in sorted(keyed, key=lambda pair: pair[0])]


def draw_curves(evals: list[dict[str, Any]], stopped_at: int | None = None):
    """Metric-vs-step panels like the paper's Figure 4, in one row, as a PIL image."""
    names = list(evals[0]["eval"]) if evals else []
    steps = [e["step"] for e in evals]
    series = {registry.get(n).label: (steps, [e["eval"][n] for e in evals]) for n in names}
    return curves(series, ylabel=None, ncols=max(1, len(names)), xlabel="optimiser steps", stopped_at=stopped_at,
                  size=(3.6, 2.8), dpi=100)
