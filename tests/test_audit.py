"""`retrack audit`: grouping, nearest training images, the copy rule, and the files it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import save_pipeline
from retrack.audit import copy_rule, default_threshold, find_copies, group_identical, nearest
from retrack.cli import main
from retrack.data import load_images, parse_forget


def test_identical_training_images_form_one_group():
    a, b = np.zeros((2, 2, 1), np.uint8), np.full((2, 2, 1), 7, np.uint8)
    reps, members = group_identical(np.stack([a, b, a, a, b]))
    assert members == [[0, 2, 3], [1, 4]] and np.array_equal(reps, np.stack([a, b]))


def test_nearest_streams_over_chunks_and_matches_brute_force():
    rng = np.random.default_rng(0)
    samples, reps = rng.integers(0, 256, (5, 3, 3, 1), np.uint8), rng.integers(0, 256, (11, 3, 3, 1), np.uint8)
    d, i = nearest(samples, reps, 4, chunk=3)
    full = np.linalg.norm(samples.reshape(5, 1, -1) / 255 - reps.reshape(1, 11, -1) / 255, axis=2)
    np.testing.assert_array_equal(i, np.argsort(full, 1, kind="stable")[:, :4])
    np.testing.assert_allclose(d, np.sort(full, 1)[:, :4])


def test_copy_rule_by_hand():
    dist = np.array([[1.0, 4.0, 6.0],    # < 10 and < 0.5·5: copy
                     [3.0, 4.0, 6.0],    # < 10 but not < 2.5: a digit among digits
                     [11.0, 40.0, 40.0]])  # far from everything but above 10
    assert copy_rule(dist, 10.0, 0.5).tolist() == [True, False, False]
    assert copy_rule(dist, 10.0, 0.0).tolist() == [True, True, False]
    assert default_threshold((28, 28, 1)) == pytest.approx(10.0)
    assert default_threshold((32, 32, 3)) == pytest.approx(10.0 * np.sqrt(3072 / 784))


def test_find_copies_groups_the_planted_image_and_nothing_else():
    rng = np.random.default_rng(1)
    digits = rng.integers(0, 256, (30, 28, 28, 1), np.uint8)
    planted = np.zeros((28, 28, 1), np.uint8)
    planted[8:20, 8:20] = 255
    train = np.concatenate([digits, np.repeat(planted[None], 4, 0)])
    noisy = np.clip(planted.astype(int) + rng.integers(-20, 21, planted.shape), 0, 255).astype(np.uint8)
    samples = np.stack([planted, noisy, digits[3], rng.integers(0, 256, (28, 28, 1), np.uint8)])
    report = find_copies(samples, train, next_=5)
    assert report["distinct_train"] == 31 and report["copies"] == 3
    groups = report["groups"]
    assert [g["indices"] for g in groups] == [[30, 31, 32, 33], [3]]
    assert groups[0]["count"] == 2 and groups[0]["samples"] == [0, 1] and groups[0]["min_l2"] == 0.0
    assert groups[1]["count"] == 1 and report["fraction"] == 0.75


def test_audit_writes_report_sheet_and_a_forget_file_unlearn_accepts(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "audit"
    args = ["audit", "--model", tiny_model, "--data", tiny_data, "--num", "6", "--steps", "2", "--out", out,
            "--ratio", "0", "--threshold", "100", "--quiet", "--device", "cpu"]  # everything counts: files are full
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "copies: 6/6 samples" in printed
    report = json.loads((out / "audit.json").read_text())
    assert report["rule"]["threshold"] == 100 and report["num_samples"] == 6 and "versions" in report
    assert (out / "contact_sheet.png").is_file() and (out / "samples.npz").is_file()
    listed = parse_forget(f"@{out / 'forget.txt'}", load_images(str(tiny_data)))
    assert sorted(listed.tolist()) == sorted(i for g in report["groups"] for i in g["indices"])
    assert sum(g["count"] for g in report["groups"]) == 6
    again = tmp_path / "again"  # the same samples, read back instead of drawn: the same report
    assert main([str(a) for a in [*args[:9], "--samples", out / "samples.npz", "--out", again, "--ratio", "0",
                                  "--threshold", "100", "--quiet", "--device", "cpu"]]) == 0
    assert json.loads((again / "audit.json").read_text())["groups"] == report["groups"]


@pytest.mark.parametrize("extra,words", [
    (["--model", "BIG"], "the data's images are (1, 8, 8) (C, H, W) but the model makes (1, 16, 16)"),
    (["--out", "EXISTS"], "exists; pass --overwrite"),
])
def test_audit_bad_input_exit_2_nothing_written(extra, words, tiny_model, tiny_data, tmp_path, capsys):
    big = save_pipeline(tmp_path / "big", size=16)
    (tmp_path / "exists").mkdir()
    sub = {"BIG": str(big), "EXISTS": str(tmp_path / "exists")}
    base = {"--model": str(tiny_model), "--out": str(tmp_path / "new")}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        base[flag] = sub[value]
    args = ["audit", "--data", tiny_data, "--num", "2", "--steps", "2", "--quiet", "--device", "cpu",
            *[x for kv in base.items() for x in kv]]
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "new").exists() and not any((tmp_path / "exists").iterdir())
