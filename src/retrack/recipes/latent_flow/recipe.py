"""The latent flow recipe: what `retrack pretrain` builds when a YAML says `kind: latent-flow`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from retrack.errors import UserError, require
from retrack.recipes.latent_tshirt.recipe import Mapping_, RecipeFile
from retrack.validation import POSITIVE_INT, SEED, Int, Text, option

KIND = "latent-flow"
SECTIONS = ("data", "text_encoder", "vae", "vae_training", "transformer", "transformer_training", "scheduler")


@dataclass(frozen=True)
class FlowRecipe(RecipeFile):
    SECTIONS: ClassVar[tuple[str, ...]] = SECTIONS
    KIND: ClassVar[str] = KIND

    data: dict[str, Any] = option(Mapping_())
    text_encoder: dict[str, Any] = option(Mapping_())
    vae: dict[str, Any] = option(Mapping_())
    vae_training: dict[str, Any] = option(Mapping_())
    transformer: dict[str, Any] = option(Mapping_())
    transformer_training: dict[str, Any] = option(Mapping_())
    scheduler: dict[str, Any] = option(Mapping_())
    kind: str = option(Text(), KIND)
    max_length: int = option(Int(min=4, max=77), 16)
    seed: int = option(SEED, 0)
    checkpoint_every: int = option(POSITIVE_INT, 200)

    def check(self, where: str) -> None:
        """Every section parses and every constructor accepts its keys, before any data is built."""

        self.data_spec(), self.stage("vae_training"), self.stage("transformer_training")
        for name, cls in (("vae", AutoencoderKL), ("transformer", SD3Transformer2DModel)):
            accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
            unknown = sorted(set(getattr(self, name)) - accepted)
            require(not unknown, f"unknown key {unknown[0]!r} under {name}: of recipe {where!r}." if unknown else "")
        width, proj = self.text_encoder.get("hidden_size"), self.text_encoder.get("projection_dim")
        require(self.transformer.get("joint_attention_dim") == 2 * width,
                f"transformer: joint_attention_dim must be twice text_encoder: hidden_size ({2 * width}) in "
                f"recipe {where!r}.")
        require(self.transformer.get("pooled_projection_dim") == 2 * proj,
                f"transformer: pooled_projection_dim must be twice text_encoder: projection_dim ({2 * proj}) in "
                f"recipe {where!r}.")
        try:
            FlowMatchEulerDiscreteScheduler(**self.scheduler)
        except Exception as e:  # noqa: BLE001 - diffusers raises TypeError, ValueError
            raise UserError(f"scheduler: of recipe {where!r} is not a valid FlowMatchEulerDiscreteScheduler: "
                            f"{type(e).__name__}.") from None
