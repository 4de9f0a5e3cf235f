"""Read what runs, demos and experiments leave on disk, tolerating missing or older pieces.

Three kinds of folder: an unlearning run (`retrack unlearn --out`: retrack_run.json and
retrack_log.json beside the model), the demo's output (demo_run.json, metrics.json, PNGs, model/)
and an experiment (`retrack experiment`: experiment.json, summary.*, one folder per run holding
metrics.json, samples.npz and model/). Experiment runs are found wherever they sit below the
folder (label/seedN/, runs/..., or only a collected runs.json), so the report reads today's layout
and the ones that replace it; whatever is missing is reported as missing, never a crash.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrack.errors import UserError, require
from retrack.validation import load_json

RUN_RECORD, STEP_LOG, EVAL_LOG = "retrack_run.json", "retrack_log.json", "retrack_eval.json"
Kind = Literal["run", "demo", "experiment"]


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing, not valid JSON, too large or too deep."""

    if not Path(path).is_file():
        return None
    try:
        return load_json(path)
    except UserError:
        return None


_RECORD_SHAPES: dict[str, Any] = {"config": dict, "data": dict, "final_terms": dict, "objective": dict,
                                   "seed": int, "neighbours": list}


def _int_rows(value: Any) -> bool:
    return all(isinstance(row, list) and all(isinstance(i, int) and i >= 0 for i in row) for row in value)


def _checked_record(record: dict[str, Any]) -> dict[str, Any]:
    """A run record with every entry the report reads of the type it is written with; an entry of
    another type (a damaged or hand-edited file) is left out, and the page says it is missing."""
    kept = {k: v for k, v in record.items() if k not in _RECORD_SHAPES or
            (isinstance(v, _RECORD_SHAPES[k]) and not isinstance(v, bool))}
    if "neighbours" in kept and not _int_rows(kept["neighbours"]):
        del kept["neighbours"]
    data = kept.get("data")
    if isinstance(data, dict) and "forget_indices" in data and not _int_rows([data["forget_indices"]]):
        kept["data"] = {k: v for k, v in data.items() if k != "forget_indices"}
    return kept


def read_samples(path: Path) -> np.ndarray | None:
    """The uint8 (N, H, W, C) `images` of a samples .npz, or None when it is missing or damaged
    (not a zip, no such array, objects, another dtype or shape): the page then says it is missing."""

    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
            return None
        with loaded as f:
            images = f["images"] if "images" in f.files else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        return None
    return images


def _entries(value: Any) -> list[dict[str, Any]]:
    """The dict entries of a per-step log; anything else a damaged file holds is left out."""
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def recorded_inputs(folder: Path) -> list[Path]:
    """The local model and data folders a run, demo or experiment folder says it read: a report
    must not be written into them."""
    found = []
    for name in (RUN_RECORD, "demo_run.json", "experiment.json"):
        record = read_json(Path(folder) / name)
        config = record.get("config") if isinstance(record, dict) else None
        for key in ("model", "data", "reference_model"):
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, str) and value and Path(value).exists():
                found.append(Path(value))
    return found


def kind_of(path: Path) -> Kind:
    require(path.is_dir(), f"{str(path)!r} is not a folder.")
    if (path / RUN_RECORD).is_file():
        return "run"
    if (path / "demo_run.json").is_file():
        return "demo"
    markers = ("experiment.json", "summary.json", "summary.md", "runs.json")
    if any((path / m).is_file() for m in markers) or next(path.glob("**/metrics.json"), None):
        return "experiment"
    raise UserError(f"{str(path)!r} holds no {RUN_RECORD}, demo_run.json, summary.json or "
                    "metrics.json: not a run, demo or experiment folder.")


@dataclass
class RunFolder:
    """An unlearned model with its run record and per-step log."""

    path: Path
    record: dict[str, Any]
    log: list[dict[str, Any]]

    @classmethod
    def read(cls, path: Path) -> RunFolder | None:
        record = read_json(path / RUN_RECORD)
        if not isinstance(record, dict):
            return None
        entries = _entries(read_json(path / STEP_LOG)) + _entries(read_json(path / EVAL_LOG))
        return cls(path, _checked_record(record), entries)

    @property
    def config(self) -> dict[str, Any]:
        config = self.record.get("config")
        return config if isinstance(config, dict) else {}


def split_log(log: list[dict[str, Any]]) -> tuple[dict, dict]:
    """(training series, evaluation series), each name -> (steps, values).

    Evaluation entries are values under an `eval` mapping or keys starting with `eval/`; any
    other number in an entry is a training quantity (loss terms, grad_norm).
    """
    train: dict[str, tuple[list, list]] = {}
    evals: dict[str, tuple[list, list]] = {}
    for i, entry in enumerate(log):
        step = entry.get("step", i)
        evaluated = entry.get("eval")
        items = [(f"eval/{k}", v) for k, v in (evaluated.items() if isinstance(evaluated, dict) else [])]
        items += [(k, v) for k, v in entry.items() if k not in ("step", "eval")]
        for key, value in items:
            if isinstance(value, int | float) and not isinstance(value, bool):
                target = evals if key.startswith("eval/") else train
                name = key.removeprefix("eval/")
                target.setdefault(name, ([], []))
                target[name][0].append(step)
                target[name][1].append(float(value))
    return train, evals


@dataclass
class ExperimentRun:
    name: str  # where it lives, relative to the experiment folder
    label: str  # the table row it belongs to
    seed: int | None
    metrics: dict[str, Any]
    path: Path | None = None

    @property
    def target(self) -> str:
        """The forget set's name where an experiment has several ("" otherwise)."""
        target = self.metrics.get("target")
        return str(target) if target not in (None, "") else ""

    @property
    def samples(self) -> np.ndarray | None:
        if self.path is None or not (self.path / "samples.npz").is_file():
            return None
        return read_samples(self.path / "samples.npz")

    @property
    def model(self) -> RunFolder | None:
        if self.path is None:
            return None
        return RunFolder.read(self.path / "model") or RunFolder.read(self.path)


@dataclass
class Experiment:
    path: Path
    record: dict[str, Any]  # experiment.json: resolved config and provenance
    summary: list[dict[str, Any]]
    runs: list[ExperimentRun] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        config = self.record.get("config")
        return config if isinstance(config, dict) else {}


def _label_seed(name: str, metrics: dict[str, Any]) -> tuple[str, int | None]:
    """A run's row and seed: from its metrics where recorded, else from its path (label/seedN)."""
    parts = name.split("/")
    m = re.fullmatch(r"seed(\d+)", parts[-1])
    label = metrics.get("method") or metrics.get("label")
    if not isinstance(label, str):
        target = metrics.get("target")
        label_parts = parts[:-1] if m else parts
        if target and label_parts and label_parts[-1] == target:
            label_parts = label_parts[:-1]
        label = "/".join(label_parts) or name
    seed = metrics.get("seed")
    if not isinstance(seed, int):
        seed = int(m.group(1)) if m else None
    return label, seed


def read_experiment(path: Path) -> Experiment:
    record = read_json(path / "experiment.json")
    summary = read_json(path / "summary.json")
    runs = []
    for metrics_file in sorted(path.glob("**/metrics.json")):
        run_dir = metrics_file.parent
        metrics = read_json(metrics_file)
        if run_dir == path or not isinstance(metrics, dict):
            continue
        name = run_dir.relative_to(path).as_posix()
        runs.append(ExperimentRun(name, *_label_seed(name, metrics), metrics, run_dir))
    if not runs:  # a collected copy of the results (runs.json) without the run folders
        collected = read_json(path / "runs.json")
        for name, metrics in (collected or {}).items() if isinstance(collected, dict) else []:
            if isinstance(metrics, dict):
                runs.append(ExperimentRun(name, *_label_seed(name, metrics), metrics))
    return Experiment(path, record if isinstance(record, dict) else {},
                      summary if isinstance(summary, list) else [], runs)
