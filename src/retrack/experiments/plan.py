"""The runs of an experiment, in a fixed order, and the deterministic share of each shard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retrack.errors import require
from retrack.experiments.config import ExperimentConfig, MethodSpec

PRETRAINED = "pretrained"  # the label of the rows that measure the model before unlearning


@dataclass(frozen=True)
class RunSpec:
    """One cell entry of the table: a row label under one target and one seed."""

    label: str
    method: str | None  # None: the pretrained model itself
    seed: int
    target: str  # folder name of the forget set; "" when the experiment has one
    settings: dict[str, Any] = field(default_factory=dict)  # unlearn options (train + method)

    @property
    def name(self) -> str:
        return "/".join(p for p in (self.label, self.target, f"seed{self.seed}") if p)


def plan(cfg: ExperimentConfig) -> list[RunSpec]:
    """Pretrained rows, then every method, then the ablations; each label × target × seed."""
    rows: list[tuple[MethodSpec | None, tuple[int, ...]]] = []
    if cfg.pretrained:
        rows.append((None, cfg.seeds))
    rows += [(m, cfg.seeds) for m in cfg.methods]
    rows += [(m, cfg.ablation_seeds or cfg.seeds) for m in cfg.ablations]
    runs = []
    for m, seeds in rows:
        for target in cfg.targets.names:
            for seed in seeds:
                if m is None:
                    runs.append(RunSpec(PRETRAINED, None, seed, target))
                else:
                    runs.append(RunSpec(m.label, m.method, seed, target, {**cfg.train, **m.settings}))
    return runs


def select(runs: list[RunSpec], wanted: list[str] | None) -> list[RunSpec]:
    """Keep the rows named (the pretrained row always stays).

    A name that is a row's label picks that row alone, so `retrack` means the plain row even when
    `retrack surgery` also uses the method; a name that labels no row picks every row of that method.
    """
    if not wanted:
        return runs
    labels = {r.label for r in runs}
    methods = {r.method for r in runs if r.method}
    bad = [w for w in wanted if w not in labels and w not in methods]
    require(not bad, f"--methods: {bad[0]!r} is neither a row label nor a method of this config; "
                     f"choose from {', '.join(sorted(labels | methods))}." if bad else "")
    by_method = {w for w in wanted if w not in labels}
    return [r for r in runs if r.method is None or r.label in wanted or r.method in by_method]


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' with 1 ≤ i ≤ n: this process runs the i-th of n shares."""
    i, sep, n = text.partition("/")
    ok = sep and i.isascii() and i.isdigit() and n.isascii() and n.isdigit()
    require(bool(ok), f"--shard must look like 1/4 (this shard / number of shards), got {text!r}.")
    i_, n_ = int(i), int(n)
    require(n_ >= 1 and 1 <= i_ <= n_, f"--shard {text}: the shard must be between 1 and {n_}.")
    return i_, n_


def shard(runs: list[RunSpec], i: int, n: int) -> list[RunSpec]:
    """Round-robin: run j goes to shard j mod n + 1, so cheap and costly rows spread evenly and
    the n shares partition the plan whatever the machine."""
    return [r for j, r in enumerate(runs) if j % n == i - 1]
