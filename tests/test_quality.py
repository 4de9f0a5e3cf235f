"""FID, IS and CLIP-IQA with hand-made feature modules whose answers are known in closed form."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from retrack.errors import UserError
from retrack.metrics.quality import clip_iqa, frechet_distance, inception_score


class FirstPixels(nn.Module):
    """Features = the first two pixel values: the feature sets are chosen by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.ndim == 4  # torchmetrics hands over uint8 NCHW
        return x.flatten(1)[:, :2].double()


class Projection(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).float() @ self.w


def points(*pairs: tuple[int, int]) -> np.ndarray:
    return np.array([[[[a], [b]], [[0], [0]]] for a, b in pairs], dtype=np.uint8)  # (N, 2, 2, 1)


def test_fid_of_a_set_with_itself_is_zero():
    images = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 1), dtype=np.uint8)
    assert abs(frechet_distance(images, images, features=Projection(), progress=False)) < 1e-2


def test_fid_matches_the_closed_form_for_known_feature_sets():
    # real: mean (100, 100), cov diag(200/3, 200/3); fake: mean (120, 95), cov diag(800/3, 50/3)
    real = points((110, 100), (90, 100), (100, 110), (100, 90))
    fake = points((140, 95), (100, 95), (120, 100), (120, 90))
    expected = (20**2 + 5**2) + (2 / 3) * ((10 - 20) ** 2 + (10 - 5) ** 2)  # 508.33…
    fid = frechet_distance(real, fake, features=FirstPixels(), batch_size=3, progress=False)
    assert fid == pytest.approx(expected, rel=1e-6)


class Logits(nn.Module):
    """Logits scale·onehot(first pixel mod 10); scale 0 is the uniform classifier."""

    def __init__(self, scale: float, train_scale: float | None = None):
        super().__init__()
        self.scale, self.train_scale = scale, train_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.train_scale if self.training and self.train_scale is not None else self.scale
        return scale * nn.functional.one_hot(x.flatten(1)[:, 0].long() % 10, 10).float()


def balanced(per_class: int = 10) -> np.ndarray:
    return np.repeat(np.arange(10, dtype=np.uint8), per_class).reshape(-1, 1, 1, 1)


def test_is_of_a_uniform_classifier_is_one():
    mean, std = inception_score(balanced(), classifier=Logits(0.0), splits=2, progress=False)
    assert mean == pytest.approx(1.0, abs=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_is_of_a_confident_balanced_classifier_is_the_number_of_classes():
    mean, std = inception_score(balanced(), classifier=Logits(60.0), splits=1, progress=False)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == 0.0


def test_is_runs_the_classifier_in_eval_mode_and_restores_it():
    clf = Logits(60.0, train_scale=0.0).train()
    mean, _ = inception_score(balanced(), classifier=clf, splits=1, progress=False)
    assert mean == pytest.approx(10.0, rel=1e-6) and clf.training


def test_is_is_reproducible_with_splits():
    images = np.concatenate([balanced(), balanced(3)])
    a = inception_score(images, classifier=Logits(60.0), splits=5, seed=3, progress=False)
    b = inception_score(images, classifier=Logits(60.0), splits=5, seed=3, progress=False)
    assert a == b and 1 < a[0] < 10


def test_missing_weights_name_the_flag(tmp_path):
    images = balanced()
    with pytest.raises(UserError, match="FID needs Inception weights: pass --inception PATH"):
        frechet_distance(images, images)
    with pytest.raises(UserError, match="pass --classifier PATH or --inception PATH"):
        inception_score(images)
    with pytest.raises(UserError, match="does not exist"):
        frechet_distance(images, images, inception_weights=tmp_path / "nope.pth")
    with pytest.raises(UserError, match="CLIP-IQA needs a local CLIP model: pass --clip PATH"):
        clip_iqa(images)
    with pytest.raises(UserError, match="does not exist"):
        clip_iqa(images, clip_path=tmp_path / "no-clip")


def test_inception_without_torch_fidelity_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed: import raises ImportError
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"")
    with pytest.raises(UserError, match="pip install torch-fidelity"):
        frechet_distance(balanced(), balanced(), inception_weights=weights)


def test_clip_without_transformers_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: import raises ImportError
    with pytest.raises(UserError, match="pip install transformers"):
        clip_iqa(balanced(), clip_path=tmp_path)


def test_too_few_images_are_user_errors():
    with pytest.raises(UserError, match="at least 10 images"):
        inception_score(balanced()[:5], classifier=Logits(1.0), splits=10)
    with pytest.raises(UserError, match="at least 2"):
        frechet_distance(balanced()[:1], balanced(), features=FirstPixels())
