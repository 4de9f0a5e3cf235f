"""Command-line flags generated from a command's settings dataclass.

A setting is declared once, as a field with `option(check, default, help=...)`: its flag, default
and help here, its config key and Python keyword in `Validated.from_settings`, its check on
creation. A command adds only what is not a setting of its run (`--quiet`, its output file).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from retrack.validation import Bool, flag_of, ordered_fields, setting_fields, setting_key


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
              skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """One flag per setting of `cls` (a nested group becomes an argument group), except `skip`.

    Returns {dest: default}: argparse stores that very object when a flag is left out, so
    `given_settings` can tell a typed value (always a new string) from an untouched default.
    """
    defaults: dict[str, Any] = {}
    for f in ordered_fields(cls):
        inner = f.metadata.get("nested")
        if inner is not None:
            group = parser.add_argument_group(f.metadata["title"], f.metadata["help"])
            defaults.update(add_flags(group, inner, skip))
        elif setting_key(f) not in skip:
            defaults.update(_add_field(parser, f))
    return defaults


def _add_field(parser: argparse.ArgumentParser | argparse._ArgumentGroup, f: dataclasses.Field) -> dict[str, Any]:
    flags = flag_of(f).split("/")
    split = len(flags) > 1  # '--beta1/--beta2': one flag per element of a pair
    helps = f.metadata["help"] if split else (f.metadata["help"],)
    values = f.default if split else (f.default,)
    added = {}
    for flag, text, default in zip(flags, helps, values, strict=True):
        dest = flag.lstrip("-").replace("-", "_")
        if f.default is dataclasses.MISSING:
            parser.add_argument(flag, dest=dest, required=True, help=text)
            continue
        if isinstance(f.metadata["check"], Bool) and default is False:
            parser.add_argument(flag, dest=dest, action="store_true", help=text)
        else:
            if isinstance(default, tuple):  # shown and parsed as typed: 'nll,copies'
                default = ",".join(map(str, default))
            parser.add_argument(flag, dest=dest, default=default, help=text)
        added[dest] = default
    return added


def given_settings(cls: type, args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """The settings the user typed on the command line, by key (a split flag's pair when either
    part was typed): what overrides a recipe, while untyped settings keep the recipe's values."""
    given = {}
    for key, (_, f) in setting_fields(cls).items():
        dests = [flag.lstrip("-").replace("-", "_") for flag in flag_of(f).split("/")]
        if not all(hasattr(args, d) for d in dests):
            continue
        typed = [d not in defaults or getattr(args, d) is not defaults[d] for d in dests]
        if any(typed):
            values = tuple(getattr(args, d) for d in dests)
            given[key] = values if len(dests) > 1 else values[0]
    return given
