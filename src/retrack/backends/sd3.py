"""Stable Diffusion 3.x under a fixed prompt: a rectified-flow transformer over VAE latents.

A StableDiffusion3Pipeline encodes the prompt with two CLIP encoders and, if present, T5 (a
folder saved without T5 loads with it left out, as diffusers allows); the per-token embeddings and
the pooled embedding are computed once by the pipeline's own `encode_prompt` and bound into an
SD3Transformer2DModel called at σ·1000, as the pipeline calls it. Its velocity is converted to ε
and its timesteps index the σ table of flow_matching.flow_schedule (logit-normal, shifted by the
scheduler's `shift`). The VAE latents are (posterior mean − shift_factor) × scaling_factor, as the
pipeline decodes them; LoRA adapts the transformer's joint attention projections.
"""

from __future__ import annotations

import torch

from retrack.backends.flow_matching import FlowTextModel, flow_schedule
from retrack.backends.stable_diffusion import resolution
from retrack.models import Denoiser, FlowSchedule


class SD3Denoiser(Denoiser):
    """An SD3 transformer with one prompt's embeddings bound in: ε(x, t) from its velocity."""

    def __init__(self, transformer: torch.nn.Module, schedule: FlowSchedule, context: torch.Tensor,
                 pooled: torch.Tensor, sigma_table: dict):
        super().__init__(transformer, schedule, "flow")
        self.register_buffer("context", context.detach(), persistent=False)
        self.register_buffer("pooled", pooled.detach(), persistent=False)
        self.sigma_table = sigma_table

    def unet_output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return self.unet(hidden_states=x, timestep=self.schedule.model_time(t).to(x.dtype),
                         encoder_hidden_states=self.context.to(x.dtype).expand(b, -1, -1),
                         pooled_projections=self.pooled.to(x.dtype).expand(b, -1), return_dict=False)[0]


class StableDiffusion3Model(FlowTextModel):
    name = "sd3"
    description = "StableDiffusion3Pipeline folders (SD3.x, rectified flow, with --prompt)"
    pipelines = ("StableDiffusion3Pipeline",)

    @classmethod
    def _denoiser(cls, pipe, model: str, prompt: str, device: torch.device) -> Denoiser:
        with torch.no_grad():
            context, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        h, w = resolution(pipe)
        patch = int(pipe.transformer.config.patch_size)
        tokens = (h // pipe.vae_scale_factor // patch) * (w // pipe.vae_scale_factor // patch)
        schedule, table = flow_schedule(pipe.scheduler.config, tokens, int(pipe.scheduler.config.num_train_timesteps))
        return SD3Denoiser(pipe.transformer, schedule, context.float(), pooled.float(), table)
