"""An experiment as data: the YAML schema, `--set` overrides, and the key checks at every depth.

Everything here is checked without loading a model or an image, so a typo anywhere in the file
costs a second. Keys that name unlearning options are checked against `UnlearnConfig` itself and
metric settings against `EvaluateConfig`, so an option added to either is usable here at once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrack.errors import require
from retrack.experiments.metrics import check_metric
from retrack.experiments.paired import parse_paired
from retrack.experiments.tradeoff import parse_tradeoff
from retrack.unlearn_config import UnlearnConfig
from retrack.validation import Int, IntList, excerpt, load_yaml, parse_seeds, parse_yaml, read_text, setting_fields

TOP_KEYS = ("name", "out", "model", "data", "targets", "reference_model", "seeds", "train", "methods",
            "ablations", "metrics", "sampling", "pretrained", "keep_models", "device", "tradeoff", "paired")
SAMPLING_DEFAULTS = {"samples": 1000, "steps": 50, "sampler": "ddim", "batch_size": 64}
TARGET_KEYS = ("indices", "files", "one_at_a_time")
# Unlearn options the runner sets itself, per run, or leaves at their defaults (the forward layout
# changes speed, never results): never from the config, and not part of a run's fingerprint.
PER_RUN = ("model", "data", "forget", "out", "seed", "method", "overwrite", "cache_dir", "device", "layout")
BUILTIN = "builtin:"


def unlearn_options() -> tuple[str, ...]:
    return tuple(k for k in setting_fields(UnlearnConfig) if k not in PER_RUN)


def parse_ints(value: Any, what: str) -> list[int]:
    """A YAML int, a list, or '0-9' / '0,3,5' text: the project's shared integer-list parser."""
    return IntList(Int(min=0))(value, what)


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: a label, the method it runs and its own settings."""

    label: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Targets:
    """Forget specs as `--forget` takes them (one per forget set) and the folder name of each."""

    specs: tuple[str, ...]
    names: tuple[str, ...]
    builtin: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment, keys checked; paths are still unresolved (see experiments.resolve)."""

    model: str
    data: str
    targets: Targets
    methods: tuple[MethodSpec, ...]
    seeds: tuple[int, ...]
    metrics: dict[str, dict[str, Any]]
    out: str
    name: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    ablations: tuple[MethodSpec, ...] = ()
    ablation_seeds: tuple[int, ...] | None = None
    sampling: dict[str, Any] = field(default_factory=lambda: dict(SAMPLING_DEFAULTS))
    reference_model: str | None = None
    pretrained: bool = True
    keep_models: bool = True
    device: str | None = None
    tradeoff: dict[str, Any] = field(default_factory=dict)  # axes of tradeoff.png; {} = automatic
    paired: dict[str, str] = field(default_factory=dict)  # base row and column of paired.md; {} = none
    source: str = ""  # the YAML file, for messages

    def as_dict(self) -> dict[str, Any]:
        """The config as written back into experiment.json (methods and ablations as label maps)."""
        return {"name": self.name, "model": self.model, "data": self.data,
                "targets": {"specs": list(self.targets.specs), "names": list(self.targets.names),
                            "builtin": self.targets.builtin},
                "reference_model": self.reference_model, "seeds": list(self.seeds), "train": self.train,
                "methods": {m.label: {"method": m.method, **m.settings} for m in self.methods},
                "ablations": {m.label: {"method": m.method, **m.settings} for m in self.ablations},
                "ablation_seeds": list(self.ablation_seeds) if self.ablation_seeds is not None else None,
                "metrics": self.metrics, "sampling": self.sampling, "pretrained": self.pretrained,
                "keep_models": self.keep_models, "device": self.device, "out": self.out,
                "tradeoff": self.tradeoff, "paired": self.paired}


# ---------------------------------------------------------------------------------------------
# Reading: YAML, overrides, then one parser per section
# ---------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    raw = load_yaml(path, "experiment config")
    require(isinstance(raw, dict), f"experiment config {str(path)!r} must be a mapping of keys.")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key.sub=value` (value read as YAML) replaces one entry; used to point a config at local
    stand-ins (`--set model=./tiny --set data=./tiny.npz`) without editing the file."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        require(bool(sep) and bool(key.strip()), f"--set needs KEY=VALUE, got {excerpt(item)}.")
        value = parse_yaml(text, f"the value of --set {excerpt(item)}")
        *parents, last = key.strip().split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), f"--set {key!r}: {part!r} is not a mapping in the config.")
        node[last] = value
    return raw


def parse_config(raw: dict[str, Any], source: str = "") -> ExperimentConfig:
    where = f"experiment config {source!r}" if source else "the experiment config"
    _no_unknown(raw, TOP_KEYS, where)
    for key in ("model", "data", "methods", "seeds", "metrics"):
        require(key in raw, f"{where} has no {key!r}.")
    train = _mapping(raw.get("train"), "train")
    _no_unknown(train, unlearn_options(), "train:")
    methods = tuple(_method(label, s) for label, s in _mapping(raw["methods"], "methods").items())
    require(bool(methods), "methods: is empty; name at least one method.")
    ablations, ab_seeds = _ablations(_mapping(raw.get("ablations"), "ablations"), methods)
    labels = [m.label for m in methods + ablations]
    dup = next((x for x in labels if labels.count(x) > 1 or x == "pretrained"), None)
    require(dup is None, f"the table would have two rows labelled {dup!r}; rename one.")
    sampling = {**SAMPLING_DEFAULTS, **_mapping(raw.get("sampling"), "sampling")}
    _no_unknown(sampling, tuple(SAMPLING_DEFAULTS), "sampling:")
    return ExperimentConfig(
        model=_text(raw["model"], "model"), data=_text(raw["data"], "data"),
        targets=_targets(raw.get("targets"), _text(raw["data"], "data")), methods=methods,
        seeds=tuple(parse_seeds(raw["seeds"], "seeds")), metrics=_metrics(raw["metrics"]),
        out=_text(raw.get("out", f"runs/{raw.get('name') or Path(source).stem or 'experiment'}"), "out"),
        name=str(raw.get("name") or Path(source).stem), train=train, ablations=ablations,
        ablation_seeds=ab_seeds, sampling=sampling,
        reference_model=_text(raw["reference_model"], "reference_model") if raw.get("reference_model") else None,
        pretrained=_flag(raw.get("pretrained", True), "pretrained"),
        keep_models=_flag(raw.get("keep_models", True), "keep_models"),
        device=_text(raw["device"], "device") if raw.get("device") else None,
        tradeoff=parse_tradeoff(raw.get("tradeoff")), paired=parse_paired(raw.get("paired")), source=source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    return parse_config(apply_overrides(read_yaml(path), overrides or []), str(path))


def _no_unknown(section: dict[str, Any], allowed: tuple[str, ...] | list[str], where: str) -> None:
    unknown = [k for k in section if k not in allowed]
    require(not unknown, f"{where} has an unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}."
            if unknown else "")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    require(isinstance(value, dict), f"{where}: must be a mapping of keys, got {value!r}.")
    require(all(isinstance(k, str) for k in value), f"{where}: every key must be text.")
    return dict(value)


def _text(value: Any, where: str) -> str:
    require(isinstance(value, str) and value.strip() != "", f"{where}: must be a path or name, got {value!r}.")
    return value.strip()


def _flag(value: Any, where: str) -> bool:
    require(isinstance(value, bool), f"{where}: must be true or false, got {value!r}.")
    return value


def _method(label: str, settings: Any) -> MethodSpec:
    s = _mapping(settings, f"methods: {label}")
    require(label.strip() == label and label and "/" not in label and not label.startswith("."),
            f"methods: the label {label!r} cannot name a folder; use letters, digits, spaces, = or λ.")
    method = s.pop("method", label)
    _no_unknown(s, unlearn_options(), f"methods: {label}:")
    require(isinstance(method, str), f"methods: {label}: method must be a method name, got {method!r}.")
    return MethodSpec(label, method, s)


def _ablations(ab: dict[str, Any],
               methods: tuple[MethodSpec, ...]) -> tuple[tuple[MethodSpec, ...], tuple[int, ...] | None]:
    """`{base: retrack, seeds: [0], k: [1, 100], lam: [1.0]}`: the base row with one setting
    changed at a time, labelled like the paper ("retrack K=1", "retrack λ=1.0")."""
    if not ab:
        return (), None
    _no_unknown(ab, ("base", "seeds") + unlearn_options(), "ablations:")
    by_label = {m.label: m for m in methods}
    base_label = ab.get("base", "retrack")
    require(base_label in by_label, f"ablations: base {base_label!r} is not a label under methods:.")
    base = by_label[base_label]
    seeds = tuple(parse_seeds(ab["seeds"], "ablations: seeds")) if "seeds" in ab else None
    rows = []
    for key, values in ab.items():
        if key in ("base", "seeds"):
            continue
        require(isinstance(values, list), f"ablations: {key} must be a list of values, got {values!r}.")
        name = {"k": "K", "lam": "λ"}.get(key, key)
        for v in values:
            if base.settings.get(key) != v:
                rows.append(MethodSpec(f"{base_label} {name}={v}", base.method, {**base.settings, key: v}))
    return tuple(rows), seeds


def _metrics(value: Any) -> dict[str, dict[str, Any]]:
    if isinstance(value, list):
        value = {name: {} for name in value}
    found = _mapping(value, "metrics")
    require(bool(found), "metrics: is empty; name at least one metric.")
    out = {}
    for name, settings in found.items():
        out[name] = _mapping(settings, f"metrics: {name}")
        check_metric(name, out[name])
    return out


def _targets(value: Any, data: str) -> Targets:
    """`builtin` (the built-in data's own forget set), or {indices | files, one_at_a_time}."""
    if value is None or value == "builtin":
        require(data.startswith(BUILTIN), "targets: is missing; give indices: or files: (only "
                                          "built-in data defines its own forget set).")
        return Targets(("builtin",), ("",), builtin=True)
    t = _mapping(value, "targets")
    _no_unknown(t, TARGET_KEYS, "targets:")
    require(("indices" in t) != ("files" in t), "targets: give exactly one of indices: or files:.")
    each = _flag(t.get("one_at_a_time", False), "targets: one_at_a_time")
    if "indices" in t:
        items = [str(i) for i in _indices(t["indices"])]
        names = [f"index{i}" for i in items]
    else:
        files = t["files"] if isinstance(t["files"], list) else [t["files"]]
        items = [_target_file(f, data) for f in files]
        require(bool(items), "targets: files is empty.")
        names = [Path(f).stem for f in items]
    if each:
        require(len(set(names)) == len(names), "targets: two targets share a name; rename the files.")
        return Targets(tuple(items), tuple(names))
    return Targets((",".join(items),), ("",))


def _indices(value: Any) -> list[int]:
    if isinstance(value, str) and value.startswith("@"):
        f = Path(value[1:])
        require(f.is_file(), f"targets: index file {str(f)!r} does not exist.")
        lines = [ln.strip() for ln in read_text(f, "targets: index file").splitlines()]
        return parse_ints([ln for ln in lines if ln and not ln.startswith("#")], f"targets: {str(f)!r}")
    return parse_ints(value, "targets: indices")


def _target_file(f: Any, data: str) -> str:
    """Relative files are looked up in the data folder, so pointing `data` elsewhere moves them too."""
    require(isinstance(f, str) and "," not in f, f"targets: files: {f!r} must be a path without commas.")
    p = Path(f)
    return str(p if p.is_absolute() else Path(data) / p)
