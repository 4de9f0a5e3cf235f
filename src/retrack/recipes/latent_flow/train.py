"""Build the latent flow pipeline: stage 1 the latent T-shirt recipe's AutoencoderKL, stage 2 an
SD3Transformer2DModel trained by flow matching on its latents under the prompts.

Rectified flow as SD3 trains it (Esser et al. 2024): x = (1 − σ)·x0 + σ·ε with σ logit-normal
(shifted by the scheduler's `shift`), the transformer predicting the velocity ε − x0 at timestep
σ·1000, squared error. The two CLIP encoders are random and frozen: they only give each prompt
(and the empty prompt of classifier-free guidance) a distinct fixed embedding, computed by the
pipeline's own `encode_prompt`, so training sees exactly what sampling and unlearning see. The
latents are (posterior mean − shift) × scale with SD3's convention: shift the mean and scale
1/std of the posterior means. Resumable: the whole state goes to OUT.training/state.pt every
`checkpoint_every` steps, and a rerun continues from there to the same weights.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.training_utils import EMAModel
from PIL import Image

from retrack.errors import UserError, require
from retrack.recipes.latent_flow.recipe import FlowRecipe
from retrack.recipes.latent_tshirt.data import PROMPTS, LatentTshirt, build_latent_tshirt
from retrack.recipes.latent_tshirt.recipe import StageSpec
from retrack.recipes.latent_tshirt.tokenizer import save_tokenizer
from retrack.recipes.latent_tshirt.train import (
    _optimizer,
    _posterior_means,
    _vae_loss,
    reconstruction_l2,
    train_stage,
    tree_sha256,
)
from retrack.runrecord import atomic_directory, check_output, environment_record, write_json
from retrack.untrusted import load_checkpoint

UNCOND = len(PROMPTS)  # index of the empty prompt among the encoded contexts


class Parts:
    """The models, the data and the generator of one build; everything a checkpoint holds. Its
    `vae`, `data`, `device`, `gen` and `pixels` are what the latent T-shirt recipe's VAE stage reads."""

    def __init__(self, recipe: FlowRecipe, data: LatentTshirt, tokenizer, device: str):
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        torch.manual_seed(recipe.seed)
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
        config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=recipe.max_length,
                                **ids, **recipe.text_encoder)
        self.text_encoders = [CLIPTextModelWithProjection(config).to(device).requires_grad_(False).eval()
                              for _ in range(2)]
        self.vae = AutoencoderKL(**recipe.vae).to(device)
        self.transformer = SD3Transformer2DModel(**recipe.transformer).to(device)
        self.scheduler = FlowMatchEulerDiscreteScheduler(**recipe.scheduler)
        self.tokenizer, self.data, self.device = tokenizer, data, device
        self.gen = torch.Generator().manual_seed(recipe.seed)
        self.state: dict[str, Any] = {"stage": "vae", "step": 0, "loss_ema": None,
                                      "log": {"vae": [], "transformer": []},
                                      "seconds": {"vae": 0.0, "transformer": 0.0}, "scaling_factor": None,
                                      "shift_factor": None}
        self.opt: torch.optim.Optimizer | None = None
        self.ema = None

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """Images as the pipeline's image processor gives them: RGB in [-1, 1]."""
        x = torch.from_numpy(self.data.data.images[idx.numpy()]).permute(0, 3, 1, 2).float()
        return (x / 127.5 - 1).expand(-1, 3, -1, -1).to(self.device)

    def pipeline(self):
        from diffusers import StableDiffusion3Pipeline  # imports transformers, the optional [sd] extra

        return StableDiffusion3Pipeline(transformer=self.transformer.eval(), scheduler=self.scheduler,
                                        vae=self.vae.eval(), text_encoder=self.text_encoders[0],
                                        tokenizer=self.tokenizer, text_encoder_2=self.text_encoders[1],
                                        tokenizer_2=self.tokenizer, text_encoder_3=None, tokenizer_3=None)


def build_flow_model(recipe: FlowRecipe, out: Path, device: str = "cpu", steps: int | None = None,
                     progress: bool = True) -> Path:
    """Train (or resume) both stages and write a StableDiffusion3Pipeline folder."""
    check_output(out, overwrite=False)
    spec = recipe.data_spec()
    data = build_latent_tshirt(spec.tshirts, spec.copies, spec.fashion_dir, spec.mnist_dir)
    work = out.with_name(out.name + ".training")
    work.mkdir(parents=True, exist_ok=True)
    parts = Parts(recipe, data, save_tokenizer(work / "tokenizer", recipe.max_length), device)
    vae_spec, flow_spec = recipe.stage("vae_training"), recipe.stage("transformer_training")
    if steps is not None:
        flow_spec = StageSpec(**{**flow_spec.__dict__, "steps": steps})
    ckpt = work / "state.pt"
    _resume(parts, ckpt, work)
    if parts.state["stage"] == "vae":
        _train(parts, "vae", vae_spec, recipe.checkpoint_every, ckpt, progress=progress)
        _start_flow_stage(parts, flow_spec, ckpt)
    latents, contexts = _latents(parts), _contexts(parts)
    _train(parts, "transformer", flow_spec, recipe.checkpoint_every, ckpt, latents, contexts, progress)
    parts.ema.copy_to(parts.transformer.parameters())
    require(all(torch.isfinite(p).all() for p in parts.transformer.parameters()),
            "the trained transformer holds NaN or infinite values; lower lr in the recipe (nothing was written).")
    _write(parts, recipe, out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _models(parts: Parts) -> dict[str, torch.nn.Module]:
    return {"text_encoder": parts.text_encoders[0], "text_encoder_2": parts.text_encoders[1], "vae": parts.vae,
            "transformer": parts.transformer}


def _resume(parts: Parts, ckpt: Path, work: Path) -> None:
    if not ckpt.is_file():
        return
    saved = load_checkpoint(ckpt, parts.device)
    try:
        for name, module in _models(parts).items():
            module.load_state_dict(saved[name])
        parts.gen.set_state(saved["gen"])
        parts.state = saved["state"]
        if parts.state["scaling_factor"] is not None:
            parts.vae.register_to_config(scaling_factor=parts.state["scaling_factor"],
                                         shift_factor=parts.state["shift_factor"])
        stage = parts.state["stage"]
        parts.opt = _optimizer(parts.vae if stage == "vae" else parts.transformer, 1.0)
        parts.opt.load_state_dict(saved["opt"])
        if stage == "transformer":
            parts.ema = _ema(parts.transformer, saved["ema_decay"])
            parts.ema.load_state_dict(saved["ema"])
    except Exception as e:  # noqa: BLE001 - load_state_dict and set_state raise many types
        raise UserError(f"the checkpoint {str(ckpt)!r} cannot be resumed ({type(e).__name__}); it was written by "
                        f"another recipe or is damaged: delete {str(work)!r} to start over.") from None


def _ema(model: torch.nn.Module, decay: float):

    return EMAModel(model.parameters(), decay=decay)


def _start_flow_stage(parts: Parts, spec: StageSpec, ckpt: Path) -> None:
    """Freeze the VAE, set SD3's latent convention (shift = mean, scale = 1/std of the posterior
    means), checkpoint."""
    parts.vae.requires_grad_(False).eval()
    means = _posterior_means(parts)
    parts.state.update(stage="transformer", step=0, loss_ema=None, scaling_factor=float(1.0 / means.std()),
                       shift_factor=float(means.mean()))
    parts.vae.register_to_config(scaling_factor=parts.state["scaling_factor"],
                                 shift_factor=parts.state["shift_factor"])
    l2 = reconstruction_l2(parts, parts.data.forget[:1])[0]
    parts.state["vae_reconstruction_planted_l2"] = float(l2)
    print(f"VAE done: scaling factor {parts.state['scaling_factor']:.4f}, shift {parts.state['shift_factor']:.4f}, "
          f"planted T-shirt reconstructed at L2 {l2:.3f} (28×28, [0, 1])", file=sys.stderr)
    parts.opt = _optimizer(parts.transformer, spec.lr)
    parts.ema = _ema(parts.transformer, spec.ema_decay)
    _save_checkpoint(ckpt, parts, spec.ema_decay)


def _latents(parts: Parts) -> torch.Tensor:
    """(posterior mean − shift) × scale of every image, as the pipeline decodes them."""
    parts.vae.requires_grad_(False).eval()
    s = parts.state
    return ((_posterior_means(parts) - s["shift_factor"]) * s["scaling_factor"]).to(parts.device)


@torch.no_grad()
def _contexts(parts: Parts) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's and the empty prompt's token and pooled embeddings, from the pipeline's own
    encode_prompt (two CLIP encoders, T5's place filled with zeros as SD3 without T5 does)."""
    pipe = parts.pipeline()
    embeds, _, pooled, _ = pipe.encode_prompt([*PROMPTS, ""], None, None, device=torch.device(parts.device),
                                              do_classifier_free_guidance=False)
    return embeds, pooled


def _train(parts: Parts, stage: str, spec: StageSpec, every: int, ckpt: Path,
           latents: torch.Tensor | None = None, contexts: tuple[torch.Tensor, torch.Tensor] | None = None,
           progress: bool = True) -> None:
    model = parts.vae if stage == "vae" else parts.transformer
    loss = (lambda: _vae_loss(parts, spec)) if stage == "vae" else (lambda: _flow_loss(parts, spec, latents, contexts))
    train_stage(parts, stage, model, spec, every, loss, lambda: _save_checkpoint(ckpt, parts, spec.ema_decay), progress)


def _flow_loss(parts: Parts, spec: StageSpec, latents: torch.Tensor,
               contexts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Velocity MSE at σ ~ logit-normal(ln shift, 1); the prompt is replaced by the empty one with
    probability prompt_dropout."""
    b, gen = spec.batch_size, parts.gen
    idx = torch.randint(0, len(latents), (b,), generator=gen)
    u = torch.randn(b, generator=gen) + math.log(float(parts.scheduler.config.shift))
    sigma = torch.sigmoid(u).to(parts.device).view(-1, 1, 1, 1)
    noise = torch.randn((b, *latents.shape[1:]), generator=gen).to(parts.device)
    drop = torch.rand(b, generator=gen) < spec.prompt_dropout
    which = torch.where(drop, torch.full_like(idx, UNCOND), torch.from_numpy(parts.data.prompt_ids)[idx])
    which = which.to(parts.device)
    x0 = latents[idx.to(parts.device)]
    x = (1 - sigma) * x0 + sigma * noise
    embeds, pooled = contexts
    v = parts.transformer(hidden_states=x, timestep=sigma.flatten() * parts.scheduler.config.num_train_timesteps,
                          encoder_hidden_states=embeds[which], pooled_projections=pooled[which],
                          return_dict=False)[0]
    return F.mse_loss(v, noise - x0)


def _save_checkpoint(path: Path, parts: Parts, ema_decay: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({**{name: m.state_dict() for name, m in _models(parts).items()}, "opt": parts.opt.state_dict(),
                "ema": parts.ema.state_dict() if parts.ema is not None else None, "ema_decay": ema_decay,
                "gen": parts.gen.get_state(), "state": parts.state}, tmp)
    tmp.replace(path)


def _write(parts: Parts, recipe: FlowRecipe, out: Path) -> None:

    n = len(parts.data.data)
    sample = np.random.default_rng(recipe.seed).choice(n, min(256, n), replace=False)
    recon = {"planted_tshirt_l2": float(reconstruction_l2(parts, parts.data.forget[:1])[0]),
             "mean_l2_of_256_images": float(reconstruction_l2(parts, np.sort(sample)).mean())}
    pipe = parts.pipeline()
    with atomic_directory(out) as tmp:
        pipe.save_pretrained(tmp)
        Image.fromarray(parts.data.tshirt[..., 0]).save(tmp / "planted_tshirt.png")
        d = parts.data
        record = environment_record(
            recipe, seed=recipe.seed, data_digest=d.data.digest(), data_size=len(d.data),
            data_counts={"digits": int((d.prompt_ids == 0).sum()), "other_tshirts": len(d.tshirt_indices),
                         "planted_copies": len(d.forget)},
            prompts=list(PROMPTS), scaling_factor=parts.state["scaling_factor"],
            shift_factor=parts.state["shift_factor"], reconstruction=recon, loss_log=parts.state["log"],
            train_seconds=parts.state["seconds"], device=parts.device, files_sha256=tree_sha256(tmp))
        write_json(tmp / "provenance.json", record)
