"""Loaders for every accepted data format and the forget-spec parser."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrack.data import load_images, parse_forget, split
from retrack.errors import UserError


def write_idx(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    header = bytes([0, 0, 8, 3]) + b"".join(int(v).to_bytes(4, "big") for v in (n, h, w))
    with gzip.open(path, "wb") as fh:
        fh.write(header + images.tobytes())


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, 5, 5), dtype=np.uint8)


def test_npz_nhw_and_nhwc(tmp_path, images):
    np.savez(tmp_path / "a.npz", images=images)
    np.savez(tmp_path / "b.npz", images=np.repeat(images[..., None], 3, axis=-1))
    a, b = load_images(tmp_path / "a.npz"), load_images(tmp_path / "b.npz")
    assert a.images.shape == (6, 5, 5, 1) and b.images.shape == (6, 5, 5, 3)
    assert np.array_equal(a.images[..., 0], images)
    t = a.as_tensor()
    assert t.shape == (6, 1, 5, 5) and t.min() >= -1 and t.max() <= 1
    assert t[0, 0, 0, 0].item() == pytest.approx(images[0, 0, 0] / 127.5 - 1)


def test_image_folder_sorted_by_name(tmp_path, images):
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    loaded = load_images(tmp_path)
    assert np.array_equal(loaded.images[..., 0], images)


def test_torchvision_style_mnist_folder(tmp_path, images):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte.gz", images)
    assert np.array_equal(load_images(tmp_path).images[..., 0], images)


def test_cifar_folder(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (2, 3072), dtype=np.uint8) for _ in range(5)]
    for i, b in enumerate(batches, 1):
        with open(d / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"data": b}, fh)
    loaded = load_images(tmp_path)
    assert loaded.images.shape == (10, 32, 32, 3)
    assert np.array_equal(loaded.images[0, :, :, 1], batches[0][0, 1024:2048].reshape(32, 32))


def test_digest_changes_with_content(tmp_path, images):
    np.savez(tmp_path / "a.npz", images=images)
    changed = images.copy()
    changed[3, 2, 2] ^= 1
    np.savez(tmp_path / "b.npz", images=changed)
    assert load_images(tmp_path / "a.npz").digest() != load_images(tmp_path / "b.npz").digest()


def test_forget_specs(tmp_path, images):
    np.savez(tmp_path / "d.npz", images=images)
    data = load_images(tmp_path / "d.npz")
    assert parse_forget("4, 1", data).tolist() == [1, 4]
    (tmp_path / "f.txt").write_text("# the takedown\n2\n5\n")
    assert parse_forget(f"@{tmp_path / 'f.txt'}", data).tolist() == [2, 5]
    Image.fromarray(images[3]).save(tmp_path / "x.png")
    assert parse_forget(str(tmp_path / "x.png"), data).tolist() == [3]
    parts = split(data, parse_forget("0,5", data))
    assert parts.remain.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("spec,message", [
    ("6", "out of range"), ("-1", "out of range"), ("1,1", "duplicates"),
    ("0,1,2,3,4,5", "covers the whole data set"), ("@nope.txt", "does not exist"),
    ("nope.png", "neither an index nor an existing image file"), ("", "empty"),
])
def test_bad_forget_specs(tmp_path, images, spec, message):
    np.savez(tmp_path / "d.npz", images=images)
    data = load_images(tmp_path / "d.npz")
    with pytest.raises(UserError, match=message):
        split(data, parse_forget(spec, data))


def test_image_not_in_data_is_an_error(tmp_path, images):
    np.savez(tmp_path / "d.npz", images=images)
    Image.fromarray(255 - images[0]).save(tmp_path / "other.png")
    with pytest.raises(UserError, match="does not occur in the data"):
        parse_forget(str(tmp_path / "other.png"), load_images(tmp_path / "d.npz"))


def test_bad_data_paths(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 3, 3), dtype=np.float32))
    for path, message in ((tmp_path / "nope", "does not exist"), (tmp_path / "x.txt", "not an .npz"),
                          (tmp_path / "empty", "holds no png/jpg"), (tmp_path / "f.npz", "must be uint8")):
        with pytest.raises(UserError, match=message):
            load_images(path)
