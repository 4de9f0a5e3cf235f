"""The reconstruction probe with models whose ε-predictor is exact for a one-image data set.

For data {a}, x_t = γ_t a + σ_t ε, so the exact predictor is ε*(x, t) = (x − γ_t a)/σ_t: DDPM's
x0-estimate is then a at every step and the ancestral sampler must return a exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from retrack.errors import UserError
from retrack.metrics.similarity import (
    PixelCosine,
    SSIMDescriptor,
    TorchScriptDescriptor,
    make_descriptor,
    reconstruction_similarity,
)
from retrack.models import Denoiser, Schedule


class OneImageEps(nn.Module):
    def __init__(self, image: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("image", image)
        self.register_buffer("ab", alphas_cumprod.float())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        ab = self.ab[t.long()].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(x - ab.sqrt() * self.image) / (1 - ab).sqrt())


def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1, 16, 16, 1), dtype=np.uint8)
    return np.concatenate([a, 255 - a])  # b = 255 − a is −a in model range


def exact_model(image: np.ndarray, config) -> Denoiser:
    ac = DDPMScheduler.from_config(config).alphas_cumprod.double()
    a = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    return Denoiser(OneImageEps(a, ac), Schedule(ac))


@pytest.mark.parametrize("descriptor", [PixelCosine(), SSIMDescriptor()], ids=lambda d: d.name)
def test_memorised_image_comes_back_and_another_does_not(descriptor):
    config = DDPMScheduler(num_train_timesteps=100).config
    a, b = images()
    remembers = reconstruction_similarity(exact_model(a, config), config, a[None], descriptor,
                                          progress=False)
    assert remembers.t_start == 25 and remembers.descriptor == descriptor.name
    assert np.array_equal(remembers.reconstructions[0], a)
    assert remembers.similarity[0] == pytest.approx(1.0, abs=1e-6)
    other = reconstruction_similarity(exact_model(b, config), config, a[None], descriptor,
                                      progress=False)
    assert np.array_equal(other.reconstructions[0], b)
    if descriptor.name == "pixel_cosine":
        assert other.similarity[0] == pytest.approx(-1.0, abs=1e-6)
    else:
        assert other.similarity[0] < 0


def test_pixel_cosine_cross_matrix():
    a, b = images()
    sim = PixelCosine().cross(np.stack([a, b]), np.stack([a, b, a]))
    assert np.allclose(sim, [[1, -1, 1], [-1, 1, -1]])


class ChannelMeans(nn.Module):
    """Embeds an image as its three channel means: the preprocessing is then visible."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated; SSCD needs it
def test_torchscript_descriptor_sees_sscd_preprocessing(tmp_path):
    path = tmp_path / "means.pt"
    torch.jit.save(torch.jit.script(ChannelMeans()), str(path))
    d = make_descriptor("sscd", sscd_path=path)
    assert d.name == "sscd"
    gray = np.full((1, 16, 32, 1), 51, dtype=np.uint8)  # 0.2 in [0, 1]
    x = d.preprocess(torch.from_numpy(gray))
    assert tuple(x.shape) == (1, 3, 288, 576)
    expected = (0.2 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x.mean((2, 3))[0], expected, atol=1e-5)
    assert d.paired(gray, gray) == pytest.approx([1.0])
    user = make_descriptor(str(path))
    assert isinstance(user, TorchScriptDescriptor) and user.name == "torchscript:means.pt"


def test_descriptor_errors_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="--sscd PATH"):
        make_descriptor("sscd")
    with pytest.raises(UserError, match="does not exist"):
        make_descriptor("sscd", sscd_path=tmp_path / "missing.pt")
    with pytest.raises(UserError, match="not one of sscd, ssim, pixel_cosine"):
        make_descriptor("dino")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a model")
    with pytest.raises(UserError, match="not a TorchScript module"):
        make_descriptor(str(bad))
