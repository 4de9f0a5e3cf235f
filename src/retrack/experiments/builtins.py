"""Built-in models and data an experiment can name as `builtin:NAME` instead of a path."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrack.data import ImageSet, load_images
from retrack.errors import require
from retrack.recipes import RECIPES
from retrack.recipes.mnist_tshirt import build_mnist_planted
from retrack.recipes.mnist_tshirt.demo import SHIPPED_MODEL


@dataclass(frozen=True)
class BuiltinData:
    """A data set built in memory, and the forget set it defines (its memorised copies)."""

    images: ImageSet
    forget: np.ndarray


def _shipped_mnist_tshirt() -> str:
    return str(SHIPPED_MODEL)


def _mnist_planted(name: str) -> Callable[[], BuiltinData]:
    def build() -> BuiltinData:
        built = build_mnist_planted(name)
        return BuiltinData(built.data, built.forget)

    return build


# Training time of a recipe model on a 2-core CPU with one torch thread (the boot's took 9,085 s).
RECIPE_HOURS = 2.5


def _recipe_model(name: str) -> Callable[[], str]:
    """The model that recipes/NAME/pretrain.yaml builds into recipes/NAME/model; a recipe whose
    weights are not built yet says in one sentence how to build them."""

    def find() -> str:
        folder = RECIPES / name / "model"
        require(folder.is_dir(), f"model: builtin:{name} is a recipe whose weights are not built yet; build them "
                                 f"(about {RECIPE_HOURS:g} h on 2 CPU cores) with `retrack pretrain --config "
                                 f"{_shown(RECIPES / name / 'pretrain.yaml')} --out {_shown(folder)}`.")
        return str(folder)

    return find


def _shown(path: Path) -> str:
    """A path as a command typed here would name it: relative to the working folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


MODELS: dict[str, Callable[[], str]] = {"mnist_tshirt": _shipped_mnist_tshirt,
                                        "mnist_boot": _recipe_model("mnist_boot"),
                                        "mnist_bag": _recipe_model("mnist_bag")}
DATA: dict[str, Callable[[], BuiltinData]] = {"mnist_tshirt": _mnist_planted("tshirt"),
                                              "mnist_boot": _mnist_planted("boot"),
                                              "mnist_bag": _mnist_planted("bag")}


def builtin_model(name: str) -> str:
    require(name in MODELS, f"model: no built-in model {name!r}; built in: {', '.join(MODELS)}.")
    return MODELS[name]()


def builtin_data(name: str) -> BuiltinData:
    require(name in DATA, f"data: no built-in data {name!r}; built in: {', '.join(DATA)}.")
    return DATA[name]()


def write_builtin_data(built: BuiltinData, folder: Path, name: str) -> tuple[Path, Path]:
    """The .npz and forget list that `retrack unlearn` reads, written once (atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    data_path, forget_path = folder / f"{name}.npz", folder / f"{name}_forget.txt"
    if not data_path.is_file() or _digest_of(data_path) != built.images.digest():
        tmp = folder / f".{name}.{os.getpid()}.npz"  # concurrent shards each write their own
        np.savez(tmp, images=built.images.images)
        tmp.replace(data_path)
    text = "".join(f"{i}\n" for i in built.forget)
    if not forget_path.is_file() or forget_path.read_text() != text:
        tmp = folder / f".{name}_forget.{os.getpid()}.txt"
        tmp.write_text(text)
        tmp.replace(forget_path)
    return data_path, forget_path


def _digest_of(path: Path) -> str:
    try:
        return load_images(path).digest()
    except Exception:  # noqa: BLE001  (a damaged copy is simply rewritten)
        return ""
