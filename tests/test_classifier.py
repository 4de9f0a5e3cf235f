"""The shipped MNIST digit classifier: integrity, accuracy, and batch-independent eval-mode outputs.

FID/IS on MNIST are only comparable across runs if the classifier is the recorded one and a
sample's score never depends on its batch (the reference code's train-mode BatchNorm defect).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from retrack.errors import UserError
from retrack.recipes.mnist_tshirt import classifier as clf
from retrack.recipes.mnist_tshirt.builder import load_digits

ACCURACY_MARGIN = 0.004  # two of the 500 held-out digits


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(clf.RECORD_PATH.read_text())


@pytest.fixture(scope="module")
def model() -> clf.DigitClassifier:
    return clf.load_digit_classifier()


@pytest.fixture(scope="module")
def split() -> clf.DigitSplit:
    images, labels, _ = load_digits()
    return clf.split_digits(images, labels)


@pytest.fixture(scope="module")
def sample(split: clf.DigitSplit) -> torch.Tensor:
    """64 held-out digits, uint8 (64, 1, 28, 28)."""
    return clf.to_tensor(split.test_x[::7][:64])


def test_shipped_file_matches_record(record: dict) -> None:
    data = clf.WEIGHTS_PATH.read_bytes()
    assert len(data) < 2 * 1024 * 1024
    assert hashlib.sha256(data).hexdigest() == record["weights_sha256"]
    assert record["weights_file"] == clf.WEIGHTS_PATH.name


def test_record_describes_the_data_and_split(record: dict, split: clf.DigitSplit) -> None:
    assert record["data"]["sha256_images_then_labels"] == split.digest
    assert record["split"]["train"] == len(split.train_y) == 4500
    assert record["split"]["test"] == len(split.test_y) == 500
    assert np.array_equal(np.bincount(split.test_y), np.full(10, 50))
    assert {"seed", "epochs", "test_accuracy", "versions"} <= record.keys()


def test_held_out_accuracy_is_as_recorded(model: clf.DigitClassifier, split: clf.DigitSplit,
                                          record: dict) -> None:
    acc = clf.accuracy(model, split.test_x, split.test_y)
    assert acc >= record["test_accuracy"] - ACCURACY_MARGIN


def test_loaded_model_is_frozen_in_eval_mode(model: clf.DigitClassifier) -> None:
    assert not model.training
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert clf.count_parameters(model) <= 200_000


def test_outputs_do_not_depend_on_the_batch(model: clf.DigitClassifier,
                                            sample: torch.Tensor) -> None:
    # Equal up to float rounding only: CPU conv kernels block differently for 1 vs 64 images
    # (≈1e-5 here), whereas batch statistics would move outputs by O(1).
    feats, logits = clf.DigitFeatures(model), clf.DigitLogits(model)
    batch_f, batch_l = feats(sample), logits(sample)
    for i in (0, 17, 63):
        torch.testing.assert_close(feats(sample[i:i + 1])[0], batch_f[i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits(sample[i:i + 1])[0], batch_l[i], rtol=1e-4, atol=1e-4)
    reordered = feats(torch.cat([sample.flip(0), sample[:5]]))
    torch.testing.assert_close(reordered[:64].flip(0), batch_f, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("adapter_cls", [clf.DigitFeatures, clf.DigitLogits])
def test_train_call_cannot_change_outputs(model: clf.DigitClassifier, sample: torch.Tensor,
                                          adapter_cls: type) -> None:
    adapter = adapter_cls(model)
    before = adapter(sample)
    adapter.train()
    assert not adapter.training and not model.training
    adapter.classifier.train()  # reaching past the adapter: forward must still pin eval mode
    after = adapter(sample)
    assert not model.training
    assert torch.equal(before, after)
    assert not after.requires_grad


def test_feature_dims_are_as_advertised(model: clf.DigitClassifier, sample: torch.Tensor) -> None:
    feats = clf.DigitFeatures(model)
    assert feats(sample).shape == (64, feats.num_features) == (64, model.feature_dim)
    assert clf.DigitLogits(model)(sample).shape == (64, 10)
    assert model.features(sample).shape == (64, 128)


def test_rgb_is_averaged_to_grey(model: clf.DigitClassifier, sample: torch.Tensor) -> None:
    rgb = sample.expand(-1, 3, -1, -1).contiguous()
    assert torch.equal(model.logits(rgb), model.logits(sample))


def test_non_uint8_or_wrong_shape_is_refused(model: clf.DigitClassifier,
                                             sample: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="uint8"):
        model.features(sample.float() / 255)
    with pytest.raises(ValueError, match="28, 28"):
        model.features(sample[:, :, :14])


def test_torchmetrics_fid_and_is_accept_the_adapters(model: clf.DigitClassifier,
                                                     split: clf.DigitSplit) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    def fid(real: np.ndarray, fake: np.ndarray) -> float:
        metric = FrechetInceptionDistance(feature=clf.DigitFeatures(model))
        metric.train()  # a caller's train() must not reach the classifier
        metric.update(clf.to_tensor(real), real=True)
        metric.update(clf.to_tensor(fake), real=False)
        return float(metric.compute())

    real = split.train_x[::18]  # 250 of each keeps this fast; the ordering is what matters
    noise = np.random.default_rng(0).integers(0, 256, (250, 28, 28), dtype=np.uint8)
    same, far = fid(real, split.test_x[::2]), fid(real, noise)
    assert np.isfinite(same) and 0 <= same < 0.05 * far

    torch.manual_seed(0)
    inception = InceptionScore(feature=clf.DigitLogits(model), splits=2)
    inception.update(clf.to_tensor(split.test_x))
    mean, _ = inception.compute()
    assert 8.0 < float(mean) <= 10.0


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    weights, record = tmp_path / "w.safetensors", tmp_path / "w.json"
    shutil.copy(clf.WEIGHTS_PATH, weights)
    shutil.copy(clf.RECORD_PATH, record)
    clf.load_digit_classifier(weights=weights, record=record)  # the untouched copy loads
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        clf.load_digit_classifier(weights=weights, record=record)


def test_missing_weights_are_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing"):
        clf.load_digit_classifier(weights=tmp_path / "nope.safetensors")
