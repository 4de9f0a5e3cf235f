"""Image similarity descriptors and the reconstruction probe of memorisation (SSCD protocol).

Every result carries the name of the descriptor that produced it, so an offline pixel cosine is
never reported as "sscd". Descriptors: `sscd` (the sscd_disc_mixup TorchScript file, given as a
local path: nothing is downloaded), `ssim` (torchmetrics), `pixel_cosine` (cosine of the raw
images in [−1, 1]) and any user TorchScript file that maps ImageNet-normalised images to vectors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure as ssim
from tqdm.auto import tqdm

from retrack.data import to_model_range, to_uint8
from retrack.errors import UserError, require
from retrack.metrics.likelihood import model_device_dtype
from retrack.sampling import reconstruct

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILTIN = ("sscd", "ssim", "pixel_cosine")


class Descriptor:
    """Similarity of uint8 (N, H, W, C) images; higher = more alike, 1 = identical."""

    name: str = "descriptor"

    def paired(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(N,) similarity of a[i] with b[i]."""
        raise NotImplementedError

    def cross(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(N, M) similarity of every a[i] with every b[j]."""
        return np.stack([self.paired(a, np.repeat(bj[None], len(a), 0)) for bj in b], axis=1)


class EmbeddingDescriptor(Descriptor):
    """Cosine similarity of embeddings; subclasses say how an image becomes a vector."""

    def __init__(self, batch_size: int = 64, device: torch.device | str = "cpu"):
        self.batch_size, self.device = batch_size, torch.device(device)

    def _embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        """(N, F) unit vectors, computed `batch_size` images at a time."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size]))
            out.append(self._embed_batch(chunk.to(self.device)).flatten(1).double().cpu())
        return F.normalize(torch.cat(out), dim=1)

    def paired(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (self.embed(a) * self.embed(b)).sum(1).numpy()

    def cross(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (self.embed(a) @ self.embed(b).T).numpy()


class PixelCosine(EmbeddingDescriptor):
    """Cosine of the images themselves in the model range [−1, 1] (offline, no weights).

    [−1, 1] rather than [0, 1]: in [0, 1] all pixels are non-negative and any two images look
    alike; centring makes an image and its negative score −1.
    """

    name = "pixel_cosine"

    def _embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_range(images).flatten(1)


class TorchScriptDescriptor(EmbeddingDescriptor):
    """A TorchScript image embedder, fed as SSCD expects: 3 channels, Resize(288), ImageNet norm."""

    def __init__(self, path: str | Path, name: str, resize: int = 288, batch_size: int = 64,
                 device: torch.device | str = "cpu"):
        super().__init__(batch_size, device)
        self.name, self.resize = name, resize
        self.module = load_torchscript(path, self.device, what=f"{name} descriptor")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) to normalised float (N, 3, H', W'), shorter side = `resize`."""
        x = images.permute(0, 3, 1, 2).float() / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        scale = self.resize / min(h, w)
        size = (self.resize, round(w * scale)) if h <= w else (round(h * scale), self.resize)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(self.preprocess(images))


class SSIMDescriptor(Descriptor):
    """Structural similarity (torchmetrics, Gaussian window σ = 1.5) of images in [0, 1].

    The window is 11 pixels, or the largest odd size that fits images smaller than that.
    """

    name = "ssim"

    def __init__(self, batch_size: int = 64, device: torch.device | str = "cpu"):
        self.batch_size, self.device = batch_size, torch.device(device)

    @torch.no_grad()
    def paired(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        require(a.shape == b.shape, f"SSIM needs images of one shape, got {a.shape} and {b.shape}.")
        side = min(a.shape[1], a.shape[2])
        kernel = min(11, side if side % 2 else side - 1)
        out = []
        for s in range(0, len(a), self.batch_size):
            x, y = (torch.from_numpy(np.ascontiguousarray(v[s:s + self.batch_size])).to(self.device)
                    .permute(0, 3, 1, 2).double() / 255 for v in (a, b))
            out.append(ssim(x, y, data_range=1.0, kernel_size=kernel, reduction="none").cpu())
        return torch.cat(out).numpy()


def load_torchscript(path: str | Path, device: torch.device, what: str) -> torch.jit.ScriptModule:
    """Load a TorchScript file in eval mode, or say in one sentence why not."""
    p = Path(path)
    require(p.is_file(), f"{what} file {str(p)!r} does not exist.")
    try:
        with warnings.catch_warnings():  # jit is deprecated, but SSCD ships only as TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location=device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{what} file {str(p)!r} is not a TorchScript module "
                        f"({_first_line(e)}).") from None
    return module.eval()


def make_descriptor(spec: str, sscd_path: str | Path | None = None, batch_size: int = 64,
                    device: torch.device | str = "cpu") -> Descriptor:
    """`sscd` (needs sscd_path), `ssim`, `pixel_cosine`, or a path to a TorchScript embedder."""
    if spec == "sscd":
        require(sscd_path is not None,
                "the sscd descriptor needs --sscd PATH (the sscd_disc_mixup TorchScript file).")
        return TorchScriptDescriptor(sscd_path, "sscd", batch_size=batch_size, device=device)
    if spec == "ssim":
        return SSIMDescriptor(batch_size, device)
    if spec == "pixel_cosine":
        return PixelCosine(batch_size, device)
    if Path(spec).is_file():
        return TorchScriptDescriptor(spec, f"torchscript:{Path(spec).name}", batch_size=batch_size,
                                     device=device)
    raise UserError(f"descriptor {spec!r} is not one of {', '.join(BUILTIN)} "
                    "nor an existing TorchScript file.")


# ---------------------------------------------------------------------------------------------
# The reconstruction probe
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reconstruction:
    """Similarity of each image to its noise-then-denoise reconstruction."""

    descriptor: str
    t_start: int
    similarity: np.ndarray  # (N,)
    reconstructions: np.ndarray  # uint8 (N, H, W, C)

    def summary(self) -> dict:
        return {"descriptor": self.descriptor, "t_start": self.t_start,
                "mean": float(self.similarity.mean()), "per_image": self.similarity.tolist()}


def reconstruction_similarity(
    denoiser: torch.nn.Module,
    scheduler_config: dict,
    images: np.ndarray,
    descriptor: Descriptor,
    t_start: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> Reconstruction:
    """Noise each image to t_start (default T/4), denoise with ancestral DDPM, compare.

    A memorised image comes back from t = T/4 and scores near 1; lower = more forgotten.
    Batch k > 0 draws its noise from a seed derived from (seed, k), so with up to `batch_size`
    images the noise is exactly `sampling.reconstruct(..., seed)`'s.
    """

    require(images.ndim == 4 and images.dtype == np.uint8, "images must be uint8 (N, H, W, C).")
    t_start = int(scheduler_config["num_train_timesteps"]) // 4 if t_start is None else int(t_start)
    device, _ = model_device_dtype(denoiser)
    recon = []
    starts = range(0, len(images), batch_size)
    for k, start in enumerate(tqdm(starts, desc=f"reconstruct from t={t_start}",
                                   disable=not progress, dynamic_ncols=True)):
        x = to_model_range(torch.from_numpy(images[start:start + batch_size]).to(device))
        chunk_seed = seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        recon.append(to_uint8(reconstruct(denoiser, scheduler_config, x, t_start, chunk_seed)))
    recon_all = np.concatenate(recon)
    return Reconstruction(descriptor.name, t_start, descriptor.paired(images, recon_all), recon_all)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
