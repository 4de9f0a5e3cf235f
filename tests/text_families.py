"""Tiny SDXL, SD3 and Flux pipelines built from configs, as diffusers' own tests build them: 8×8 (Flux
16×16) RGB images, 4-channel latents, one-layer CLIP text encoders of width 8, a two-layer T5 of
width 8 with a tokenizer written here, no downloads. Each is written with save_pretrained."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from conftest import save_tiny_tokenizer

CLIP = {"vocab_size": 514, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
        "num_hidden_layers": 1, "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513, "projection_dim": 8}


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _clip(max_length: int, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(max_position_embeddings=max_length, **CLIP)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(sample_size: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=2, sample_size=sample_size, **kw)


def save_t5_tokenizer(path: Path, max_length: int = 32):
    """A T5 tokenizer built locally: a Unigram vocabulary of single characters (alone and after
    the word marker ▁), </s> appended, as T5's own tokenizer does."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -3.0) for c in chars]
    T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length).save_pretrained(path)
    return T5TokenizerFast.from_pretrained(path)


T5_VOCAB = 4 + 2 * 94


def _t5(seed: int, width: int = 8):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=T5_VOCAB, d_model=width, d_kv=4, d_ff=16, num_layers=2, num_heads=2,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def save_sdxl_pipeline(path: Path, seed: int = 0, max_length: int = 12, refiner: bool = False) -> Path:
    _quiet()
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    tokenizer = save_tiny_tokenizer(path.parent / f".{path.name}-tokenizer", max_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=4 * (5 if refiner else 6) + CLIP["projection_dim"],
        cross_attention_dim=CLIP["hidden_size"] * (1 if refiner else 2), norm_num_groups=2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    parts = dict(vae=_vae(8), unet=unet, scheduler=scheduler, text_encoder_2=_clip(max_length, True, seed + 2),
                 tokenizer_2=tokenizer)
    if refiner:
        StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
                                         **parts).save_pretrained(path)
    else:
        StableDiffusionXLPipeline(text_encoder=_clip(max_length, False, seed + 1), tokenizer=tokenizer,
                                  **parts).save_pretrained(path)
    return path


def save_sd3_pipeline(path: Path, seed: int = 0, max_length: int = 12, t5: bool = False) -> Path:
    _quiet()
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = save_tiny_tokenizer(path.parent / f".{path.name}-tokenizer", max_length)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
        pooled_projection_dim=2 * CLIP["projection_dim"], pos_embed_max_size=8)
    third = dict(text_encoder_3=_t5(seed + 3, 16), tokenizer_3=save_t5_tokenizer(path.parent / f".{path.name}-t5")) \
        if t5 else dict(text_encoder_3=None, tokenizer_3=None)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(8, shift_factor=0.0609, scaling_factor=1.5035), text_encoder=_clip(max_length, True, seed + 1),
        tokenizer=tokenizer, text_encoder_2=_clip(max_length, True, seed + 2), tokenizer_2=tokenizer,
        **third).save_pretrained(path)
    return path


def save_flux_pipeline(path: Path, seed: int = 0, max_length: int = 12, scheduler: bool = True,
                       guidance: bool = False) -> Path:
    _quiet()
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = save_tiny_tokenizer(path.parent / f".{path.name}-tokenizer", max_length)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=CLIP["hidden_size"],
        axes_dims_rope=(2, 2, 4), guidance_embeds=guidance)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(transformer=transformer, scheduler=sched, vae=_vae(16, shift_factor=0.1159, scaling_factor=0.3611),
                 text_encoder=_clip(max_length, False, seed + 1), tokenizer=tokenizer, text_encoder_2=_t5(seed + 2),
                 tokenizer_2=save_t5_tokenizer(path.parent / f".{path.name}-t5")).save_pretrained(path)
    if not scheduler:
        index = json.loads((path / "model_index.json").read_text())
        index["scheduler"] = [None, None]
        (path / "model_index.json").write_text(json.dumps(index))
        for f in (path / "scheduler").iterdir():
            f.unlink()
        (path / "scheduler").rmdir()
    return path
