"""Sample quality through torchmetrics: FID, Inception Score and CLIP-IQA, offline.

torchmetrics normally fetches Inception (via torch-fidelity) and CLIP weights from the internet;
here every weight is a local path given by a flag, and a missing one is a one-sentence error
naming that flag. Custom modules are accepted too: torchmetrics' FrechetInceptionDistance and
InceptionScore take any nn.Module as `feature`, which receives uint8 (N, C, H, W) images and
returns (N, F) features (FID) or (N, classes) logits (IS: torchmetrics applies the softmax
itself, so logits are exactly what it expects). The paper's MNIST IS uses a 10-class classifier.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.inception import InceptionScore
from tqdm.auto import tqdm

from retrack.errors import UserError, first_line, require

INCEPTION_HINT = "torch-fidelity's pt_inception-2015-12-05 weights file"
FID_NEEDS = f"FID needs Inception weights: pass --inception PATH ({INCEPTION_HINT})."
IS_NEEDS = ("IS needs a classifier or Inception weights: pass --classifier PATH or "
            f"--inception PATH ({INCEPTION_HINT}).")
CLIP_NEEDS = "CLIP-IQA needs a local CLIP model: pass --clip PATH (a transformers CLIP folder)."


def _nchw_uint8(images: np.ndarray, three_channels: bool) -> torch.Tensor:
    require(images.ndim == 4 and images.dtype == np.uint8, "images must be uint8 (N, H, W, C).")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1) if three_channels and x.shape[1] == 1 else x


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration (the reference code ran its MNIST classifier in train mode)."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


def check_takes(module: nn.Module, shape: tuple[int, ...], flag: str, device: torch.device | str = "cpu") -> None:
    """Refuse, before any long work, a feature network or classifier (a custom one: Inception
    resizes anything) that cannot take uint8 images of `shape` (C, H, W)."""
    x = torch.zeros((2, *shape), dtype=torch.uint8, device=device)
    try:
        with _eval_mode(module), torch.no_grad():
            module(x)
    except Exception as e:  # noqa: BLE001 - a network's own check raises any type
        raise UserError(f"{flag} cannot take the {'×'.join(map(str, shape))} (C×H×W) images measured here "
                        f"({first_line(e)}); pass a network made for them.") from None


def inception_network(weights: str | Path | None, output: str, flag_sentence: str) -> nn.Module:
    """torchmetrics' Inception-v3 (torch-fidelity port) loaded from a local weights file."""
    require(weights is not None, flag_sentence)
    require(Path(weights).is_file(), f"Inception weights file {str(weights)!r} does not exist.")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise UserError("Inception features need the torch-fidelity package: "
                        "pip install torch-fidelity.") from None

    try:
        return NoTrainInceptionV3("inception-v3-compat", [output], str(weights))
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        raise UserError(f"could not load Inception weights from {str(weights)!r}: {e}.") from None


class _Sized(nn.Module):
    """A feature module with `num_features` set, so torchmetrics need not probe it on the CPU."""

    def __init__(self, module: nn.Module, example: torch.Tensor):
        super().__init__()
        self.module = module
        self.num_features = int(module(example).reshape(len(example), -1).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).reshape(len(x), -1)


def _batches(x: torch.Tensor, batch_size: int, desc: str, progress: bool) -> Iterator[torch.Tensor]:
    require(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}.")
    starts = range(0, len(x), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, dynamic_ncols=True):
        yield x[start:start + batch_size]


def frechet_distance(
    real: np.ndarray,
    fake: np.ndarray,
    features: nn.Module | None = None,
    inception_weights: str | Path | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> float:
    """FID between uint8 (N, H, W, C) sets, with Inception pool features or a custom module."""
    return FrechetReference(real, features, inception_weights, batch_size, device, progress)(fake, progress)


class FrechetReference:
    """FID of any number of generated sets against one real set, whose features are taken once.

    Evaluation during fine-tuning measures FID at many steps against the same remain set; its
    features (60,000 images for MNIST) would otherwise be recomputed at every evaluation.
    """

    def __init__(self, real: np.ndarray, features: nn.Module | None = None,
                 inception_weights: str | Path | None = None, batch_size: int = 64,
                 device: torch.device | str = "cpu", progress: bool = True) -> None:

        require(len(real) >= 2, "FID needs at least 2 real and 2 generated images.")
        self.custom = features is not None
        if not self.custom:
            features = inception_network(inception_weights, "2048", FID_NEEDS)
        self.shape, self.features, self.batch_size, self.device = real.shape[1:], features, batch_size, device
        xr = _nchw_uint8(real, not self.custom)
        with _eval_mode(features.to(device)), torch.no_grad():
            self.metric = FrechetInceptionDistance(feature=_Sized(features, xr[:2].to(device)),
                                                   reset_real_features=False).to(device)
            for batch in _batches(xr, batch_size, "FID real", progress):
                self.metric.update(batch.to(device), real=True)

    def __call__(self, fake: np.ndarray, progress: bool = True) -> float:
        require(len(fake) >= 2, "FID needs at least 2 real and 2 generated images.")
        require(self.shape == fake.shape[1:],
                f"real {self.shape} and generated {fake.shape[1:]} images differ in size.")
        self.metric.reset()  # the generated features only: reset_real_features=False
        with _eval_mode(self.features), torch.no_grad():
            for batch in _batches(_nchw_uint8(fake, not self.custom), self.batch_size, "FID generated", progress):
                self.metric.update(batch.to(self.device), real=False)
            return float(self.metric.compute())


def inception_score(
    fake: np.ndarray,
    classifier: nn.Module | None = None,
    inception_weights: str | Path | None = None,
    splits: int = 10,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> tuple[float, float]:
    """(mean, std over splits) of exp E[KL(p(y|x) ‖ p(y))] for uint8 (N, H, W, C) images.

    The classifier (in eval mode) returns logits. torchmetrics shuffles before splitting with the
    global RNG; it is seeded here so the score is reproducible. With one split std is 0.
    """

    require(splits >= 1 and len(fake) >= splits,
            f"IS needs at least {splits} images (one per split).")
    custom = classifier is not None
    if not custom:
        classifier = inception_network(inception_weights, "logits_unbiased", IS_NEEDS)
    x = _nchw_uint8(fake, not custom)
    with _eval_mode(classifier.to(device)), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
        metric = InceptionScore(feature=classifier, splits=splits).to(device)
        for batch in _batches(x, batch_size, "IS", progress):
            metric.update(batch.to(device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mean, std = metric.compute() if splits > 1 else (metric.compute()[0], torch.tensor(0.0))
    return float(mean), float(std)


def clip_iqa(
    images: np.ndarray,
    clip_path: str | Path | None = None,
    prompts: tuple[str | tuple[str, str], ...] = ("quality",),
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> float:
    """Mean CLIP-IQA (torchmetrics CLIPImageQualityAssessment) from a local CLIP folder."""
    require(clip_path is not None, CLIP_NEEDS)
    require(Path(clip_path).is_dir(), f"CLIP folder {str(clip_path)!r} does not exist.")
    loader = _clip_loader(Path(clip_path))
    from torchmetrics.multimodal.clip_iqa import CLIPImageQualityAssessment  # needs the optional [clip] extra

    metric = CLIPImageQualityAssessment(model_name_or_path=loader, data_range=255.0,
                                        prompts=prompts).to(device)
    scores = []
    with torch.no_grad():
        for batch in _batches(_nchw_uint8(images, True), batch_size, "CLIP-IQA", progress):
            out = metric(batch.to(device).float())
            out = out if torch.is_tensor(out) else torch.stack(list(out.values()), 1)
            scores.append(out.reshape(len(batch), -1))
    return float(torch.cat(scores).double().mean())


def _clip_loader(path: Path):
    """A callable giving (model, processor): torchmetrics' way to take a CLIP not on the hub."""
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError:
        raise UserError("CLIP-IQA needs the transformers package: "
                        "pip install transformers.") from None

    def load():
        try:
            return CLIPModel.from_pretrained(str(path)), CLIPProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise UserError(f"could not load a CLIP model from {str(path)!r}: {e}.") from None

    return load
