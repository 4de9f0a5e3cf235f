"""Stable Diffusion XL under a fixed prompt: the SD backend with SDXL's richer conditioning bound in.

A StableDiffusionXLPipeline encodes the prompt with two text encoders: the per-token embeddings of
both (concatenated) go to the UNet's cross-attention, and the second encoder's pooled embedding
and six "time ids" (original size, crop corner, target size) go to its added conditioning. All
three are computed once, as the pipeline's own `encode_prompt` and `_get_add_time_ids` compute
them at the pipeline's default size, and bound into the Denoiser like SD's prompt embedding.
Everything else (latents, LoRA on the UNet's attention projections, sampling through the
pipeline, saving) is the SD backend's. The refiner and the image-to-image pipelines are not text-
to-image models under a prompt, and are refused with the list of supported families.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from retrack.backends.stable_diffusion import PromptDenoiser, StableDiffusionModel, resolution
from retrack.errors import require
from retrack.models import Denoiser, Schedule

# What a base SDXL folder's model_index.json must list (a refiner has no first text encoder).
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class SDXLDenoiser(PromptDenoiser):
    """An SDXL UNet with one prompt's embeddings, pooled embedding and time ids bound in."""

    def __init__(self, unet: torch.nn.Module, schedule: Schedule, prediction_type: str, context: torch.Tensor,
                 pooled: torch.Tensor, time_ids: torch.Tensor):
        super().__init__(unet, schedule, prediction_type, context)
        self.register_buffer("pooled", pooled.detach(), persistent=False)
        self.register_buffer("time_ids", time_ids.detach(), persistent=False)

    def unet_output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        ctx = self.context.to(x.dtype).expand(b, -1, -1)
        added = {"text_embeds": self.pooled.to(x.dtype).expand(b, -1),
                 "time_ids": self.time_ids.to(x.dtype).expand(b, -1)}
        return self.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample


class StableDiffusionXLModel(StableDiffusionModel):
    name = "sdxl"
    description = ("StableDiffusionXLPipeline folders (SDXL base with both text encoders listed in its "
                   "model_index.json, with --prompt)")
    pipelines = ("StableDiffusionXLPipeline",)

    @classmethod
    def complete(cls, path: Path) -> bool:
        try:
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(index, dict) and all(isinstance(index.get(c), list) and index[c][0] is not None
                                               for c in SDXL_COMPONENTS)

    @classmethod
    def _pretrained_kwargs(cls, model: str) -> dict:
        return {}

    @classmethod
    def _denoiser(cls, pipe, model: str, prompt: str, device: torch.device) -> Denoiser:
        require(hasattr(pipe.scheduler, "alphas_cumprod"),
                f"the scheduler {type(pipe.scheduler).__name__} of {model!r} has no alphas_cumprod (ᾱ_t).")
        require(pipe.text_encoder is not None and pipe.text_encoder_2 is not None,
                f"{model!r} lacks a text encoder (an SDXL refiner?); only the SDXL base pipeline is supported.")
        with torch.no_grad():
            context, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        size = resolution(pipe)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                          text_encoder_projection_dim=int(pipe.text_encoder_2.config.projection_dim))
        schedule = Schedule(pipe.scheduler.alphas_cumprod.to(torch.float64))
        return SDXLDenoiser(pipe.unet, schedule, pipe.scheduler.config.prediction_type, context.float(),
                            pooled.float(), time_ids.to(device))

    def record(self) -> dict:
        record = super().record()
        record["text_to_image"]["time_ids"] = self.denoiser.time_ids[0].tolist()
        return record
