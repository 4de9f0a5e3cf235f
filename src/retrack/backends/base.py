"""The one interface between a model family and everything else.

Unlearning, evaluation, sampling and the run record never ask which family a model belongs to:
they call these methods. A family (pixel UNets, Stable Diffusion, later SDXL, SD3, Flux) is one
subclass in one file plus one line in `backends/__init__.py`'s registry. What a family decides:
how its folders are recognised, how it loads (with the conditioning the run binds in, e.g. a
prompt), the space its training data live in (pixels, VAE latents), the Denoiser the objectives
train, how it samples, what its samples are compared with, and how it saves and records itself.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from huggingface_hub import constants, try_to_load_from_cache

from retrack.data import ImageSet
from retrack.errors import require
from retrack.models import Denoiser
from retrack.validation import load_json


@dataclass(frozen=True)
class LoadOptions:
    """What a run binds into the model as it loads: the prompt it is conditioned on, a LoRA
    adapter to train instead of the whole network (rank, α; its initial weights from `seed`)."""

    prompt: str | None = None
    lora: int | None = None
    lora_alpha: float | None = None
    seed: int = 0
    flag: str = "--model"


DEFAULT_LOAD = LoadOptions()


@dataclass
class TrainingSpace:
    """The data as the Denoiser sees them: one row per image (uint8 NHWC pixels or float latents),
    and the conversion of rows to the tensor the trainer draws batches from."""

    rows: np.ndarray
    to_tensor: Callable[[np.ndarray], torch.Tensor]


@dataclass
class MetricImages:
    """What samples are compared with, as uint8 (N, H, W, C) at the size the model draws:
    `targets` (the distinct images being forgotten, or named training image files) and `remain`
    (FID's real set; empty when no metric reads it); `name` says which targets they are."""

    targets: np.ndarray
    remain: np.ndarray
    name: str = "forget"

    @property
    def pixels(self) -> ImageSet:
        return ImageSet(self.targets, self.name)


class Backend(abc.ABC):
    """A loaded model of one family. Class attributes describe the family; instances hold weights."""

    name: ClassVar[str]
    # How the family reads in "supported are ..." (every registered family's, joined).
    description: ClassVar[str]
    # Whether the family is used under a prompt (--prompt); a hub id is given to the family whose
    # conditioning matches the flags, since its files cannot be read before it downloads.
    conditioned: ClassVar[bool]
    # The diffusers pipeline classes (model_index.json's _class_name) the family loads.
    pipelines: ClassVar[tuple[str, ...]] = ()
    # Metrics of `retrack evaluate` its models support (None: all of them).
    metrics: ClassVar[tuple[str, ...] | None] = None
    # Whether training images of any size are resized to the model's (else they must fit exactly).
    resizes_images: ClassVar[bool] = False

    denoiser: Denoiser
    source: str

    # -- the family ----------------------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def claims(cls, path: Path) -> bool:
        """Whether a local folder is a model of this family, read from its config files only."""

    @classmethod
    @abc.abstractmethod
    def check_conditioning(cls, model: str, prompt: str | None, flag: str) -> None:
        """Refuse a prompt the family cannot take, or the lack of one it needs."""

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any], command: str) -> None:
        """Refuse, before anything loads, settings of `command` (its config as a mapping) that this
        family has no use for, and say what installs the libraries it needs."""
        return None

    @classmethod
    def check_metrics(cls, names: tuple[str, ...], flag: str, choices: tuple[str, ...]) -> None:
        """Refuse metrics (of `choices`, named by `flag`) its models cannot be measured with."""
        return None

    @classmethod
    @abc.abstractmethod
    def eval_defaults(cls, eval_clip: str | None) -> dict[str, Any]:
        """What the evaluation during fine-tuning measures when the flags leave it unset
        (eval_metrics, eval_samples, copy_rule); `eval_clip` names a local CLIP if one is given."""

    @classmethod
    def image_size(cls, model: str) -> tuple[int, int] | None:
        """(H, W) a family that resizes training images brings every image of a mixed folder to,
        read from the model's config files without loading weights (None: the images must agree)."""
        return None

    @classmethod
    @abc.abstractmethod
    def load(cls, model: str, device: str, options: LoadOptions) -> Backend:
        """The model from a local folder or hub id, on `device`, with `options` bound in."""

    # -- a loaded model ------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def scheduler_config(self) -> dict[str, Any]:
        """The model's own noise scheduler's config (samplers are built from it)."""

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @abc.abstractmethod
    def training_space(self, images: ImageSet, cache_dir: Path | None, progress: bool) -> TrainingSpace:
        """The data set in the space the Denoiser is trained in."""

    @abc.abstractmethod
    def metric_images(self, images: ImageSet, forget: np.ndarray, remain: np.ndarray | None,
                      target_files: list[Path]) -> MetricImages:
        """The images samples are compared with: `forget`/`remain` index `images` (remain None:
        not needed); `target_files` replace the forget images when the family supports it."""

    @abc.abstractmethod
    def sample(self, num: int, steps: int, sampler: str, seed: int, batch_size: int, guidance: float,
               progress: bool) -> np.ndarray:
        """`num` samples as uint8 (N, H, W, C); sample i depends only on (seed, i)."""

    def sample_settings(self, guidance: float) -> dict[str, Any]:
        """Settings beside the sampler's that made the samples (recorded with every sample metric)."""
        return {}

    @abc.abstractmethod
    def save(self, out: Path) -> None:
        """Write the model into the (new, empty) folder `out` in the layout it came in."""

    def record(self) -> dict[str, Any]:
        """The family's entries in the run record beside the output."""
        return {}


# ---------------------------------------------------------------------------------------------
# Reading a diffusers folder without loading weights
# ---------------------------------------------------------------------------------------------


def pipeline_class(path: Path) -> str | None:
    """`_class_name` of a local folder's model_index.json, or None without one."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    raw = load_json(index, "model index")
    require(isinstance(raw, dict) and isinstance(raw.get("_class_name"), str),
            f"model index {str(index)!r} must be a JSON object with a '_class_name'.")
    return raw["_class_name"]


def config_class(config: Path, default: str) -> str | None:
    """`_class_name` of a diffusers config.json (`default` when it names none), None without the file."""
    if not config.is_file():
        return None
    raw = load_json(config, "model config")
    require(isinstance(raw, dict), f"model config {str(config)!r} must hold a JSON object, "
                                   f"not a {type(raw).__name__}.")
    return raw.get("_class_name", default)


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def nchw(rows: np.ndarray) -> torch.Tensor:
    """uint8 NHWC rows to the NCHW tensor the trainer draws pixel batches from."""
    return torch.from_numpy(np.ascontiguousarray(rows.transpose(0, 3, 1, 2)))


def require_hub_reachable(repo: str) -> None:
    """Offline, a hub id works only if it is already in the local cache: say so at once instead
    of letting the hub client retry and then blame a missing config.json."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if not (constants.HF_HUB_OFFLINE or offline):
        return
    found = any(isinstance(try_to_load_from_cache(repo, name), str)
                for name in ("unet/config.json", "model_index.json", "config.json"))
    require(found,
            f"could not download the model {repo!r}: the Hugging Face Hub is offline (HF_HUB_OFFLINE) and "
            "it is not in the local cache; a local folder path works offline.")
