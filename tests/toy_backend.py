"""A model family that is not diffusers at all, written as a new family would be: one file.

A folder with `toy.json` (its size) and `weights.safetensors` of a two-layer conv net, trained in
pixel space on diffusers' default linear schedule. Registering it is one line:
`retrack.backends.register(ToyModel)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from retrack.backends import LoadOptions, MetricImages, TrainingSpace
from retrack.backends.base import DEFAULT_LOAD, Backend, nchw
from retrack.data import ImageSet, distinct
from retrack.errors import require
from retrack.models import Denoiser, Schedule
from retrack.sampling import sample


class ToyNet(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(in_channels=1, sample_size=size)
        self.inner = torch.nn.Conv2d(2, 8, 3, padding=1)
        self.outer = torch.nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        time = (t.float() / 1000).view(-1, 1, 1, 1).expand_as(x)
        return SimpleNamespace(sample=self.outer(torch.nn.functional.silu(self.inner(torch.cat([x, time], 1)))))


def write_toy(folder: Path, size: int = 8, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    (folder / "toy.json").write_text(json.dumps({"size": size}))
    save_file(ToyNet(size).state_dict(), str(folder / "weights.safetensors"))
    return folder


class ToyModel(Backend):
    name = "toy"
    description = "toy folders (toy.json)"
    conditioned = False

    def __init__(self, net: ToyNet, source: str, device: str) -> None:
        self.scheduler = DDPMScheduler()
        schedule = Schedule(self.scheduler.alphas_cumprod.to(torch.float64))
        self.denoiser, self.source = Denoiser(net, schedule).to(device), source

    @classmethod
    def claims(cls, path: Path) -> bool:
        return (path / "toy.json").is_file()

    @classmethod
    def check_conditioning(cls, model: str, prompt: str | None, flag: str) -> None:
        require(prompt is None, f"{flag} {model!r} is a toy model; it takes no --prompt.")

    @classmethod
    def eval_defaults(cls, eval_clip: str | None) -> dict[str, Any]:
        return {"eval_metrics": ("copies",), "eval_samples": 8, "copy_rule": "l2"}

    @classmethod
    def load(cls, model: str, device: str, options: LoadOptions = DEFAULT_LOAD) -> ToyModel:
        net = ToyNet(json.loads((Path(model) / "toy.json").read_text())["size"])
        net.load_state_dict(load_file(str(Path(model) / "weights.safetensors")))
        return cls(net, model, device)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.scheduler.config)

    def training_space(self, images: ImageSet, cache_dir: Path | None, progress: bool) -> TrainingSpace:
        return TrainingSpace(images.images, nchw)

    def metric_images(self, images: ImageSet, forget: np.ndarray, remain: np.ndarray | None,
                      target_files: list[Path]) -> MetricImages:
        kept = images.images[:0] if remain is None else images.images[remain]
        return MetricImages(distinct(images.images[forget]), kept)

    def sample(self, num: int, steps: int, sampler: str, seed: int, batch_size: int, guidance: float,
               progress: bool) -> np.ndarray:
        return sample(self.denoiser, self.scheduler_config, num, steps, sampler, seed, batch_size, progress)

    def save(self, out: Path) -> None:
        (out / "toy.json").write_text(json.dumps({"size": self.denoiser.sample_shape[-1]}))
        save_file({k: v.contiguous() for k, v in self.denoiser.unet.state_dict().items()},
                  str(out / "weights.safetensors"))

    def record(self) -> dict[str, Any]:
        return {"toy": {"size": self.denoiser.sample_shape[-1]}}
