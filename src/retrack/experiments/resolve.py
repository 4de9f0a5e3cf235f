"""Everything checked before the first run: model, data, targets, weight files, every run's
settings; then each run's fingerprint, the hash of what it will be computed from.

Nothing is written and no model weights are loaded here (only configs and the data), so a bad
config ends in one sentence within seconds and finished runs stay as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import try_to_load_from_cache

from retrack.data import ImageSet, load_images, parse_forget, split
from retrack.errors import UserError, require
from retrack.evaluate import EvaluateConfig, resolved
from retrack.experiments.builtins import BuiltinData, builtin_data, builtin_model
from retrack.experiments.config import BUILTIN, PER_RUN, ExperimentConfig
from retrack.experiments.metrics import evaluate_metric_names, get_metric, merged_evaluate_settings
from retrack.experiments.paired import check_paired
from retrack.experiments.plan import RunSpec, plan
from retrack.experiments.tradeoff import axes_for
from retrack.runrecord import tree_sha256
from retrack.unlearn_config import UnlearnSettings, resolve_method
from retrack.validation import check_overlap, load_json

FINGERPRINT_VERSION = 1
# Evaluate settings that name a weight file unless they hold one of these built-in names.
WEIGHT_SETTINGS = {"sscd": (), "inception": (), "clip": (), "classifier": ("mnist",),
                   "fid_features": ("mnist",), "descriptor": ("sscd", "ssim", "pixel_cosine")}


@dataclass
class Resolved:
    """The checked experiment: what every run will read, and every run with its fingerprint."""

    cfg: ExperimentConfig
    model: str
    data: ImageSet
    builtin: BuiltinData | None
    targets: dict[str, str]  # target name → forget spec
    runs: list[RunSpec]
    fingerprints: dict[str, dict[str, Any]]  # run name → resolved settings (hashed below)
    reference_model: str | None = None

    def fingerprint(self, run: RunSpec) -> str:
        return digest_settings(self.fingerprints[run.name])


def digest_settings(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def resolve(cfg: ExperimentConfig) -> Resolved:
    model, model_id = _model(cfg.model, "model")
    reference = _model(cfg.reference_model, "reference_model") if cfg.reference_model else (None, None)
    images, built = _data(cfg.data)
    inputs = [p for p in (model, reference[0], cfg.data) if p is not None and Path(p).exists()]
    check_overlap(cfg.out, inputs, "--out")  # before any run writes into a model it reads
    _check_shape(model, images)
    forget = _forget_sets(cfg, images, built)
    runs = plan(cfg)
    unlearn = {r.label: _unlearn_settings(r, cfg) for r in runs if r.method is not None}
    metrics = _metric_settings(cfg)
    _check_tradeoff(cfg)
    _check_paired(cfg, runs)
    common = {"version": FINGERPRINT_VERSION, "model": model_id, "data": images.digest(),
              "metrics": metrics, "sampling": cfg.sampling, "reference_model": reference[1]}
    fingerprints = {r.name: {**common, "forget": forget[r.target][1], "seed": r.seed,
                             "method": r.method, "unlearn": unlearn.get(r.label)} for r in runs}
    targets = {name: spec for name, (spec, _) in forget.items()}
    return Resolved(cfg, model, images, built, targets, runs, fingerprints, reference[0])


# ---------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------


def _model(spec: str, key: str) -> tuple[str, str]:
    """(what to load, its identity): a built-in, a local folder (identity: digest of its files)
    or a hub id (identity: the id; it is downloaded when the first run loads it)."""
    if spec.startswith(BUILTIN):
        spec = builtin_model(spec[len(BUILTIN):])
    p = Path(spec).expanduser()
    if p.exists() or _looks_local(spec):
        require(p.is_dir(), f"{key}: {spec!r} does not exist or is not a model folder.")
        return str(p), "sha256:" + tree_sha256(p)
    _check_hub_id(spec, key)
    return spec, "hub:" + spec


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") != 1


def _check_hub_id(repo: str, key: str) -> None:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline:
        return

    for name in ("model_index.json", "config.json"):
        if isinstance(try_to_load_from_cache(repo, name), str):
            return
    raise UserError(f"{key}: {repo!r} is a hub id that is not in the local cache and HF_HUB_OFFLINE "
                    "is set; give a local folder (or --set {key}=PATH) instead.")


def _data(spec: str) -> tuple[ImageSet, BuiltinData | None]:
    if spec.startswith(BUILTIN):
        built = builtin_data(spec[len(BUILTIN):])
        return built.images, built
    require(Path(spec).exists(), f"data: {spec!r} does not exist.")
    return load_images(spec), None


def _check_shape(model: str, images: ImageSet) -> None:
    """Compare the data with the UNet's config.json where one is on disk (a hub model is checked
    when its run loads it)."""
    for cfg_path in (Path(model) / "unet" / "config.json", Path(model) / "config.json"):
        if cfg_path.is_file():
            try:
                cfg = load_json(cfg_path, "model:")
                size = cfg["sample_size"]
                h, w = (size, size) if isinstance(size, int) else tuple(size)
                want = (int(cfg["in_channels"]), int(h), int(w))
            except (ValueError, KeyError, TypeError, OverflowError, IndexError):
                raise UserError(f"model: {str(cfg_path)!r} is not a UNet config.") from None
            require(want == images.shape, f"data: its images are {'×'.join(map(str, images.shape))} "
                                          f"(C×H×W) but the model takes {'×'.join(map(str, want))}.")
            return


def _forget_sets(cfg: ExperimentConfig, images: ImageSet,
                 built: BuiltinData | None) -> dict[str, tuple[str, list[int]]]:
    """target name → (forget spec for unlearn(), sorted indices), each checked against the data."""
    found = {}
    for name, spec in zip(cfg.targets.names, cfg.targets.specs, strict=True):
        if cfg.targets.builtin:
            require(built is not None, "targets: builtin needs built-in data.")
            indices = np.asarray(built.forget)
            spec = ",".join(str(int(i)) for i in indices)
        else:
            try:
                indices = parse_forget(spec, images)
            except UserError as e:
                raise UserError(f"targets: {e}") from None
        split(images, indices)
        found[name] = (spec, [int(i) for i in indices])
    return found


# ---------------------------------------------------------------------------------------------
# Settings of every run, resolved as the API will resolve them
# ---------------------------------------------------------------------------------------------


# The settings a fingerprint has always held, at any value. A setting added later enters a run's
# fingerprint only where it differs from its default (which leaves the run as it was before the
# setting existed), so finished runs stay valid when an option is added.
ALWAYS_FINGERPRINTED = (
    "steps", "batch_size", "grad_accum", "lr", "weight_decay", "betas", "clip", "k", "lam", "lam_ratio", "surgery",
    "forget_weighting", "snr_gamma", "forget_t_min", "s", "eta", "prompt", "lora", "lora_alpha",
    "gradient_checkpointing", "mixed_precision", "recipe", "eval_every", "eval_metrics", "eval_samples", "eval_steps",
    "eval_seed", "eval_guidance", "eval_target", "stop_at", "copy_rule", "copy_threshold", "descriptor", "sscd",
    "fid_features", "inception", "classifier", "eval_clip")


def _unlearn_settings(run: RunSpec, cfg: ExperimentConfig) -> dict[str, Any]:
    """The run's unlearn options with every default filled in, checked by the API's own rules."""

    try:
        full = resolve_method(UnlearnSettings.from_settings({"method": run.method, "seed": run.seed, **run.settings}),
                              processes=1)
    except UserError as e:
        raise UserError(f"methods: {run.label}: {_as_keys(str(e))}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"methods: {run.label}: a setting has the wrong type ({e}).") from None
    defaults = UnlearnSettings().settings()
    out = {k: v for k, v in full.settings().items()
           if k not in PER_RUN and (k in ALWAYS_FINGERPRINTED or v != defaults[k])}
    return {"method": full.method, **out}


def _as_keys(message: str) -> str:
    """The API names its settings by flag (--grad-accum); a config names them by key."""
    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)


def _check_tradeoff(cfg: ExperimentConfig) -> None:
    """The plot's axes must be columns of the table, checked before the first run."""

    axes_for(cfg.tradeoff, [c for name, st in cfg.metrics.items() for c in get_metric(name).columns(st)])


def _check_paired(cfg: ExperimentConfig, runs: list[RunSpec]) -> None:
    """paired.md's base row and column must exist, checked before the first run."""

    labels = list(dict.fromkeys(r.label for r in runs))
    check_paired(cfg.paired, labels, [c for name, st in cfg.metrics.items() for c in get_metric(name).columns(st)])


def _metric_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """The metrics with their settings resolved as evaluate() will (defaults filled, weight files
    checked), so a changed default or weight file changes the fingerprint too."""

    names = tuple(n for n in cfg.metrics if n in evaluate_metric_names())
    merged = merged_evaluate_settings(cfg.metrics)
    for key, value in merged.items():
        if key in WEIGHT_SETTINGS and isinstance(value, str) and value not in WEIGHT_SETTINGS[key]:
            require(Path(value).exists(), f"metrics: {key} file {value!r} does not exist.")
    s = cfg.sampling
    out: dict[str, Any] = {"names": list(cfg.metrics), "settings": cfg.metrics}
    if cfg.reference_model is not None:
        merged["reference_model"] = cfg.reference_model  # checked here as each run will pass it
    if names:
        try:
            full = resolved(EvaluateConfig(metrics=names, num_samples=s["samples"], steps=s["steps"],
                                           sampler=s["sampler"], batch_size=s["batch_size"],
                                           device="cpu", **merged))
        except UserError as e:
            raise UserError(f"metrics: {_as_keys(str(e))}") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"metrics: a setting has the wrong type ({e}).") from None
        out["evaluate"] = {k: v for k, v in asdict(full).items() if k not in ("device", "seed", "sample_cache")}
        for key in WEIGHT_SETTINGS:
            value = out["evaluate"].get(key)
            if isinstance(value, str) and Path(value).is_file():
                out["evaluate"][key] = {"path": value, "sha256": _file_digest(Path(value))}
    return out


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
