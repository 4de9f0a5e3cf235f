"""Run (or resume) an experiment's share of runs, and merge finished runs into one table.

A run is finished when its metrics.json exists and reads as a record (a damaged one leaves the run
pending, so it is run again); its fingerprint.json holds the hash of the
settings it was computed from. A finished run whose fingerprint no longer matches the config is
stale: it is refused (one sentence, nothing run) unless `force`, which reruns it. The table and
experiment.json are built only from runs whose fingerprints match the config they describe.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrack import api
from retrack.errors import UserError, require
from retrack.evaluate import companion_cache_path
from retrack.experiments.builtins import write_builtin_data
from retrack.experiments.changed import CHANGED_MD, changed_fractions, changed_markdown
from retrack.experiments.metrics import Column, RunContext, get_metric
from retrack.experiments.nearest import NEAREST_MD, NEAREST_PNG, REFERENCE_ROW, load_samples, nearest_outputs
from retrack.experiments.paired import PAIRED_FILE, check_paired, paired_table
from retrack.experiments.plan import PRETRAINED, RunSpec
from retrack.experiments.resolve import Resolved, digest_settings
from retrack.experiments.tables import write_summary
from retrack.experiments.tradeoff import TRADEOFF_FILE, axes_for, draw_tradeoff
from retrack.metrics.reference import scaled_l2_threshold
from retrack.runrecord import environment_record, write_bytes, write_json, write_text
from retrack.validation import default_device, load_json

FINISHED, FINGERPRINT = "metrics.json", "fingerprint.json"


@dataclass(frozen=True)
class Status:
    finished: list[RunSpec]
    stale: list[tuple[RunSpec, list[str]]]  # with the settings that changed
    pending: list[RunSpec]


def status(res: Resolved, runs: list[RunSpec]) -> Status:
    out = Path(res.cfg.out)
    finished, stale, pending = [], [], []
    for run in runs:
        folder = out / run.name
        if _read_record(folder, res) is None:
            pending.append(run)
            continue
        saved = _read_fingerprint(folder)
        if saved.get("fingerprint") == res.fingerprint(run) or _same_settings(saved.get("settings"),
                                                                               res.fingerprints[run.name]):
            finished.append(run)
        elif not saved:
            stale.append((run, ["no readable fingerprint.json (made by an older runner, or damaged)"]))
        else:
            stale.append((run, _changed(saved.get("settings"), res.fingerprints[run.name])))
    return Status(finished, stale, pending)


def refuse_stale(st: Status) -> None:
    if st.stale:
        run, changed = st.stale[0]
        what = ", ".join(changed[:4]) or "the fingerprint"
        raise UserError(f"{len(st.stale)} finished run(s) were computed with other settings than this "
                        f"config (first: {run.name}, changed: {what}); pass --force to rerun them.")


def run_share(res: Resolved, runs: list[RunSpec], force: bool = False, progress: bool = False,
              tag: str = "") -> list[str]:
    """Run every pending (and, with force, stale) run of `runs`; returns the names run."""
    st = status(res, runs)
    if not force:
        refuse_stale(st)
    redo = {r.name for r in st.pending} | {r.name for r, _ in st.stale}
    todo = [r for r in runs if r.name in redo]
    out = Path(res.cfg.out)
    data_path = _prepare(res, out) if todo else None
    for run in todo:
        print(f"run {run.name}{tag}", flush=True)
        execute(res, run, out / run.name, data_path, progress)
    return [r.name for r in todo]


def _prepare(res: Resolved, out: Path) -> str:
    """The data path every unlearn() call reads: the config's, or the built-in set written once."""
    out.mkdir(parents=True, exist_ok=True)
    if res.builtin is None:
        return res.cfg.data
    name = res.cfg.data.split(":", 1)[1]
    data_path, _ = write_builtin_data(res.builtin, out / "data", name)
    return str(data_path)


def execute(res: Resolved, run: RunSpec, folder: Path, data_path: str, progress: bool = False) -> dict[str, Any]:
    """Unlearn (unless the pretrained row), then measure; metrics.json is written last."""

    cfg = res.cfg
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted or stale run starts over
    folder.mkdir(parents=True)
    forget = res.targets[run.target]
    started = time.perf_counter()
    model = res.model
    if run.method is not None:
        model = str(folder / "model")
        api.unlearn(res.model, data_path, forget, model, progress=progress, method=run.method, seed=run.seed,
                cache_dir=str(Path(cfg.out) / "cache"), device=cfg.device, **run.settings)
    ctx = RunContext(model, res.data, forget, run.seed, cfg.sampling, cfg.metrics, res.reference_model,
                     cfg.device, folder, progress, sample_cache=str(Path(cfg.out) / "cache" / "samples"))
    values: dict[str, float] = {}
    details: dict[str, Any] = {}
    for name, settings in cfg.metrics.items():
        found, details[name] = get_metric(name).compute(ctx, settings)
        values.update(found)
    stopping = _stopping_of(folder / "model") if run.method is not None else None
    if not cfg.keep_models and run.method is not None:
        shutil.rmtree(folder / "model", ignore_errors=True)
    record = {**values, "method": run.label, "method_name": run.method, "seed": run.seed,
              "target": run.target, "hyper": run.settings, "fingerprint": res.fingerprint(run),
              "seconds": round(time.perf_counter() - started, 3), "details": details,
              **({"stopping": stopping} if stopping else {})}
    write_json(folder / FINGERPRINT, {"fingerprint": res.fingerprint(run), "settings": res.fingerprints[run.name]})
    write_json(folder / FINISHED, record)
    return record


def _stopping_of(model: Path) -> dict[str, Any] | None:
    """What a stop-when-forgotten rule did in the run (steps done, where it stopped, its checks),
    kept in the run's record since the model folder itself may be removed."""
    path = model / "retrack_run.json"
    return load_json(path, "the run record").get("stopping") if path.is_file() else None


def merge(res: Resolved, runs: list[RunSpec], partial: bool = False) -> str:
    """The one table from every finished run of `runs`; refuses if any of them is stale, and, unless
    `partial`, if any has not run (a shard never run would silently shrink the table)."""
    st = status(res, runs)
    refuse_stale(st)
    out = Path(res.cfg.out)
    require(bool(st.finished), f"no finished runs under {str(out)!r} yet; run the experiment first.")
    if st.pending and not partial:
        names = ", ".join(r.name for r in st.pending[:5]) + (", …" if len(st.pending) > 5 else "")
        raise UserError(f"{len(st.pending)} of {len(runs)} runs have not finished under {str(out)!r} ({names}); "
                        f"run their shards first, or pass --partial to build the table from the "
                        f"{len(st.finished)} finished runs.")
    done = {r.name for r in st.finished}
    results: dict[str, list[dict[str, Any]]] = {}
    records = {}
    for run in runs:
        results.setdefault(run.label, [])
        if run.name in done:
            records[run.name] = _read_record(out / run.name, res)
            results[run.label].append(records[run.name])
    results = {k: v for k, v in results.items() if v}
    md = write_summary(out, results, columns(res))
    _write_tradeoff(res, out, results)
    _write_paired(res, out, results)
    _write_sample_views(res, out, st.finished)
    write_json(out / "runs.json", records)
    write_json(out / "experiment.json", environment_record(
        res.cfg.as_dict(), complete=not st.pending, runs={r.name: res.fingerprint(r) for r in st.finished},
        missing=[r.name for r in st.pending]))
    return md


def _write_tradeoff(res: Resolved, out: Path, results: dict[str, list[dict[str, Any]]]) -> None:
    """tradeoff.png beside the table, when it has a quality and a forgetting column."""
    cols = columns(res)
    picked = axes_for(res.cfg.tradeoff, cols)
    if picked is not None:
        write_bytes(out / TRADEOFF_FILE, draw_tradeoff(results, cols, *picked))


def _write_paired(res: Resolved, out: Path, results: dict[str, list[dict[str, Any]]]) -> None:
    """paired.md beside the table, when the config asks for it and its base row has runs."""
    cols = columns(res)
    key = check_paired(res.cfg.paired, list(dict.fromkeys(r.label for r in res.runs)), cols)
    if key is not None and results.get(res.cfg.paired["base"]):
        write_text(out / PAIRED_FILE, paired_table(results, res.cfg.paired["base"],
                                                   next(c for c in cols if c.key == key)))


def _write_sample_views(res: Resolved, out: Path, finished: list[RunSpec]) -> None:
    """nearest.md and nearest.png from the samples the finished runs saved (first target only),
    with the reference model's samples from the sample cache where they are there; changed.md
    from the same samples against the pretrained row's."""

    target = res.runs[0].target
    samples: dict[str, dict[int, Any]] = {}
    shape = tuple(res.data.images.shape[1:])
    for run in (r for r in finished if r.target == target):
        images = load_samples(out / run.name / "samples.npz", shape)
        if images is not None:
            samples.setdefault(run.label, {})[run.seed] = images
    if not samples:
        return
    mine = next(r for r in finished if r.target == target)
    forgotten = res.data.images[res.fingerprints[mine.name]["forget"][0]]
    if res.reference_model is not None:
        for seed in sorted({r.seed for r in finished}):
            images = load_samples(_reference_cache(res, out, seed), shape)
            if images is not None:
                samples.setdefault(REFERENCE_ROW, {})[seed] = images
    md, png = nearest_outputs(samples, forgotten)
    write_text(out / NEAREST_MD, md)
    write_bytes(out / NEAREST_PNG, png)
    samples.pop(REFERENCE_ROW, None)
    changed = changed_fractions(samples, PRETRAINED, forgotten, _copy_threshold(res))
    if changed:
        write_text(out / CHANGED_MD, changed_markdown(changed, PRETRAINED))


def _copy_threshold(res: Resolved) -> float:
    """The experiment's L2 copy threshold (copies: settings), else the paper's 10 at 28×28."""

    copies = res.cfg.metrics.get("copies") or {}
    if copies.get("copy_rule", "l2") == "l2" and copies.get("copy_threshold") is not None:
        return float(copies["copy_threshold"])
    return scaled_l2_threshold(res.data.images.shape[1:])


def _reference_cache(res: Resolved, out: Path, seed: int) -> Path:
    """Where evaluate() kept the reference model's samples for this seed (see companion_samples)."""

    s = res.cfg.sampling
    device = default_device(res.cfg.device)
    settings = {"seed": seed, "num_samples": s["samples"], "steps": s["steps"], "sampler": s["sampler"]}
    return companion_cache_path(out / "cache" / "samples", res.reference_model, settings, s["batch_size"], device)


def columns(res: Resolved) -> list[Column]:
    cols: list[Column] = []
    for name, settings in res.cfg.metrics.items():
        cols += get_metric(name).columns(settings)
    return cols


def _read_fingerprint(folder: Path) -> dict[str, Any]:
    try:
        saved = load_json(folder / FINGERPRINT, "fingerprint")
    except UserError:
        return {}
    return saved if isinstance(saved, dict) else {}


def _read_record(folder: Path, res: Resolved) -> dict[str, Any] | None:
    """A finished run's metrics.json, or None where it is missing or damaged (not a mapping, a
    column that is not a number, no integer seed): such a run counts as not finished."""
    if not (folder / FINISHED).is_file():
        return None
    try:
        record = load_json(folder / FINISHED, "metrics")
    except UserError:
        return None
    if not isinstance(record, dict) or type(record.get("seed")) is not int \
            or not isinstance(record.get("details", {}), dict):
        return None
    for col in columns(res):
        value = record.get(col.key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return None
    return record


def _same_settings(old: Any, new: dict[str, Any]) -> bool:
    """Equal once unset (None) settings are dropped on both sides: a newer retrack that adds an
    optional setting, unset here, computes the same numbers, so finished runs stay finished."""
    return isinstance(old, dict) and digest_settings(_set_only(old)) == digest_settings(_set_only(new))


def _set_only(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _set_only(v) for k, v in value.items() if v is not None}
    return value


def _changed(old: Any, new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ, for the refusal message."""
    if not isinstance(old, dict):
        return [prefix or "everything"] if old != new else []
    keys = sorted(set(old) | set(new))
    found: list[str] = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _changed(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            found.append(f"{prefix}{k}")
    return found
