"""One model contract for everything downstream: a Denoiser that predicts ε at integer timesteps.

Every model family (backends/) hands the objectives, the trainer, the samplers and the metrics a
Denoiser; how it was loaded and how it is saved stay in its backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from retrack.errors import require


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
