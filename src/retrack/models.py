"""One model contract for everything downstream: a Denoiser that predicts ε at integer timesteps.

Every model family (backends/) hands the objectives, the trainer, the samplers and the metrics a
Denoiser; how it was loaded and how it is saved stay in its backend. A rectified-flow model
(x_σ = (1 − σ)·x0 + σ·ε, velocity v = ε − x0) is one more case: its timesteps index a table of σ
(`FlowSchedule`), γ = 1 − σ, and its velocity is converted to ε exactly (docs/flow-matching.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class FlowSchedule(Schedule):
    """A rectified flow's noising x = γ·x0 + σ·ε with γ = 1 − σ, at T integer timesteps.

    `sigmas` (T,) float64, increasing in t, strictly inside (0, 1): timestep t stands for σ_t, so
    drawing t uniformly draws σ from the distribution the table was built from (its quantiles).
    `alphas_cumprod` holds the VP model with the same signal-to-noise ratio, ᾱ = γ²/(γ² + σ²), for
    what reads SNR_t = ᾱ_t/(1 − ᾱ_t) = γ_t²/σ_t² (min-SNR weighting).
    """

    sigmas: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    model_timesteps: int = 1000  # the network is called at σ·model_timesteps (diffusers' convention)

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor, model_timesteps: int = 1000) -> FlowSchedule:
        s = sigmas.to(torch.float64)
        require(s.ndim == 1 and len(s) > 0 and bool(((s > 0) & (s < 1)).all()) and bool((s.diff() >= 0).all()),
                "a flow schedule needs increasing σ strictly between 0 and 1.")
        g = 1.0 - s
        return cls(g * g / (g * g + s * s), s, int(model_timesteps))

    def gamma_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sigmas.to(like.device)[t.to(like.device)].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (1 - s).view(shape), s.view(shape)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The network's own timestep input for integer t: σ_t·model_timesteps, float32."""
        return (self.sigmas.to(t.device)[t] * self.model_timesteps).float()


def logit_normal_sigmas(steps: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """σ_i = sigmoid(mean + std·Φ⁻¹((i + ½)/steps)): the quantiles of a logit-normal distribution,
    increasing, strictly inside (0, 1). A shift of the flow's time (SD3's σ' = sσ/(1 + (s − 1)σ),
    Flux's e^μ/(e^μ + 1/σ − 1)) adds ln s or μ to the logit, so it is a change of `mean`."""
    u = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    z = torch.special.ndtri(u)
    return torch.sigmoid(mean + std * z)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def velocity_from_eps(eps: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The inverse of the flow conversion: v = (ε − x)/γ (γ = 1 − σ > 0)."""
    return (eps - x) / gamma


class Denoiser(nn.Module):
    """ε-prediction at integer timesteps, whatever the UNet's own prediction type.

    v- and x0-predicting models are converted exactly (ε = γ·v + σ·x, ε = (x − γ·x0)/σ), and so is
    a rectified flow's velocity ("flow": v = ε − x0 with γ = 1 − σ, so ε = x + γ·v), so every
    objective, sampler and metric can speak ε alone.
    """

    def __init__(self, unet: nn.Module, schedule: Schedule, prediction_type: str = "epsilon"):
        super().__init__()
        require(
            prediction_type in PREDICTION_TYPES,
            f"prediction type {prediction_type!r} is not supported ({', '.join(PREDICTION_TYPES)}).",
        )
        require(prediction_type != "flow" or isinstance(schedule, FlowSchedule),
                "a flow-matching (velocity) model needs a FlowSchedule (γ = 1 − σ).")
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
        if self.prediction_type == "flow":
            return x + gamma * out
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
