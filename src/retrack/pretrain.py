"""Train a small unconditional diffusers UNet from a YAML recipe (ε-prediction, EMA, resumable).

This is how the shipped MNIST T-shirt model was made; it is not a general training framework.
The loss is the usual per-pixel MSE; only unlearning uses the paper's summed reduction.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retrack.data import ImageSet, load_images
from retrack.errors import UserError, require
from retrack.runrecord import atomic_directory, check_output, environment_record, write_json
from retrack.validation import POSITIVE_INT, SEED, Check, Float, Int, Text, Validated, load_yaml, option


class Mapping_(Check):
    """A YAML mapping of keyword arguments (the UNet's or the scheduler's constructor)."""

    def describe(self) -> str:
        return "a mapping of constructor arguments"

    def __call__(self, value: Any, name: str | None = None) -> dict[str, Any]:
        require(isinstance(value, dict), f"{name} must be {self.describe()}, got {value!r}.")
        return dict(value)


@dataclass(frozen=True)
class PretrainRecipe(Validated):
    data: str = option(Text())
    unet: dict[str, Any] = option(Mapping_())
    scheduler: dict[str, Any] = option(Mapping_())
    steps: int = option(POSITIVE_INT, 3600)
    batch_size: int = option(POSITIVE_INT, 128)
    lr: float = option(Float(0.0, min_open=True), 1e-3)
    warmup_steps: int = option(Int(min=0), 100)
    weight_decay: float = option(Float(0.0), 0.0)
    ema_decay: float = option(Float(0.0, 1.0, max_open=True), 0.999)
    seed: int = option(SEED, 0)
    checkpoint_every: int = option(POSITIVE_INT, 100)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PretrainRecipe:
        p = Path(path)
        require(p.is_file(), f"--config: recipe {str(p)!r} does not exist.")
        raw = load_yaml(p, "recipe")
        if isinstance(raw, dict):
            raw.pop("extra", None)
            missing = [k for k in ("data", "unet", "scheduler") if k not in raw]
            require(not missing, f"recipe {str(p)!r} lacks the key {missing[0]!r}." if missing else "")
        recipe = cls.from_mapping(raw, f"recipe {str(p)!r}")
        check_constructors(recipe, p)
        return recipe


def check_constructors(recipe: PretrainRecipe, path: Path) -> None:
    """Unknown UNet keys and a bad scheduler fail here, not after the data is built."""
    import inspect

    from diffusers import DDPMScheduler, UNet2DModel

    accepted = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(recipe.unet) - accepted)
    require(not unknown, f"unknown key {unknown[0]!r} under unet: of recipe {str(path)!r}." if unknown else "")
    try:
        DDPMScheduler(**recipe.scheduler)
    except Exception as e:  # noqa: BLE001 - diffusers raises TypeError, ValueError, NotImplementedError
        raise UserError(f"scheduler: of recipe {str(path)!r} is not a valid DDPMScheduler: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}.") from None


def check_recipe_data(name: str) -> None:
    """A recipe's data is a built-in set or an existing path; checked before anything is built."""
    from retrack.recipes.mnist_tshirt import PLANTED

    planted = name.removesuffix("_remain").removeprefix("mnist_")
    builtin = name.startswith("mnist_") and planted in PLANTED
    require(builtin or Path(name).exists(),
            f"the recipe's data {name!r} is neither a built-in set "
            f"({', '.join(f'mnist_{p}[_remain]' for p in sorted(PLANTED))}) nor an existing path.")


def recipe_data(name: str) -> ImageSet:
    """A built-in set by name, else any path load_images reads.

    `mnist_tshirt` (the paper's) and `mnist_boot` are MNIST digits plus ≈1% copies of one
    Fashion-MNIST image; a `_remain` suffix drops the copies: the data of the model retrained from
    scratch, the gold standard an unlearned model is compared against.
    """
    from retrack.recipes.mnist_tshirt import PLANTED, build_mnist_planted

    base = name.removesuffix("_remain")
    planted = base.removeprefix("mnist_")
    if base.startswith("mnist_") and planted in PLANTED:
        built = build_mnist_planted(planted)
        if name == base:
            return built.data
        keep = np.setdiff1d(np.arange(len(built.data)), built.forget)
        return ImageSet(np.ascontiguousarray(built.data.images[keep]), name)
    return load_images(name)


def pretrain(recipe: PretrainRecipe, out: Path, device: str = "cpu", steps: int | None = None) -> Path:
    """Train (or resume) and write a DDPM pipeline folder holding the EMA weights."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    check_output(out, overwrite=False)
    total = steps or recipe.steps
    try:
        UNet2DModel(**recipe.unet)  # the real one is built below, after seeding; this only checks
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for bad arguments
        raise UserError(f"unet: of the recipe is not a valid UNet2DModel: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}.") from None
    data = recipe_data(recipe.data)
    images = data.as_tensor(device)
    work = out.with_name(out.name + ".training")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    unet = UNet2DModel(**recipe.unet).to(device)
    scheduler = DDPMScheduler(**recipe.scheduler)
    ema = EMAModel(unet.parameters(), decay=recipe.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(recipe.seed)
    state = {"step": 0, "loss_ema": None, "log": [], "seconds": 0.0}
    ckpt = work / "state.pt"
    if ckpt.is_file():
        try:
            saved = torch.load(ckpt, map_location=device, weights_only=False)
            unet.load_state_dict(saved["unet"])
            ema.load_state_dict(saved["ema"])
            opt.load_state_dict(saved["opt"])
            gen.set_state(saved["gen"])
            state = saved["state"]
        except Exception as e:  # noqa: BLE001 - torch.load and load_state_dict raise many types
            raise UserError(f"the checkpoint {str(ckpt)!r} cannot be resumed ({type(e).__name__}); it was "
                            f"written by another recipe or is damaged: delete {str(work)!r} to start over.") from None
    abar = scheduler.alphas_cumprod.to(device)
    bar = tqdm(total=total, initial=state["step"], desc="pretrain", dynamic_ncols=True)
    t_start = time.time() - state["seconds"]
    while state["step"] < total:
        lr = recipe.lr * min(1.0, (state["step"] + 1) / max(1, recipe.warmup_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(images), (recipe.batch_size,), generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (recipe.batch_size,), generator=gen)
        noise = torch.randn(images[idx].shape, generator=gen).to(device)
        a = abar[t.to(device)].view(-1, 1, 1, 1)
        x_t = a.sqrt() * images[idx] + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(x_t, t.to(device)).sample, noise)
        if not torch.isfinite(loss):
            raise UserError(f"pretraining loss became {loss.item()} at step {state['step']}.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        state["step"] += 1
        le = state["loss_ema"]
        state["loss_ema"] = loss.item() if le is None else 0.99 * le + 0.01 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{state['loss_ema']:.4f}")
        if state["step"] % recipe.checkpoint_every == 0 or state["step"] == total:
            state["log"].append({"step": state["step"], "loss_ema": state["loss_ema"]})
            state["seconds"] = time.time() - t_start
            _save_checkpoint(ckpt, unet, ema, opt, gen, state)
    bar.close()
    ema.copy_to(unet.parameters())
    require(all(torch.isfinite(p).all() for p in unet.parameters()),
            "the trained weights hold NaN or infinite values; lower lr in the recipe (nothing was written).")
    with atomic_directory(out) as tmp:
        unet.save_pretrained(tmp / "unet")
        scheduler.save_pretrained(tmp / "scheduler")
        write_json(tmp / "model_index.json", {"_class_name": "DDPMPipeline",
                                              "unet": ["diffusers", "UNet2DModel"],
                                              "scheduler": ["diffusers", "DDPMScheduler"]})
        record = environment_record(recipe, seed=recipe.seed, steps=state["step"],
                                    data_digest=data.digest(), data_size=len(data),
                                    final_loss_ema=state["loss_ema"], train_seconds=state["seconds"],
                                    loss_log=state["log"], device=device)
        record["weights_sha256"] = file_sha256(tmp / "unet" / "diffusion_pytorch_model.safetensors")
        write_json(tmp / "provenance.json", record)
    shutil.rmtree(work, ignore_errors=True)
    return out


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _save_checkpoint(path: Path, unet, ema, opt, gen, state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "gen": gen.get_state(), "state": state}, tmp)
    tmp.replace(path)
