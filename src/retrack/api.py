"""The public entry points, with the same names as the CLI flags: unlearn() and sample()."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from retrack import objectives
from retrack.data import ImageSet, load_images, parse_forget, split
from retrack.errors import UserError, require
from retrack.models import LoadedModel, load_model, save_model
from retrack.neighbours import cached_nearest_neighbours
from retrack.runrecord import atomic_directory, check_output, environment_record, write_json
from retrack.trainer import TrainData, TrainSettings, neighbour_table, per_process_batch, train
from retrack.validation import Int

RUN_RECORD = "retrack_run.json"
STEP_LOG = "retrack_log.json"


@dataclass(frozen=True)
class UnlearnConfig:
    """Every setting of one unlearning run; saved, fully resolved, beside the output model.

    Defaults are the paper's MNIST T-shirt settings; None for lam/s/eta means the method's own.
    lam="auto" and the fields after `eta` are ReTrack's options beside the paper's objective
    (objectives/retrack.py); their defaults leave it exactly the paper's.
    """

    model: str
    data: str
    forget: str
    out: str
    method: str = "retrack"
    steps: int = 50
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 5e-5
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    clip: float = 1.0
    seed: int = 0
    k: int | str = 10
    lam: float | str | None = None
    s: float | None = None
    eta: float | None = None
    lam_ratio: float = 1.0
    surgery: bool = False
    forget_weighting: str = "none"
    snr_gamma: float = 5.0
    forget_t_min: int = 0
    device: str | None = None
    overwrite: bool = False
    cache_dir: str | None = None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def unlearn(model: str, data: str, forget: str, out: str, progress: bool = True, **settings) -> Path:
    """Fine-tune `model` so that it behaves as if the `forget` images of `data` were never seen.

    Args:
        model: diffusers pipeline folder, bare UNet2DModel folder, or hub id. Never modified.
        data: image folder, .npz with `images`, or torchvision-style MNIST/CIFAR-10 folder.
        forget: "17,42", "@indices.txt", or paths of image files matched to `data` by content.
        out: output folder, written atomically in the same layout as `model`.
        **settings: any field of UnlearnConfig (method, steps, batch_size, lr, seed, k, lam, ...).
    Returns:
        The output folder.
    """
    cfg = _validated(UnlearnConfig(model=model, data=data, forget=forget, out=out, **settings))
    out_path = Path(cfg.out)
    protected = [Path(p) for p in (cfg.model, cfg.data) if Path(p).exists()]
    check_output(out_path, cfg.overwrite, protected)
    images = load_images(cfg.data)
    parts = split(images, parse_forget(cfg.forget, images))
    loaded = load_model(cfg.model, cfg.device)
    _check_fits(images, loaded)
    steps = loaded.denoiser.schedule.num_steps
    require(cfg.forget_t_min < steps, f"--forget-t-min must be below the model's {steps} timesteps, "
                                      f"got {cfg.forget_t_min}.")
    objective = _objective(cfg)
    remain, forget_imgs = images.images[parts.remain], images.images[parts.forget]
    table = None
    if objective.needs_neighbours and cfg.k != "all":
        table = cached_nearest_neighbours(remain, forget_imgs, int(cfg.k),
                                          Path(cfg.cache_dir) if cfg.cache_dir else None, progress)
    train_data = TrainData(_nchw(remain), _nchw(forget_imgs), neighbour_table(table))
    settings_ = _train_settings(cfg)
    log = train(loaded.denoiser, objective, train_data, settings_, cfg.device, progress)
    if _is_main_process():
        _write_output(out_path, loaded, cfg, objective, images, parts, table, log)
    return out_path


def _validated(cfg: UnlearnConfig) -> UnlearnConfig:
    cls = objectives.method_class(cfg.method)
    require(cfg.steps > 0, f"--steps must be positive, got {cfg.steps}.")
    require(cfg.batch_size > 0, f"--batch-size must be positive, got {cfg.batch_size}.")
    Int(min=1)(cfg.grad_accum, "--grad-accum")
    per_process_batch(_train_settings(cfg), process_count())
    require(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}.")
    require(cfg.clip > 0, f"--clip must be positive, got {cfg.clip}.")
    k = cfg.k
    if isinstance(k, str) and k != "all":
        require(k.isdigit(), f"--k must be a positive integer or 'all', got {k!r}.")
        k = int(k)
    require(k == "all" or int(k) >= 1, f"--k must be a positive integer or 'all', got {k}.")
    _check_variant_options(cfg, cls)
    if cfg.lam is not None and cfg.lam != "auto":
        require(0.0 <= cfg.lam <= 1.0, f"--lam must be between 0 and 1 or 'auto', got {cfg.lam}.")
    defaults = {f: getattr(cls, f) for f in ("lam", "s", "eta") if hasattr(cls, f)}
    resolved = {f: getattr(cfg, f) if getattr(cfg, f) is not None else defaults.get(f) for f in defaults}
    return replace(cfg, k=k, device=cfg.device or default_device(), **resolved)


VARIANT_OPTIONS = ("lam_ratio", "surgery", "forget_weighting", "snr_gamma", "forget_t_min")


def _check_variant_options(cfg: UnlearnConfig, cls: type) -> None:
    """Options a method does not have are an error, not silently ignored."""
    require(cfg.lam != "auto" or hasattr(cls, "lam_ratio"),
            f"--lam auto balances an unlearning and a remain gradient; method {cfg.method!r} has no such λ.")
    for name in VARIANT_OPTIONS:
        flag = "--" + name.replace("_", "-")
        require(getattr(cfg, name) == UnlearnConfig.__dataclass_fields__[name].default or hasattr(cls, name),
                f"{flag} is an option of retrack; method {cfg.method!r} does not have it.")
    if isinstance(cfg.lam, str) and cfg.lam != "auto":
        raise UserError(f"--lam must be a number between 0 and 1 or 'auto', got {cfg.lam!r}.")
    require(cfg.lam_ratio > 0, f"--lam-ratio must be positive, got {cfg.lam_ratio}.")
    require(cfg.snr_gamma > 0, f"--snr-gamma must be positive, got {cfg.snr_gamma}.")
    require(cfg.forget_t_min >= 0, f"--forget-t-min must be ≥ 0, got {cfg.forget_t_min}.")
    from retrack.objectives.retrack import FORGET_WEIGHTINGS

    require(cfg.forget_weighting in FORGET_WEIGHTINGS, f"unknown --forget-weighting "
            f"{cfg.forget_weighting!r}; choose one of {', '.join(FORGET_WEIGHTINGS)}.")


def _train_settings(cfg: UnlearnConfig) -> TrainSettings:
    return TrainSettings(cfg.steps, cfg.batch_size, cfg.lr, tuple(cfg.betas), cfg.weight_decay,
                         cfg.clip, cfg.seed, cfg.grad_accum)


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


def _write_output(out, loaded, cfg, objective, images, parts, table, log) -> None:
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
    )
    with atomic_directory(out) as tmp:
        save_model(loaded, tmp)
        write_json(tmp / RUN_RECORD, record)
        write_json(tmp / STEP_LOG, log)


def sample(
    model: str,
    num: int,
    out: str,
    steps: int = 50,
    sampler: str = "ddim",
    seed: int = 0,
    batch_size: int = 256,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Draw `num` images from `model` and write them as uint8 (N, H, W, C) `images` in an .npz."""
    from retrack.sampling import sample as draw

    out_path = Path(out)
    require(out_path.suffix == ".npz", f"--out must end in .npz, got {str(out_path)!r}.")
    check_output(out_path, overwrite)
    loaded = load_model(model, device or default_device())
    images = draw(loaded.denoiser, loaded.scheduler.config, num, steps, sampler, seed, batch_size,
                  progress)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".npz")
    os.close(fd)
    np.savez(tmp, images=images, seed=seed, steps=steps, sampler=sampler, model=str(model))
    os.replace(tmp, out_path)
    return out_path
