"""UNet2DModel configs of the paper's pretrained models (their unet/config.json on the hub), so the
benches and the GPU check build the real architectures, randomly initialised, without downloads."""

from __future__ import annotations

# google/ddpm-cifar10-32: 35.7M parameters, attention at 16×16.
DDPM_CIFAR10_32 = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "act_fn": "silu", "attention_head_dim": None, "center_input_sample": False, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-6,
    "norm_num_groups": 32, "time_embedding_type": "positional",
}

# google/ddpm-ema-celebahq-256: 113.7M parameters, attention at 16×16.
DDPM_CELEBAHQ_256 = {
    **DDPM_CIFAR10_32,
    "sample_size": 256,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                         "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
}

ARCHITECTURES = {"cifar10": DDPM_CIFAR10_32, "celebahq": DDPM_CELEBAHQ_256}


def build(name: str, seed: int = 0):
    """The named architecture as a Denoiser on the linear DDPM schedule both models were trained with."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from retrack.models import Denoiser, Schedule

    torch.manual_seed(seed)
    unet = UNet2DModel(**ARCHITECTURES[name])
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    return Denoiser(unet, Schedule(sched.alphas_cumprod.double()))
