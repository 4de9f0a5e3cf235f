"""Shared fixtures: tiny randomly initialised diffusers UNets and data sets made in the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

# Tests are small; one thread each keeps them from fighting over the cores.
torch.set_num_threads(1)


def tiny_unet(size: int = 8, channels: int = 1, seed: int = 0, prediction_type: str = "epsilon"):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def save_pipeline(path: Path, size: int = 8, channels: int = 1, seed: int = 0,
                  beta_schedule: str = "linear") -> Path:
    from diffusers import DDPMScheduler

    tiny_unet(size, channels, seed).save_pretrained(path / "unet")
    DDPMScheduler(beta_schedule=beta_schedule).save_pretrained(path / "scheduler")
    return path


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return save_pipeline(tmp_path / "model")


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))
    return path


def tree_digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def tiny_denoiser(seed: int = 0):
    """The tiny UNet behind the Denoiser contract, on diffusers' default linear schedule."""
    from diffusers import DDPMScheduler

    from retrack.models import Denoiser, Schedule

    return Denoiser(tiny_unet(seed=seed), Schedule(DDPMScheduler().alphas_cumprod.double()))


def tiny_train_data():
    """30 remain and 3 forget 8×8 images with 4 (arbitrary) neighbours each, the same every call."""
    from retrack.trainer import TrainData

    g = torch.Generator().manual_seed(1)
    remain = torch.randint(0, 256, (30, 1, 8, 8), generator=g, dtype=torch.uint8)
    forget = torch.randint(0, 256, (3, 1, 8, 8), generator=g, dtype=torch.uint8)
    return TrainData(remain, forget, torch.stack([torch.randperm(30, generator=g)[:4] for _ in range(3)]))
