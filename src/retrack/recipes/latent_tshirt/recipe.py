"""The latent text-to-image recipe: what `retrack pretrain` builds when a YAML says `kind: latent-text`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from retrack.errors import UserError, require
from retrack.validation import POSITIVE_INT, SEED, Check, Float, Int, Optional, Text, Validated, load_yaml, option

KIND = "latent-text"


class Mapping_(Check):
    """A YAML mapping of keyword arguments (a diffusers or transformers constructor's)."""

    def describe(self) -> str:
        return "a mapping of constructor arguments"

    def __call__(self, value: Any, name: str | None = None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise UserError(f"{name} must be {self.describe()}, got {value!r}.")
        return dict(value)


@dataclass(frozen=True)
class DataSpec(Validated):
    tshirts: int = option(Int(min=0), 600)
    copies: int = option(POSITIVE_INT, 150)
    fashion_dir: str | None = option(Optional(Text()), None)
    mnist_dir: str | None = option(Optional(Text()), None)


@dataclass(frozen=True)
class StageSpec(Validated):
    """One training stage: AdamW with linear warm-up, gradient clipping at 1."""

    steps: int = option(POSITIVE_INT, 1000)
    batch_size: int = option(POSITIVE_INT, 32)
    lr: float = option(Float(0.0, min_open=True), 1e-3)
    warmup_steps: int = option(Int(min=0), 50)
    kl_weight: float = option(Float(0.0), 1e-6)  # VAE stage only
    ema_decay: float = option(Float(0.0, 1.0, max_open=True), 0.999)  # UNet stage only
    prompt_dropout: float = option(Float(0.0, 1.0), 0.1)  # UNet stage only: classifier-free guidance


class RecipeFile(Validated):
    """What every latent recipe does with its YAML: the sections it must have (`SECTIONS`), the
    `kind:` it builds (`KIND`), each section parsed by key, and its own `check` before any data."""

    SECTIONS: ClassVar[tuple[str, ...]] = ()
    KIND: ClassVar[str] = ""

    def data_spec(self) -> DataSpec:
        return DataSpec.from_mapping(self.data, "data: of the recipe")

    def stage(self, name: str) -> StageSpec:
        return StageSpec.from_mapping(getattr(self, name), f"{name}: of the recipe")

    def check(self, where: str) -> None:  # pragma: no cover - each recipe checks its own sections
        raise NotImplementedError

    @classmethod
    def from_yaml(cls, path: str | Path):
        p = Path(path)
        require(p.is_file(), f"--config: recipe {str(p)!r} does not exist.")
        raw = load_yaml(p, "recipe")
        require(isinstance(raw, dict), f"recipe {str(p)!r} must be a mapping.")
        missing = [k for k in cls.SECTIONS if k not in raw]
        require(not missing, f"recipe {str(p)!r} lacks the key {missing[0]!r}." if missing else "")
        recipe = cls.from_mapping(raw, f"recipe {str(p)!r}")
        require(recipe.kind == cls.KIND,
                f"recipe {str(p)!r} has kind {recipe.kind!r}; this builder makes {cls.KIND!r}.")
        recipe.check(str(p))
        return recipe


@dataclass(frozen=True)
class LatentRecipe(RecipeFile):
    SECTIONS: ClassVar[tuple[str, ...]] = ("data", "text_encoder", "vae", "vae_training", "unet", "unet_training",
                                           "scheduler")
    KIND: ClassVar[str] = KIND

    data: dict[str, Any] = option(Mapping_())
    text_encoder: dict[str, Any] = option(Mapping_())
    vae: dict[str, Any] = option(Mapping_())
    vae_training: dict[str, Any] = option(Mapping_())
    unet: dict[str, Any] = option(Mapping_())
    unet_training: dict[str, Any] = option(Mapping_())
    scheduler: dict[str, Any] = option(Mapping_())
    kind: str = option(Text(), KIND)
    max_length: int = option(Int(min=4, max=77), 16)
    seed: int = option(SEED, 0)
    checkpoint_every: int = option(POSITIVE_INT, 200)

    def check(self, where: str) -> None:
        """Every section parses and every constructor accepts its keys, before any data is built."""

        self.data_spec(), self.stage("vae_training"), self.stage("unet_training")
        for name, cls in (("vae", AutoencoderKL), ("unet", UNet2DConditionModel)):
            accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
            unknown = sorted(set(getattr(self, name)) - accepted)
            require(not unknown, f"unknown key {unknown[0]!r} under {name}: of recipe {where!r}." if unknown else "")
        width = self.text_encoder.get("hidden_size")
        require(self.unet.get("cross_attention_dim") == width,
                f"unet: cross_attention_dim must equal text_encoder: hidden_size ({width}) in recipe {where!r}.")
        try:
            DDPMScheduler(**self.scheduler)
        except Exception as e:  # noqa: BLE001 - diffusers raises TypeError, ValueError, NotImplementedError
            raise UserError(f"scheduler: of recipe {where!r} is not a valid DDPMScheduler: "
                            f"{type(e).__name__}.") from None


def recipe_kind(path: str | Path) -> str | None:
    """The `kind:` of a recipe YAML (None for the pixel recipes, which have none)."""
    raw = load_yaml(Path(path), "recipe") if Path(path).is_file() else None
    return raw.get("kind") if isinstance(raw, dict) else None
