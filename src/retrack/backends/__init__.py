"""Model families behind one interface (base.Backend); detection in registry.py.

A new family is one module with a Backend subclass and one `register(...)` line below.
"""

from retrack.backends.base import DEFAULT_LOAD, Backend, LoadOptions, MetricImages, TrainingSpace
from retrack.backends.flux import FluxModel
from retrack.backends.pixel import PixelModel
from retrack.backends.registry import detect, family_of, register, supported
from retrack.backends.sd3 import StableDiffusion3Model
from retrack.backends.sdxl import StableDiffusionXLModel
from retrack.backends.stable_diffusion import StableDiffusionModel

register(PixelModel)
register(StableDiffusionModel)
register(StableDiffusionXLModel)
register(StableDiffusion3Model)
register(FluxModel)


def load(model: str, device: str, options: LoadOptions = DEFAULT_LOAD) -> Backend:
    """The model under these options, by the family that detection gives it."""
    return detect(model, options.prompt, options.flag).load(model, device, options)


__all__ = ["Backend", "FluxModel", "LoadOptions", "MetricImages", "PixelModel", "StableDiffusion3Model",
           "StableDiffusionModel", "StableDiffusionXLModel", "TrainingSpace", "detect", "family_of", "load",
           "register", "supported"]
