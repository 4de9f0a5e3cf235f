"""Train a small unconditional diffusers UNet from a YAML recipe (ε-prediction, EMA, resumable).

This is how the shipped MNIST T-shirt model was made; it is not a general training framework.
The loss is the usual per-pixel MSE; only unlearning uses the paper's summed reduction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from retrack.data import ImageSet, load_images
from retrack.errors import UserError, require
from retrack.recipes.mnist_tshirt import PLANTED, build_mnist_planted
from retrack.runrecord import atomic_directory, check_output, environment_record, write_json
from retrack.untrusted import load_checkpoint
from retrack.validation import POSITIVE_INT, SEED, Check, Float, Int, Text, Validated, excerpt, load_yaml, option


class Mapping_(Check):
    """A YAML mapping of keyword arguments (the UNet's or the scheduler's constructor)."""

    def describe(self) -> str:
        return "a mapping of constructor arguments"

    def __call__(self, value: Any, name: str | None = None) -> dict[str, Any]:
        require(isinstance(value, dict), f"{name} must be {self.describe()}, got {excerpt(value)}.")
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

    planted = name.removesuffix("_remain").removeprefix("mnist_")
    builtin = name.startswith("mnist_") and planted in PLANTED
    require(builtin or Path(name).exists(),
            f"the recipe's data {name!r} is neither a built-in set "
            f"({', '.join(f'mnist_{p}[_remain]' for p in sorted(PLANTED))}) nor an existing path.")


def recipe_data(name: str) -> ImageSet:
    """A built-in set by name, else any path load_images reads.

    `mnist_tshirt` (the paper's), `mnist_boot` and `mnist_bag` are MNIST digits plus ≈1% copies of
    one Fashion-MNIST image; a `_remain` suffix drops the copies: the data of the model retrained from
    scratch, the gold standard an unlearned model is compared against.
    """

    base = name.removesuffix("_remain")
    planted = base.removeprefix("mnist_")
    if base.startswith("mnist_") and planted in PLANTED:
        built = build_mnist_planted(planted)
        if name == base:
            return built.data
        keep = np.setdiff1d(np.arange(len(built.data)), built.forget)
        return ImageSet(np.ascontiguousarray(built.data.images[keep]), name)
    return load_images(name)


def training_folder(out: Path) -> Path:
    """Where the checkpoint lives: beside the output, kept after success so a run can be extended."""
    out = Path(out)
    return out.with_name(out.name + ".training")


def _recipe_identity(recipe: PretrainRecipe) -> dict[str, Any]:
    """What must match for a checkpoint to be continued: everything but the length and the logging."""
    return {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("steps", "checkpoint_every")}


def check_extension(out: Path, total: int) -> None:
    """`--extend` continues a finished run only from its kept checkpoint, and only forwards."""
    ckpt = training_folder(out) / "state.pt"
    require(Path(out).is_dir(), f"--extend: {str(out)!r} is not a finished pretraining output.")
    require(ckpt.is_file(), f"--extend: {str(ckpt)!r} does not exist, so {str(out)!r} cannot be trained "
            f"longer (its training state was not kept); train a new output with --steps instead.")
    done = _saved_step(ckpt)
    require(total > done, f"--extend: {str(out)!r} already holds {done} steps; pass --steps greater than {done}.")


def _saved_step(ckpt: Path) -> int:
    saved = load_checkpoint(ckpt, "cpu")
    try:
        return int(saved["state"]["step"])
    except Exception as e:  # noqa: BLE001 - whatever the mapping holds instead
        raise UserError(f"the checkpoint {str(ckpt)!r} cannot be read ({type(e).__name__}).") from None


def pretrain(recipe: PretrainRecipe, out: Path, device: str = "cpu", steps: int | None = None,
             extend: bool = False, progress: bool = True) -> Path:
    """Train (or resume, or extend) and write a DDPM pipeline folder holding the EMA weights.

    The learning rate is constant after warm-up, so extending a finished run to more steps gives
    the same weights as training that many steps at once (tested); the checkpoint is kept beside
    the output for that reason.
    """

    total = steps or recipe.steps
    recipe = dataclasses.replace(recipe, steps=total)  # the record's config is the one that ran
    if extend:
        check_extension(out, total)
    else:
        require(not Path(out).exists(), f"--out {str(out)!r} exists; choose another --out, or pass --extend "
                "--steps N to train that model longer.")
        check_output(out, overwrite=False)
    try:
        UNet2DModel(**recipe.unet)  # the real one is built below, after seeding; this only checks
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for bad arguments
        raise UserError(f"unet: of the recipe is not a valid UNet2DModel: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}.") from None
    data = recipe_data(recipe.data)
    _check_data_fits(recipe, data)
    run = _TrainingRun.start(recipe, device, training_folder(out))
    require(run.state["step"] <= total,
            f"the checkpoint {str(run.ckpt)!r} already holds {run.state['step']} steps, more than the {total} "
            f"asked; pass --steps {run.state['step']} or more, or delete {str(run.ckpt.parent)!r} to start over.")
    run.train(data.as_tensor(device), total, progress)
    _write_pipeline(run, out, data, device)
    return out


def _check_data_fits(recipe: PretrainRecipe, data: ImageSet) -> None:
    """The images must be what the UNet takes (checked before the training folder is made)."""


    defaults = {k: p.default for k, p in inspect.signature(UNet2DModel.__init__).parameters.items()}
    given = {**defaults, **recipe.unet}
    size = given["sample_size"] if isinstance(given["sample_size"], int) else None
    c, h, w = data.shape
    require(c == given["in_channels"] and c == given["out_channels"],
            f"the recipe's data holds {c}-channel images but its unet: takes in_channels={given['in_channels']}, "
            f"out_channels={given['out_channels']}; set both to {c}.")
    require(size is None or (h, w) == (size, size),
            f"the recipe's data holds {h}×{w} images but its unet: has sample_size={size}; set it to {h}.")


@dataclass
class _TrainingRun:
    """The model, its EMA, optimiser and noise generator, saved together so a run resumes exactly."""

    recipe: PretrainRecipe
    unet: Any
    ema: Any
    opt: torch.optim.Optimizer
    gen: torch.Generator
    ckpt: Path
    state: dict[str, Any]

    @classmethod
    def start(cls, recipe: PretrainRecipe, device: str, work: Path) -> _TrainingRun:
        work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(recipe.seed)
        unet = UNet2DModel(**recipe.unet).to(device)
        ema = EMAModel(unet.parameters(), decay=recipe.ema_decay)
        opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        state = {"step": 0, "loss_ema": None, "log": [], "seconds": 0.0, "recipe": _recipe_identity(recipe)}
        run = cls(recipe, unet, ema, opt, torch.Generator().manual_seed(recipe.seed), work / "state.pt", state)
        if run.ckpt.is_file():
            run._load(device)
        return run

    def _load(self, device: str) -> None:
        saved = load_checkpoint(self.ckpt, device)
        try:
            self.unet.load_state_dict(saved["unet"])
            self.ema.load_state_dict(saved["ema"])
            self.opt.load_state_dict(saved["opt"])
            self.gen.set_state(saved["gen"])
            identity = saved["state"].get("recipe", self.state["recipe"])  # checkpoints before this check lack it
        except Exception as e:  # noqa: BLE001 - load_state_dict and a foreign mapping raise many types
            raise UserError(f"the checkpoint {str(self.ckpt)!r} cannot be resumed ({type(e).__name__}); it was "
                            f"written by another recipe or is damaged: delete {str(self.ckpt.parent)!r} to start "
                            f"over.") from None
        require(identity == self.state["recipe"],
                f"the checkpoint {str(self.ckpt)!r} was written by a recipe with other settings "
                f"({', '.join(k for k in identity if identity[k] != self.state['recipe'].get(k))}); "
                f"delete {str(self.ckpt.parent)!r} to start over.")
        self.state = {**saved["state"], "recipe": identity}

    def train(self, images: torch.Tensor, total: int, progress: bool = True) -> None:
        recipe, state = self.recipe, self.state
        abar = DDPMScheduler(**recipe.scheduler).alphas_cumprod.to(images.device)
        bar = tqdm(total=total, initial=state["step"], desc="pretrain", dynamic_ncols=True, disable=not progress)
        t_start = time.time() - state["seconds"]
        while state["step"] < total:
            loss = self._step(images, abar)
            state["step"] += 1
            le = state["loss_ema"]
            state["loss_ema"] = loss if le is None else 0.99 * le + 0.01 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{state['loss_ema']:.4f}")
            if state["step"] % recipe.checkpoint_every == 0 or state["step"] == total:
                state["log"].append({"step": state["step"], "loss_ema": state["loss_ema"]})
                state["seconds"] = time.time() - t_start
                self._save()
        bar.close()

    def _step(self, images: torch.Tensor, abar: torch.Tensor) -> float:
        recipe, gen, device = self.recipe, self.gen, images.device
        lr = recipe.lr * min(1.0, (self.state["step"] + 1) / max(1, recipe.warmup_steps))
        for g in self.opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(images), (recipe.batch_size,), generator=gen)
        t = torch.randint(0, len(abar), (recipe.batch_size,), generator=gen)
        noise = torch.randn(images[idx].shape, generator=gen).to(device)
        a = abar[t.to(device)].view(-1, 1, 1, 1)
        x_t = a.sqrt() * images[idx] + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(self.unet(x_t, t.to(device)).sample, noise)
        if not torch.isfinite(loss):
            raise UserError(f"pretraining loss became {loss.item()} at step {self.state['step']}.")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.ema.step(self.unet.parameters())
        return loss.item()

    def _save(self) -> None:
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save({"unet": self.unet.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                    "gen": self.gen.get_state(), "state": self.state}, tmp)
        tmp.replace(self.ckpt)


def _write_pipeline(run: _TrainingRun, out: Path, data: ImageSet, device: str) -> None:
    unet, recipe, state = run.unet, run.recipe, run.state
    run.ema.copy_to(unet.parameters())
    require(all(torch.isfinite(p).all() for p in unet.parameters()),
            "the trained weights hold NaN or infinite values; lower lr in the recipe (nothing was written).")
    with atomic_directory(out) as tmp:
        unet.save_pretrained(tmp / "unet")
        DDPMScheduler(**recipe.scheduler).save_pretrained(tmp / "scheduler")
        write_json(tmp / "model_index.json", {"_class_name": "DDPMPipeline",
                                              "unet": ["diffusers", "UNet2DModel"],
                                              "scheduler": ["diffusers", "DDPMScheduler"]})
        record = environment_record(recipe, seed=recipe.seed, steps=state["step"],
                                    data_digest=data.digest(), data_size=len(data),
                                    final_loss_ema=state["loss_ema"], train_seconds=state["seconds"],
                                    loss_log=state["log"], device=device)
        record["weights_sha256"] = file_sha256(tmp / "unet" / "diffusion_pytorch_model.safetensors")
        write_json(tmp / "provenance.json", record)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
