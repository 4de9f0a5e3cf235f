"""Hostile files, full disks and rivals: no code runs from data, no memory bombs, no partial results.

Every refusal here is the one the bad-input table asks for: exit 2, one `retrack:` line, no
traceback, and the inputs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_pipeline
from retrack.cli import main
from retrack.data import load_images
from retrack.errors import UserError
from retrack.experiments import load_config, run_experiment
from test_experiments import MNIST, install_stubs, mnist_overrides

TINY_UNET = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
             "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4}


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def refused(args: list, capsys, message: str, root: Path | None = None) -> str:
    """Run `retrack ARGS`: exit 2, one line naming `message`, no traceback, `root` unchanged."""
    before = tree(root) if root is not None else None
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert err.startswith("retrack: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err
    if root is not None:
        assert tree(root) == before
    return err


class _RunsCode:
    """What a crafted pickle holds: unpickling it calls Path.touch(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---------------------------------------------------------------------------------------------
# No code runs from a data file or a checkpoint
# ---------------------------------------------------------------------------------------------


def _pretrain_recipe(tmp_path: Path) -> Path:
    np.savez(tmp_path / "d.npz", images=np.zeros((10, 8, 8), np.uint8))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"data": str(tmp_path / "d.npz"), "unet": TINY_UNET, "scheduler": {}, "steps": 2,
                                  "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 1}))
    return recipe


@pytest.mark.parametrize("extend", [False, True], ids=["resume", "extend"])
def test_a_crafted_checkpoint_runs_no_code(tmp_path, capsys, extend):
    recipe, out, marker = _pretrain_recipe(tmp_path), tmp_path / "p", tmp_path / "marker"
    (tmp_path / "p.training").mkdir()
    if extend:
        out.mkdir()
    torch.save({"state": {"step": _RunsCode(marker)}}, tmp_path / "p.training" / "state.pt")
    args = ["pretrain", "--config", recipe, "--out", out, "--device", "cpu",
            *(["--extend", "--steps", "3"] if extend else [])]
    refused(args, capsys, "holds more than tensors and plain values, so it is not read", tmp_path)
    assert not marker.exists()


def test_a_checkpoint_of_tensors_and_plain_values_resumes(tmp_path, capsys):
    recipe = _pretrain_recipe(tmp_path)
    assert main(["pretrain", "--config", str(recipe), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    assert main(["pretrain", "--config", str(recipe), "--out", str(tmp_path / "p"), "--device", "cpu",
                 "--extend", "--steps", "3"]) == 0
    assert json.loads((tmp_path / "p" / "provenance.json").read_text())["steps"] == 3


def _cifar(folder: Path, first: object) -> Path:
    folder.mkdir()
    for i in range(1, 6):
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"filenames": [b"a", b"b"],
                 b"batch_label": b"training batch"}
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump(first if i == 1 else batch, fh, protocol=2)
    return folder


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_load_with_every_pickle_protocol(tmp_path, protocol):
    from retrack.data import load_images

    d = tmp_path / "c"
    d.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=protocol))
    loaded = load_images(d)
    assert loaded.images.shape == (10, 32, 32, 3)
    assert np.array_equal(loaded.images[1, :, :, 2], data[1, 2048:].reshape(32, 32))


def test_a_crafted_cifar_batch_runs_no_code(tmp_path, capsys):
    from conftest import save_pipeline

    marker = tmp_path / "marker"
    d = _cifar(tmp_path / "cifar", {b"data": _RunsCode(marker)})
    save_pipeline(tmp_path / "model", size=32, channels=3)
    refused(["unlearn", "--model", tmp_path / "model", "--data", d, "--forget", "0", "--out", tmp_path / "o",
             "--device", "cpu", "--quiet"], capsys, "getattr is not part of a CIFAR-10 batch", tmp_path)
    refused(["prepare-data", d, "--out", tmp_path / "s"], capsys, "is not part of a CIFAR-10 batch",
            tmp_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# YAML and JSON are read within limits, before anything is built from them
# ---------------------------------------------------------------------------------------------


def _laughs(levels: int = 9) -> str:
    text, prev = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n', "a"
    for name in "bcdefghijk"[: levels - 1]:
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
        prev = name
    return text


BOMBS = {
    "laughs": (_laughs(), "holds more than 1,000,000 values once its aliases (*name) are expanded"),
    "deep": ("a: " + "[" * 20_000 + "]" * 20_000 + "\n", "nests mappings and lists more than 64 deep"),
    "deep-through-aliases": ("a: &a " + "[" * 40 + "1" + "]" * 40 + "\nb: &b " + "[" * 30 + "*a" + "]" * 30 + "\n",
                             "more than 64 deep once its aliases (*name) are expanded"),
    "self-alias": ("a: &a [1, *a]\n", "holds an alias (*name) inside the value it names"),
}


@pytest.mark.parametrize("kind", BOMBS, ids=list(BOMBS))
@pytest.mark.parametrize("command", ["experiment", "recipe", "pretrain"])
def test_a_yaml_bomb_is_refused_within_a_second(tmp_path, capsys, kind, command):
    import time
    import tracemalloc

    from conftest import save_pipeline

    text, message = BOMBS[kind]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(text)
    save_pipeline(tmp_path / "model")
    np.savez(tmp_path / "d.npz", images=np.zeros((10, 8, 8), np.uint8))
    args = {"experiment": ["experiment", bomb],
            "recipe": ["unlearn", "--model", tmp_path / "model", "--data", tmp_path / "d.npz", "--forget", "0",
                       "--recipe", bomb, "--out", tmp_path / "o", "--device", "cpu", "--quiet"],
            "pretrain": ["pretrain", "--config", bomb, "--out", tmp_path / "p", "--device", "cpu"]}[command]
    import retrack.experiments
    import retrack.pretrain
    import retrack.unlearn_config  # noqa: F401 - imported before the clock starts

    tracemalloc.start()
    start = time.perf_counter()
    try:
        refused(args, capsys, message, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 200 << 20  # the expanded laughs would take gigabytes


def test_long_values_are_quoted_as_bounded_excerpts(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"data": "x", "unet": "u" * 100_000, "scheduler": {}}))
    err = refused(["pretrain", "--config", recipe, "--out", tmp_path / "p", "--device", "cpu"], capsys,
                  "'unet' in recipe")
    assert len(err) < 400
    recipe.write_text("? " + "k" * 100_000 + "\n: 1\ndata: x\nunet: {}\nscheduler: {}\n")
    assert len(refused(["pretrain", "--config", recipe, "--out", tmp_path / "p", "--device", "cpu"], capsys,
                       "unknown key 'kkkk")) < 600


def test_json_too_deep_or_too_large_is_one_sentence(tmp_path, capsys):
    from retrack.errors import UserError
    from retrack.validation import load_json

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="nests its values too deep to be read"):
        load_json(deep, "run record")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(["sample", "--model", model, "--num", "2", "--out", tmp_path / "s.npz", "--device", "cpu"], capsys,
            "nests its values too deep to be read", tmp_path)


# ---------------------------------------------------------------------------------------------
# One write path: full disks, rivals, and outputs inside inputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path, monkeypatch):
    """A tiny model and data set, and the cache in the test's folder."""
    from conftest import save_pipeline

    monkeypatch.setenv("RETRACK_CACHE", str(tmp_path / "cache"))
    save_pipeline(tmp_path / "model")
    np.savez(tmp_path / "d.npz", images=np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8))
    (tmp_path / "out").mkdir()
    return tmp_path


def _unlearn(w: Path, out: Path, *extra) -> list:
    return ["unlearn", "--model", w / "model", "--data", w / "d.npz", "--forget", "0", "--out", out, "--steps", "1",
            "--batch-size", "4", "--quiet", "--device", "cpu", "--cache-dir", w / "cache", *extra]


def _no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def _safetensors_full(*args, **kwargs):
    raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                       '"No space left on device" })')


@pytest.mark.parametrize("where", ["json", "weights", "sample-npz", "report", "store"])
def test_a_full_disk_is_one_sentence_and_leaves_nothing(small, capsys, monkeypatch, where):
    w = small
    if where in ("report",):
        assert main([str(a) for a in _unlearn(w, w / "out" / "run")]) == 0
    before = tree(w)
    if where == "json":
        monkeypatch.setattr(Path, "write_bytes", _no_space)
        args = _unlearn(w, w / "out" / "u")
    elif where == "weights":
        from diffusers import UNet2DModel

        monkeypatch.setattr(UNet2DModel, "save_pretrained", _safetensors_full)
        args = _unlearn(w, w / "out" / "u")
    elif where == "sample-npz":
        monkeypatch.setattr(np, "savez", _no_space)
        args = ["sample", "--model", w / "model", "--num", "2", "--steps", "2", "--out", w / "out" / "s.npz",
                "--grid", w / "out" / "g.png", "--device", "cpu", "--quiet"]
    elif where == "report":
        monkeypatch.setattr(Path, "write_bytes", _no_space)
        args = ["report", w / "out" / "run", "--out", w / "out" / "r.html", "--samples", "0"]
    else:
        monkeypatch.setattr(Path, "write_text", _no_space)
        args = ["prepare-data", w / "d.npz", "--out", w / "out" / "store", "--quiet"]
    err = refused(args, capsys, "the disk is full (nothing was written); free some space or choose another --out")
    assert tree(w) == {k: v for k, v in tree(w).items() if k.startswith("cache")} | {
        k: v for k, v in before.items() if not k.startswith("cache")}, err
    assert not list((w / "out").glob(".*"))  # no temporary file or .partial folder left


def test_a_rival_process_is_refused_and_the_finished_output_is_never_replaced(small, capsys):
    import os
    import subprocess
    import sys
    import time

    from retrack.outputs import lock_path

    w, out = small, small / "out" / "u"
    rival = subprocess.Popen([sys.executable, "-m", "retrack", *map(str, _unlearn(w, out, "--steps", "100"))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and rival.poll() is None:
            if lock_path(out).is_file() and lock_path(out).read_text() == str(rival.pid):
                break
            time.sleep(0.05)
        refused(_unlearn(w, out), capsys, f"is being written by another retrack process (pid {rival.pid}); "
                "wait for it to finish, or choose another --out")
        refused(_unlearn(w, out, "--overwrite"), capsys, "is being written by another retrack process")
    finally:
        _, err = rival.communicate(timeout=300)
    assert rival.returncode == 0, err
    finished = tree(out)
    refused(_unlearn(w, out), capsys, "exists; pass --overwrite to replace it")
    assert tree(out) == finished and not lock_path(out).exists()
    assert json.loads((out / "retrack_run.json").read_text())["config"]["steps"] == 100


def test_an_output_that_appears_meanwhile_is_not_replaced(small):
    from retrack.errors import UserError
    from retrack.runrecord import atomic_directory, check_output

    out = small / "out" / "x"
    check_output(out, overwrite=False)
    out.mkdir()  # written by something that took no lock
    (out / "theirs").write_text("kept")
    with pytest.raises(UserError, match="appeared while this run worked"), atomic_directory(out) as tmp:
        (tmp / "mine").write_text("not written")
    assert [p.name for p in out.iterdir()] == ["theirs"] and not list(out.parent.glob(".*"))


def test_experiment_and_report_never_write_into_an_input_model(small, capsys):
    w = small
    config = w / "exp.yaml"
    config.write_text(json.dumps({"model": str(w / "model"), "data": str(w / "d.npz"), "methods": {"retrack": {}},
                                  "seeds": [0], "targets": {"indices": [0]},
                                  "metrics": {"copies": {"copy_threshold": 1.5}},
                                  "train": {"steps": 1, "batch_size": 4},
                                  "sampling": {"samples": 2, "steps": 2, "batch_size": 2}}))
    for out in (w / "model", w / "model" / "exp"):
        refused(["experiment", config, "--out", out], capsys, f"--out {str(out)!r} overlaps the input", w)
    assert main([str(a) for a in _unlearn(w, w / "out" / "run")]) == 0
    refused(["report", w / "out" / "run", "--out", w / "model" / "r.html", "--samples", "0"], capsys,
            "overlaps the input", w)


# ---------------------------------------------------------------------------------------------
# Images of every mode are converted as the pipelines convert them
# ---------------------------------------------------------------------------------------------


def test_16_bit_pngs_round_trip_to_the_expected_8_bit(tmp_path):
    from PIL import Image

    from retrack.data import load_images

    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    for i, im in enumerate(eight):
        Image.fromarray(im.astype(np.uint16) * 257).save(tmp_path / f"{i}.png")  # the same values, 16 bits
    with Image.open(tmp_path / "0.png") as im:
        assert im.mode.startswith("I")
    np.testing.assert_array_equal(load_images(tmp_path).images[..., 0], eight)
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "0.png")  # mid-grey, not white
    assert int(load_images(tmp_path).images[0].max()) == 128


@pytest.mark.parametrize("mode, expected", [("LA", [[7]]), ("RGBA", [[[1, 2, 3]]]), ("P", [[[10, 20, 30]]]),
                                             ("F", [[128]]), ("1", [[255]])])
def test_other_modes_convert_like_the_pipelines(mode, expected):
    from PIL import Image

    from retrack.data import image_to_uint8

    im = {"LA": lambda: Image.fromarray(np.array([[[7, 9]]], np.uint8), "LA"),
          "RGBA": lambda: Image.fromarray(np.array([[[1, 2, 3, 0]]], np.uint8), "RGBA"),
          "P": lambda: Image.fromarray(np.array([[[10, 20, 30]]], np.uint8)).convert("P", palette=Image.ADAPTIVE),
          "F": lambda: Image.fromarray(np.array([[0.502]], np.float32), "F"),
          "1": lambda: Image.fromarray(np.array([[255]], np.uint8)).convert("1")}[mode]()
    assert image_to_uint8(im).tolist() == expected


# ---------------------------------------------------------------------------------------------
# Readers of damaged files, and options that cannot take effect
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, write, message", [
    ("not-zip", lambda p: p.write_bytes(b"not a zip at all"), "is not an .npz archive"),
    ("npy", lambda p: np.save(p.with_suffix(".npy"), np.zeros((2, 8, 8, 1), np.uint8)) or
     p.with_suffix(".npy").rename(p), "is a bare array, not an .npz holding 'images'"),
    ("objects", lambda p: np.savez(p, images=np.array([{"a": 1}], dtype=object)), "is not plain numbers"),
    ("no-images", lambda p: np.savez(p, pixels=np.zeros((2, 8, 8, 1), np.uint8)), "holds no 'images' array"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_audit_samples_that_are_damaged_or_foreign(small, capsys, name, write, message):
    w = small
    samples = w / "s.npz"
    write(samples)
    refused(["audit", "--model", w / "model", "--data", w / "d.npz", "--samples", samples, "--device", "cpu",
             "--quiet"], capsys, message, w)


def test_audit_ratio_that_never_decides(small, capsys):
    refused(["audit", "--model", small / "model", "--data", small / "d.npz", "--ratio", "1.5", "--num", "2"],
            capsys, "--ratio 1.5 never decides", small)


def test_report_on_damaged_logs_and_samples_names_what_is_missing(small, capsys):
    from retrack.report.folders import RunFolder, read_samples

    w = small
    assert main([str(a) for a in _unlearn(w, w / "out" / "run")]) == 0
    (w / "out" / "run" / "retrack_log.json").write_text('{"not": "a list"}')
    (w / "out" / "run" / "retrack_run.json").write_text('{"config": [1, 2]}')
    run = RunFolder.read(w / "out" / "run")
    assert run.log == [] and run.config == {}
    (w / "bad.npz").write_bytes(b"PK\x03\x04 damaged")
    np.savez(w / "obj.npz", images=np.array([None], dtype=object))
    np.savez(w / "f.npz", images=np.zeros((2, 8, 8, 1), np.float32))
    assert [read_samples(w / n) for n in ("bad.npz", "obj.npz", "f.npz", "none.npz")] == [None] * 4
    assert main(["report", str(w / "out" / "run"), "--out", str(w / "r.html"), "--samples", "0"]) == 0


def test_pretrain_data_that_the_unet_cannot_take_leaves_no_training_folder(tmp_path, capsys):
    recipe = _pretrain_recipe(tmp_path)
    np.savez(tmp_path / "d.npz", images=np.zeros((10, 8, 8, 3), np.uint8))
    refused(["pretrain", "--config", recipe, "--out", tmp_path / "p", "--device", "cpu"], capsys,
            "the recipe's data holds 3-channel images but its unet: takes in_channels=1, out_channels=1; set both "
            "to 3.", tmp_path)


def test_a_store_header_whose_image_count_overflows_is_one_sentence(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8))
    assert main(["prepare-data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "st"), "--quiet"]) == 0
    capsys.readouterr()
    header = json.loads((tmp_path / "st" / "header.json").read_text())
    for shape, said in (([10**30, 8, 8, 1], "10000000...(31 digits)×8×8×1"),
                        ([2**62, 8, 8, 1], "4611686018427387904×8×8×1 = 295147905179352825856"),
                        ([2**40, 2**40, 8, 1], "1099511627776×1099511627776×8×1")):
        (tmp_path / "st" / "header.json").write_text(json.dumps({**header, "shape": shape}))
        refused(["prepare-data", tmp_path / "st", "--out", tmp_path / "again"], capsys, said, tmp_path)
        refused(["audit", "--model", tmp_path / "none", "--data", tmp_path / "st"], capsys, "the store is damaged")


def test_damaged_experiment_records_leave_their_runs_pending(tmp_path, monkeypatch, capsys):
    install_stubs(monkeypatch)
    save_pipeline(tmp_path / "model")
    np.savez(tmp_path / "d.npz", images=np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    over = mnist_overrides(tmp_path / "model", tmp_path / "d.npz", tmp_path / "exp")
    cfg = load_config(MNIST, over)
    run_experiment(cfg)
    exp = tmp_path / "exp"
    (exp / "vanilla" / "seed1" / "metrics.json").write_text("{")  # cut short
    copies = json.loads((exp / "vanilla" / "seed0" / "metrics.json").read_text())
    (exp / "vanilla" / "seed0" / "metrics.json").write_text(json.dumps({**copies, "seed": "zero"}))
    (exp / "retrack" / "seed0" / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)
    np.savez(exp / "retrack" / "seed1" / "samples.npz", images=np.zeros((2, 4, 4, 1), np.uint8))  # foreign shape
    (exp / "pretrained" / "seed0" / "samples.npz").write_bytes(b"PK\x03\x04 damaged")
    args = ["experiment", MNIST, "--merge", *[a for o in over for a in ("--set", o)]]
    refused(args, capsys, "3 of 16 runs have not finished under", exp)
    run_experiment(cfg, only_merge=True, partial=True)  # the views leave the damaged samples out
    assert (exp / "summary.md").is_file()
    (exp / "retrack" / "seed1" / "fingerprint.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match=r"1 finished run\(s\).*retrack/seed1, changed: no readable fingerprint"):
        run_experiment(cfg)
    assert sorted(run_experiment(cfg, force=True).ran) == ["retrack/seed0", "retrack/seed1", "vanilla/seed0",
                                                           "vanilla/seed1"]


def test_a_damaged_unet_config_or_run_record_is_one_sentence(small, capsys):
    w = small
    exp = w / "exp.yaml"
    exp.write_text(json.dumps({"model": str(w / "model"), "data": str(w / "d.npz"), "methods": {"retrack": {}},
                               "seeds": [0], "targets": {"indices": [0]}, "metrics": ["copies"],
                               "out": str(w / "out" / "e")}))
    unet = w / "model" / "unet" / "config.json"
    saved = unet.read_text()
    for text, message in (("[" * 100_000, "nests its values too deep to be read"),
                          (json.dumps({**json.loads(saved), "in_channels": 1e999}), "is not a UNet config"),
                          ('{"sample_size": [8], "in_channels": 1}', "is not a UNet config")):
        unet.write_text(text)
        refused(["experiment", exp, "--dry-run"], capsys, message, w)
    unet.write_text(saved)
    assert main([str(a) for a in _unlearn(w, w / "out" / "run")]) == 0
    record = w / "out" / "run" / "retrack_run.json"
    for text, message in (('{"config": [1]}', "names no model it started from; pass --pretrained-model PATH"),
                          ("{", "is not valid JSON")):
        record.write_text(text)
        refused(["evaluate", "--model", w / "out" / "run", "--data", w / "d.npz", "--forget", "0",
                 "--metrics", "changed", "--num-samples", "2", "--steps", "2", "--device", "cpu",
                 "--out", w / "out" / "e.json", "--copy-threshold", "2.86"], capsys, message, w)


@pytest.mark.parametrize("command", ["evaluate", "unlearn"])
def test_a_feature_network_that_cannot_take_the_images_is_one_sentence(tmp_path, capsys, command):
    save_pipeline(tmp_path / "m16", size=16)
    np.savez(tmp_path / "d16.npz", images=np.random.default_rng(0).integers(0, 256, (20, 16, 16), dtype=np.uint8))
    common = ["--model", tmp_path / "m16", "--data", tmp_path / "d16.npz", "--forget", "0", "--fid-features", "mnist",
              "--copy-threshold", "5", "--device", "cpu", "--quiet", "--out", tmp_path / "out.json"]
    args = ([command, *common, "--metrics", "fid", "--num-samples", "4", "--steps", "2"] if command == "evaluate" else
            [command, *common, "--eval-metrics", "fid", "--eval-every", "1", "--eval-samples", "4", "--eval-steps",
             "2", "--steps", "1", "--batch-size", "4", "--cache-dir", tmp_path / "cache"])
    refused(args, capsys, "--fid-features 'mnist' cannot take the 1×16×16 (C×H×W) images measured here (digit "
            "classifier expects (N, 1|3, 28, 28) images, got (2, 1, 16, 16)); pass a network made for them.")
    assert not (tmp_path / "out.json").exists()


def test_run_records_hold_final_paths_and_a_shell_quoted_command(small, monkeypatch):
    import shlex
    import sys

    from retrack.runrecord import environment_record

    w = small
    typed = ["retrack", "unlearn", "--prompt", "a photo of a t shirt", "--out", "it's here"]
    monkeypatch.setattr(sys, "argv", typed)
    assert shlex.split(environment_record({})["command"]) == typed
    assert main([str(a) for a in _unlearn(w, w / "out" / "run")]) == 0
    assert main(["sample", "--model", str(w / "out" / "run"), "--num", "2", "--steps", "2", "--out",
                 str(w / "out" / "s.npz"), "--device", "cpu", "--quiet"]) == 0
    for record in [*(w / "out").rglob("*.json")]:
        text = record.read_text()
        assert ".partial" not in text and f"{w / 'out'}/." not in text, record
    assert json.loads((w / "out" / "run" / "retrack_run.json").read_text())["config"]["out"] == str(w / "out" / "run")


def test_device_and_quiet_mean_the_same_in_every_command():
    from retrack.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in COMMANDS:
        flags = {f: a for a in sub.choices[name]._actions for f in a.option_strings}
        if name not in ("prepare-data", "experiment"):  # prepare-data computes nothing; experiment: its config's
            assert flags["--device"].default is None and "cuda if available" in flags["--device"].help, name
        if name != "experiment":  # progress bars inside each run only with --progress
            assert flags["--quiet"].const is True and flags["--quiet"].help.startswith("no progress bar"), name


def test_report_and_pretrain_take_quiet(small, capsys):
    w = small
    assert main([str(a) for a in _unlearn(w, w / "out" / "run")]) == 0
    capsys.readouterr()
    assert main(["report", str(w / "out" / "run"), "--samples", "2", "--sampling-steps", "2", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    recipe = _pretrain_recipe(w)
    assert main(["pretrain", "--config", str(recipe), "--out", str(w / "p"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_the_conversion_of_16_bit_files_is_recorded(small, capsys):
    from PIL import Image

    w = small
    folder = w / "sixteen"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16)).save(folder / f"{i:02d}.png")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / "12.png")  # 8-bit: kept
    assert main(["unlearn", "--model", str(w / "model"), "--data", str(folder), "--forget", "0", "--out",
                 str(w / "out" / "u"), "--steps", "1", "--batch-size", "4", "--k", "2", "--quiet", "--device", "cpu",
                 "--cache-dir", str(w / "cache")]) == 0
    record = json.loads((w / "out" / "u" / "retrack_run.json").read_text())
    mode = next(iter(record["data"]["conversion"]["modes"]))
    assert mode.startswith("I") and record["data"]["conversion"] == {"modes": {mode: 12}}
    assert main(["prepare-data", str(folder), "--out", str(w / "out" / "store"), "--quiet"]) == 0
    assert json.loads((w / "out" / "store" / "header.json").read_text())["conversion"] == {"modes": {mode: 12}}
    assert load_images(w / "out" / "store").conversion == {"modes": {mode: 12}}
    assert load_images(w / "d.npz").conversion == {}  # nothing converted: nothing recorded
