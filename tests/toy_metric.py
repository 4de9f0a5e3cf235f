"""A metric added as a new metric would be: one function and one `register_metric` line."""

from __future__ import annotations

from typing import Any

from retrack.metrics.registry import MetricSpec


def brightness(run: Any) -> dict[str, Any]:
    """The samples' mean pixel value in [0, 1]."""
    return {"mean": float(run.samples().mean() / 255.0), "settings": run.sample_settings()}


SPEC = MetricSpec("brightness", brightness, "mean", "mean brightness of the samples", stop="above")
