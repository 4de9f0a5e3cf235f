"""A latent text-to-image model's ReTrack step against one forward+backward of its UNet on the 2B
latents the step touches, and peak memory of LoRA unlearning against full fine-tuning.

    python bench/bench_sd_step.py [--batch-size 4] [--repeats 5] [--lora 4] [--steps 2] [--threads 1]

The model is a small Stable-Diffusion-shaped UNet2DConditionModel built from a config (randomly
initialised): 4×16×16 latents (128×128 images under an 8× VAE), blocks of 64/128/256 channels with
cross-attention in the first two, two layers per block, attention heads of 8 channels, conditioned
on 77 tokens of width 256 from a one-layer CLIP text encoder, also built from a config. It is the
UNet of SD v1.x at about a fifth of its width and a quarter of its latent side, small enough for a
CPU. The prompt's embedding is bound in as `retrack unlearn --prompt` binds it (PromptDenoiser
of backends/stable_diffusion.py),
with the scheduler of SD v1.x (scaled-linear β, 1000 steps). The VAE plays no part in a step (the
latents are encoded once before training), so none is built.

Timings, interleaved, medians after one warm-up round (the paper's K = 10, λ = 0.5):
- gradient: the trainer's own path for one batch (draw, noise, ReTrack's weighted target over K
  neighbours, one forward over the 2B rows, backward: trainer.batch_gradient);
- forward+backward: the same UNet with the same prompt on 2B random latents, squared error;
- step: the gradient plus clipping and the AdamW update (the whole optimiser step).
Memory: each variant in a fresh process (bench/peak.py: its own VmHWM), running `--steps` steps
of trainer.train: the model only (no training), full fine-tuning of the UNet, and a LoRA adapter
of rank `--lora` on the attention projections (backends.stable_diffusion.add_lora, as `--lora` does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from peak import peak_rss_mb  # noqa: E402
from step_timing import time_gradient_step  # noqa: E402

LATENT = (4, 16, 16)
WIDTH = 256  # text encoder width = the UNet's cross-attention dimension
TOKENS = 77
VARIANTS = ("model only", "full UNet", "LoRA")


def build_model(device: str):
    """The PromptDenoiser of a small SD-shaped UNet under a fixed 77-token prompt."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from retrack.backends.stable_diffusion import PromptDenoiser
    from retrack.models import Schedule

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=LATENT[1], in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=8, norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                                        num_attention_heads=4, num_hidden_layers=1, max_position_embeddings=TOKENS,
                                        bos_token_id=998, eos_token_id=999, pad_token_id=999))
    ids = torch.randint(0, 1000, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = text(ids).last_hidden_state
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return PromptDenoiser(unet, Schedule(sched.alphas_cumprod.double()), "epsilon", context).to(device)


def train_data(k: int):
    from retrack.trainer import TrainData

    g = torch.Generator().manual_seed(0)
    remain, forget = torch.randn(200, *LATENT, generator=g), torch.randn(4, *LATENT, generator=g)
    table = torch.stack([torch.randperm(200, generator=g)[:k] for _ in range(4)])
    return TrainData(remain, forget, table)


def time_step(batch: int, repeats: int, device: str, k: int) -> dict[str, float]:
    from retrack import objectives

    model, objective, data = build_model(device), objectives.build("retrack", lam=0.5), train_data(k)
    opt = torch.optim.AdamW(list(model.parameters()), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2)
    return time_gradient_step(model, objective, data, batch, LATENT, opt, device, repeats)


def memory_child(variant: str, batch: int, steps: int, lora: int, device: str, k: int) -> None:
    from retrack import objectives
    from retrack.backends.stable_diffusion import add_lora
    from retrack.trainer import TrainSettings, train

    model = build_model(device)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if variant == "LoRA":
        trained = add_lora(model.unet, lora, None)["trainable_parameters"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if variant != "model only":
        train(model, objectives.build("retrack", lam=0.5), train_data(k),
              TrainSettings(steps=steps, batch_size=batch, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2),
              device, progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mb()
    print(json.dumps({"variant": variant, "peak_mb": peak,
                      "trained_parameters": 0 if variant == "model only" else trained}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=4, help="B: forget and remain latents per step each")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="training steps of each memory variant")
    ap.add_argument("--lora", type=int, default=4, help="LoRA rank of the memory variant")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        return memory_child(args.child, args.batch_size, args.steps, args.lora, args.device, args.k)
    unet_params = sum(p.numel() for p in build_model("cpu").unet.parameters())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, device {args.device}; UNet {unet_params / 1e6:.2f}M parameters, latents "
          f"{'×'.join(map(str, LATENT))}, context {TOKENS}×{WIDTH}; B={args.batch_size}, K={args.k}, "
          f"medians of {args.repeats}")
    m = time_step(args.batch_size, args.repeats, args.device, args.k)
    fb = m["forward+backward"]
    print(f"ReTrack gradient {m['gradient']:.3f} s, forward+backward on 2B={2 * args.batch_size} latents {fb:.3f} s, "
          f"ratio {m['gradient'] / fb:.3f} (target ≤ 1.10); whole step with clip+AdamW {m['step']:.3f} s "
          f"({m['step'] / fb:.3f}×)")
    what = "GPU memory allocated" if args.device.startswith("cuda") else "RSS (VmHWM of a fresh process)"
    peaks = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--batch-size", str(args.batch_size), "--steps",
               str(args.steps), "--lora", str(args.lora), "--k", str(args.k), "--device", args.device]
        out = subprocess.run(cmd + (["--threads", str(args.threads)] if args.threads else []),
                             capture_output=True, text=True, check=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        peaks[variant] = res["peak_mb"]
        print(f"peak {what}, {variant}{f' (rank {args.lora})' if variant == 'LoRA' else ''}: {res['peak_mb']:.0f} MB, "
              f"{res['trained_parameters']:,} trained parameters, {args.steps} steps")
    base = peaks["model only"]
    print(f"LoRA / full: {peaks['LoRA'] / peaks['full UNet']:.3f} (target < 1); above the model alone: "
          f"full {peaks['full UNet'] - base:.0f} MB, LoRA {peaks['LoRA'] - base:.0f} MB")


if __name__ == "__main__":
    main()
