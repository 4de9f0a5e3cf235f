"""Flux under a fixed prompt: a rectified-flow transformer over packed VAE latents.

A FluxPipeline encodes the prompt with CLIP (pooled) and T5 (per token) once, by its own
`encode_prompt`. Its transformer reads the latents packed into 2×2 patches (a sequence of
(h/2)(w/2) tokens of 4c channels) with position ids; the Denoiser packs and unpacks them, so the
objectives, the kNN and the cache see ordinary (c, h, w) latents (packing is a permutation, so
distances are unchanged). The transformer is called at σ, as the pipeline calls it; a
guidance-distilled model (`guidance_embeds`) is trained at the pipeline's default guidance 3.5.
σ is drawn from the logit-normal shifted by the μ the pipeline computes for the number of image
tokens (flow_matching.flow_schedule). The transformer has no image size: the pipeline's default
size here is its VAE's `sample_size`. A Flux folder without its scheduler is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from retrack.backends.flow_matching import FlowTextModel, flow_schedule
from retrack.backends.stable_diffusion import resolution
from retrack.errors import require
from retrack.models import Denoiser, FlowSchedule

FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: what a guidance-distilled model is trained at


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, c, h, w) latents → (B, (h/2)(w/2), 4c) tokens, as FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """The inverse of pack."""
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class FluxDenoiser(Denoiser):
    """A Flux transformer with one prompt's embeddings and the image's position ids bound in."""

    def __init__(self, transformer: torch.nn.Module, schedule: FlowSchedule, context: torch.Tensor,
                 pooled: torch.Tensor, text_ids: torch.Tensor, image_ids: torch.Tensor,
                 latent_shape: tuple[int, int, int], guidance: float | None, sigma_table: dict):
        super().__init__(transformer, schedule, "flow")
        for name, value in (("context", context), ("pooled", pooled), ("text_ids", text_ids),
                            ("image_ids", image_ids)):
            self.register_buffer(name, value.detach(), persistent=False)
        self.latent_shape = latent_shape
        self.guidance = guidance
        self.sigma_table = sigma_table

    def unet_output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=x.device,
                                                                  dtype=torch.float32)
        out = self.unet(hidden_states=pack(x), timestep=self.schedule.model_time(t).to(x.dtype), guidance=guidance,
                        pooled_projections=self.pooled.to(x.dtype).expand(b, -1),
                        encoder_hidden_states=self.context.to(x.dtype).expand(b, -1, -1),
                        txt_ids=self.text_ids, img_ids=self.image_ids, return_dict=False)[0]
        return unpack(out, c, h, w)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.latent_shape


class FluxModel(FlowTextModel):
    name = "flux"
    description = "FluxPipeline folders (Flux.1, rectified flow, with its scheduler and T5, with --prompt)"
    pipelines = ("FluxPipeline",)
    required = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

    @classmethod
    def _denoiser(cls, pipe, model: str, prompt: str, device: torch.device) -> Denoiser:
        with torch.no_grad():
            context, pooled, text_ids = pipe.encode_prompt(prompt, None, device=device, num_images_per_prompt=1)
        height, width = resolution(pipe)
        c = int(pipe.vae.config.latent_channels)
        h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
        require(int(pipe.transformer.config.in_channels) == 4 * c,
                f"the transformer of {model!r} reads {pipe.transformer.config.in_channels} channels, not the 4 × {c} "
                "of its VAE's latents packed in 2×2 patches.")
        image_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.float32)
        schedule, table = flow_schedule(pipe.scheduler.config, (h // 2) * (w // 2), 1)
        guidance = FLUX_GUIDANCE if pipe.transformer.config.guidance_embeds else None
        table = {**table, "trained_guidance": guidance}
        return FluxDenoiser(pipe.transformer, schedule, context.float(), pooled.float(), text_ids.float(),
                            image_ids, (c, h, w), guidance, table)

    def call_kwargs(self) -> dict[str, Any]:
        h, w = resolution(self.pipeline)
        return {"height": h, "width": w}
