"""The planted Fashion-MNIST images ship inside the package; Debian's files only cross-check them."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest

from retrack.errors import UserError
from retrack.recipes.mnist_tshirt import builder
from retrack.recipes.mnist_tshirt.builder import DEBIAN_FASHION_MNIST, SHIPPED_PLANTED, load_fashion


def test_shipped_bytes_match_their_recorded_sha256_and_labels():
    record = json.loads((SHIPPED_PLANTED / "provenance.json").read_text())
    assert record["license"].startswith("MIT") and (SHIPPED_PLANTED / "LICENSE.txt").is_file()
    for name, entry in record["images"].items():
        raw = (SHIPPED_PLANTED / entry["file"]).read_bytes()
        assert len(raw) == 784 and hashlib.sha256(raw).hexdigest() == entry["sha256"]
        assert (entry["fashion_mnist_train_index"], entry["label"]) == builder.PLANTED[name]
        np.testing.assert_array_equal(load_fashion(name), np.frombuffer(raw, np.uint8).reshape(28, 28, 1))


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("name", sorted(builder.PLANTED))
def test_debian_files_cross_check_the_shipped_images(name):
    np.testing.assert_array_equal(load_fashion(name, DEBIAN_FASHION_MNIST), load_fashion(name))


def test_a_folder_with_another_image_is_refused(tmp_path):
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    header = (2051).to_bytes(4, "big") + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    labels = (2049).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes([9, 0])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(UserError, match="differs from the shipped tshirt"):
        load_fashion("tshirt", tmp_path)


def test_a_damaged_shipped_image_is_refused(tmp_path, monkeypatch):
    for f in SHIPPED_PLANTED.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "tshirt.u8").write_bytes(bytes(784))
    monkeypatch.setattr(builder, "SHIPPED_PLANTED", tmp_path)
    with pytest.raises(UserError, match="does not match its recorded SHA-256"):
        load_fashion("tshirt")


BAG_SHA256 = "1ffa11beff800f657456b5ddf88b1b0f4b5812d9e279836a158fae4ddf34ff61"


def test_the_third_planted_image_is_the_recorded_bag():
    raw = (SHIPPED_PLANTED / "bag.u8").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == BAG_SHA256 and builder.PLANTED["bag"] == (633, 8)
    assert json.loads((SHIPPED_PLANTED / "provenance.json").read_text())["images"]["bag"]["sha256"] == BAG_SHA256


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_files_hold_the_bag_at_train_633_under_label_8():
    """Read here without the builder: the IDX files, not load_fashion's own check."""
    from retrack.data import read_idx, read_idx_labels

    assert read_idx_labels(DEBIAN_FASHION_MNIST / "train-labels-idx1-ubyte.gz")[633] == 8
    image = read_idx(DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz")[633]
    assert hashlib.sha256(image.tobytes()).hexdigest() == BAG_SHA256
