"""Which family a model belongs to, decided in this one place from its folder or the flags.

Families register in `backends/__init__.py`; detection asks each whether it claims a local
folder (reading config files only, never weights). A hub id cannot be read before it downloads,
so it goes to the family whose conditioning matches the flags (a prompt or none).
"""

from __future__ import annotations

from pathlib import Path

from retrack.backends.base import Backend, config_class, looks_like_hub_id, pipeline_class
from retrack.errors import UserError, require

FAMILIES: list[type[Backend]] = []


def register(family: type[Backend]) -> type[Backend]:
    """Add a family (a Backend subclass); detection asks families in the order they registered."""
    if family not in FAMILIES:
        FAMILIES.append(family)
    return family


def supported() -> str:
    """Every family's description, for the sentence that refuses an unknown model."""
    return ", and ".join(f.description for f in FAMILIES)


def family_of(model: str | Path, flag: str = "--model") -> type[Backend] | None:
    """The family of a local model folder (None for a hub id), checked without loading weights."""
    path = Path(model)
    if not path.exists():
        require(looks_like_hub_id(str(model)), f"{flag}: model path {str(model)!r} does not exist.")
        return None
    require(path.is_dir(), f"{flag} {str(path)!r} is not a folder.")
    for family in FAMILIES:
        if family.claims(path):
            return family
    raise _unsupported(path, flag)


def detect(model: str | Path, prompt: str | None = None, flag: str = "--model") -> type[Backend]:
    """The family that loads `model` under these flags; a prompt it cannot take (or the lack of one
    it needs) is refused here, before anything loads."""
    family = family_of(model, flag)
    if family is None:
        family = next(f for f in FAMILIES if f.conditioned == (prompt is not None))
    family.check_conditioning(str(model), prompt, flag)
    return family


def _unsupported(path: Path, flag: str) -> UserError:
    """Why no family claims a folder, in the terms of diffusers' layouts."""
    cls = pipeline_class(path)  # a pipeline folder (unet/ or transformer/) that no family takes
    if cls is not None and ((path / "unet").is_dir() or not (path / "config.json").is_file()):
        owner = next((f for f in FAMILIES if cls in f.pipelines), None)
        if owner is None:
            return UserError(f"--model {str(path)!r} is a {cls}; supported are {supported()}.")
        complete = getattr(owner, "complete", None)
        if complete is not None and not complete(path):
            return UserError(f"--model {str(path)!r} is a {cls}; supported are {supported()}; its model_index.json "
                             "does not list the components that pipeline needs.")
    if not (path / "unet").is_dir() and not (path / "config.json").is_file():
        return UserError(f"{flag} {str(path)!r} has neither a unet/ subfolder nor a config.json.")
    config = path / ("unet" if (path / "unet").is_dir() else "") / "config.json"
    unet = config_class(config, "UNet2DModel")
    return UserError(f"{str(config)!r} holds a {unet} outside a StableDiffusionPipeline folder; only "
                     f"unconditional UNet2DModel is supported there ({supported()}).")
