"""Unlearning objectives behind a small registry: a new method is one new module here.

Each module defines one class with a `name` and decorates it with `@register`; `build(name, **hp)`
constructs it from the hyperparameters it declares.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from retrack.errors import require
from retrack.objectives.base import Objective

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def method_class(name: str) -> type:
    _discover()
    require(name in _REGISTRY, f"unknown method {name!r}; choose one of {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def build(name: str, **hyperparameters: Any) -> Objective:
    """Construct method `name`, passing only the hyperparameters it declares (λ, s, η, ...)."""
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hyperparameters.items() if k in fields and v is not None})
