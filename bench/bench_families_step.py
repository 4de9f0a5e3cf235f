"""SDXL, SD3 and Flux: a ReTrack step against one forward+backward of the family's network on the 2B
latents the step touches, and peak memory of LoRA unlearning against full fine-tuning.

    python bench/bench_families_step.py [--families sdxl,sd3,flux] [--batch-size 2] [--repeats 5]
                                        [--lora 4] [--steps 2] [--threads 1]

Each family is a small pipeline of its own shape built from configs (randomly initialised) and
saved to a temporary folder, then loaded through its backend exactly as `retrack unlearn --prompt`
loads it, so the Denoiser timed is the real one (SDXL's pooled embedding and time ids, SD3's
σ-table and velocity conversion, Flux's 2×2 packing and position ids):
- SDXL: UNet of 128/256 channels (cross-attention with 1 and 2 transformer layers in the down and
  up blocks, heads of 8 channels), two CLIP text encoders of width 64 (77 tokens), 4×16×16 latents;
- SD3: SD3Transformer2DModel of 8 joint blocks, 6 heads of 64 channels, patch 2, 16×16×16 latents
  (64 image tokens), two CLIP encoders of width 64 and no T5 (the pipeline pads 256 zero tokens in
  its place, as for SD3 without T5);
- Flux: FluxTransformer2DModel of 4 double and 8 single blocks, 6 heads of 64 channels, 16-channel
  latents of 16×16 packed into 64 tokens, CLIP of width 64 (pooled) and a two-layer T5 of width
  64 over the pipeline's 512 tokens.
The VAE plays no part in a step (latents are encoded once), so it is as small as the pipeline allows.

Timings, interleaved, medians after one warm-up round (K = 10, λ = 0.5), as bench_sd_step.py:
the trainer's gradient for one ReTrack batch, one forward+backward of the same Denoiser on 2B
random latents, and the whole step with clipping and AdamW. Memory: each variant in a fresh
process (peak.py: VmHWM), `--steps` steps of trainer.train: the model only, the whole network,
and a LoRA adapter of rank `--lora` on its attention projections (as `--lora` adds it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from peak import peak_rss_mb  # noqa: E402
from step_timing import time_gradient_step  # noqa: E402

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
PROMPT = "a photograph of a t-shirt on a table"
VARIANTS = ("model only", "full network", "LoRA")
WIDTH = 64  # text encoders' width


def _clip_tokenizer(path: Path):
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)


def _clip(projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=514, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=4,
                         num_hidden_layers=1, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513, projection_dim=WIDTH)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae(latent_channels: int, sample_size: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3,
                         latent_channels=latent_channels, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1,
                         sample_size=sample_size, **kw)


def build(family: str, path: Path) -> Path:
    """A small pipeline of the family, written to `path`."""
    import diffusers

    torch.manual_seed(0)
    tok = _clip_tokenizer(path.parent / f".{family}-tokenizer")
    if family == "sdxl":
        unet = diffusers.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(128, 256), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
            transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=32, projection_class_embeddings_input_dim=6 * 32 + WIDTH,
            cross_attention_dim=2 * WIDTH, norm_num_groups=32)
        sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1)
        pipe = diffusers.StableDiffusionXLPipeline(vae=_vae(4, 128), text_encoder=_clip(False), tokenizer=tok,
                                                   text_encoder_2=_clip(True), tokenizer_2=tok, unet=unet,
                                                   scheduler=sched)
    elif family == "sd3":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=8, attention_head_dim=64,
            num_attention_heads=6, caption_projection_dim=384, joint_attention_dim=2 * WIDTH,
            pooled_projection_dim=2 * WIDTH, pos_embed_max_size=16)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(16, 128, shift_factor=0.0609, scaling_factor=1.5035), text_encoder=_clip(True), tokenizer=tok,
            text_encoder_2=_clip(True), tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    else:
        from transformers import T5Config, T5EncoderModel, T5TokenizerFast

        chars = [chr(c) for c in range(33, 127)]
        vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
        vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -3.0) for c in chars]
        T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512).save_pretrained(path.parent / ".t5")
        t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=WIDTH, d_kv=16, d_ff=2 * WIDTH, num_layers=2,
                                     num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64,
            num_attention_heads=6, joint_attention_dim=WIDTH, pooled_projection_dim=WIDTH,
            axes_dims_rope=(16, 24, 24), guidance_embeds=True)
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        pipe = diffusers.FluxPipeline(transformer=transformer, scheduler=sched,
                                      vae=_vae(16, 128, shift_factor=0.1159, scaling_factor=0.3611),
                                      text_encoder=_clip(False), tokenizer=tok, text_encoder_2=t5,
                                      tokenizer_2=T5TokenizerFast.from_pretrained(path.parent / ".t5"))
    pipe.save_pretrained(path)
    return path


def load(family: str, path: Path, device: str, lora: int | None = None):
    from retrack.backends import LoadOptions, detect

    return detect(str(path), PROMPT).load(str(path), device, LoadOptions(PROMPT, lora=lora))


def train_data(shape: tuple[int, ...], k: int):
    from retrack.trainer import TrainData

    g = torch.Generator().manual_seed(0)
    remain, forget = torch.randn(200, *shape, generator=g), torch.randn(4, *shape, generator=g)
    table = torch.stack([torch.randperm(200, generator=g)[:k] for _ in range(4)])
    return TrainData(remain, forget, table)


def time_family(path: Path, family: str, batch: int, repeats: int, device: str, k: int) -> dict:
    from retrack import objectives

    model = load(family, path, device)
    den = model.denoiser
    opt = torch.optim.AdamW([p for p in den.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.999),
                            weight_decay=1e-2)
    out = time_gradient_step(den, objectives.build("retrack", lam=0.5), train_data(den.sample_shape, k), batch,
                             den.sample_shape, opt, device, repeats)
    out["parameters"] = sum(p.numel() for p in den.unet.parameters())
    out["shape"] = den.sample_shape
    return out


def memory_child(path: Path, family: str, variant: str, batch: int, steps: int, lora: int, device: str,
                 k: int) -> None:
    from retrack import objectives
    from retrack.trainer import TrainSettings, train

    model = load(family, path, device, lora if variant == "LoRA" else None)
    den = model.denoiser
    trained = sum(p.numel() for p in den.parameters() if p.requires_grad)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if variant != "model only":
        train(den, objectives.build("retrack", lam=0.5), train_data(den.sample_shape, k),
              TrainSettings(steps=steps, batch_size=batch, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2),
              device, progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mb()
    print(json.dumps({"variant": variant, "peak_mb": peak, "trained_parameters": 0 if variant == "model only"
                      else trained}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="sdxl,sd3,flux")
    ap.add_argument("--batch-size", type=int, default=2, help="B: forget and remain latents per step each")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="training steps of each memory variant")
    ap.add_argument("--lora", type=int, default=4, help="LoRA rank of the memory variant")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="time the step only")
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)  # path family variant
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        path, family, variant = args.child
        return memory_child(Path(path), family, variant, args.batch_size, args.steps, args.lora, args.device, args.k)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, device {args.device}; B={args.batch_size}, K={args.k}, medians of "
          f"{args.repeats}; load average before {os.getloadavg()[0]:.2f}")
    what = "GPU memory allocated" if args.device.startswith("cuda") else "RSS (VmHWM of a fresh process)"
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            path = build(family, Path(tmp) / family)
            m = time_family(path, family, args.batch_size, args.repeats, args.device, args.k)
            fb = m["forward+backward"]
            shape = "×".join(map(str, m["shape"]))
            print(f"{family}: network {m['parameters'] / 1e6:.2f}M parameters, latents {shape}; "
                  f"ReTrack gradient {m['gradient']:.3f} s, forward+backward on 2B={2 * args.batch_size} latents "
                  f"{fb:.3f} s, ratio {m['gradient'] / fb:.3f} (target ≤ 1.10); whole step with clip+AdamW "
                  f"{m['step']:.3f} s ({m['step'] / fb:.3f}×)")
            if args.no_memory:
                continue
            peaks = {}
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--child", str(path), family, variant, "--batch-size",
                       str(args.batch_size), "--steps", str(args.steps), "--lora", str(args.lora), "--k", str(args.k),
                       "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
                res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True)
                                 .stdout.strip().splitlines()[-1])
                peaks[variant] = res["peak_mb"]
                print(f"{family}: peak {what}, {variant}{f' (rank {args.lora})' if variant == 'LoRA' else ''}: "
                      f"{res['peak_mb']:.0f} MB, {res['trained_parameters']:,} trained parameters, {args.steps} steps")
            base = peaks["model only"]
            print(f"{family}: LoRA / full: {peaks['LoRA'] / peaks['full network']:.3f} (target < 1); above the model "
                  f"alone: full {peaks['full network'] - base:.0f} MB, LoRA {peaks['LoRA'] - base:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
