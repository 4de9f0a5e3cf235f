"""The metrics an experiment can name: a registry of name → (table columns, function).

Every metric of `retrack.evaluate` is registered on its own, so a metric added there (with its
settings added to EvaluateConfig) can be named in an experiment at once; those share one
`evaluate()` call per run, so samples are drawn once for copies, FID and IS. Anything else plugs
in with `register_metric`: its function receives the RunContext (the model under test, the data,
the forget spec, the seed, the sampling settings and the config's `reference_model`) and its
settings, and returns {column key: value} plus any details to keep in metrics.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrack.errors import UserError, require
from retrack.evaluate import EvaluateConfig, evaluate
from retrack.metrics import registry


def pct(v: float) -> str:
    return f"{100 * v:.4f}%"


def two(v: float) -> str:
    return f"{v:.2f}"


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: Callable[[float], str] = two


@dataclass(frozen=True)
class Metric:
    """columns(settings) → table columns; compute(ctx, settings) → ({key: value}, details)."""

    name: str
    columns: Callable[[dict[str, Any]], tuple[Column, ...]]
    compute: Callable[[RunContext, dict[str, Any]], tuple[dict[str, float], Any]]
    check: Callable[[dict[str, Any]], None] | None = None


_REGISTRY: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    _REGISTRY[metric.name] = metric
    return metric


def available() -> list[str]:
    _register_evaluate_metrics()
    return list(_REGISTRY)


def get_metric(name: str) -> Metric:
    _register_evaluate_metrics()
    require(name in _REGISTRY, f"metrics: unknown metric {name!r}; choose from {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def check_metric(name: str, settings: dict[str, Any]) -> None:
    metric = get_metric(name)
    if metric.check is not None:
        metric.check(settings)


@dataclass
class RunContext:
    """What a metric may look at for one run; the evaluate() call is made once and shared."""

    model: str
    data: Any  # retrack.data.ImageSet
    forget: str
    seed: int
    sampling: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    reference_model: str | None = None
    device: str | None = None
    run_dir: Path | None = None
    progress: bool = False
    sample_cache: str | None = None  # folder where the retrained model's samples are kept for every row
    _evaluation: dict[str, Any] | None = field(default=None, repr=False)

    def evaluation(self) -> dict[str, Any]:
        if self._evaluation is None:
            names = [n for n in self.metrics if n in evaluate_metric_names()]
            samples = self.run_dir / "samples.npz" if self.run_dir is not None else None
            self._evaluation = evaluate(self.model, self.data, self.forget, names, progress=self.progress,
                                        save_samples=samples, **evaluate_settings(self))
        return self._evaluation


def evaluate_metric_names() -> tuple[str, ...]:
    return registry.metric_names()


def evaluate_settings(ctx: RunContext) -> dict[str, Any]:
    """EvaluateConfig fields for the run: every evaluate metric's settings merged, the sampling
    settings and seed, and the reference model where EvaluateConfig takes one."""

    merged = merged_evaluate_settings(ctx.metrics)
    s = ctx.sampling
    merged.update(seed=ctx.seed, num_samples=s["samples"], steps=s["steps"], sampler=s["sampler"],
                  batch_size=s["batch_size"], device=ctx.device, sample_cache=ctx.sample_cache)
    if ctx.reference_model is not None and "reference_model" in EvaluateConfig.__dataclass_fields__:
        merged["reference_model"] = ctx.reference_model
    return merged


def merged_evaluate_settings(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One EvaluateConfig serves every evaluate metric, so two of them may not disagree."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    names = evaluate_metric_names()
    for name, settings in metrics.items():
        if name not in names:
            continue
        for key, value in settings.items():
            require(key not in merged or merged[key] == value,
                    f"metrics: {name} sets {key}={value!r} but {owner.get(key)} sets {key}={merged.get(key)!r}; "
                    "they share one evaluation, so make them agree.")
            merged[key], owner[key] = value, name
    return merged


# ---------------------------------------------------------------------------------------------
# The evaluate() metrics
# ---------------------------------------------------------------------------------------------

def _evaluate_columns(name: str) -> Callable[[dict[str, Any]], tuple[Column, ...]]:
    spec = registry.get(name)
    key, fmt = spec.column or name, pct if spec.percent else two

    def columns(settings: dict[str, Any]) -> tuple[Column, ...]:
        if spec.descriptor_title:  # named after its descriptor, so a pixel cosine is never "SSCD"
            d = settings.get("descriptor") or ("sscd" if settings.get("sscd") else "pixel_cosine")
            return (Column(key, f"{'SSCD' if d == 'sscd' else d} ↓", fmt),)
        return (Column(key, spec.title or name, fmt),)

    return columns


def _evaluate_compute(name: str):
    spec = registry.get(name)

    def compute(ctx: RunContext, settings: dict[str, Any]) -> tuple[dict[str, float], Any]:
        result = ctx.evaluation()[name]
        value = result.get(spec.headline)
        return ({spec.column or name: float(value)} if value is not None else {}), result

    return compute


def _evaluate_check(name: str):
    def check(settings: dict[str, Any]) -> None:
        allowed = [f for f in EvaluateConfig.__dataclass_fields__ if f not in _EVAL_PER_RUN]
        bad = [k for k in settings if k not in allowed]
        if bad:
            raise UserError(f"metrics: {name}: unknown key {bad[0]!r}; allowed: {', '.join(allowed)} "
                            "(samples, steps and sampler go under sampling:).")

    return check


_EVAL_PER_RUN = ("metrics", "seed", "num_samples", "steps", "sampler", "batch_size", "device",
                 "reference_model")


def _register_evaluate_metrics() -> None:
    for name in evaluate_metric_names():
        if name not in _REGISTRY:
            register_metric(Metric(name, _evaluate_columns(name), _evaluate_compute(name),
                                   _evaluate_check(name)))
