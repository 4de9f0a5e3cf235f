"""Every row against one base row, run by run: the comparison that seed-to-seed spread hides.

Runs of two rows with the same seed and target share the unlearning data order, the timesteps,
the noise and the sampling seeds; only the method differs. Their difference is therefore paired,
and far less noisy than the difference of two means: on the shipped model one seed doubles the
cost of every ReTrack row with the paper's weighting, which inflates each row's std without saying which row is better.
`paired: {base: retrack, column: fid_reference}` writes paired.md: each row's value per seed (and
target), its change from the base row's value on the same run, on how many of them it is better,
and its copies in total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from retrack.errors import require
from retrack.experiments.metrics import Column

PAIRED_FILE = "paired.md"
PAIRED_KEYS = ("base", "column")
COLUMN_PREFERENCE = ("fid_reference", "fid")


def parse_paired(value: Any) -> dict[str, str]:
    """`paired: {base: LABEL, column: KEY}` from the config, checked for shape only."""
    if value is None:
        return {}
    require(isinstance(value, dict), "paired: must be a mapping like {base: retrack, column: fid_reference}.")
    bad = [k for k in value if k not in PAIRED_KEYS]
    require(not bad, f"paired: unknown key {bad[0]!r}; allowed: base, column." if bad else "")
    require(isinstance(value.get("base"), str), "paired.base must be the label of a row under methods:.")
    require(isinstance(value.get("column", ""), str), "paired.column must be one column key, e.g. fid_reference.")
    return {k: value[k] for k in PAIRED_KEYS if k in value}


def check_paired(spec: Mapping[str, str], labels: Sequence[str], columns: Sequence[Column]) -> str | None:
    """The column to compare on, or None when nothing is asked; a base or column the experiment
    lacks is refused before the first run."""
    if not spec:
        return None
    require(spec["base"] in labels,
            f"paired.base {spec['base']!r} is not a row label; rows: {', '.join(labels)}.")
    keys = [c.key for c in columns]
    column = spec.get("column") or next((k for k in COLUMN_PREFERENCE if k in keys), None)
    require(column in keys, f"paired.column {column!r} is not a column of this experiment; columns: "
                            f"{', '.join(keys)}.")
    return column


def lower_is_better(column: Column) -> bool:
    """The table's titles carry the direction (FID ↓, NLL ↑); a column without one counts as ↓."""
    return "↑" not in column.title


def _run_key(run: Mapping[str, Any]) -> tuple[str, int]:
    return str(run.get("target", "")), int(run["seed"])


def _copies(runs: Sequence[Mapping[str, Any]]) -> str:
    found = [r.get("details", {}).get("copies") for r in runs]
    if not found or any(not isinstance(c, dict) or "count" not in c for c in found):
        return "–"
    return f"{sum(c['count'] for c in found)}/{sum(c['num_samples'] for c in found)}"


def paired_table(results: Mapping[str, Sequence[Mapping[str, Any]]], base: str, column: Column,
                 skip: Sequence[str] = ("pretrained",)) -> str:
    """Markdown: one line per row (the base first), one cell per (target, seed) the base has."""
    key, lower = column.key, lower_is_better(column)
    ref = {_run_key(r): r[key] for r in results[base] if r.get(key) is not None}
    runs = sorted(ref)
    several_targets = len({t for t, _ in runs}) > 1
    heads = [f"{t}, seed {s}" if several_targets else f"seed {s}" for t, s in runs]
    lines = [f"| row ({column.title}) | " + " | ".join(heads) + " | better than " + base + " | copies |",
             "|---" * (len(heads) + 3) + "|"]
    for label in [base, *[lb for lb in results if lb not in (base, *skip)]]:
        mine = {_run_key(r): r[key] for r in results[label] if r.get(key) is not None}
        cells, wins, pairs = [], 0, 0
        for run in runs:
            if run not in mine:
                cells.append("–")
            elif label == base:
                cells.append(column.fmt(mine[run]))
            else:
                change = (mine[run] / ref[run] - 1) * 100 if ref[run] else float("nan")
                cells.append(f"{column.fmt(mine[run])} ({change:+.0f}%)")
                pairs += 1
                wins += (mine[run] < ref[run]) if lower else (mine[run] > ref[run])
        better = "" if label == base else f"{wins} of {pairs}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {better} | {_copies(results[label])} |")
    return "\n".join(lines) + "\n"
