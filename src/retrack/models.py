"""One model contract for everything downstream: a Denoiser that predicts ε at integer timesteps.

Loading accepts a diffusers pipeline directory (`unet/` + `scheduler/`), a bare `UNet2DModel`
directory (optionally with `scheduler_config.json` beside it) or a hub id; saving writes the same
layout the model came in, so an unlearned model drops in where the original was.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from retrack.errors import UserError, require

Layout = Literal["pipeline", "bare"]
Kind = Literal["pixel", "text", "unknown"]
TEXT_PIPELINES = ("StableDiffusionPipeline",)
PIXEL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")
SUPPORTED = ("unconditional UNet2DModel folders and DDPMPipeline/DDIMPipeline folders (pixel models), and "
             "StableDiffusionPipeline folders (SD 1.x/2.x, text-to-image, with --prompt)")


@dataclass(frozen=True)
class Schedule:
    """γ_t = sqrt(ᾱ_t) and σ_t = sqrt(1 − ᾱ_t) from the model's own scheduler."""

    alphas_cumprod: torch.Tensor  # (T,) float64

    @property
    def num_steps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def gamma_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """γ_t, σ_t for integer timesteps t, shaped to broadcast against `like` (B, C, H, W)."""
        a = self.alphas_cumprod.to(like.device)[t.to(like.device)].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.sqrt().view(shape), (1 - a).sqrt().view(shape)


class Denoiser(nn.Module):
    """ε-prediction at integer timesteps, whatever the UNet's own prediction type.

    v- and x0-predicting models are converted exactly (ε = γ·v + σ·x, ε = (x − γ·x0)/σ), so every
    objective, sampler and metric can speak ε alone.
    """

    def __init__(self, unet: nn.Module, schedule: Schedule, prediction_type: str = "epsilon"):
        super().__init__()
        require(
            prediction_type in ("epsilon", "v_prediction", "sample"),
            f"prediction type {prediction_type!r} is not supported (epsilon, v_prediction, sample).",
        )
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.unet_output(x, t)
        if self.prediction_type == "epsilon":
            return out
        gamma, sigma = self.schedule.gamma_sigma(t, x)
        if self.prediction_type == "v_prediction":
            return gamma * out + sigma * x
        return (x - gamma * out) / sigma

    def unet_output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's raw prediction; a conditional model binds its conditioning in here."""
        return self.unet(x, t).sample

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels), int(h), int(w))


@dataclass
class LoadedModel:
    """A Denoiser plus what is needed to write it back in the layout it came in."""

    denoiser: Denoiser
    scheduler: object
    layout: Layout
    source: str


def load_model(model: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a diffusers UNet2DModel and its scheduler from a local directory or a hub id."""
    from diffusers import DDPMScheduler, UNet2DModel

    path, layout = Path(model), model_layout(model)
    if not path.exists():
        _require_hub_reachable(str(model))
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
                            f"({_first_line(e)}); a local folder path works offline.") from None
        raise UserError(f"could not load a diffusers UNet2DModel from {str(model)!r}: {_first_line(e)}") from None
    schedule = Schedule(scheduler.alphas_cumprod.to(torch.float64))
    denoiser = Denoiser(unet, schedule, scheduler.config.prediction_type).to(device)
    return LoadedModel(denoiser, scheduler, layout, str(model))


def model_layout(model: str | Path, flag: str = "--model") -> Layout:
    """How `model` is laid out, checked without loading weights: a pipeline folder, a bare UNet
    folder, or a hub id (a pipeline)."""
    path = Path(model)
    if path.exists():
        require(path.is_dir(), f"{flag} {str(path)!r} is not a folder.")
        if (path / "unet").is_dir():
            layout: Layout = "pipeline"
        else:
            require((path / "config.json").is_file(),
                    f"{flag} {str(path)!r} has neither a unet/ subfolder nor a config.json.")
            layout = "bare"
    elif _looks_like_hub_id(str(model)):
        return "pipeline"
    else:
        raise UserError(f"{flag}: model path {str(model)!r} does not exist.")
    _refuse_conditional(path, layout)
    return layout


def _require_hub_reachable(repo: str) -> None:
    """Offline, a hub id works only if it is already in the local cache: say so at once instead
    of letting the hub client retry and then blame a missing config.json."""
    from huggingface_hub import constants, try_to_load_from_cache

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if not (constants.HF_HUB_OFFLINE or offline):
        return
    found = try_to_load_from_cache(repo, "unet/config.json")
    require(isinstance(found, str),
            f"could not download the model {repo!r}: the Hugging Face Hub is offline (HF_HUB_OFFLINE) and "
            "it is not in the local cache; a local folder path works offline.")


def save_model(loaded: LoadedModel, out: Path) -> None:
    """Write the (possibly fine-tuned) UNet and scheduler in the layout the model came in."""
    unet = loaded.denoiser.unet
    if loaded.layout == "pipeline":
        unet.save_pretrained(out / "unet")
        loaded.scheduler.save_pretrained(out / "scheduler")
        src_index = Path(loaded.source) / "model_index.json"
        if src_index.is_file():
            shutil.copy(src_index, out / "model_index.json")
        else:
            index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                     "scheduler": ["diffusers", type(loaded.scheduler).__name__]}
            (out / "model_index.json").write_text(json.dumps(index, indent=2))
    else:
        unet.save_pretrained(out)
        loaded.scheduler.save_pretrained(out)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def model_kind(model: str | Path, flag: str = "--model") -> Kind:
    """Pixel model, Stable Diffusion pipeline, or (a hub id, not downloaded yet) unknown; any other
    pipeline (SDXL, img2img, ...) is refused here, naming the supported ones."""
    from retrack.latent import is_lora_folder

    if is_lora_folder(model):
        return "text"
    layout = model_layout(model, flag)
    path = Path(model)
    if not path.exists():
        return "unknown"
    return "text" if layout == "pipeline" and pipeline_class(path) in TEXT_PIPELINES else "pixel"


def require_kind(model: str | Path, prompt: str | None, flag: str = "--model") -> Kind:
    """A text-to-image model needs --prompt and a pixel model refuses one, before anything loads."""
    kind = model_kind(model, flag)
    require(not (kind == "text" and prompt is None),
            f"{flag} {str(model)!r} is a text-to-image StableDiffusionPipeline; pass --prompt with the prompt "
            "it is used under.")
    require(not (kind == "pixel" and prompt is not None),
            f"--prompt is for text-to-image models, but {flag} {str(model)!r} is an unconditional pixel model; "
            "drop --prompt.")
    return kind


def pipeline_class(path: Path) -> str | None:
    """`_class_name` of a local folder's model_index.json, or None without one."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    from retrack.validation import load_json

    raw = load_json(index, "model index")
    require(isinstance(raw, dict) and isinstance(raw.get("_class_name"), str),
            f"model index {str(index)!r} must be a JSON object with a '_class_name'.")
    return raw["_class_name"]


def _refuse_conditional(path: Path, layout: Layout) -> None:
    if layout == "pipeline":
        cls = pipeline_class(path)
        if cls in TEXT_PIPELINES:
            return
        require(cls is None or cls in PIXEL_PIPELINES, f"--model {str(path)!r} is a {cls}; supported are {SUPPORTED}.")
    cfg = path / ("unet" if layout == "pipeline" else "") / "config.json"
    if cfg.is_file():
        from retrack.validation import load_json

        raw = load_json(cfg, "model config")
        require(isinstance(raw, dict), f"model config {str(cfg)!r} must hold a JSON object, "
                                       f"not a {type(raw).__name__}.")
        cls = raw.get("_class_name", "UNet2DModel")
        require(cls == "UNet2DModel", f"{str(cfg)!r} holds a {cls} outside a StableDiffusionPipeline folder; "
                                      f"only unconditional UNet2DModel is supported there ({SUPPORTED}).")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
