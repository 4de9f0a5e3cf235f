"""Sampling and noise-then-denoise reconstruction through diffusers' DDPM and DDIM schedulers.

Every sample i of a call draws its noise from its own generator seeded by (seed, i), as EDM does,
so a sample depends on the seed and its index, never on the batch size or the device count.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from retrack.data import to_uint8
from retrack.errors import require
from retrack.models import Denoiser

SamplerName = Literal["ddpm", "ddim"]


def make_scheduler(scheduler_config: dict, sampler: SamplerName, prediction_type: str = "epsilon"):
    """A fresh diffusers scheduler for sampling; the Denoiser always hands it ε (a pipeline calling
    its UNet directly hands it the UNet's own prediction type)."""

    require(sampler in ("ddpm", "ddim"), f"sampler {sampler!r} is not one of ddpm, ddim.")
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    return cls.from_config(dict(scheduler_config), prediction_type=prediction_type)


def sample_seeds(seed: int, start: int, count: int) -> list[int]:
    """The generator seed of samples start … start + count − 1 of a call seeded by `seed`."""
    return [(seed * 1_000_003 + start + i) % 2**64 for i in range(count)]


def sample_generators(seed: int, start: int, count: int, device: torch.device | str) -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(s) for s in sample_seeds(seed, start, count)]


def per_sample_randn(shape: tuple[int, ...], generators: list[torch.Generator], device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])


@torch.no_grad()
def denoise(
    denoiser: Denoiser,
    x: torch.Tensor,
    scheduler,
    generators: list[torch.Generator],
    start_t: int | None = None,
) -> torch.Tensor:
    """Run the scheduler's reverse steps from x (at timestep `start_t`, or pure noise) to t = 0."""
    for t in scheduler.timesteps:
        if start_t is not None and int(t) > start_t:
            continue
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = denoiser(x, tt)
        x = scheduler.step(eps, t, x, generator=generators).prev_sample
    return x


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler_config: dict,
    num: int,
    steps: int = 50,
    sampler: SamplerName = "ddim",
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Draw `num` images; returns uint8 (N, H, W, C)."""
    require(num > 0, f"--num must be positive, got {num}.")
    sched = make_scheduler(scheduler_config, sampler)
    require(1 <= steps <= sched.config.num_train_timesteps,
            f"--steps must be in 1..{sched.config.num_train_timesteps}, got {steps}.")
    sched.set_timesteps(steps)
    device = next(denoiser.parameters()).device
    denoiser.eval()
    out = []
    for start in tqdm(range(0, num, batch_size), desc=f"sample ({sampler}, {steps} steps)",
                      disable=not progress, dynamic_ncols=True):
        n = min(batch_size, num - start)
        gens = sample_generators(seed, start, n, device)
        x = per_sample_randn(denoiser.sample_shape, gens, device) * sched.init_noise_sigma
        out.append(to_uint8(denoise(denoiser, x, sched, gens)))
    return np.concatenate(out)


@torch.no_grad()
def reconstruct(
    denoiser: Denoiser,
    scheduler_config: dict,
    images: torch.Tensor,
    t_start: int,
    seed: int = 0,
) -> torch.Tensor:
    """Noise model-range images to timestep t_start, then denoise with ancestral DDPM to t = 0.

    This is the SSCD memorisation probe of the paper: a memorised image comes back.
    """
    sched = make_scheduler(scheduler_config, "ddpm")
    sched.set_timesteps(sched.config.num_train_timesteps)
    require(0 <= t_start < sched.config.num_train_timesteps,
            f"t_start must be in 0..{sched.config.num_train_timesteps - 1}, got {t_start}.")
    device = images.device
    gens = sample_generators(seed, 0, images.shape[0], device)
    noise = per_sample_randn(tuple(images.shape[1:]), gens, device)
    t = torch.full((images.shape[0],), t_start, device=device, dtype=torch.long)
    gamma, sigma = denoiser.schedule.gamma_sigma(t, images)
    denoiser.eval()
    return denoise(denoiser, gamma * images + sigma * noise, sched, gens, start_t=t_start)
