"""`retrack evaluate` and evaluate() end to end on a tiny model, with hand-made instruments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from retrack.backends.pixel import load_model
from retrack.cli import main
from retrack.data import ImageSet
from retrack.errors import UserError
from retrack.evaluate import evaluate, parse_metrics

FAST = ["--steps", "2", "--num-samples", "12", "--batch-size", "8", "--quiet", "--device", "cpu"]


class MeanStd(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).float()
        return torch.stack([x.mean(1), x.std(1), x[:, 0]], 1)


class Brightness(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.flatten(1).float().mean(1) / 32 - k for k in range(8)], 1)


def script(module: nn.Module, path: Path) -> Path:
    with pytest.warns(DeprecationWarning):
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def cli(args: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_evaluate_writes_one_object_keyed_by_metric(tiny_model, tiny_data, tmp_path, capsys):
    feats, clf = script(MeanStd(), tmp_path / "f.pt"), script(Brightness(), tmp_path / "c.pt")
    out = tmp_path / "metrics.json"
    code, err = cli(["evaluate", "--model", tiny_model, "--data", tiny_data, "--forget", "3,7",
                     "--metrics", "reconstruction,copies,fid,is", "--fid-features", feats,
                     "--classifier", clf, "--is-splits", "2", "--copy-threshold", "1.5",
                     "--out", out, *FAST], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert list(res) == ["reconstruction", "copies", "fid", "is"]
    assert res["reconstruction"]["descriptor"] == "pixel_cosine"  # never labelled sscd
    assert res["reconstruction"]["t_start"] == 250 and len(res["reconstruction"]["per_image"]) == 2
    assert res["copies"]["rule"] == "l2" and res["copies"]["threshold"] == 1.5
    assert res["copies"]["num_samples"] == 12 and res["copies"]["settings"]["steps"] == 2
    assert res["fid"]["num_real"] == 38 and res["fid"]["real"] == "remain"
    assert res["fid"]["num_generated"] + res["fid"]["excluded_copies"] == 12
    assert res["is"]["splits"] == 2 and 1.0 - 1e-6 <= res["is"]["mean"] <= 8.0
    record = json.loads((tmp_path / "metrics.run.json").read_text())
    assert record["config"]["seed"] == 0 and record["config"]["descriptor"] == "pixel_cosine"


def test_fid_and_is_are_undefined_not_errors_when_every_sample_is_a_copy(tiny_model, tiny_data, tmp_path, capsys):
    """A destroyed model whose samples all fall within the copy threshold leaves nothing to score:
    the metrics say so and the evaluation (and an experiment over many methods) goes on."""
    feats, clf = script(MeanStd(), tmp_path / "f.pt"), script(Brightness(), tmp_path / "c.pt")
    out = tmp_path / "metrics.json"
    code = main([str(a) for a in ["evaluate", "--model", tiny_model, "--data", tiny_data, "--forget", "3",
                                  "--metrics", "copies,fid,is", "--fid-features", feats, "--classifier", clf,
                                  "--is-splits", "2", "--copy-threshold", "100", "--out", out, *FAST]])
    printed = capsys.readouterr().out
    assert code == 0
    res = json.loads(out.read_text())
    assert res["copies"]["fraction"] == 1.0
    assert res["fid"]["value"] is None and res["is"]["mean"] is None
    assert res["fid"]["undefined"] == ("only 0 of 12 samples are left once the 12 that count as copies of the "
                                       "forget images are set aside; FID needs 2.")
    assert res["is"]["undefined"].endswith("IS needs 2.") and res["is"]["num_generated"] == 0
    assert "fid: undefined: only 0 of 12" in printed and "is: undefined" in printed


def test_nll_of_the_forget_image_through_the_cli(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "nll.json"
    code, err = cli(["evaluate", "--model", tiny_model, "--data", tiny_data, "--forget", "5",
                     "--metrics", "nll", "--out", out, *FAST], capsys)
    assert code == 0, err
    nll = json.loads(out.read_text())["nll"]
    assert nll["unit"] == "bits/dim" and len(nll["per_image"]) == 1 and np.isfinite(nll["mean"])
    assert nll["settings"]["probes"] == 1 and nll["settings"]["offset"] == 7.0


@pytest.mark.parametrize("metrics, flag", [("fid", "--inception PATH"), ("is", "--classifier PATH"),
                                           ("clipiqa", "--clip PATH")])
def test_missing_weights_fail_first_with_one_sentence(metrics, flag, tiny_model, tiny_data,
                                                      tmp_path, capsys):
    out = tmp_path / "m.json"
    code, err = cli(["evaluate", "--model", tiny_model, "--data", tiny_data, "--forget", "1",
                     "--metrics", metrics, "--out", out, *FAST], capsys)
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--metrics", "nll,bogus"], "unknown metric 'bogus'"),
    (["--metrics", "reconstruction", "--descriptor", "sscd"], "--sscd PATH"),
    (["--metrics", "nll", "--forget", "99"], "out of range"),
    (["--metrics", "copies", "--copy-rule", "descriptor", "--sscd", "no.pt"], "does not exist"),
])
def test_bad_input_is_exit_code_2(extra, message, tiny_model, tiny_data, tmp_path, capsys):
    args = ["evaluate", "--model", tiny_model, "--data", tiny_data, "--forget", "1",
            "--out", tmp_path / "m.json", *FAST, *extra]
    code, err = cli(args, capsys)
    assert code == 2 and message in err, err


def test_existing_output_is_refused(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "m.json"
    out.write_text("{}")
    code, err = cli(["evaluate", "--model", tiny_model, "--data", tiny_data, "--forget", "1",
                     "--metrics", "copies", "--out", out, *FAST], capsys)
    assert code == 2 and "--overwrite" in err and out.read_text() == "{}"


def test_api_copies_follow_the_threshold_and_forget_set_is_deduplicated(tiny_model):
    images = np.random.default_rng(1).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    images[8] = images[9]  # two copies of one forget image count as one target
    data = ImageSet(images, "test")
    model = load_model(tiny_model)
    kw = dict(num_samples=6, steps=2, batch_size=6, progress=False)
    every = evaluate(model, data, [8, 9], ["copies"], copy_threshold=1e9, **kw)["copies"]
    none = evaluate(model, data, [8, 9], ["copies"], copy_threshold=0.0, **kw)["copies"]
    assert every["fraction"] == 1.0 and every["per_target"] == [6]
    assert none["fraction"] == 0.0 and none["count"] == 0
    again = evaluate(model, data, "8,9", "copies", copy_threshold=1e9, **kw)["copies"]
    assert again == every
    by_cosine = evaluate(model, data, [8, 9], ["copies"], copy_rule="descriptor",
                         descriptor="pixel_cosine", copy_threshold=-1.5, **kw)["copies"]
    assert by_cosine["rule"] == "pixel_cosine" and by_cosine["fraction"] == 1.0


def test_parse_metrics_and_unknown_settings():
    assert parse_metrics("nll, FID") == ("nll", "fid")
    with pytest.raises(UserError, match="twice"):
        parse_metrics("nll,nll")
    with pytest.raises(UserError, match="unknown evaluate setting 'samples'"):
        evaluate("m", "d", "1", "nll", samples=3)


def test_nll_schedule_flows_through_the_cli(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    import retrack.metrics.likelihood as likelihood

    seen = {}

    def fake_nll(denoiser, images, **kwargs):  # the ODE itself is tested in test_likelihood.py
        seen.update(kwargs, shape=images.shape)
        return np.full(len(images), 2.5)

    monkeypatch.setattr(likelihood, "nll_bits_per_dim", fake_nll)
    out = tmp_path / "nll.json"
    code, err = cli(["evaluate", "--model", tiny_model, "--data", tiny_data, "--forget", "5",
                     "--metrics", "nll", "--nll-schedule", "score-sde", "--out", out, *FAST], capsys)
    assert code == 0, err
    assert seen["schedule"] == "score-sde" and seen["shape"] == (1, 8, 8, 1)
    nll = json.loads(out.read_text())["nll"]
    assert nll["settings"]["schedule"] == "score-sde" and nll["per_image"] == [2.5]
    record = json.loads((tmp_path / "nll.run.json").read_text())
    assert record["config"]["nll_schedule"] == "score-sde"
    code, err = cli(["evaluate", "--model", tiny_model, "--data", tiny_data, "--forget", "5",
                     "--metrics", "nll", "--out", tmp_path / "default.json", *FAST], capsys)
    assert code == 0 and seen["schedule"] == "model"
    code, err = cli(["evaluate", "--model", tiny_model, "--data", tiny_data, "--forget", "5", "--metrics", "nll",
                     "--nll-schedule", "song", "--out", tmp_path / "x.json"], capsys)
    assert code == 2 and "--nll-schedule must be one of model, score-sde, got 'song'" in err
    with pytest.raises(UserError, match="--nll-schedule must be one of model, score-sde"):
        evaluate(tiny_model, tiny_data, "5", "nll", nll_schedule="song")
