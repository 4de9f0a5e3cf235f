"""How unfamiliar is an image the model never saw, timestep by timestep? The level `--forget-level`
forgets down to.

ReTrack's target for a noisy forget image points at its neighbours; its distance from the true
noise grows like SNR_t·‖a_u − ā‖², so at low noise the paper's objective teaches the model to
denoise the forgotten image far *worse* than an image it never saw (on the shipped T-shirt model,
3–5× the retrained model's error at t = 10–200): the over-forgetting that raises the image's NLL
past the retrained model's and bends other samples. The retrained model's error on the image is
close to the input model's error on unseen images of the same kind at every timestep, which needs
no retrained model to measure: this module measures it, once, before the first step.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from retrack.models import Denoiser
from retrack.objectives.base import noisy, sse

LEVEL_STRIDE = 10  # measured at t = 0, 10, 20, …, interpolated linearly in between
LEVEL_IMAGES = 64  # unseen images used (the first ones given)


@torch.no_grad()
def unseen_levels(denoiser: Denoiser, unseen: torch.Tensor, seed: int = 0, stride: int = LEVEL_STRIDE,
                  images: int = LEVEL_IMAGES, batch: int = 256) -> dict[str, Any]:
    """The mean denoising error E‖ε_θ(x_t, t) − ε‖² (summed over pixels) of model-range `unseen`
    images (N, C, H, W) at t = 0, stride, 2·stride, …, T−1, one noise draw per image and
    timestep from a generator seeded with `seed`; `levels` holds it at every t (linear in between).
    """
    start = time.perf_counter()
    T = denoiser.schedule.num_steps
    grid = np.unique(np.append(np.arange(0, T, stride), T - 1))
    x0 = unseen[:images]
    gen = torch.Generator().manual_seed(seed)
    was = denoiser.training
    denoiser.eval()
    means = []
    try:
        for t0 in grid:
            eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0)
            t = torch.full((x0.shape[0],), int(t0), dtype=torch.long, device=x0.device)
            x = noisy(x0, t, eps, denoiser.schedule)
            err = [sse(denoiser(x[i:i + batch], t[i:i + batch]), eps[i:i + batch])
                   for i in range(0, x0.shape[0], batch)]
            means.append(float(torch.cat(err).double().mean()))
    finally:
        denoiser.train(was)
    levels = np.interp(np.arange(T), grid, np.array(means))
    return {"timesteps": grid.tolist(), "grid_levels": means, "levels": levels.tolist(),
            "images": int(x0.shape[0]), "seconds": round(time.perf_counter() - start, 3)}
