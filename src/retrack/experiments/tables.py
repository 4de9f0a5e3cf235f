"""The summary table, laid out like the paper's Tables 1–3: one row per label, mean ± sample std
over its runs (seeds, targets or both), in Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from retrack.experiments.metrics import Column
from retrack.runrecord import write_json, write_text


def summarise(results: dict[str, list[dict[str, Any]]], columns: list[Column]) -> list[dict[str, Any]]:
    """Mean and std (ddof 1; 0 for a single run) for each label, in the order given."""
    rows = []
    for label, runs in results.items():
        row: dict[str, Any] = {"method": label, "runs": len(runs)}
        for col in columns:
            values = [float(r[col.key]) for r in runs if r.get(col.key) is not None]
            if values:
                row[col.key] = float(np.mean(values))
                row[f"{col.key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                row[f"{col.key}_n"] = len(values)  # fewer than runs where the metric was undefined
        rows.append(row)
    return rows


def to_markdown(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    lines = ["| Method | " + " | ".join(c.title for c in columns) + " | runs |",
             "|---" * (len(columns) + 2) + "|"]
    for row in rows:
        cells = [_cell(row, c) for c in columns]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['runs']} |")
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, Any], c: Column) -> str:
    """mean ± std, saying over how many runs when the metric was undefined in some of them."""
    if c.key not in row:
        return "—"
    n = row.get(f"{c.key}_n", row["runs"])
    return f"{c.fmt(row[c.key])} ± {c.fmt(row[c.key + '_std'])}" + (f" ({n} of {row['runs']})" if n < row["runs"]
                                                                    else "")


def to_csv(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    keys = ["method", "runs"] + [f"{c.key}{s}" for c in columns for s in ("", "_std")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_summary(out: Path, results: dict[str, list[dict[str, Any]]], columns: list[Column]) -> str:
    rows = summarise(results, columns)
    md = to_markdown(rows, columns)
    write_text(out / "summary.md", md)
    write_text(out / "summary.csv", to_csv(rows, columns))
    write_json(out / "summary.json", rows)
    return md


