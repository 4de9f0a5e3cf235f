"""One parser for every flag, Python argument and config key: types, ranges, choices, paths.

A bad value must cost a second, not an hour, so every command resolves its whole configuration
through these checks before it loads a model or touches data. Each check is a small frozen object
that turns a raw value (a flag's string, a YAML scalar, a Python argument) into the typed value,
or raises `InvalidValue`: one sentence naming the value, what is allowed and the flag that fixes
it. The same objects serve three places:

- argparse: ``p.add_argument("--steps", type=Int(min=1), default=50)``; argparse prefixes the
  message with the flag (``argument --steps: must be an integer ≥ 1, got '0'``);
- a command's frozen config dataclass: ``steps: int = option(Int(min=1), 50)``, checked in
  `__post_init__` by `Validated`, so the Python API gets the same checks as the CLI;
- a YAML section: ``Config.from_mapping(raw, where="train: of x.yaml")`` also names unknown keys
  (with the closest known one).

Strings are parsed strictly: ASCII digits only (Python's int() accepts '٣' and '1_0'), finite
floats only, no bools where numbers are wanted.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import numbers
import os
import re
import reprlib
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from retrack.errors import UserError
from retrack.outputs import lock_output, release_output

MIN_FREE_BYTES = 1 << 20  # an output needs at least this much room on its disk
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
MAX_LIST = 100_000
_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)
_RANGE = re.compile(r"([0-9]+)\s*-\s*([0-9]+)", re.ASCII)


class InvalidValue(UserError, argparse.ArgumentTypeError):
    """A value outside what a flag or key allows; argparse and the CLI both print it as one line."""


def _fail(name: str | None, allowed: str, value: Any) -> InvalidValue:
    shown = excerpt(value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value)
    subject = f"{name} must be" if name else "must be"
    return InvalidValue(f"{subject} {allowed}, got {shown}.")


def _num(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _bounds(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '≥'} {_num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '≤'} {_num(hi)}"
    return ""


def parse_int_text(text: str) -> int | None:
    """The int of an ASCII decimal string ('  -3 ', '+7'), else None: never raises."""
    text = text.strip()
    return int(text) if _INT.fullmatch(text) else None


class Check:
    """Base of every check: `check(value, name)` returns the parsed value or raises InvalidValue."""

    def __call__(self, value: Any, name: str | None = None) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Check):
    """An integer within [min, max]; strings must be plain ASCII decimals."""

    min: int | None = None
    max: int | None = None

    def describe(self) -> str:
        b = _bounds(self.min, self.max)
        return f"an integer {b}".rstrip()

    def __call__(self, value: Any, name: str | None = None) -> int:
        if isinstance(value, str):
            parsed = parse_int_text(value)
        elif isinstance(value, bool):
            parsed = None
        elif isinstance(value, numbers.Integral):
            parsed = int(value)
        elif isinstance(value, float) and value.is_integer():
            parsed = int(value)
        else:
            parsed = None
        if parsed is None or (self.min is not None and parsed < self.min) or (
                self.max is not None and parsed > self.max):
            raise _fail(name, self.describe(), value)
        return parsed


@dataclass(frozen=True)
class Float(Check):
    """A finite number within the bounds (open or closed); inf and nan are never allowed."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def describe(self) -> str:
        return f"a finite number {_bounds(self.min, self.max, self.min_open, self.max_open)}".rstrip()

    def __call__(self, value: Any, name: str | None = None) -> float:
        parsed: float | None = None
        if isinstance(value, str):
            text = value.strip()
            parsed = float(text) if _FLOAT.fullmatch(text) else None
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            parsed = float(value)
        if parsed is None or not math.isfinite(parsed) or not self._inside(parsed):
            raise _fail(name, self.describe(), value)
        return parsed

    def _inside(self, x: float) -> bool:
        lo_ok = self.min is None or (x > self.min if self.min_open else x >= self.min)
        hi_ok = self.max is None or (x < self.max if self.max_open else x <= self.max)
        return lo_ok and hi_ok


@dataclass(frozen=True)
class Choice(Check):
    """One of a fixed set of names (case-sensitive, surrounding spaces ignored)."""

    options: tuple[str, ...]

    def __init__(self, *options: str):
        object.__setattr__(self, "options", tuple(options))

    def describe(self) -> str:
        if len(self.options) == 1:
            return repr(self.options[0])
        return "one of " + ", ".join(self.options)

    def __call__(self, value: Any, name: str | None = None) -> str:
        text = value.strip() if isinstance(value, str) else None
        if text not in self.options:
            raise _fail(name, self.describe(), value)
        return text


@dataclass(frozen=True)
class Either(Check):
    """The first of several checks that accepts the value, e.g. Either(Choice('all'), Int(min=1))."""

    checks: tuple[Check, ...]

    def __init__(self, *checks: Check):
        object.__setattr__(self, "checks", tuple(checks))

    def describe(self) -> str:
        return " or ".join(c.describe() for c in self.checks)

    def __call__(self, value: Any, name: str | None = None) -> Any:
        for check in self.checks:
            try:
                return check(value)
            except InvalidValue:
                continue
        raise _fail(name, self.describe(), value)


@dataclass(frozen=True)
class Optional(Check):
    """None passes through unchanged (meaning 'the default'); anything else goes to `check`."""

    check: Check

    def describe(self) -> str:
        return self.check.describe()

    def __call__(self, value: Any, name: str | None = None) -> Any:
        return None if value is None else self.check(value, name)


@dataclass(frozen=True)
class Bool(Check):
    """true/false, yes/no, 1/0 (YAML and Python bools pass as they are)."""

    def describe(self) -> str:
        return "true or false"

    def __call__(self, value: Any, name: str | None = None) -> bool:
        if isinstance(value, bool):
            return value
        text = value.strip().lower() if isinstance(value, str) else None
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise _fail(name, self.describe(), value)


@dataclass(frozen=True)
class Text(Check):
    """A non-empty string (paths, names); nothing else about it is checked here."""

    def describe(self) -> str:
        return "a non-empty string"

    def __call__(self, value: Any, name: str | None = None) -> str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip():
            raise _fail(name, self.describe(), value)
        return value


@dataclass(frozen=True)
class Pair(Check):
    """Two values of one check, e.g. AdamW betas: (0.9, 0.999) or '0.9,0.999'."""

    check: Check

    def describe(self) -> str:
        return f"two values, each {self.check.describe()}"

    def __call__(self, value: Any, name: str | None = None) -> tuple[Any, Any]:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, Sequence) and len(items) == 2:
            return (self.check(items[0], name), self.check(items[1], name))
        raise _fail(name, self.describe(), value)


@dataclass(frozen=True)
class IntList(Check):
    """'0-9', '0,3,5', '0-2,7' or a list of ints: ascending ranges, no duplicates, not empty."""

    item: Check = Int(min=0)

    def describe(self) -> str:
        return f"a list like 0-9 or 0,3,5 of values, each {self.item.describe()}"

    def __call__(self, value: Any, name: str | None = None) -> list[int]:
        parts: Iterable[Any]
        if isinstance(value, str):
            parts = [p for p in value.split(",")]
        elif isinstance(value, Sequence) or hasattr(value, "tolist"):
            parts = list(value.tolist() if hasattr(value, "tolist") else value)
        else:
            parts = [value]
        out: list[int] = []
        for part in parts:
            m = _RANGE.fullmatch(part.strip()) if isinstance(part, str) else None
            if m:
                lo, hi = self.item(m.group(1), name), self.item(m.group(2), name)
                if hi < lo:
                    raise InvalidValue(f"{name or 'the range'} {part.strip()!r} runs backwards; "
                                       f"write {hi}-{lo}.")
                if hi - lo >= MAX_LIST:
                    raise InvalidValue(f"{name or 'the range'} {part.strip()!r} holds more than "
                                       f"{MAX_LIST} values.")
                out += range(lo, hi + 1)
            else:
                try:
                    out.append(self.item(part, None))
                except InvalidValue:
                    raise _fail(name, self.describe(), value) from None
        if not out or len(out) > MAX_LIST:
            raise _fail(name, self.describe(), value)
        seen: set[int] = set()
        dup = next((v for v in out if v in seen or seen.add(v)), None)
        if dup is not None:
            raise InvalidValue(f"{name or 'the list'} {excerpt(value)} names {dup} twice.")
        return out


SEED = Int(min=0, max=SEED_MAX)
POSITIVE_INT = Int(min=1)


def parse_seeds(text: Any, name: str = "--seeds") -> list[int]:
    """'0-9' or '0,3,5' (or a list) → seeds, each a non-negative 64-bit integer."""
    return IntList(SEED)(text, name)


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


def default_device(device: str | None = None) -> str:
    """`device`, or where a run goes when none is named: cuda if this machine has it, else cpu."""

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Device(Check):
    """'cpu', 'cuda', 'cuda:N' or 'mps', and only if this machine has it; None = cuda if any."""

    def describe(self) -> str:
        return "cpu, cuda, cuda:N or mps"

    def __call__(self, value: Any, name: str | None = None) -> str:
        flag = name or "--device"
        if value is None:
            return default_device()
        text = str(value).strip()
        m = re.fullmatch(r"(cpu|cuda|mps)(?::([0-9]+))?", text, re.ASCII)
        if not m or (m.group(1) != "cuda" and m.group(2) is not None and m.group(2) != "0"):
            raise _fail(flag, self.describe(), value)
        kind, index = m.group(1), int(m.group(2) or 0)
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise InvalidValue(f"{flag} {text}: this machine has no usable CUDA device "
                                   f"(torch {torch.__version__}); use {flag} cpu.")
            if index >= torch.cuda.device_count():
                raise InvalidValue(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA "
                                   f"device(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
        if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InvalidValue(f"{flag} {text}: MPS is not available on this machine; use {flag} cpu.")
        return text


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def existing_file(value: Any, flag: str, what: str = "file") -> Path:
    p = Path(Text()(value, flag))
    if not p.exists():
        raise UserError(f"{flag}: {what} {str(p)!r} does not exist.")
    if not p.is_file():
        raise UserError(f"{flag}: {what} {str(p)!r} is not a file.")
    return p


def existing_dir(value: Any, flag: str, what: str = "folder") -> Path:
    p = Path(Text()(value, flag))
    if not p.exists():
        raise UserError(f"{flag}: {what} {str(p)!r} does not exist.")
    if not p.is_dir():
        raise UserError(f"{flag}: {what} {str(p)!r} is not a folder.")
    return p


def check_output(out: Path | str, flag: str = "--out", overwrite: bool = False,
                 protected: Iterable[Path | str] = (), suffix: str | None = None) -> Path:
    """Refuse an output that overlaps an input, that another process is writing, that exists (unless
    overwrite), or that cannot be written; then hold it (`retrack.outputs.lock_output`) until it
    is renamed into place or the command ends.

    Writability is probed by creating and removing a temporary folder in the nearest existing
    ancestor, so '/proc/x', a path below a file, or a read-only folder fail now, not after the work
    (permission bits alone lie to root). Nothing is left behind.
    """

    out = Path(Text()(out, flag))
    if suffix is not None and out.suffix.lower() != suffix:
        raise UserError(f"{flag} must end in {suffix}, got {str(out)!r}.")
    check_overlap(out, protected, flag)
    resolved = out.resolve()
    _probe_writable(resolved, out, flag)
    lock_output(out, flag, overwrite)
    if out.exists() and not overwrite:
        release_output(out)
        raise UserError(f"{flag} {str(out)!r} exists; pass --overwrite to replace it.")
    return out


def check_overlap(out: Path | str, inputs: Iterable[Path | str], flag: str = "--out") -> None:
    """Refuse an output equal to, inside or around any input (it would be written into or over it)."""
    resolved = Path(out).resolve()
    for p in inputs:
        p = Path(p).resolve()
        if resolved == p or p in resolved.parents or resolved in p.parents:
            raise UserError(f"{flag} {str(out)!r} overlaps the input {str(p)!r}; choose another {flag}.")


def _probe_writable(resolved: Path, shown: Path, flag: str) -> None:
    ancestor = resolved.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {str(shown)!r} lies below {str(ancestor)!r}, which is a file; "
                        f"choose another {flag}.")
    try:
        probe = tempfile.mkdtemp(dir=ancestor, prefix=".retrack-probe-")
    except OSError as e:
        raise UserError(f"{flag} {str(shown)!r} cannot be written ({e.strerror or e} in "
                        f"{str(ancestor)!r}); choose another {flag}.") from None
    shutil.rmtree(probe, ignore_errors=True)
    free = shutil.disk_usage(ancestor).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"{flag} {str(shown)!r} cannot be written: {str(ancestor)!r} has {free} bytes free; "
                        f"free some space or choose another {flag}.")


# ---------------------------------------------------------------------------------------------
# Frozen config dataclasses whose fields carry their checks
# ---------------------------------------------------------------------------------------------


def option(check: Check | None, default: Any = dataclasses.MISSING, flag: str | None = None,
           help: str | tuple[str, ...] | None = None, **kw: Any):
    """A dataclass field checked by `check`. It is one setting everywhere: the flag `flag`
    (default '--field-name', which also names it in messages), described by `help`; the config key
    and Python keyword of the same name (a `flag` of another name renames them too, except a split
    flag like '--beta1/--beta2', whose `help` is one text per part)."""
    meta = {"check": check, "flag": flag, "help": help}
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def nested(cls: type, title: str, help: str) -> Any:
    """A field holding a group of settings (a Validated dataclass of its own). Its settings are
    given flat, beside the others (flags, config keys and keywords); `--help` shows them under
    `title`, described by `help`."""
    return dataclasses.field(default_factory=cls, metadata={"nested": cls, "title": title, "help": help})


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def setting_key(f: dataclasses.Field) -> str:
    """The key of a field in configs and keyword arguments: its flag's name ('--eval-every' is
    eval_every), or the field's name for a split flag."""
    flag = f.metadata.get("flag")
    return f.name if flag is None or "/" in flag else flag.lstrip("-").replace("-", "_")


def ordered_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a settings dataclass, those without a default first (a subclass adding the
    required paths of a run declares them last), each group in declaration order."""
    fields = dataclasses.fields(cls)
    required = [f for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    return required + [f for f in fields if f not in required]


def setting_fields(cls: type) -> dict[str, tuple[tuple[str, ...], dataclasses.Field]]:
    """Every setting of `cls`, nested groups flattened: key → (path of field names, field)."""
    found: dict[str, tuple[tuple[str, ...], dataclasses.Field]] = {}
    for f in ordered_fields(cls):
        inner = f.metadata.get("nested")
        if inner is None:
            found[setting_key(f)] = ((f.name,), f)
        else:
            found.update({k: ((f.name, *path), g) for k, (path, g) in setting_fields(inner).items()})
    return found


class Validated:
    """Mixin for frozen dataclasses: every field declared with option() is parsed on creation;
    nested() groups are built from their flat keys (`from_settings`) and flattened back (`settings`)."""

    unknown_hint: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check, inner = f.metadata.get("check"), f.metadata.get("nested")
            if check is not None:
                object.__setattr__(self, f.name, check(getattr(self, f.name), flag_of(f)))
            elif inner is not None and not isinstance(getattr(self, f.name), inner):
                raise TypeError(f"{f.name} must be a {inner.__name__}")

    @classmethod
    def from_settings(cls, values: Mapping[str, Any]):
        """Build from flat settings (keys as `setting_fields` names them); checks run on creation."""
        fields = setting_fields(cls)
        tree: dict[str, Any] = {}
        for key, value in values.items():
            path = fields[key][0]
            node = tree
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = value
        return cls._build(tree)

    @classmethod
    def _build(cls, tree: dict[str, Any]):
        kinds = {f.name: f.metadata.get("nested") for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: kinds[k]._build(v) if kinds[k] is not None else v for k, v in tree.items()})

    def settings(self) -> dict[str, Any]:
        """Every setting by its key, nested groups flattened in field order (run records show this)."""
        out: dict[str, Any] = {}
        for f in ordered_fields(type(self)):
            value = getattr(self, f.name)
            out.update(value.settings() if f.metadata.get("nested") else {setting_key(f): value})
        return out

    @classmethod
    def from_mapping(cls, raw: Any, where: str, **fixed: Any):
        """Build from a YAML mapping, naming unknown keys and bad values by key and `where`."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise UserError(f"{where} must be a mapping of keys to values, got {type(raw).__name__}.")
        known = setting_fields(cls)
        for key in raw:
            if key not in known:
                raise UserError(f"unknown key {excerpt(key)} in {where}{_did_you_mean(str(key)[:200], known)}.")
        values = {}
        for key, value in raw.items():
            check = known[key][1].metadata.get("check")
            values[key] = check(value, f"{key!r} in {where}") if check is not None else value
        return cls.from_settings({**values, **fixed})

    @classmethod
    def check_keys(cls, given: Iterable[str], what: str = "setting") -> None:
        """Refuse Python keyword arguments that are not settings (with the closest known one)."""
        known = setting_fields(cls)
        for key in given:
            if key not in known:
                raise UserError(f"unknown {what} {key!r}{_did_you_mean(key, known)}.")


def config_from_args(cls: type, args: Any, **extra: Any):
    """A command's config from its parsed flags: every setting of `cls` that is also a flag of the
    same name, plus `extra` (values assembled from several flags); the fields' checks run here."""
    names = setting_fields(cls)
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls.from_settings({**values, **extra})


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(sorted(known))}"


# ---------------------------------------------------------------------------------------------
# Loading text files whose libraries raise their own exceptions
# ---------------------------------------------------------------------------------------------


MAX_YAML_BYTES = 4 << 20  # configs and recipes are a few kilobytes
MAX_JSON_BYTES = 256 << 20  # records and logs of long runs stay far below
MAX_DEPTH = 64  # mappings and lists within each other
MAX_NODES = 1_000_000  # values once every alias is expanded (a "billion laughs" has 10⁹)


def excerpt(value: Any, limit: int = 80) -> str:
    """A bounded repr for messages: long strings, lists and nested values are cut, never expanded."""

    r = reprlib.Repr()
    r.maxlevel, r.maxtuple, r.maxlist, r.maxdict, r.maxset, r.maxfrozenset = 3, 6, 6, 6, 6, 6
    r.maxstring = r.maxlong = r.maxother = limit
    shown = r.repr(value)
    return shown if len(shown) <= limit + 10 else shown[:limit] + "…"


def read_text(path: Path | str, what: str, limit: int | None = None) -> str:
    """A UTF-8 text file, or one sentence naming it; with `limit`, larger files are refused unread."""
    p = Path(path)
    try:
        if limit is not None and p.is_file() and p.stat().st_size > limit:
            raise UserError(f"{what} {str(p)!r} holds {p.stat().st_size} bytes, more than the "
                            f"{limit >> 20} MiB such a file may have.")
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {str(p)!r} is not UTF-8 text (byte {e.start}).") from None
    except IsADirectoryError:
        raise UserError(f"{what} {str(p)!r} is a folder, not a file.") from None
    except FileNotFoundError:
        raise UserError(f"{what} {str(p)!r} does not exist.") from None
    except OSError as e:
        raise UserError(f"could not read {what} {str(p)!r}: {e.strerror or e}.") from None


def load_yaml(path: Path | str, what: str = "config") -> Any:
    """Parse a YAML file within limits; a syntax error becomes one sentence with its line and column."""
    return parse_yaml(read_text(path, what, MAX_YAML_BYTES), f"{what} {str(path)!r}")


def parse_yaml(text: str, what: str) -> Any:
    """YAML text → Python values (safe types only), refusing before anything is built what nests
    deeper than MAX_DEPTH or, its aliases expanded, holds more than MAX_NODES values."""

    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{what} is longer than {MAX_YAML_BYTES >> 20} MiB.")
    loader = yaml.SafeLoader(text)
    try:
        _check_depth(text, what)
        node = loader.get_single_node()
        if node is not None:
            size, deep = _expanded_size(node, {}, what)
            if deep > MAX_DEPTH:
                raise UserError(f"{what} nests mappings and lists more than {MAX_DEPTH} deep once its aliases "
                                f"(*name) are expanded.")
            if size > MAX_NODES:
                raise UserError(f"{what} holds more than {MAX_NODES:,} values once its aliases (*name) are "
                                f"expanded; write the values out.")
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UserError(f"{what} is not valid YAML{where}: {str(problem)[:200]}.") from None
    finally:
        loader.dispose()


def _check_depth(text: str, what: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH from the parser's events, before any node is built (with
    libyaml's parser where there is one: the pure-Python scanner is quadratic in the depth)."""

    depth = 0
    try:
        for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise UserError(f"{what} nests mappings and lists more than {MAX_DEPTH} deep.")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError as e:
        if "nesting depth" in str(e):  # libyaml's own limit, met while it scans ahead
            raise UserError(f"{what} nests mappings and lists more than {MAX_DEPTH} deep.") from None
        # any other syntax error: the loader below names it with its line and column


def _expanded_size(node: Any, seen: dict[int, tuple[int, int] | None], what: str) -> tuple[int, int]:
    """(values, depth) of a YAML node with its aliases expanded. Nodes are visited in the order of
    the text, so an alias meets its anchor already counted: the recursion is only as deep as the
    text nests (checked before), and each node is counted once however often it is referred to."""

    key = id(node)
    if key in seen:
        found = seen[key]
        if found is None:
            raise UserError(f"{what} holds an alias (*name) inside the value it names.")
        return found
    seen[key] = None
    size, deep = 1, 1
    children = node.value if isinstance(node, yaml.SequenceNode) else (
        [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else [])
    for child in children:
        n, d = _expanded_size(child, seen, what)
        size, deep = min(size + n, MAX_NODES + 1), max(deep, d + 1)
    seen[key] = (size, deep)
    return size, deep


def load_json(path: Path | str, what: str = "file") -> Any:
    """Parse a JSON file within limits (size, nesting); a damaged one is one sentence naming it."""
    return parse_json(read_text(path, what, MAX_JSON_BYTES), f"{what} {str(path)!r}")


def parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} is not valid JSON (line {e.lineno}: {e.msg}).") from None
    except RecursionError:
        raise UserError(f"{what} nests its values too deep to be read.") from None
