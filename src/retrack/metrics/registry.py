"""Every metric `retrack evaluate`, the evaluation during fine-tuning and `retrack experiment`
know, in one table: what it measures, what it needs, its one headline number and which way it
points.

A new metric is a function of the evaluation run (see metrics/measures.py) and one
`register_metric(MetricSpec(...))` line; evaluate's --metrics, the curves of --eval-every (when
it needs no second model), --stop-at (when it has a stop direction) and the experiment's table
columns all read it from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from retrack.errors import require
from retrack.metrics import measures

Direction = Literal["lower", "higher"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric.

    measure: run → its result dict (with "settings").
    headline: the key of the one number a curve plots and a table shows.
    better: which way a better model moves it (None: neither, e.g. a reference value).
    stop: which way the value moves as a model forgets, for --stop-at (None: not a stop metric).
    samples: it reads the samples drawn once per evaluation.
    companion: a second model it compares with ("reference": the retrained model, "pretrained":
        the model before unlearning); such metrics are not measured during fine-tuning.
    column, title, percent: its experiment table column (key, heading; both default to the name);
        descriptor_title: the heading names the descriptor its settings choose (SSCD, pixel_cosine).
    """

    name: str
    measure: Callable[[Any], dict[str, Any]]
    headline: str
    label: str
    better: Direction | None = None
    stop: Literal["below", "above"] | None = None
    samples: bool = True
    companion: Literal["reference", "pretrained"] | None = None
    column: str | None = None
    title: str | None = None
    percent: bool = False
    descriptor_title: bool = False
    remain: bool = False  # it reads the remain set (FID's real images)
    copies: bool = False  # it finds the copies of the targets among the samples (to count or set aside)
    lowest: float | None = None  # the least value the headline can take (a --stop-at below it is never met)

    def value(self, result: dict[str, Any]) -> float:
        """The headline number; NaN where it is undefined (FID when every sample is a copy)."""
        value = result[self.headline]
        return float("nan") if value is None else float(value)


_METRICS: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec) -> MetricSpec:
    _METRICS[spec.name] = spec
    return spec


def metric_names() -> tuple[str, ...]:
    return tuple(_METRICS)


def get(name: str) -> MetricSpec:
    require(name in _METRICS, f"unknown metric {name!r}; choose from {', '.join(_METRICS)}.")
    return _METRICS[name]


def during_training() -> tuple[str, ...]:
    """The metrics that need no second model, measurable on a model while it trains."""
    return tuple(n for n, s in _METRICS.items() if s.companion is None)


def finds_copies(names: tuple[str, ...]) -> bool:
    """Whether any of these metrics applies the copy rule (and so needs its threshold)."""
    return any(get(n).copies for n in names)


def stop_metrics() -> dict[str, str]:
    return {n: s.stop for n, s in _METRICS.items() if s.stop is not None}


for _spec in (
    MetricSpec("nll", measures.nll, "mean", "NLL of forget images (bits/dim)", "higher", "above", samples=False,
               title="NLL ↑"),
    MetricSpec("reconstruction", measures.reconstruction, "mean", "reconstruction similarity", "lower", "below",
               samples=False, descriptor_title=True),
    MetricSpec("similarity", measures.similarity, "mean", "similarity of samples to the target", "lower", "below",
               title="similarity"),
    MetricSpec("copies", measures.copies, "fraction", "copies (fraction of samples)", "lower", "below",
               column="frequency", title="Frequency ↓", percent=True, copies=True, lowest=0.0),
    MetricSpec("fid", measures.fid, "value", "FID", "lower", title="FID ↓", remain=True, copies=True),
    MetricSpec("is", measures.inception, "mean", "Inception score", "higher", title="IS ↑", copies=True),
    MetricSpec("clipiqa", measures.clipiqa, "mean", "CLIP-IQA", "higher", title="CLIP-IQA ↑"),
    MetricSpec("fid_reference", measures.fid_reference, "value", "FID to the retrained model", "lower",
               companion="reference", title="FID to retrained ↓"),
    MetricSpec("nll_reference", measures.nll_reference, "mean", "NLL under the retrained model", samples=False,
               companion="reference", title="NLL retrained"),
    MetricSpec("membership_loss", measures.membership_score("loss"), "mean",
               "denoising loss of forget images (membership)", "higher", "above", samples=False, title="MI loss ↑"),
    MetricSpec("membership_secmi", measures.membership_score("secmi"), "mean",
               "SecMI t-error of forget images (membership)", "higher", "above", samples=False, title="MI SecMI ↑"),
    MetricSpec("membership_pia", measures.membership_score("pia"), "mean",
               "PIA score of forget images (membership)", "higher", "above", samples=False, title="MI PIA ↑"),
    MetricSpec("changed", measures.changed, "value", "samples visibly changed", "lower", companion="pretrained",
               title="Changed ↓", percent=True, copies=True),
):
    register_metric(_spec)


# ---------------------------------------------------------------------------------------------
# Instruments named on the command line (--fid-features mnist, --classifier mnist)
# ---------------------------------------------------------------------------------------------

# name → "module:function" returning the module for ("features" | "logits", device); resolved on
# use, so evaluation never imports a recipe it is not asked for.
_INSTRUMENTS: dict[str, str] = {"mnist": "retrack.recipes.mnist_tshirt.classifier:instrument"}


def register_instrument(name: str, target: str) -> None:
    _INSTRUMENTS[name] = target


def instrument_names() -> tuple[str, ...]:
    return tuple(_INSTRUMENTS)


def load_instrument(name: str, kind: Literal["features", "logits"], device: str) -> Any:
    module, function = _INSTRUMENTS[name].split(":")
    return getattr(importlib.import_module(module), function)(kind, device)
