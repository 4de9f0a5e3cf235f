"""Every setting of one unlearning run, declared once, and the checks that resolve it.

`UnlearnConfig` is the one declaration: its fields are the flags of `retrack unlearn`, the keys
of a recipe or an experiment's method settings, and the keyword arguments of
`retrack.unlearn()`, each with the paper's default and its check. Resolving a config checks
everything that can be checked before data or a model load: the method's options, the model's
family and what that family accepts, the evaluation during fine-tuning, and a writable new output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

from accelerate.utils import get_int_from_env

from retrack import objectives
from retrack.backends import Backend, detect
from retrack.data import ForgetSpec, check_forget_file
from retrack.errors import UserError, require
from retrack.evaluate import EvaluateConfig, MetricNames, resolved, target_files
from retrack.metrics import registry
from retrack.monitor import StopAt, check_evaluation
from retrack.objectives.retrack import FORGET_WEIGHTINGS
from retrack.runrecord import check_output
from retrack.trainer import TrainSettings, per_process_batch
from retrack.validation import (
    POSITIVE_INT,
    SEED,
    Bool,
    Choice,
    Device,
    Either,
    Float,
    Int,
    Optional,
    Pair,
    Text,
    Validated,
    default_device,
    load_yaml,
    option,
)

_METHOD = Choice(*objectives.available())
MIXED_PRECISION = ("no", "bf16", "fp16")
_PROB = Float(0.0, 1.0)


@dataclass(frozen=True)
class UnlearnConfig(Validated):
    """Every setting of one unlearning run, checked on creation and saved beside the output model.

    Defaults are the paper's MNIST T-shirt settings; None for lam/s/eta means the method's own.
    lam="auto" and the fields after `eta` are ReTrack's options beside the paper's objective
    (objectives/retrack.py); their defaults leave it exactly the paper's.
    Each field is the flag of the same name (`batch_size` is `--batch-size`).
    """

    model: str = option(Text())
    data: str = option(Text())
    forget: str = option(ForgetSpec())
    out: str = option(Text())
    method: str = option(_METHOD, "retrack")
    steps: int = option(POSITIVE_INT, 50)
    batch_size: int = option(POSITIVE_INT, 128)
    grad_accum: int = option(POSITIVE_INT, 1)
    lr: float = option(Float(0.0, min_open=True), 5e-5)
    betas: tuple[float, float] = option(Pair(Float(0.0, 1.0, max_open=True)), (0.95, 0.999),
                                        flag="--beta1/--beta2")
    weight_decay: float = option(Float(0.0), 1e-6)
    clip: float = option(Float(0.0, min_open=True), 1.0)
    seed: int = option(SEED, 0)
    k: int | str = option(Either(Choice("all"), POSITIVE_INT), 10)
    lam: float | str | None = option(Optional(Either(Choice("auto"), _PROB)), None)
    s: float | None = option(Optional(Float(0.0)), None)
    eta: float | None = option(Optional(Float(0.0)), None)
    lam_ratio: float = option(Float(0.0, min_open=True), 1.0)
    surgery: bool = option(Bool(), False)
    forget_weighting: str = option(Choice(*FORGET_WEIGHTINGS), "none")
    snr_gamma: float = option(Float(0.0, min_open=True), 5.0)
    forget_t_min: int = option(Int(min=0), 0)
    device: str | None = option(Optional(Device()), None)
    overwrite: bool = option(Bool(), False)
    cache_dir: str | None = option(Optional(Text()), None)
    prompt: str | None = option(Optional(Text()), None)
    lora: int | None = option(Optional(POSITIVE_INT), None)
    lora_alpha: float | None = option(Optional(Float(0.0, min_open=True)), None)
    gradient_checkpointing: bool = option(Bool(), False)
    mixed_precision: str = option(Choice(*MIXED_PRECISION), "no")
    recipe: str | None = option(Optional(Text()), None)
    # Evaluation during fine-tuning (monitor.py); the instruments are retrack evaluate's flags.
    # None in eval_metrics, eval_samples and copy_rule means the model kind's default (eval_defaults).
    eval_every: int | None = option(Optional(POSITIVE_INT), None)
    eval_metrics: tuple[str, ...] | None = option(Optional(MetricNames("--eval-metrics", during_training=True)), None)
    eval_samples: int | None = option(Optional(POSITIVE_INT), None)
    eval_steps: int = option(POSITIVE_INT, 50)
    eval_seed: int = option(SEED, 0)
    eval_guidance: float = option(Float(0.0), 7.5)
    eval_target: str | None = option(Optional(Text()), None)
    stop_at: tuple[str, float] | None = option(Optional(StopAt()), None)
    copy_rule: str | None = option(Optional(Choice("l2", "descriptor")), None)
    copy_threshold: float | None = option(Optional(Float()), None)
    descriptor: str | None = option(Optional(Text()), None)
    sscd: str | None = option(Optional(Text()), None)
    fid_features: str | None = option(Optional(Text()), None)
    inception: str | None = option(Optional(Text()), None)
    classifier: str | None = option(Optional(Text()), None)
    eval_clip: str | None = option(Optional(Text()), None)  # CLIP-IQA's model (--clip is the gradient clip)


RECIPES = {"stable-diffusion": "stable_diffusion/unlearn.yaml"}
_NOT_IN_RECIPES = ("model", "data", "forget", "out", "recipe", "method")


def unlearn_recipe(spec: str, method: str) -> dict:
    """The settings a recipe gives `method`: its top-level keys, then the method's own under
    `methods:`. `spec` is a built-in name (stable-diffusion: the paper's SD v1.4 column) or a YAML
    file; every value goes through the same checks as its flag."""
    path = resources.files("retrack.recipes") / RECIPES[spec] if spec in RECIPES else Path(spec)
    where = f"recipe {str(spec)!r}"
    require(spec in RECIPES or Path(spec).is_file(),
            f"--recipe {spec!r} is neither a built-in recipe ({', '.join(RECIPES)}) nor a YAML file.")
    raw = load_yaml(path, "recipe")
    require(isinstance(raw, dict), f"{where} must be a mapping of settings, got {type(raw).__name__}.")
    raw = dict(raw)
    per_method = raw.pop("methods", None) or {}
    require(isinstance(per_method, dict) and all(isinstance(v, dict) for v in per_method.values()),
            f"'methods' in {where} must map method names to their settings.")
    fields = {f.name: f for f in dataclasses.fields(UnlearnConfig) if f.name not in _NOT_IN_RECIPES}
    settings = {}
    for key, value in {**raw, **per_method.get(method, {})}.items():
        require(key in fields, f"unknown key {key!r} in {where}; known: {', '.join(sorted(fields))}.")
        settings[key] = fields[key].metadata["check"](value, f"{key!r} in {where}")
    return settings

def resolve_unlearn(cfg: UnlearnConfig) -> UnlearnConfig:
    """Everything that can be checked before loading data or a model: method defaults, device,
    the model's family and what it accepts, the data and forget files, and a writable, new output."""
    cfg = resolve_method(cfg)
    family = detect(cfg.model, cfg.prompt)
    cfg = eval_defaults(cfg, family)
    check_evaluation(cfg)
    device = cfg.device or default_device()
    _check_options(cfg, device)
    family.check_settings(asdict(cfg), "unlearn")
    eval_config(cfg, family)
    require(Path(cfg.data).exists(), f"--data: data path {cfg.data!r} does not exist.")
    check_forget_file(cfg.forget)
    protected = [Path(p) for p in (cfg.model, cfg.data) if Path(p).exists()]
    check_output(Path(cfg.out), cfg.overwrite, protected)
    return replace(cfg, device=device)


def _check_options(cfg: UnlearnConfig, device: str) -> None:
    """A LoRA α needs a LoRA rank; mixed precision runs on a GPU only."""
    require(cfg.lora_alpha is None or cfg.lora is not None, "--lora-alpha needs --lora RANK.")
    if cfg.mixed_precision != "no":
        require(device.startswith("cuda"), f"--mixed-precision {cfg.mixed_precision} needs a CUDA device "
                                           f"(accelerate's autocast); on {device} leave it at 'no'.")
        require(not (cfg.mixed_precision == "fp16" and cfg.method == "siss"),
                "--mixed-precision fp16 scales the loss, which changes SISS's fixed-norm forget gradient; use bf16.")


def resolve_method(cfg: UnlearnConfig, processes: int | None = None) -> UnlearnConfig:
    """The method's own defaults filled in and its options checked, touching no file (an
    experiment checks every run's settings this way before the first run)."""
    cls = objectives.method_class(cfg.method)
    _check_variant_options(cfg, cls)
    per_process_batch(train_settings(cfg), process_count() if processes is None else processes)
    defaults = {f: getattr(cls, f) for f in ("lam", "s", "eta") if hasattr(cls, f)}
    return replace(cfg, **{f: getattr(cfg, f) if getattr(cfg, f) is not None else defaults.get(f)
                           for f in defaults})


def eval_defaults(cfg: UnlearnConfig, family: type[Backend]) -> UnlearnConfig:
    """The evaluation settings left unset, filled with the family's defaults, so the run record
    shows what was measured; the metrics checked against what the family can measure."""
    if cfg.eval_every is None:
        return cfg
    defaults = family.eval_defaults(cfg.eval_clip)
    cfg = replace(cfg, **{k: v if getattr(cfg, k) is None else getattr(cfg, k) for k, v in defaults.items()})
    for path in target_files(cfg.eval_target):
        require(path.is_file(), f"--eval-target {str(path)!r} is not an image file.")
    family.check_metrics(cfg.eval_metrics, "--eval-metrics", registry.during_training())
    return cfg


def eval_config(cfg: UnlearnConfig, family: type[Backend]) -> EvaluateConfig | None:
    """The evaluation during fine-tuning as `retrack evaluate` would run it (None: no evaluation);
    resolving it names missing weights before anything loads."""
    if cfg.eval_every is None:
        return None
    require("clipiqa" not in cfg.eval_metrics or cfg.eval_clip is not None,
            "CLIP-IQA needs a local CLIP model: pass --eval-clip PATH (a transformers CLIP folder).")
    require(cfg.eval_clip is None or Path(cfg.eval_clip).exists(), f"--eval-clip {cfg.eval_clip!r} does not exist.")
    return resolved(EvaluateConfig(
        metrics=cfg.eval_metrics, seed=cfg.eval_seed, num_samples=cfg.eval_samples, steps=cfg.eval_steps,
        copy_rule=cfg.copy_rule, copy_threshold=cfg.copy_threshold, descriptor=cfg.descriptor,
        sscd=cfg.sscd, fid_features=cfg.fid_features, inception=cfg.inception, classifier=cfg.classifier,
        clip=cfg.eval_clip, device=cfg.device or default_device(), prompt=cfg.prompt, guidance=cfg.eval_guidance,
        target=cfg.eval_target))


VARIANT_OPTIONS = ("lam_ratio", "surgery", "forget_weighting", "snr_gamma", "forget_t_min")


def _check_variant_options(cfg: UnlearnConfig, cls: type) -> None:
    """Options a method does not have are an error, not silently ignored."""
    require(cfg.lam != "auto" or hasattr(cls, "lam_ratio"),
            f"--lam auto balances an unlearning and a remain gradient; method {cfg.method!r} has no such λ.")
    for name in VARIANT_OPTIONS:
        flag = "--" + name.replace("_", "-")
        require(getattr(cfg, name) == UnlearnConfig.__dataclass_fields__[name].default or hasattr(cls, name),
                f"{flag} is an option of retrack; method {cfg.method!r} does not have it.")
    _check_takes_effect(cfg)


def _check_takes_effect(cfg: UnlearnConfig) -> None:
    """A value that only another setting would make count is refused, naming that setting (the
    defaults are always accepted)."""
    default = UnlearnConfig.__dataclass_fields__
    require(cfg.lam_ratio == default["lam_ratio"].default or cfg.lam == "auto",
            f"--lam-ratio {cfg.lam_ratio:g} acts only with --lam auto"
            f"{f' (now --lam {cfg.lam})' if cfg.lam is not None else ''}; add --lam auto.")
    require(cfg.snr_gamma == default["snr_gamma"].default or cfg.forget_weighting == "min-snr",
            f"--snr-gamma {cfg.snr_gamma:g} acts only with --forget-weighting min-snr (now "
            f"{cfg.forget_weighting}); add --forget-weighting min-snr.")
    if cfg.cache_dir is not None:
        cache = Path(cfg.cache_dir)
        ancestor = next((p for p in (cache, *cache.parents) if p.exists()), None)
        require(ancestor is None or ancestor.is_dir(),
                f"--cache-dir {cfg.cache_dir!r} is a file or lies below one ({str(ancestor)!r}); "
                f"give a folder (it is made if missing).")


def train_settings(cfg: UnlearnConfig) -> TrainSettings:
    return TrainSettings(cfg.steps, cfg.batch_size, cfg.lr, tuple(cfg.betas), cfg.weight_decay,
                         cfg.clip, cfg.seed, cfg.grad_accum, cfg.mixed_precision)


def process_count() -> int:
    """Processes of this run as `accelerate launch` (or MPI) announces them, read before any
    distributed state exists so that a bad batch split fails before a model is loaded."""
    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def build_objective(cfg: UnlearnConfig):
    try:
        return objectives.build(cfg.method, lam=cfg.lam, s=cfg.s, eta=cfg.eta,
                                **{name: getattr(cfg, name) for name in VARIANT_OPTIONS})
    except ValueError as e:
        raise UserError(f"{e}.") from None
