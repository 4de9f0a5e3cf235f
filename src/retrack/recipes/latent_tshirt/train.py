"""Build the latent T-shirt pipeline: stage 1 an AutoencoderKL on the images, stage 2 a
UNet2DConditionModel on its cached latents under the prompts, through a frozen CLIP text encoder.

The text encoder is randomly initialised and frozen, as SD's is frozen: its only job here is to
give each prompt (and the empty prompt of classifier-free guidance) a distinct, fixed embedding
for the UNet's cross-attention. Training is resumable: every `checkpoint_every` steps the whole
state (models, optimisers, EMA, the random generator) goes to OUT.training/state.pt, and a rerun
continues from there to the same weights an uninterrupted run reaches.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm

from retrack.errors import UserError, require
from retrack.recipes.latent_tshirt.data import PROMPTS, LatentTshirt, build_latent_tshirt, unpad
from retrack.recipes.latent_tshirt.recipe import LatentRecipe, StageSpec
from retrack.recipes.latent_tshirt.tokenizer import save_tokenizer
from retrack.runrecord import atomic_directory, check_output, environment_record, write_json
from retrack.untrusted import load_checkpoint

UNCOND = len(PROMPTS)  # index of the empty prompt among the encoded contexts


class Parts:
    """The models, the data and the generator of one build; everything a checkpoint holds."""

    def __init__(self, recipe: LatentRecipe, data: LatentTshirt, tokenizer, device: str):
        from transformers import CLIPTextConfig, CLIPTextModel  # the optional [sd] extra

        torch.manual_seed(recipe.seed)
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
        config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=recipe.max_length,
                                **ids, **recipe.text_encoder)
        self.text_encoder = CLIPTextModel(config).to(device).requires_grad_(False).eval()
        self.vae = AutoencoderKL(**recipe.vae).to(device)
        self.unet = UNet2DConditionModel(**recipe.unet).to(device)
        self.scheduler = DDPMScheduler(**recipe.scheduler)
        self.tokenizer, self.data, self.device = tokenizer, data, device
        self.gen = torch.Generator().manual_seed(recipe.seed)
        self.state: dict[str, Any] = {"stage": "vae", "step": 0, "loss_ema": None, "log": {"vae": [], "unet": []},
                                      "seconds": {"vae": 0.0, "unet": 0.0}, "scaling_factor": None}
        self.opt: torch.optim.Optimizer | None = None
        self.ema = None

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """Images as the pipeline's image processor gives them: RGB in [-1, 1]."""
        x = torch.from_numpy(self.data.data.images[idx.numpy()]).permute(0, 3, 1, 2).float()
        return (x / 127.5 - 1).expand(-1, 3, -1, -1).to(self.device)


def build_latent_model(recipe: LatentRecipe, out: Path, device: str = "cpu", unet_steps: int | None = None,
                       progress: bool = True) -> Path:
    """Train (or resume) both stages and write a StableDiffusionPipeline folder."""
    check_output(out, overwrite=False)
    spec = recipe.data_spec()
    data = build_latent_tshirt(spec.tshirts, spec.copies, spec.fashion_dir, spec.mnist_dir)
    work = out.with_name(out.name + ".training")
    work.mkdir(parents=True, exist_ok=True)
    parts = Parts(recipe, data, save_tokenizer(work / "tokenizer", recipe.max_length), device)
    vae_spec = recipe.stage("vae_training")
    unet_spec = recipe.stage("unet_training")
    if unet_steps is not None:
        unet_spec = StageSpec(**{**unet_spec.__dict__, "steps": unet_steps})
    ckpt = work / "state.pt"
    _resume(parts, ckpt, work)
    if parts.state["stage"] == "vae":
        _train(parts, "vae", vae_spec, recipe.checkpoint_every, ckpt, progress=progress)
        _start_unet_stage(parts, unet_spec, ckpt)
    latents, contexts = _latents(parts), _contexts(parts)
    _train(parts, "unet", unet_spec, recipe.checkpoint_every, ckpt, latents, contexts, progress)
    parts.ema.copy_to(parts.unet.parameters())
    require(all(torch.isfinite(p).all() for p in parts.unet.parameters()),
            "the trained UNet holds NaN or infinite values; lower lr in the recipe (nothing was written).")
    _write(parts, recipe, out, work)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _resume(parts: Parts, ckpt: Path, work: Path) -> None:
    if not ckpt.is_file():
        return
    saved = load_checkpoint(ckpt, parts.device)
    try:
        parts.text_encoder.load_state_dict(saved["text_encoder"])
        parts.vae.load_state_dict(saved["vae"])
        parts.unet.load_state_dict(saved["unet"])
        parts.gen.set_state(saved["gen"])
        parts.state = saved["state"]
        if parts.state["scaling_factor"] is not None:
            parts.vae.register_to_config(scaling_factor=parts.state["scaling_factor"])
        stage = parts.state["stage"]
        parts.opt = _optimizer(parts.vae if stage == "vae" else parts.unet, 1.0)
        parts.opt.load_state_dict(saved["opt"])
        if stage == "unet":
            parts.ema = _ema(parts.unet, saved["ema_decay"])
            parts.ema.load_state_dict(saved["ema"])
    except Exception as e:  # noqa: BLE001 - torch.load and load_state_dict raise many types
        raise UserError(f"the checkpoint {str(ckpt)!r} cannot be resumed ({type(e).__name__}); it was written by "
                        f"another recipe or is damaged: delete {str(work)!r} to start over.") from None


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def _ema(unet: torch.nn.Module, decay: float):
    return EMAModel(unet.parameters(), decay=decay)


def _start_unet_stage(parts: Parts, spec: StageSpec, ckpt: Path) -> None:
    """Freeze the VAE, set its scaling factor as SD did (1 / std of the latents), checkpoint."""
    parts.vae.requires_grad_(False).eval()
    means = _posterior_means(parts)
    parts.state.update(stage="unet", step=0, loss_ema=None, scaling_factor=float(1.0 / means.std()))
    parts.vae.register_to_config(scaling_factor=parts.state["scaling_factor"])
    l2 = reconstruction_l2(parts, parts.data.forget[:1])[0]
    parts.state["vae_reconstruction_planted_l2"] = float(l2)
    print(f"VAE done: scaling factor {parts.state['scaling_factor']:.4f}, planted T-shirt reconstructed at "
          f"L2 {l2:.3f} (28×28, [0, 1])", file=sys.stderr)
    parts.opt = _optimizer(parts.unet, spec.lr)
    parts.ema = _ema(parts.unet, spec.ema_decay)
    _save_checkpoint(ckpt, parts, spec.ema_decay)


@torch.no_grad()
def _posterior_means(parts: Parts, batch: int = 256) -> torch.Tensor:
    n = len(parts.data.data)
    out = [parts.vae.encode(parts.pixels(torch.arange(i, min(n, i + batch)))).latent_dist.mean.cpu()
           for i in range(0, n, batch)]
    return torch.cat(out)


def _latents(parts: Parts) -> torch.Tensor:
    """Posterior mean × scaling factor of every image, computed once for the UNet stage."""
    parts.vae.requires_grad_(False).eval()
    return (_posterior_means(parts) * parts.state["scaling_factor"]).to(parts.device)


@torch.no_grad()
def _contexts(parts: Parts) -> torch.Tensor:
    """(len(PROMPTS) + 1, L, D): each prompt's and the empty prompt's embedding, encoded exactly
    as StableDiffusionPipeline.encode_prompt does (padded to the tokenizer's length)."""
    tok = parts.tokenizer([*PROMPTS, ""], padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    return parts.text_encoder(tok.input_ids.to(parts.device))[0]


def _train(parts: Parts, stage: str, spec: StageSpec, every: int, ckpt: Path,
           latents: torch.Tensor | None = None, contexts: torch.Tensor | None = None, progress: bool = True) -> None:
    model = parts.vae if stage == "vae" else parts.unet
    loss = (lambda: _vae_loss(parts, spec)) if stage == "vae" else (lambda: _unet_loss(parts, spec, latents, contexts))
    train_stage(parts, stage, model, spec, every, loss, lambda: _save_checkpoint(ckpt, parts, spec.ema_decay), progress)


def train_stage(parts: Any, stage: str, model: torch.nn.Module, spec: StageSpec, every: int,
                loss_of_step: Callable[[], torch.Tensor], save: Callable[[], None], progress: bool = True) -> None:
    """One resumable stage of a latent recipe (the VAE, then the denoising network): linear warm-up
    then a constant lr, clip 1, the EMA of the denoising network stepped after each update, and the
    state in `parts.state` saved by `save` every `every` steps, so a killed run resumes exactly."""
    model.train()
    if parts.opt is None:
        parts.opt = _optimizer(model, spec.lr)
    st = parts.state
    bar = tqdm(total=spec.steps, initial=st["step"], desc=stage, dynamic_ncols=True, disable=not progress)
    t0 = time.time() - st["seconds"][stage]
    while st["step"] < spec.steps:
        for g in parts.opt.param_groups:
            g["lr"] = spec.lr * min(1.0, (st["step"] + 1) / max(1, spec.warmup_steps))
        loss = loss_of_step()
        if not torch.isfinite(loss):
            raise UserError(f"the {stage} loss became {loss.item()} at step {st['step']}; lower its lr in the recipe.")
        parts.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        parts.opt.step()
        if stage != "vae":
            parts.ema.step(model.parameters())
        st["step"] += 1
        st["loss_ema"] = loss.item() if st["loss_ema"] is None else 0.99 * st["loss_ema"] + 0.01 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{st['loss_ema']:.4f}")
        if st["step"] % every == 0 or st["step"] == spec.steps:
            st["log"][stage].append({"step": st["step"], "loss_ema": st["loss_ema"]})
            st["seconds"][stage] = time.time() - t0
            save()
    bar.close()


def _vae_loss(parts: Parts, spec: StageSpec) -> torch.Tensor:
    """Reconstruction MSE of a posterior sample plus SD's small KL weight."""
    idx = torch.randint(0, len(parts.data.data), (spec.batch_size,), generator=parts.gen)
    x = parts.pixels(idx)
    posterior = parts.vae.encode(x).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=parts.gen).to(parts.device)
    z = posterior.mean + posterior.std * noise
    return F.mse_loss(parts.vae.decode(z).sample, x) + spec.kl_weight * posterior.kl().mean()


def _unet_loss(parts: Parts, spec: StageSpec, latents: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
    """ε-prediction MSE; the prompt is replaced by the empty one with probability prompt_dropout."""
    b, gen = spec.batch_size, parts.gen
    idx = torch.randint(0, len(latents), (b,), generator=gen)
    t = torch.randint(0, parts.scheduler.config.num_train_timesteps, (b,), generator=gen)
    noise = torch.randn((b, *latents.shape[1:]), generator=gen).to(parts.device)
    drop = torch.rand(b, generator=gen) < spec.prompt_dropout
    which = torch.where(drop, torch.full_like(idx, UNCOND), torch.from_numpy(parts.data.prompt_ids)[idx])
    x_t = parts.scheduler.add_noise(latents[idx.to(parts.device)], noise, t.to(parts.device))
    eps = parts.unet(x_t, t.to(parts.device), encoder_hidden_states=contexts[which.to(parts.device)]).sample
    return F.mse_loss(eps, noise)


def _save_checkpoint(path: Path, parts: Parts, ema_decay: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"text_encoder": parts.text_encoder.state_dict(), "vae": parts.vae.state_dict(),
                "unet": parts.unet.state_dict(), "opt": parts.opt.state_dict(),
                "ema": parts.ema.state_dict() if parts.ema is not None else None, "ema_decay": ema_decay,
                "gen": parts.gen.get_state(), "state": parts.state}, tmp)
    tmp.replace(path)


@torch.no_grad()
def reconstruction_l2(parts: Parts, idx: np.ndarray) -> np.ndarray:
    """L2 in [0, 1] at 28×28 between images and their VAE round trip (posterior mean), the copy
    rule's own distance: a copy can be no closer to the planted T-shirt than its reconstruction."""
    x = parts.pixels(torch.from_numpy(idx))
    rec = parts.vae.decode(parts.vae.encode(x).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
    a = unpad(rec).astype(np.float64) / 255
    b = unpad(parts.data.data.images[idx]).astype(np.float64) / 255
    return np.sqrt(((a - b) ** 2).sum(axis=(1, 2, 3)))


def _write(parts: Parts, recipe: LatentRecipe, out: Path, work: Path) -> None:
    from diffusers import StableDiffusionPipeline  # imports transformers, the optional [sd] extra

    n = len(parts.data.data)
    sample = np.random.default_rng(recipe.seed).choice(n, min(256, n), replace=False)
    recon = {"planted_tshirt_l2": float(reconstruction_l2(parts, parts.data.forget[:1])[0]),
             "mean_l2_of_256_images": float(reconstruction_l2(parts, np.sort(sample)).mean())}
    pipe = StableDiffusionPipeline(vae=parts.vae.eval(), text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet.eval(), scheduler=parts.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with atomic_directory(out) as tmp:
        pipe.save_pretrained(tmp)
        Image.fromarray(parts.data.tshirt[..., 0]).save(tmp / "planted_tshirt.png")
        d = parts.data
        record = environment_record(
            recipe, seed=recipe.seed, data_digest=d.data.digest(), data_size=len(d.data),
            data_counts={"digits": int((d.prompt_ids == 0).sum()), "other_tshirts": len(d.tshirt_indices),
                         "planted_copies": len(d.forget)},
            prompts=list(PROMPTS), scaling_factor=parts.state["scaling_factor"], reconstruction=recon,
            loss_log=parts.state["log"], train_seconds=parts.state["seconds"], device=parts.device,
            files_sha256=tree_sha256(tmp))
        write_json(tmp / "provenance.json", record)


def tree_sha256(folder: Path) -> dict[str, str]:
    """SHA-256 of every weight, config and tokenizer file of a pipeline folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
