"""`retrack sample`: draw images from any supported model into an .npz (and a .png grid)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from retrack.backends import LoadOptions, detect, load
from retrack.errors import require
from retrack.grid import save_grid
from retrack.runrecord import atomic_files, check_output
from retrack.validation import (
    POSITIVE_INT,
    SEED,
    Bool,
    Choice,
    Device,
    Float,
    Optional,
    Text,
    Validated,
    default_device,
    option,
)


@dataclass(frozen=True)
class SampleConfig(Validated):
    """Every setting of `retrack sample`; each field is the flag of the same name."""

    model: str = option(Text(), help="diffusers pipeline folder, bare UNet folder, or hub id; a text-to-image "
                        "pipeline (SD, SDXL, SD3, Flux) with --prompt")
    num: int = option(POSITIVE_INT, help="number of images")
    out: str = option(Text(), help="output .npz")
    steps: int = option(POSITIVE_INT, 50, help="sampling steps")
    sampler: str = option(Choice("ddpm", "ddim"), "ddim", help="reverse process: ddpm or ddim")
    seed: int = option(SEED, 0, help="sampling seed")
    batch_size: int = option(POSITIVE_INT, 256, help="images per forward pass")
    grid: str | None = option(Optional(Text()), None,
                              help="also write the first 64 images as a PNG grid here (.png)")
    prompt: str | None = option(Optional(Text()), None,
                                help="text-to-image models (an SD, SDXL, SD3 or Flux pipeline folder or a `unlearn "
                                "--lora` output): the prompt; sampled by the pipeline itself with its guidance")
    guidance: float = option(Float(0.0), 7.5, help="classifier-free guidance scale with --prompt")
    device: str | None = option(Optional(Device()), None, help="torch device (default: cuda if available, else cpu)")
    overwrite: bool = option(Bool(), False, help="replace an existing --out")


def resolve_sample(cfg: SampleConfig) -> SampleConfig:
    """Model kind, device, and both outputs (.npz and the optional .png grid) checked up front."""
    detect(cfg.model, cfg.prompt).check_settings(asdict(cfg), "sample")
    protected = [Path(cfg.model)] if Path(cfg.model).exists() else []
    check_output(Path(cfg.out), cfg.overwrite, protected, flag="--out", suffix=".npz")
    if cfg.grid is not None:
        require(Path(cfg.grid).resolve() != Path(cfg.out).resolve(), "--grid and --out name the same file.")
        check_output(Path(cfg.grid), cfg.overwrite, protected, flag="--grid", suffix=".png")
    return replace(cfg, device=default_device(cfg.device))


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
    model = load(cfg.model, cfg.device, LoadOptions(prompt=cfg.prompt))
    images = model.sample(cfg.num, cfg.steps, cfg.sampler, cfg.seed, cfg.batch_size, cfg.guidance, progress)
    outputs = [Path(cfg.out)] + ([Path(cfg.grid)] if cfg.grid else [])
    with atomic_files(outputs) as temps:
        with open(temps[0], "wb") as fh:
            np.savez(fh, images=images, seed=cfg.seed, steps=cfg.steps, sampler=cfg.sampler,
                     model=str(cfg.model), **model.sample_settings(cfg.guidance))
        if cfg.grid:
            save_grid(images[:64], temps[1], fmt="PNG")
    return Path(cfg.out)
