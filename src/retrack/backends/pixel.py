"""Unconditional pixel-space models: a diffusers UNet2DModel and its DDPM scheduler.

Loading accepts a diffusers pipeline folder (`unet/` + `scheduler/`, a DDPMPipeline or
DDIMPipeline), a bare `UNet2DModel` folder (optionally with `scheduler_config.json` beside it) or a
hub id; saving writes the same layout the model came in, so an unlearned model drops in where the
original was. The data are the images themselves, which must have the model's exact size.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from retrack import sampling
from retrack.backends.base import (
    DEFAULT_LOAD,
    Backend,
    LoadOptions,
    MetricImages,
    TrainingSpace,
    config_class,
    looks_like_hub_id,
    nchw,
    pipeline_class,
    require_hub_reachable,
)
from retrack.backends.registry import family_of
from retrack.data import ImageSet, distinct
from retrack.errors import UserError, first_line, require
from retrack.models import Denoiser, Schedule

Layout = Literal["pipeline", "bare"]
PIXEL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")


class PixelModel(Backend):
    """A Denoiser over images, its scheduler, and the layout it is written back in."""

    name = "pixel"
    description = "unconditional UNet2DModel folders and DDPMPipeline/DDIMPipeline folders (pixel models)"
    conditioned = False
    pipelines = PIXEL_PIPELINES

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any], command: str) -> None:
        require(settings.get("lora") is None, "--lora adapts a Stable Diffusion UNet's attention; it needs a "
                                              "text-to-image model and --prompt.")
        for key in ("guidance", "eval_guidance"):
            require(settings.get(key, 7.5) == 7.5, f"--{key.replace('_', '-')} is for text-to-image models with "
                                                   "--prompt.")
        for key in ("target", "eval_target"):
            require(settings.get(key) is None, f"--{key.replace('_', '-')} is for text-to-image models with "
                                               "--prompt.")

    def __init__(self, denoiser: Denoiser, scheduler: Any, layout: Layout, source: str) -> None:
        self.denoiser, self.scheduler, self.layout, self.source = denoiser, scheduler, layout, source

    @classmethod
    def claims(cls, path: Path) -> bool:
        if (path / "unet").is_dir():
            if pipeline_class(path) not in (None, *PIXEL_PIPELINES):
                return False
            return config_class(path / "unet" / "config.json", "UNet2DModel") in (None, "UNet2DModel")
        return config_class(path / "config.json", "UNet2DModel") == "UNet2DModel"

    @classmethod
    def check_conditioning(cls, model: str, prompt: str | None, flag: str) -> None:
        require(prompt is None, f"--prompt is for text-to-image models, but {flag} {model!r} is an unconditional "
                                "pixel model; drop --prompt.")

    @classmethod
    def eval_defaults(cls, eval_clip: str | None) -> dict[str, Any]:
        return {"eval_metrics": ("copies",), "eval_samples": 256, "copy_rule": "l2"}

    @classmethod
    def load(cls, model: str, device: str, options: LoadOptions = DEFAULT_LOAD) -> PixelModel:
        return load_model(model, device)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.scheduler.config)

    def training_space(self, images: ImageSet, cache_dir: Path | None, progress: bool) -> TrainingSpace:
        want = self.denoiser.sample_shape
        require(images.shape == want, f"the data's images are {_fmt(images.shape)} (C×H×W) but the model "
                                      f"takes {_fmt(want)}.")
        return TrainingSpace(images.images, nchw)

    def metric_images(self, images: ImageSet, forget: np.ndarray, remain: np.ndarray | None,
                      target_files: list[Path]) -> MetricImages:
        empty = images.images[:0]
        return MetricImages(distinct(images.images[forget]), empty if remain is None else images.images[remain])

    def sample(self, num: int, steps: int, sampler: str, seed: int, batch_size: int, guidance: float,
               progress: bool) -> np.ndarray:
        return sampling.sample(self.denoiser, self.scheduler_config, num, steps, sampler, seed, batch_size, progress)

    def save(self, out: Path) -> None:
        save_model(self, out)


def load_model(model: str | Path, device: str = "cpu") -> PixelModel:
    """Load a diffusers UNet2DModel and its scheduler from a local directory or a hub id."""
    family_of(model)
    path, layout = Path(model), model_layout(model)
    if not path.exists():
        require_hub_reachable(str(model))
    try:
        sub = "unet" if layout == "pipeline" else None
        unet = UNet2DModel.from_pretrained(str(model), subfolder=sub)
        if layout == "pipeline":
            scheduler = DDPMScheduler.from_pretrained(str(model), subfolder="scheduler")
        elif (path / "scheduler_config.json").is_file():
            scheduler = DDPMScheduler.from_pretrained(str(path))
        else:
            scheduler = DDPMScheduler()  # diffusers' default: linear β, 1000 steps
    except Exception as e:  # noqa: BLE001 - diffusers, safetensors and the hub raise many types
        if not path.exists():
            raise UserError(f"could not download the model {str(model)!r} from the Hugging Face Hub "
                            f"({first_line(e)}); a local folder path works offline.") from None
        raise UserError(f"could not load a diffusers UNet2DModel from {str(model)!r}: {first_line(e)}") from None
    schedule = Schedule(scheduler.alphas_cumprod.to(torch.float64))
    denoiser = Denoiser(unet, schedule, scheduler.config.prediction_type).to(device)
    return PixelModel(denoiser, scheduler, layout, str(model))


def model_layout(model: str | Path) -> Layout:
    """A pipeline folder (`unet/`), a bare UNet folder, or a hub id (a pipeline)."""
    path = Path(model)
    if not path.exists() and looks_like_hub_id(str(model)):
        return "pipeline"
    return "pipeline" if (path / "unet").is_dir() else "bare"


def save_model(model: PixelModel, out: Path) -> None:
    """Write the (possibly fine-tuned) UNet and scheduler in the layout the model came in."""
    unet = model.denoiser.unet
    if model.layout == "pipeline":
        unet.save_pretrained(out / "unet")
        model.scheduler.save_pretrained(out / "scheduler")
        src_index = Path(model.source) / "model_index.json"
        if src_index.is_file():
            shutil.copy(src_index, out / "model_index.json")
        else:
            index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                     "scheduler": ["diffusers", type(model.scheduler).__name__]}
            (out / "model_index.json").write_text(json.dumps(index, indent=2))
    else:
        unet.save_pretrained(out)
        model.scheduler.save_pretrained(out)


def _fmt(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)
