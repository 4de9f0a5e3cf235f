"""Every setting of one unlearning run, declared once, and the checks that resolve it.

`UnlearnConfig` is the one declaration: its fields are the flags of `retrack unlearn` (generated
by `retrack.flags`), the keys of a recipe or an experiment's method settings, and the keyword
arguments of `retrack.unlearn()`, each with the paper's default, its check and its help. The
evaluation during fine-tuning is one nested group (`training_eval.TrainingEvaluation`) given flat.
Resolving a config checks everything that can be checked before data or a model load: the
method's options, the model's family and what that family accepts, the evaluation's instruments,
and a writable new output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from accelerate.utils import get_int_from_env

from retrack import objectives
from retrack.backends import detect
from retrack.data import ForgetSpec, check_forget_file
from retrack.errors import UserError, require
from retrack.layout import LAYOUTS
from retrack.objectives.base import BALANCES
from retrack.objectives.retrack import FORGET_WEIGHTINGS
from retrack.runrecord import check_output
from retrack.trainer import TrainSettings, per_process_batch
from retrack.training_eval import HOW, TrainingEvaluation
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
    nested,
    option,
    setting_fields,
)

_METHOD = Choice(*objectives.available())
MIXED_PRECISION = ("no", "bf16", "fp16")
_PROB = Float(0.0, 1.0)
_S = TypeVar("_S", bound="UnlearnSettings")


@dataclass(frozen=True)
class UnlearnSettings(Validated):
    """How to unlearn, apart from which model, data and images: the settings an experiment gives
    each of its runs, checked without touching a file.

    Defaults are the paper's MNIST T-shirt settings; None for lam/s/eta means the method's own.
    lam="auto" and the options after `eta` are ReTrack's options beside the paper's objective
    (objectives/retrack.py); their defaults leave it exactly the paper's.
    """

    method: str = option(_METHOD, "retrack", help=f"unlearning method: {', '.join(objectives.available())}")
    steps: int = option(POSITIVE_INT, 50, help="optimiser steps")
    batch_size: int = option(POSITIVE_INT, 128,
                             help="images per step (per term; split across processes under accelerate)")
    grad_accum: int = option(POSITIVE_INT, 1,
                             help="micro-batches per step, to fit memory: each process's share of the batch is "
                             "split into this many, and their gradients add up to exactly the full batch's")
    lr: float = option(Float(0.0, min_open=True), 5e-5, help="AdamW learning rate (constant, no warm-up)")
    weight_decay: float = option(Float(0.0), 1e-6, help="AdamW weight decay")
    betas: tuple[float, float] = option(Pair(Float(0.0, 1.0, max_open=True)), (0.95, 0.999),
                                        flag="--beta1/--beta2", help=("AdamW β1", "AdamW β2"))
    clip: float = option(Float(0.0, min_open=True), 1.0, help="global gradient-norm clip")
    seed: int = option(SEED, 0, help="seeds data order, noise and timesteps")
    k: int | str = option(Either(Choice("all"), POSITIVE_INT), 10,
                          help="retrack: nearest remain images per forget image, or 'all' (untruncated)")
    lam: float | str | None = option(
        Optional(Either(Choice("auto"), _PROB)), None,
        help="retrack: weight λ of the unlearning term (default 0.005), or 'auto' to choose it per step from "
        "the gradient norms (see --lam-ratio), with --balance nash only the fallback where no bargain exists; "
        "siss: forget-mixing probability λ (default 0.5)")
    lam_ratio: float = option(Float(0.0, min_open=True), 1.0,
                              help="retrack with --lam auto: target of λ‖∇L_unlearn‖ / ((1−λ)‖∇L_remain‖)")
    surgery: bool = option(Bool(), False,
                           help="retrack: remove from ∇L_unlearn its component opposing ∇L_remain when their "
                           "inner product is negative (PCGrad)")
    forget_weighting: str = option(Choice(*FORGET_WEIGHTINGS), "none",
                                   help="retrack: weighting of the forget rows over timesteps: 'none' (the "
                                   "paper's) or 'min-snr' (weight min(SNR_t, γ)/SNR_t, see --snr-gamma)")
    snr_gamma: float = option(Float(0.0, min_open=True), 5.0, help="retrack with min-snr: the SNR cap γ")
    forget_t_min: int = option(Int(min=0), 0,
                               help="retrack: forget rows draw timesteps from t-min … T−1 (0: all, the paper's)")
    forget_level: str | None = option(
        Optional(Text()), None,
        help="retrack: images of the forget images' kind that the model never saw (a folder, .npz, ...; at least "
        "20); each forget row's target moves toward its neighbours only until its denoising error reaches "
        "theirs at that timestep under the input model: the paper's redirection at high noise, no more "
        "unfamiliar than an unseen image at low noise")
    balance: str = option(Choice(*BALANCES), "none",
                          help="retrack: weights of the two gradients: 'none' (λ and 1−λ, the paper's) or 'nash' "
                          "(their Nash bargaining solution at every step, as MUNBa)")
    saliency: float | None = option(
        Optional(Float(0.0, 1.0, min_open=True)), None,
        help="any method: fine-tune only this top fraction F of the weights, ranked by |∇| of the denoising "
        "loss on the forget images before the first step (SalUn's weight saliency; its paper uses 0.5); the "
        "other weights stay bit-identical to the input")
    s: float | None = option(Optional(Float(0.0)), None,
                             help="siss: norm of the subtracted forget gradient (default 5)")
    eta: float | None = option(Optional(Float(0.0)), None, help="erasediff: η of the gradient rule (default 1e-3)")
    stop_heldout: str | None = option(
        Optional(Text()), None,
        help="stop when forgotten: images of the forget images' kind that the model never saw (a folder, .npz, "
        "...; at least 20); the run ends at the first check where every forget image's membership loss score "
        "reaches --stop-percentile of theirs (scored under the input model), --steps becoming the most it runs")
    stop_percentile: float = option(Float(0.0, 100.0, min_open=True), 50.0,
                                    help="with --stop-heldout: the percentile of the held-out images' scores the "
                                    "forget images must reach (50: as familiar as a typical unseen image)")
    stop_every: int = option(POSITIVE_INT, 1, help="with --stop-heldout: check every N optimiser steps")
    distill: float = option(Float(0.0), 0.0,
                            help="weight W of a keep term that distils the frozen input model on the remain rows "
                            "(their target becomes (ε + W·ε_frozen)/(1 + W)); 0: off, the paper's objectives; "
                            "not for neggrad, which has no remain rows")
    replay: int = option(Int(min=0), 0,
                         help="with --distill: draw this many samples of the input model before training (DDIM, "
                         "50 steps) and make each remain draw one of them with probability 1/2, its target "
                         "the frozen model's ε alone (generative replay); pixel models; 0: off")
    prompt: str | None = option(
        Optional(Text()), None,
        help="text-to-image models: the prompt the model is unlearned under (its embedding is fixed; the data "
        "are encoded once by the VAE and cached); longer than the tokenizer takes: truncated as the pipeline "
        "does, with a warning")
    lora: int | None = option(Optional(POSITIVE_INT), None,
                              help="text-to-image models: train a LoRA adapter of this rank on the attention "
                              "projections of the UNet (or transformer) instead of the whole network; writes "
                              "pytorch_lora_weights.safetensors")
    lora_alpha: float | None = option(Optional(Float(0.0, min_open=True)), None,
                                      help="LoRA α; None means the rank (scale α/rank = 1)")
    gradient_checkpointing: bool = option(Bool(), False,
                                          help="recompute UNet activations in the backward pass: less memory, "
                                          "about a third more time")
    mixed_precision: str = option(Choice(*MIXED_PRECISION), "no",
                                  help="no, bf16 or fp16: autocast through accelerate (CUDA only; weights stay "
                                  "fp32)")
    layout: str = option(Choice(*LAYOUTS), "auto",
                         help="forward of the remain and forget rows: 'joint' (one forward), 'split' (one per "
                         "part) or 'auto' (whichever is faster for this device and shape, timed once and "
                         "cached); the gradients are the same")
    device: str | None = option(Optional(Device()), None,
                                help="torch device (default: cuda if available, else cpu)")
    cache_dir: str | None = option(Optional(Text()), None,
                                   help="nearest-neighbour cache (default: $RETRACK_CACHE or ~/.cache/retrack)")
    overwrite: bool = option(Bool(), False, help="replace an existing --out")
    recipe: str | None = option(
        Optional(Text()), None,
        help="settings from a recipe: 'stable-diffusion' (the paper's SD v1.4 column: 30 steps, batch 1 × 16 "
        "accumulation, lr 1e-5, AdamW (0.9, 0.999) wd 1e-2, K 10, λ 0.5, SISS s 750, EraseDiff η 1e-2) or a "
        "YAML file of flag names; flags given here override it")
    evaluation: TrainingEvaluation = nested(TrainingEvaluation, "evaluation during fine-tuning", HOW)


@dataclass(frozen=True, kw_only=True)
class UnlearnConfig(UnlearnSettings):
    """Every setting of one unlearning run, checked on creation and saved beside the output model:
    the flags of `retrack unlearn`, the keyword arguments of `retrack.unlearn()`, the keys of a
    recipe (`batch_size` is `--batch-size`; the evaluation's settings are given flat, as
    `eval_every`)."""

    model: str = option(Text(), help="diffusers pipeline folder (unet/ + scheduler/), bare UNet2DModel folder, "
                        "or hub id; a text-to-image pipeline (SD 1.x/2.x, SDXL, SD3, Flux) with --prompt")
    data: str = option(Text(), help="training images: a folder of png/jpg, an .npz with an 'images' uint8 "
                       "array (N,H,W) or (N,H,W,C), or a torchvision-style MNIST/Fashion-MNIST/CIFAR-10 folder")
    forget: str = option(ForgetSpec(), help="images to forget: comma-separated indices into --data, @FILE with "
                         "one index per line, or comma-separated image files matched to --data by content")
    out: str = option(Text(), help="output model folder")


RECIPES = {"stable-diffusion": "stable_diffusion/unlearn.yaml"}
_NOT_IN_RECIPES = ("recipe", "method")


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
    fields = {k: f for k, (_, f) in setting_fields(UnlearnSettings).items() if k not in _NOT_IN_RECIPES}
    settings = {}
    for key, value in {**raw, **per_method.get(method, {})}.items():
        require(key in fields, f"unknown key {key!r} in {where}; known: {', '.join(sorted(fields))}.")
        settings[key] = fields[key].metadata["check"](value, f"{key!r} in {where}")
    return settings


def config_of(settings: Mapping[str, Any]) -> UnlearnConfig:
    """The run's config from the settings a caller gave (flags typed, keywords passed): with
    `recipe`, the recipe's values fill what was not given; the dataclass's defaults fill the rest."""
    UnlearnConfig.check_keys(settings, "unlearn setting")
    if settings.get("recipe") is not None:
        method = str(settings.get("method", UnlearnSettings.method)).strip()
        settings = {**unlearn_recipe(settings["recipe"], method), **settings}
    return UnlearnConfig.from_settings(settings)


def resolve_unlearn(cfg: UnlearnConfig) -> UnlearnConfig:
    """Everything that can be checked before loading data or a model: method defaults, device,
    the model's family and what it accepts, the evaluation's instruments, the data and forget
    files, and a writable, new output."""
    cfg = resolve_method(cfg)
    family = detect(cfg.model, cfg.prompt)
    cfg = replace(cfg, evaluation=cfg.evaluation.with_defaults(family))
    device = cfg.device or default_device()
    _check_options(cfg, device)
    family.check_settings(cfg.settings(), "unlearn")
    require(cfg.replay == 0 or family.name == "pixel",
            f"--replay draws pixel samples beside the remain images, which a {family.name} model trains on as "
            "VAE latents; use --distill without --replay.")
    cfg = replace(cfg, evaluation=cfg.evaluation.resolve(device, cfg.prompt))
    require(Path(cfg.data).exists(), f"--data: data path {cfg.data!r} does not exist.")
    for flag, path in (("--stop-heldout", cfg.stop_heldout), ("--forget-level", cfg.forget_level)):
        require(path is None or Path(path).exists(), f"{flag}: held-out images {path!r} do not exist.")
    check_forget_file(cfg.forget)
    protected = [Path(p) for p in (cfg.model, cfg.data, cfg.stop_heldout, cfg.forget_level)
                 if p is not None and Path(p).exists()]
    check_output(Path(cfg.out), cfg.overwrite, protected)
    return replace(cfg, device=device)


def _check_options(cfg: UnlearnSettings, device: str) -> None:
    """A LoRA α needs a LoRA rank; mixed precision runs on a GPU only."""
    require(cfg.lora_alpha is None or cfg.lora is not None, "--lora-alpha needs --lora RANK.")
    if cfg.mixed_precision != "no":
        require(device.startswith("cuda"), f"--mixed-precision {cfg.mixed_precision} needs a CUDA device "
                                           f"(accelerate's autocast); on {device} leave it at 'no'.")
        require(not (cfg.mixed_precision == "fp16" and cfg.method == "siss"),
                "--mixed-precision fp16 scales the loss, which changes SISS's fixed-norm forget gradient; use bf16.")


def resolve_method(cfg: _S, processes: int | None = None) -> _S:
    """The method's own defaults filled in and its options checked, touching no file (an
    experiment checks every run's settings this way before the first run)."""
    cls = objectives.method_class(cfg.method)
    _check_variant_options(cfg, cls)
    per_process_batch(train_settings(cfg), process_count() if processes is None else processes)
    defaults = {f: getattr(cls, f) for f in ("lam", "s", "eta") if hasattr(cls, f)}
    return replace(cfg, **{f: getattr(cfg, f) if getattr(cfg, f) is not None else defaults.get(f)
                           for f in defaults})


VARIANT_OPTIONS = ("lam_ratio", "surgery", "forget_weighting", "snr_gamma", "forget_t_min", "balance")


def _check_variant_options(cfg: UnlearnSettings, cls: type) -> None:
    """Options a method does not have are an error, not silently ignored."""
    require(cfg.lam != "auto" or hasattr(cls, "lam_ratio"),
            f"--lam auto balances an unlearning and a remain gradient; method {cfg.method!r} has no such λ.")
    for name in VARIANT_OPTIONS:
        flag = "--" + name.replace("_", "-")
        require(getattr(cfg, name) == UnlearnSettings.__dataclass_fields__[name].default or hasattr(cls, name),
                f"{flag} is an option of retrack; method {cfg.method!r} does not have it.")
    require(cfg.forget_level is None or hasattr(cls, "level"),
            f"--forget-level sets how far ReTrack's forget target moves toward the neighbours; method "
            f"{cfg.method!r} has no such target (use --method retrack).")
    require(cfg.distill == 0 or hasattr(cls, "distill"),
            f"--distill distils the frozen model on the remain rows a method already feeds through it, and "
            f"method {cfg.method!r} has none (it is gradient ascent on the forget images alone); use vanilla, "
            "erasediff, siss or retrack.")
    _check_takes_effect(cfg)


def _check_takes_effect(cfg: UnlearnConfig) -> None:
    """A value that only another setting would make count is refused, naming that setting (the
    defaults are always accepted)."""
    default = UnlearnConfig.__dataclass_fields__
    require(cfg.lam_ratio == default["lam_ratio"].default or cfg.lam == "auto",
            f"--lam-ratio {cfg.lam_ratio:g} acts only with --lam auto"
            f"{f' (now --lam {cfg.lam})' if cfg.lam is not None else ''}; add --lam auto.")
    if cfg.balance == "nash":
        require(not cfg.surgery, "--balance nash weighs the two gradients by bargaining; it does not combine with "
                                 "--surgery.")
        require(cfg.lam != "auto", "--balance nash chooses both weights at every step; --lam auto cannot "
                                   "combine with it (a fixed --lam is its fallback where no bargain exists).")
    for name in ("stop_percentile", "stop_every"):
        require(getattr(cfg, name) == default[name].default or cfg.stop_heldout is not None,
                f"--{name.replace('_', '-')} acts only with --stop-heldout; add --stop-heldout IMAGES.")
    require(cfg.replay == 0 or cfg.distill > 0,
            f"--replay {cfg.replay} adds samples of the input model whose target is the frozen model's ε, "
            "which only --distill W > 0 brings in; add --distill.")
    require(cfg.snr_gamma == default["snr_gamma"].default or cfg.forget_weighting == "min-snr",
            f"--snr-gamma {cfg.snr_gamma:g} acts only with --forget-weighting min-snr (now "
            f"{cfg.forget_weighting}); add --forget-weighting min-snr.")
    if cfg.cache_dir is not None:
        cache = Path(cfg.cache_dir)
        ancestor = next((p for p in (cache, *cache.parents) if p.exists()), None)
        require(ancestor is None or ancestor.is_dir(),
                f"--cache-dir {cfg.cache_dir!r} is a file or lies below one ({str(ancestor)!r}); "
                f"give a folder (it is made if missing).")


def train_settings(cfg: UnlearnSettings) -> TrainSettings:
    return TrainSettings(cfg.steps, cfg.batch_size, cfg.lr, tuple(cfg.betas), cfg.weight_decay,
                         cfg.clip, cfg.seed, cfg.grad_accum, cfg.mixed_precision, cfg.layout, cfg.saliency)


def process_count() -> int:
    """Processes of this run as `accelerate launch` (or MPI) announces them, read before any
    distributed state exists so that a bad batch split fails before a model is loaded."""
    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def build_objective(cfg: UnlearnSettings) -> objectives.Objective:
    try:
        return objectives.build(cfg.method, lam=cfg.lam, s=cfg.s, eta=cfg.eta, distill=cfg.distill,
                                **{name: getattr(cfg, name) for name in VARIANT_OPTIONS})
    except ValueError as e:
        raise UserError(f"{e}.") from None
