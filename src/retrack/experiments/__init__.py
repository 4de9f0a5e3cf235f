"""Experiments as data: one YAML names the model, data, targets, methods, seeds, metrics and
sampling; one runner plans the runs, checks everything first, runs its share and merges.

    config.py       YAML schema, --set overrides, unknown keys at every depth
    builtins.py     `builtin:NAME` models and data (the MNIST planted-image models and their sets)
    plan.py         the ordered runs (label × target × seed), --methods, --shard
    resolve.py      model/data/targets/weights/settings checked; each run's fingerprint
    metrics.py      metric registry (every evaluate() metric, plus register_metric)
    runner.py       run a share, stale-run refusal, merge into one table
    tables.py       Markdown/CSV/JSON summary (mean ± std over seeds and targets)
    distributed.py  runs spread over the processes of `accelerate launch`
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from retrack.experiments import distributed
from retrack.experiments.config import ExperimentConfig, MethodSpec, Targets, load_config, parse_ints
from retrack.experiments.metrics import Column, Metric, RunContext, register_metric
from retrack.experiments.plan import RunSpec, parse_shard, plan, select, shard
from retrack.experiments.resolve import Resolved, resolve
from retrack.experiments.runner import merge, refuse_stale, run_share, status

__all__ = ["Column", "ExperimentConfig", "Metric", "MethodSpec", "Outcome", "Resolved", "RunContext",
           "RunSpec", "Targets", "load_config", "merge", "parse_ints", "parse_shard", "plan",
           "register_metric", "resolve", "run_experiment", "run_share", "select", "shard", "status"]


@dataclass(frozen=True)
class Outcome:
    planned: list[str]  # every run of the (selected) plan
    share: list[str]  # the runs of this shard
    ran: list[str]  # the runs executed now
    table: str | None  # the merged Markdown table, when this call wrote it


def run_experiment(cfg: ExperimentConfig, methods: list[str] | None = None, shard_of: tuple[int, int] = (1, 1),
                   force: bool = False, only_merge: bool = False, dry_run: bool = False,
                   progress: bool = False, processes=None, partial: bool = False) -> Outcome:
    """Check everything, run this shard's share (its own share per launched process), merge.

    The table is written when the whole plan ran in this call (no --shard), or on `only_merge`.
    """

    procs = processes or distributed.launched()
    distributed.detach(procs)  # before anything reads the launch: each run trains in one process
    try:
        return _run(cfg, methods, shard_of, force, only_merge, dry_run, progress, procs, partial)
    finally:
        distributed.finish(procs)


def _run(cfg, methods, shard_of, force, only_merge, dry_run, progress, procs, partial=False) -> Outcome:
    res = resolve(cfg)
    runs = select(res.runs, methods)
    i, n = shard_of
    share = shard(runs, (i - 1) * procs.world + procs.rank + 1, n * procs.world)
    names = [r.name for r in runs]
    if only_merge:
        return Outcome(names, [], [], merge(res, runs, partial) if procs.is_main else None)
    if dry_run:
        if not force:
            refuse_stale(status(res, share))
        return Outcome(names, [r.name for r in share], [], None)
    tag = f" [process {procs.rank + 1}/{procs.world}]" if procs.world > 1 else ""
    ran = run_share(res, share, force=force, progress=progress, tag=tag)
    distributed.barrier(procs)
    table = merge(res, runs) if n == 1 and procs.is_main else None
    return Outcome(names, [r.name for r in share], ran, table)


def with_overrides(cfg: ExperimentConfig, **changes) -> ExperimentConfig:
    """The config with top-level fields replaced (the CLI's --seeds, --samples, --out)."""
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
