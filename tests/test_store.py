"""Memory-mapped stores: prepare-data round trip and digest, loaders, and exact streamed kNN."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from retrack.api import unlearn
from retrack.cli import main
from retrack.data import ImageSet, load_images
from retrack.errors import UserError
from retrack.neighbours import cache_key, nearest_neighbours
from retrack.store import Rows, read_rows, write_store


def sha(images: np.ndarray) -> str:
    return hashlib.sha256(str(images.shape).encode() + images.tobytes()).hexdigest()


def prepare(src, out, *extra):
    return run_cli("prepare-data", src, "--out", out, "--quiet", *extra)


def test_prepare_data_round_trip_of_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    r = prepare(folder, tmp_path / "store")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {tmp_path / 'store'}: 7×5×6×3 uint8 (N×H×W×C), sha256 {sha(images)}"
    header = json.loads((tmp_path / "store" / "header.json").read_text())
    assert header == {"format": "retrack-images", "version": 1, "shape": [7, 5, 6, 3], "dtype": "uint8",
                      "layout": "NHWC", "digest": sha(images), "source": str(folder)}
    loaded = load_images(tmp_path / "store")
    assert isinstance(loaded.images, np.memmap) and not loaded.images.flags.writeable
    assert np.array_equal(loaded.images, images)
    assert loaded.digest() == ImageSet(images, "x").digest() == load_images(folder).digest() == sha(images)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_prepare_data_of_an_npz_and_bad_input(tmp_path, tiny_data, capsys):
    def run(src, out):
        code = main(["prepare-data", str(src), "--out", str(out), "--quiet"])
        return code, capsys.readouterr().err

    assert run(tiny_data, tmp_path / "s") == (0, "")
    assert np.array_equal(load_images(tmp_path / "s").images, load_images(tiny_data).images)
    assert run(tiny_data, tmp_path / "s") == (2, f"retrack: error: --out {str(tmp_path / 's')!r} exists; "
                                                 "pass --overwrite to replace it.\n")
    code, err = run(tmp_path / "missing.npz", tmp_path / "t")
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    assert not (tmp_path / "t").exists()


def test_a_damaged_store_is_a_user_error(tmp_path):
    write_store([np.zeros((4, 2, 2, 1), np.uint8)], (4, 2, 2, 1), tmp_path / "s", "zeros")
    with open(tmp_path / "s" / "images.u8", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(UserError, match="holds 10 bytes but its header says 4×2×2×1 = 16"):
        load_images(tmp_path / "s")
    (tmp_path / "s" / "header.json").write_text('{"format": "other"}')
    with pytest.raises(UserError, match="not a retrack-images v1 header"):
        load_images(tmp_path / "s")


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_streamed_knn_from_a_store_equals_in_ram_knn(tmp_path, chunk):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 4, (60, 3, 3, 1), dtype=np.uint8)  # few values: many exact ties
    images[10] = images[40] = images[2]  # duplicates of a forget image
    write_store([images[:25], images[25:]], images.shape, tmp_path / "s", "test")
    stored = load_images(tmp_path / "s").images
    forget = np.array([2, 17, 33])
    remain = np.setdiff1d(np.arange(60), forget)
    in_ram = nearest_neighbours(images[remain], images[forget], 12, chunk=4096, progress=False)
    streamed = nearest_neighbours(Rows(stored, remain), stored[forget], 12, chunk=chunk, progress=False)
    assert np.array_equal(streamed[0], in_ram[0]) and np.array_equal(streamed[1], in_ram[1])
    # The duplicates of forget image 2 come first, the lower remain index before the higher.
    assert streamed[0][0, :2].tolist() == [int(np.searchsorted(remain, 10)), int(np.searchsorted(remain, 40))]
    d = ((images[forget].reshape(3, 1, -1).astype(int) - images[remain].reshape(1, 57, -1)) ** 2).sum(-1)
    assert np.array_equal(streamed[0], np.argsort(d, axis=1, kind="stable")[:, :12])
    assert cache_key(Rows(stored, remain), images[forget], 12) == cache_key(images[remain], images[forget], 12)


def test_rows_read_runs_and_gaps(tmp_path):
    images = np.arange(10 * 2, dtype=np.uint8).reshape(10, 2, 1, 1)
    write_store([images], images.shape, tmp_path / "s", "test")
    rows = Rows(load_images(tmp_path / "s").images, np.array([0, 1, 2, 5, 8, 9]))
    assert np.array_equal(read_rows(rows, 1, 5), images[[1, 2, 5, 8]])
    assert read_rows(rows, 6, 6).shape == (0, 2, 1, 1)


def test_unlearn_reads_a_store_as_it_reads_the_npz(tmp_path, tiny_model, tiny_data):
    assert main(["prepare-data", str(tiny_data), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    outs = []
    for name, data in (("a", tiny_data), ("b", tmp_path / "s")):
        out = unlearn(str(tiny_model), str(data), "3,5", str(tmp_path / name), progress=False, steps=1,
                      batch_size=4, k=3, device="cpu", cache_dir=str(tmp_path / f"cache-{name}"))
        outs.append(json.loads((out / "retrack_run.json").read_text()))
    assert outs[0]["data"]["digest"] == outs[1]["data"]["digest"]
    assert outs[0]["neighbours"] == outs[1]["neighbours"]
    assert (tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
