"""One unlearning run, in one direction: resolved config → model (its backend) → data in the
model's space → neighbours → objective → trainer → output folder written atomically.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from accelerate import PartialState

from retrack import keep
from retrack.backends import Backend, LoadOptions, detect
from retrack.backends.base import TrainingSpace
from retrack.data import ImageSet, Split, load_images, parse_forget, split
from retrack.errors import require
from retrack.evaluate import (
    EvaluateConfig,
    Instruments,
    copy_threshold_for,
    load_instruments,
    measure,
    metric_images,
)
from retrack.levels import unseen_levels
from retrack.monitor import CURVES_FILE, Monitor, draw_curves, merge_log
from retrack.neighbours import cached_nearest_neighbours
from retrack.objectives.base import Objective
from retrack.runrecord import atomic_directory, environment_record, write_json
from retrack.stopping import MIN_HELDOUT, NonmemberStop, with_stop
from retrack.store import Rows
from retrack.trainer import TrainData, neighbour_table, to_model_range, train
from retrack.unlearn_config import (
    UnlearnConfig,
    build_objective,
    config_of,
    process_count,
    resolve_unlearn,
    train_settings,
)

RUN_RECORD = "retrack_run.json"
STEP_LOG = "retrack_log.json"


def unlearn(model: str, data: str, forget: str | list[int], out: str, progress: bool = True,
            **settings) -> Path:
    """Fine-tune `model` so that it behaves as if the `forget` images of `data` were never seen.

    Args:
        model: diffusers pipeline folder, bare UNet2DModel folder, or hub id. Never modified.
        data: image folder, .npz with `images`, or torchvision-style MNIST/CIFAR-10 folder.
        forget: "17,42", "@indices.txt", paths of image files matched to `data` by content, or a
            list of indices.
        out: output folder, written atomically in the same layout as `model`.
        **settings: any setting of UnlearnConfig (method, steps, batch_size, lr, seed, k, lam,
            eval_every, ...);
            recipe="stable-diffusion" (or a YAML file) supplies the settings not given here.
    Returns:
        The output folder.
    """
    cfg = resolve_unlearn(config_of({"model": model, "data": data, "forget": forget, "out": out, **settings}))
    return run_unlearn(cfg, progress)


def run_unlearn(cfg: UnlearnConfig, progress: bool = True) -> Path:
    """The expensive part, on a resolved config."""
    family = detect(cfg.model, cfg.prompt)
    images = load_images(cfg.data, family.image_size(cfg.model))  # mixed sizes: as the pipeline resizes them
    parts = split(images, parse_forget(cfg.forget, images))
    evaluation = _evaluation_setup(cfg)  # the instruments load before the model: a bad file costs seconds
    model = family.load(cfg.model, cfg.device, LoadOptions(cfg.prompt, cfg.lora, cfg.lora_alpha, cfg.seed))
    space = model.training_space(images, Path(cfg.cache_dir) if cfg.cache_dir else None, progress)
    monitor = None if evaluation is None else _monitor(cfg, *evaluation, model, images, parts)
    denoiser = model.denoiser
    if cfg.gradient_checkpointing:
        denoiser.unet.enable_gradient_checkpointing()
    steps = denoiser.schedule.num_steps
    require(cfg.forget_t_min < steps, f"--forget-t-min must be below the model's {steps} timesteps, "
                                      f"got {cfg.forget_t_min}.")
    objective = build_objective(cfg)
    level = None
    if cfg.forget_level is not None:  # measured on the input model, before any step
        level = unseen_levels(denoiser, _unseen_rows("--forget-level", cfg.forget_level, family, model, images,
                                                     space, cfg, progress), cfg.seed)
        objective = replace(objective, level=tuple(level["levels"]))
    forget_rows = space.rows[parts.forget]
    table = None
    if objective.needs_neighbours and cfg.k != "all":
        require(int(cfg.k) <= len(parts.remain), f"--k {cfg.k} must be between 1 and the remain set's "
                                                 f"size {len(parts.remain)} (K = {cfg.k} is too large).")
        table = cached_nearest_neighbours(Rows(space.rows, parts.remain), forget_rows, int(cfg.k),
                                          Path(cfg.cache_dir) if cfg.cache_dir else None, progress, cfg.device)
    replay = None
    if cfg.replay:  # samples of the input model, i.e. of the frozen copy the trainer will make
        replay = keep.replay_samples(model.sample, cfg.replay, cfg.seed, cfg.batch_size, progress)
    train_data = TrainData(space.to_tensor(space.rows[parts.remain]), space.to_tensor(forget_rows),
                           neighbour_table(table), replay)
    stopper = None if cfg.stop_heldout is None else _stopper(cfg, family, model, images, space, forget_rows, progress)
    log = train(denoiser, objective, train_data, train_settings(cfg), cfg.device, progress,
                between_steps=with_stop(monitor, stopper))
    if PartialState().is_main_process:
        _write_output(Path(cfg.out), model, cfg, objective, images, parts, table, log, monitor, stopper, level)
    return Path(cfg.out)


def _evaluation_setup(cfg: UnlearnConfig) -> tuple[EvaluateConfig, Instruments] | None:
    """The evaluation's config, resolved with the run's, and its instruments (main process only)."""
    if cfg.evaluation.every is None:
        return None
    ecfg = cfg.evaluation.evaluate_config(cfg.device, cfg.prompt)
    return ecfg, load_instruments(ecfg)


def _monitor(cfg: UnlearnConfig, ecfg: EvaluateConfig, tools: Instruments, model: Backend, images: ImageSet,
             parts: Split) -> Monitor:
    """Evaluation of the model being trained (with its LoRA adapter if any), sampled as `retrack
    evaluate` samples it and compared with the forget images (or --eval-target files) at the size
    the model draws."""
    T = model.num_timesteps
    ev = cfg.evaluation
    require(ev.steps <= T, f"--eval-steps must be in 1..{T} for this model, got {ev.steps}.")
    found = metric_images(model, images, parts, ecfg)
    ecfg = copy_threshold_for(ecfg, found.pixels)
    return Monitor(int(ev.every), cfg.steps,
                   lambda: measure(ecfg, model, found.targets, found.remain, tools, False, found.name),
                   model.denoiser, ev.stop_at)


def _stopper(cfg: UnlearnConfig, family: type[Backend], model: Backend, images: ImageSet, space: TrainingSpace,
             forget_rows: np.ndarray, progress: bool) -> NonmemberStop:
    """The stop-when-forgotten rule on the held-out images, in the model's training space (pixels,
    or latents through the model's VAE), each distinct forget image once."""
    device = next(model.denoiser.parameters()).device
    held = _unseen_rows("--stop-heldout", cfg.stop_heldout, family, model, images, space, cfg, progress)
    forget = to_model_range(space.to_tensor(np.unique(forget_rows, axis=0)), device)
    return NonmemberStop(model.denoiser, forget, held, cfg.stop_percentile, cfg.stop_every)


def _unseen_rows(flag: str, path: str, family: type[Backend], model: Backend, images: ImageSet,
                 space: TrainingSpace, cfg: UnlearnConfig, progress: bool):
    """Images the model never saw, checked (their shape is the data's, none is a training image),
    in the model's training space and range, on its device."""
    held = load_images(path, family.image_size(cfg.model))
    require(held.shape == images.shape, f"the {flag} images are {'×'.join(map(str, held.shape))} (C×H×W) "
                                        f"but --data's are {'×'.join(map(str, images.shape))}; give images like "
                                        "the training images.")
    trained = set(images.image_digests())
    require(not any(d in trained for d in held.image_digests()),
            f"an image of {flag} occurs in --data, so it is no unseen image; remove it.")
    require(len(held) >= MIN_HELDOUT, f"{flag} gives {len(held)} images; a level of unseen images needs at "
                                      f"least {MIN_HELDOUT}.")
    rows = model.training_space(held, Path(cfg.cache_dir) if cfg.cache_dir else None, progress).rows
    return to_model_range(space.to_tensor(rows), next(model.denoiser.parameters()).device)


def objective_record(objective: Objective) -> dict:
    """The objective's hyperparameters for the run record; `distill` only where it is on, so a run
    without it records exactly what it did before the option existed (it is in the settings too)."""
    return {k: v for k, v in asdict(objective).items() if (k != "distill" or v) and k != "level"}


def _write_output(out: Path, model: Backend, cfg: UnlearnConfig, objective: Objective, images: ImageSet,
                  parts: Split, table, log: list[dict], monitor: Monitor | None,
                  stopper: NonmemberStop | None = None, level: dict | None = None) -> None:
    extra = model.record()
    if level is not None:  # the grid it was measured on; every t is the linear interpolation
        extra = {**extra, "forget_level": {"heldout": cfg.forget_level, "seed": cfg.seed,
                                           **{k: v for k, v in level.items() if k != "levels"}}}
    if stopper is not None:
        extra = {**extra, "stopping": stopper.record(len(log))}
    if monitor is not None:
        extra = {**extra, "evaluation": {
            "every": monitor.every, "steps": [e["step"] for e in monitor.entries], "stop_at": cfg.evaluation.stop_at,
            "stopped_at": monitor.stopped_at, "steps_done": len(log), "curves": CURVES_FILE}}
    record = environment_record(
        cfg,
        objective=objective_record(objective),
        seed=cfg.seed,
        processes=process_count(),
        data={"source": images.source, "digest": images.digest(), "size": len(images),
              "forget_indices": parts.forget, "forget_size": len(parts.forget),
              "remain_size": len(parts.remain), **({"conversion": images.conversion} if images.conversion else {})},
        neighbours=table,
        final_terms=log[-1] if log else {},
        **({"replay": {"samples": cfg.replay, "sampler": keep.REPLAY_SAMPLER, "steps": keep.REPLAY_STEPS,
                       "seed": keep.replay_seed(cfg.seed), "share": keep.REPLAY_SHARE}} if cfg.replay else {}),
        **extra,
    )
    with atomic_directory(out) as tmp:
        model.save(tmp)
        write_json(tmp / RUN_RECORD, record)
        write_json(tmp / STEP_LOG, merge_log(log, monitor.entries) if monitor else log)
        if monitor is not None:
            draw_curves(monitor.entries, monitor.stopped_at).save(tmp / CURVES_FILE, format="PNG")
