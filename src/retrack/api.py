"""The public entry points, with the same names as the CLI flags: unlearn() and sample()."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from retrack import objectives
from retrack.data import ForgetSpec, ImageSet, check_forget_file, load_images, parse_forget, split
from retrack.errors import UserError, require
from retrack.evaluate import EvaluateConfig, MetricNames
from retrack.models import LoadedModel, load_model, require_kind, save_model
from retrack.monitor import CURVES_FILE, DURING_TRAINING, Monitor, StopAt, check_evaluation, merge_log
from retrack.neighbours import cached_nearest_neighbours
from retrack.objectives.retrack import FORGET_WEIGHTINGS
from retrack.runrecord import atomic_directory, check_output, environment_record, temp_file, write_json
from retrack.store import Rows
from retrack.trainer import TrainData, TrainSettings, neighbour_table, per_process_batch, train
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
    option,
)

RUN_RECORD = "retrack_run.json"
STEP_LOG = "retrack_log.json"


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
    eval_metrics: tuple[str, ...] | None = option(Optional(MetricNames("--eval-metrics", DURING_TRAINING)), None)
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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def unlearn(model: str, data: str, forget: str | list[int], out: str, progress: bool = True,
            **settings) -> Path:
    """Fine-tune `model` so that it behaves as if the `forget` images of `data` were never seen.

    Args:
        model: diffusers pipeline folder, bare UNet2DModel folder, or hub id. Never modified.
        data: image folder, .npz with `images`, or torchvision-style MNIST/CIFAR-10 folder.
        forget: "17,42", "@indices.txt", paths of image files matched to `data` by content, or a
            list of indices.
        out: output folder, written atomically in the same layout as `model`.
        **settings: any field of UnlearnConfig (method, steps, batch_size, lr, seed, k, lam, ...);
            recipe="stable-diffusion" (or a YAML file) supplies the settings not given here.
    Returns:
        The output folder.
    """
    UnlearnConfig.check_keys(settings, "unlearn setting")
    if settings.get("recipe") is not None:
        settings = {**unlearn_recipe(settings["recipe"], settings.get("method", "retrack")), **settings}
    cfg = resolve_unlearn(UnlearnConfig(model=model, data=data, forget=forget, out=out, **settings))
    return run_unlearn(cfg, progress)


RECIPES = {"stable-diffusion": "stable_diffusion/unlearn.yaml"}
_NOT_IN_RECIPES = ("model", "data", "forget", "out", "recipe", "method")


def unlearn_recipe(spec: str, method: str) -> dict:
    """The settings a recipe gives `method`: its top-level keys, then the method's own under
    `methods:`. `spec` is a built-in name (stable-diffusion: the paper's SD v1.4 column) or a YAML
    file; every value goes through the same checks as its flag."""
    import dataclasses
    from importlib import resources

    from retrack.validation import load_yaml

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
    the model's layout, the data and forget files, and a writable, new output."""
    cfg = resolve_method(cfg)
    cfg = eval_defaults(cfg)
    check_evaluation(cfg)
    eval_config(cfg)
    require_kind(cfg.model, cfg.prompt)
    device = cfg.device or default_device()
    _check_text_options(cfg, device)
    require(Path(cfg.data).exists(), f"--data: data path {cfg.data!r} does not exist.")
    check_forget_file(cfg.forget)
    protected = [Path(p) for p in (cfg.model, cfg.data) if Path(p).exists()]
    check_output(Path(cfg.out), cfg.overwrite, protected)
    return replace(cfg, device=device)


def _check_text_options(cfg: UnlearnConfig, device: str) -> None:
    """LoRA is for text-to-image UNets; mixed precision runs on a GPU only."""
    require(cfg.lora is None or cfg.prompt is not None,
            "--lora adapts a Stable Diffusion UNet's attention; it needs a text-to-image model and --prompt.")
    require(cfg.lora_alpha is None or cfg.lora is not None, "--lora-alpha needs --lora RANK.")
    if cfg.mixed_precision != "no":
        require(device.startswith("cuda"), f"--mixed-precision {cfg.mixed_precision} needs a CUDA device "
                                           f"(accelerate's autocast); on {device} leave it at 'no'.")
        require(not (cfg.mixed_precision == "fp16" and cfg.method == "siss"),
                "--mixed-precision fp16 scales the loss, which changes SISS's fixed-norm forget gradient; use bf16.")
    if cfg.prompt is not None:
        from retrack.latent import is_lora_folder, require_sd_extra

        require(not is_lora_folder(cfg.model), f"--model {cfg.model!r} is a LoRA adapter; unlearn its base pipeline, "
                "or fuse the adapter into it first (pipe.fuse_lora(), then pipe.save_pretrained).")
        require_sd_extra(cfg.lora is not None)


def resolve_method(cfg: UnlearnConfig, processes: int | None = None) -> UnlearnConfig:
    """The method's own defaults filled in and its options checked, touching no file (an
    experiment checks every run's settings this way before the first run)."""
    cls = objectives.method_class(cfg.method)
    _check_variant_options(cfg, cls)
    per_process_batch(_train_settings(cfg), process_count() if processes is None else processes)
    defaults = {f: getattr(cls, f) for f in ("lam", "s", "eta") if hasattr(cls, f)}
    return replace(cfg, **{f: getattr(cfg, f) if getattr(cfg, f) is not None else defaults.get(f)
                           for f in defaults})


PIXEL_EVAL = {"eval_metrics": ("copies",), "eval_samples": 256, "copy_rule": "l2"}
# The paper's SD protocol: 16 samples for the prompt, their mean similarity to the training image.
TEXT_EVAL = {"eval_metrics": ("similarity", "copies"), "eval_samples": 16, "copy_rule": "descriptor"}


def eval_defaults(cfg: UnlearnConfig) -> UnlearnConfig:
    """The evaluation settings left unset, filled for the model's kind (a text-to-image model with
    --prompt, or a pixel model), so the run record shows what was measured. CLIP-IQA joins a text
    model's defaults when --eval-clip names a local CLIP."""
    if cfg.eval_every is None:
        return cfg
    text = cfg.prompt is not None
    if not text:
        require(cfg.eval_guidance == 7.5, "--eval-guidance is for text-to-image models with --prompt.")
        require(cfg.eval_target is None, "--eval-target is for text-to-image models with --prompt.")
    defaults = dict(TEXT_EVAL if text else PIXEL_EVAL)
    if text and cfg.eval_clip is not None:
        defaults["eval_metrics"] = (*defaults["eval_metrics"], "clipiqa")
    cfg = replace(cfg, **{k: v if getattr(cfg, k) is None else getattr(cfg, k) for k, v in defaults.items()})
    if text:
        from retrack.evaluate import TEXT_METRICS, target_files

        for path in target_files(cfg.eval_target):
            require(path.is_file(), f"--eval-target {str(path)!r} is not an image file.")
        counts = {"copies", "fid", "is"} & set(cfg.eval_metrics)
        require(not counts or cfg.copy_rule != "l2" or cfg.copy_threshold is not None,
                "--copy-rule l2 with --prompt needs --copy-threshold (an L2 distance over [0, 1] pixels at the "
                "pipeline's image size).")
        other = [m for m in cfg.eval_metrics if m not in TEXT_METRICS]
        require(not other, f"--eval-metrics {other[0] if other else ''} needs a pixel model; with --prompt choose "
                           f"from {', '.join(m for m in TEXT_METRICS if m in DURING_TRAINING)}.")
    return cfg


def eval_config(cfg: UnlearnConfig) -> EvaluateConfig | None:
    """The evaluation during fine-tuning as `retrack evaluate` would run it (None: no evaluation);
    resolving it names missing weights before anything loads."""
    from retrack.evaluate import resolved

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


def run_unlearn(cfg: UnlearnConfig, progress: bool = True) -> Path:
    """The expensive part, on a resolved config."""
    out_path = Path(cfg.out)
    images = load_images(cfg.data)
    parts = split(images, parse_forget(cfg.forget, images))
    evaluation = _evaluation_setup(cfg, images)  # used on the main process only (trainer)
    if cfg.prompt is not None:
        model = _load_text(cfg, images, progress)
        space, denoiser, to_tensor = model.notes.pop("latents"), model.denoiser, torch.from_numpy
        save, extra = (lambda tmp: _save_text(model, tmp)), _text_record(model)
        monitor_on = partial(_text_monitor, cfg, evaluation, model, images, parts)
    else:
        loaded = load_model(cfg.model, cfg.device)
        _check_fits(images, loaded)
        space, denoiser, to_tensor = images.images, loaded.denoiser, _nchw
        save, extra = (lambda tmp: save_model(loaded, tmp)), {}
        monitor_on = partial(_monitor, cfg, evaluation, loaded, space[parts.remain], space[parts.forget])
    if cfg.gradient_checkpointing:
        denoiser.unet.enable_gradient_checkpointing()
    steps = denoiser.schedule.num_steps
    require(cfg.forget_t_min < steps, f"--forget-t-min must be below the model's {steps} timesteps, "
                                      f"got {cfg.forget_t_min}.")
    objective = _objective(cfg)
    forget_imgs = space[parts.forget]
    table = None
    if objective.needs_neighbours and cfg.k != "all":
        require(int(cfg.k) <= len(parts.remain), f"--k {cfg.k} must be between 1 and the remain set's "
                                                 f"size {len(parts.remain)} (K = {cfg.k} is too large).")
        table = cached_nearest_neighbours(Rows(space, parts.remain), forget_imgs, int(cfg.k),
                                          Path(cfg.cache_dir) if cfg.cache_dir else None, progress,
                                          cfg.device)
    train_data = TrainData(to_tensor(space[parts.remain]), to_tensor(forget_imgs), neighbour_table(table))
    settings_ = _train_settings(cfg)
    monitor = None if evaluation is None else monitor_on()
    log = train(denoiser, objective, train_data, settings_, cfg.device, progress, between_steps=monitor)
    if _is_main_process():
        _write_output(out_path, save, cfg, objective, images, parts, table, log, extra, monitor)
    return out_path


def _evaluation_setup(cfg: UnlearnConfig, images: ImageSet):
    """The evaluation's config (with the copy threshold for these images) and its instruments,
    loaded before the model so that a bad weight file costs seconds."""
    from retrack.evaluate import copy_threshold_for, load_instruments

    ecfg = eval_config(cfg)
    if ecfg is None:
        return None
    if cfg.prompt is None:  # a text model's threshold is checked at its pipeline's image size
        ecfg = copy_threshold_for(ecfg, images)
    return ecfg, load_instruments(ecfg)


def _monitor(cfg: UnlearnConfig, evaluation, loaded: LoadedModel, remain: np.ndarray,
             forget_imgs: np.ndarray) -> Monitor:
    from retrack.evaluate import distinct, measure

    ecfg, tools = evaluation
    T = int(loaded.scheduler.config.num_train_timesteps)
    require(cfg.eval_steps <= T, f"--eval-steps must be in 1..{T} for this model, got {cfg.eval_steps}.")
    targets = distinct(forget_imgs)
    return Monitor(int(cfg.eval_every), cfg.steps,
                   lambda: measure(ecfg, loaded, targets, remain, tools, progress=False),
                   loaded.denoiser, cfg.stop_at)


def _text_monitor(cfg: UnlearnConfig, evaluation, model, images: ImageSet, parts) -> Monitor:
    """Evaluation of a text-to-image model: samples through its pipeline under the run's prompt
    (the UNet being trained, with its LoRA adapter if any), compared with the training image(s)
    at the pipeline's size."""
    from retrack.evaluate import copy_threshold_for, measure, text_targets

    ecfg, tools = evaluation
    T = int(model.pipeline.scheduler.config.num_train_timesteps)
    require(cfg.eval_steps <= T, f"--eval-steps must be in 1..{T} for this model, got {cfg.eval_steps}.")
    found = text_targets(model.pipeline, images, parts, ecfg)
    ecfg = copy_threshold_for(ecfg, found.pixels)
    return Monitor(int(cfg.eval_every), cfg.steps,
                   lambda: measure(ecfg, model, found.targets, found.remain, tools, False, found.name),
                   model.denoiser, cfg.stop_at)


def _load_text(cfg: UnlearnConfig, images: ImageSet, progress: bool):
    """The pipeline with the prompt bound in, and the data set's latents (cached by content)."""
    from retrack.latent import cached_latents, load_text_model, preprocessing
    from retrack.neighbours import default_cache_dir

    model = load_text_model(cfg.model, cfg.prompt, cfg.device, cfg.lora, cfg.lora_alpha, seed=cfg.seed)
    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir().parent
    latents, key = cached_latents(model.pipeline, images, root / "latents", progress)
    model.notes.update(latents=np.ascontiguousarray(latents), latent_key=key,
                       preprocessing=preprocessing(model.pipeline, images))
    return model


def _save_text(model, tmp: Path) -> None:
    from retrack.latent import save_text_model

    save_text_model(model, tmp)


def _text_record(model) -> dict:
    from retrack.latent import LORA_FILE

    pipe, base = model.pipeline, Path(model.source)
    return {"text_to_image": {
        "base_model": str(base.resolve()) if base.exists() else model.source,
        "pipeline": type(pipe).__name__, "prompt": model.prompt,
        "images": model.notes["preprocessing"], "latent_cache_key": model.notes["latent_key"],
        "latent_shape": list(model.denoiser.sample_shape), "trained": "lora" if model.lora else "unet",
        "lora": model.lora, "output": LORA_FILE if model.lora else "pipeline folder"}}


VARIANT_OPTIONS = ("lam_ratio", "surgery", "forget_weighting", "snr_gamma", "forget_t_min")


def _check_variant_options(cfg: UnlearnConfig, cls: type) -> None:
    """Options a method does not have are an error, not silently ignored."""
    require(cfg.lam != "auto" or hasattr(cls, "lam_ratio"),
            f"--lam auto balances an unlearning and a remain gradient; method {cfg.method!r} has no such λ.")
    for name in VARIANT_OPTIONS:
        flag = "--" + name.replace("_", "-")
        require(getattr(cfg, name) == UnlearnConfig.__dataclass_fields__[name].default or hasattr(cls, name),
                f"{flag} is an option of retrack; method {cfg.method!r} does not have it.")


def _train_settings(cfg: UnlearnConfig) -> TrainSettings:
    return TrainSettings(cfg.steps, cfg.batch_size, cfg.lr, tuple(cfg.betas), cfg.weight_decay,
                         cfg.clip, cfg.seed, cfg.grad_accum, cfg.mixed_precision)


def process_count() -> int:
    """Processes of this run as `accelerate launch` (or MPI) announces them, read before any
    distributed state exists so that a bad batch split fails before a model is loaded."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def _objective(cfg: UnlearnConfig):
    try:
        return objectives.build(cfg.method, lam=cfg.lam, s=cfg.s, eta=cfg.eta,
                                **{name: getattr(cfg, name) for name in VARIANT_OPTIONS})
    except ValueError as e:
        raise UserError(f"{e}.") from None


def _check_fits(images: ImageSet, loaded: LoadedModel) -> None:
    want = loaded.denoiser.sample_shape
    require(images.shape == want, f"the data's images are {_fmt(images.shape)} (C×H×W) but the model "
                                  f"takes {_fmt(want)}.")


def _fmt(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _write_output(out, save, cfg, objective, images, parts, table, log, extra, monitor=None) -> None:
    if monitor is not None:
        extra = {**extra, "evaluation": {
            "every": monitor.every, "steps": [e["step"] for e in monitor.entries], "stop_at": cfg.stop_at,
            "stopped_at": monitor.stopped_at, "steps_done": len(log), "curves": CURVES_FILE}}
    record = environment_record(
        cfg,
        objective=asdict(objective),
        seed=cfg.seed,
        processes=process_count(),
        data={"source": images.source, "digest": images.digest(), "size": len(images),
              "forget_indices": parts.forget, "forget_size": len(parts.forget),
              "remain_size": len(parts.remain)},
        neighbours=table,
        final_terms=log[-1] if log else {},
        **extra,
    )
    with atomic_directory(out) as tmp:
        save(tmp)
        write_json(tmp / RUN_RECORD, record)
        write_json(tmp / STEP_LOG, merge_log(log, monitor.entries) if monitor else log)
        if monitor is not None:
            from retrack.monitor import draw_curves

            draw_curves(monitor.entries, monitor.stopped_at).save(tmp / CURVES_FILE, format="PNG")


@dataclass(frozen=True)
class SampleConfig(Validated):
    """Every setting of `retrack sample`; each field is the flag of the same name."""

    model: str = option(Text())
    num: int = option(POSITIVE_INT)
    out: str = option(Text())
    steps: int = option(POSITIVE_INT, 50)
    sampler: str = option(Choice("ddpm", "ddim"), "ddim")
    seed: int = option(SEED, 0)
    batch_size: int = option(POSITIVE_INT, 256)
    grid: str | None = option(Optional(Text()), None)
    device: str | None = option(Optional(Device()), None)
    overwrite: bool = option(Bool(), False)
    prompt: str | None = option(Optional(Text()), None)
    guidance: float = option(Float(0.0), 7.5)


def resolve_sample(cfg: SampleConfig) -> SampleConfig:
    """Model kind, device, and both outputs (.npz and the optional .png grid) checked up front."""
    require_kind(cfg.model, cfg.prompt)
    require(cfg.prompt is not None or cfg.guidance == 7.5, "--guidance is for text-to-image models with --prompt.")
    if cfg.prompt is not None:
        from retrack.latent import require_sd_extra

        require_sd_extra()
    protected = [Path(cfg.model)] if Path(cfg.model).exists() else []
    check_output(Path(cfg.out), cfg.overwrite, protected, flag="--out", suffix=".npz")
    if cfg.grid is not None:
        require(Path(cfg.grid).resolve() != Path(cfg.out).resolve(), "--grid and --out name the same file.")
        check_output(Path(cfg.grid), cfg.overwrite, protected, flag="--grid", suffix=".png")
    return replace(cfg, device=cfg.device or default_device())


def sample(model: str, num: int, out: str, progress: bool = True, **settings) -> Path:
    """Draw `num` images from `model` and write them as uint8 (N, H, W, C) `images` in an .npz.

    Args:
        **settings: any field of SampleConfig (steps, sampler, seed, batch_size, grid, device, ...).
    """
    SampleConfig.check_keys(settings, "sample setting")
    return run_sample(resolve_sample(SampleConfig(model=model, num=num, out=out, **settings)), progress)


def run_sample(cfg: SampleConfig, progress: bool = True) -> Path:
    """Sample, then write the .npz and the grid side by side, each renamed into place only once
    both are complete."""
    from retrack.grid import save_grid
    from retrack.sampling import sample as draw

    if cfg.prompt is not None:
        from retrack.latent import load_text_model, sample_text

        model = load_text_model(cfg.model, cfg.prompt, cfg.device)
        images = sample_text(model, cfg.num, cfg.steps, cfg.sampler, cfg.seed, cfg.batch_size, cfg.guidance,
                             progress)
    else:
        loaded = load_model(cfg.model, cfg.device)
        images = draw(loaded.denoiser, loaded.scheduler.config, cfg.num, cfg.steps, cfg.sampler, cfg.seed,
                      cfg.batch_size, progress)
    outputs = [Path(cfg.out)] + ([Path(cfg.grid)] if cfg.grid else [])
    temps: list[Path] = []
    try:
        for path in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            temps.append(temp_file(path))
        with open(temps[0], "wb") as fh:
            text = {} if cfg.prompt is None else {"prompt": cfg.prompt, "guidance": cfg.guidance}
            np.savez(fh, images=images, seed=cfg.seed, steps=cfg.steps, sampler=cfg.sampler,
                     model=str(cfg.model), **text)
        if cfg.grid:
            save_grid(images[:64], temps[1], fmt="PNG")
        for tmp, path in zip(temps, outputs, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return Path(cfg.out)


def prepare_data(data: str, out: str, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert `data` once into a memory-mapped store that every command accepts as --data.

    Args:
        data: anything --data accepts (image folder, .npz, MNIST/CIFAR-10 folder, another store).
        out: the store folder to write (`images.u8` + `header.json`), atomically.
    Returns:
        The store's header: shape, layout, content digest (ImageSet.digest() of the same images)
        and source.
    """
    from tqdm.auto import tqdm

    from retrack.data import image_chunks
    from retrack.store import write_store

    out_path = Path(out)
    check_output(out_path, overwrite, [Path(data)] if Path(data).exists() else [], flag="--out")
    shape, chunks = image_chunks(data)
    bar = tqdm(total=shape[0], desc="prepare-data", unit="img", disable=not progress, dynamic_ncols=True)

    def counted():
        for rows in chunks:
            bar.update(len(rows))
            yield rows

    header = write_store(counted(), shape, out_path, str(data))
    bar.close()
    return header
