"""Metrics against the retrained reference and the pretrained model, on hand-made images and tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import save_pipeline
from retrack.cli import main
from retrack.evaluate import evaluate
from retrack.metrics.reference import changed_samples, paired_l2, scaled_l2_threshold

FAST = ["--steps", "2", "--num-samples", "12", "--batch-size", "12", "--quiet", "--device", "cpu",
        "--copy-threshold", "2.86"]  # the paper's 10 at 28×28, at the same RMS for 8×8


class MeanStd(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).float()
        return torch.stack([x.mean(1), x.std(1), x[:, 0]], 1)


@pytest.fixture
def features(tmp_path: Path) -> Path:
    path = tmp_path / "features.pt"
    with pytest.warns(DeprecationWarning):
        torch.jit.save(torch.jit.script(MeanStd()), str(path))
    return path


def perturbed(src: Path, dst: Path, scale: float) -> Path:
    """A copy of a pipeline with N(0, scale²) added to every UNet weight."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(src / "unet")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(scale * torch.randn_like(p))
    unet.save_pretrained(dst / "unet")
    DDPMScheduler.from_pretrained(src / "scheduler").save_pretrained(dst / "scheduler")
    return dst


def test_scaled_threshold_keeps_the_papers_rms():
    assert scaled_l2_threshold((28, 28, 1)) == pytest.approx(10.0)
    assert scaled_l2_threshold((32, 32, 3)) == pytest.approx(10.0 * math.sqrt(3072 / 784))


def test_changed_samples_by_hand():
    # 2×2 images, D = 4: visible above 0.1·√4 = 0.2, replaced from 10·√(4/784) ≈ 0.714.
    before = np.zeros((4, 2, 2, 1), np.uint8)
    after = before.copy()
    after[1, 0, 0, 0] = 64  # L2 = 64/255 ≈ 0.251: visible, not replaced
    after[2] = 255  # L2 = 2: replaced
    after[3] = 255  # changed too, but it was a copy of a forget image: excluded from the headline
    after[0, 0, 0, 0] = 25  # L2 ≈ 0.098: not visible
    np.testing.assert_allclose(paired_l2(after, before), [25 / 255, 64 / 255, 2.0, 2.0])
    out = changed_samples(after, before, np.array([False, False, False, True]))
    assert out["value"] == pytest.approx(2 / 3) and out["replaced_fraction"] == pytest.approx(1 / 3)
    assert out["visible_fraction_all"] == pytest.approx(3 / 4) and out["excluded_copies"] == 1
    assert out["median_l2"] == pytest.approx((64 / 255 + 2.0) / 2)


def test_reference_distance_is_zero_against_itself_and_grows_with_a_perturbation(
        tiny_model, tiny_data, tmp_path, features):
    settings = dict(fid_features=str(features), num_samples=12, steps=2, batch_size=12, device="cpu",
                    progress=False, copy_threshold=scaled_l2_threshold((8, 8, 1)))
    metrics = ["fid_reference", "changed"]
    same = evaluate(tiny_model, tiny_data, "3", metrics, reference_model=str(tiny_model),
                    pretrained_model=str(tiny_model), **settings)
    assert abs(same["fid_reference"]["value"]) < 1e-3 and same["changed"]["value"] == 0.0
    fids = []
    for scale in (0.02, 0.2):
        other = perturbed(tiny_model, tmp_path / f"p{scale}", scale)
        res = evaluate(other, tiny_data, "3", metrics, reference_model=str(tiny_model),
                       pretrained_model=str(tiny_model), **settings)
        fids.append(res["fid_reference"]["value"])
        assert res["changed"]["median_l2"] > 0
    assert 1e-3 < fids[0] < fids[1]
    assert res["changed"]["value"] > 0.5  # weights moved by 0.2: most samples look different
    assert res["changed"]["num_samples"] == 12 and res["changed"]["excluded_copies"] < 12


def test_nll_reference_is_the_forget_nll_under_the_reference(tiny_model, tiny_data, tmp_path, monkeypatch):
    import retrack.metrics.likelihood as likelihood

    def weight_sum(denoiser, targets, **_):  # stands in for the ODE: which model was asked
        return np.full(len(targets), float(sum(p.detach().double().sum() for p in denoiser.parameters())))

    monkeypatch.setattr(likelihood, "nll_bits_per_dim", weight_sum)
    other = perturbed(tiny_model, tmp_path / "other", 0.1)
    res = evaluate(tiny_model, tiny_data, "3,7", ["nll", "nll_reference"], reference_model=str(other),
                   device="cpu", progress=False)
    from retrack.backends.pixel import load_model

    expect = weight_sum(load_model(str(other), "cpu").denoiser, np.zeros(2))
    assert res["nll_reference"]["per_image"] == expect.tolist() != res["nll"]["per_image"]
    assert res["nll_reference"]["reference_model"] == str(other)


def test_changed_defaults_to_the_model_the_run_record_names(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "unlearned"
    assert main([str(a) for a in ["unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "3",
                                  "--out", out, "--k", "5", "--cache-dir", tmp_path / "c", "--steps", "2",
                                  "--batch-size", "4", "--quiet", "--device", "cpu"]]) == 0
    code = main([str(a) for a in ["evaluate", "--model", out, "--data", tiny_data, "--forget", "3",
                                  "--metrics", "changed", "--out", tmp_path / "m.json", *FAST]])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "m.json").read_text())["changed"]
    assert res["pretrained_model"] == str(tiny_model) and res["num_samples"] == 12
    assert 0.0 <= res["value"] <= 1.0 and "√D" in res["rule"]


@pytest.mark.parametrize("metric,extra,words", [
    ("fid_reference", [], "fid_reference needs --reference-model PATH"),
    ("nll_reference", ["--reference-model", "BIG"],
     "makes 1×16×16 images (C×H×W) but the model under test makes 1×8×8"),
    ("changed", [], "changed needs --pretrained-model PATH"),
])
def test_reference_bad_input_exit_2_nothing_written(metric, extra, words, tiny_model, tiny_data, tmp_path,
                                                    features, capsys):
    big = save_pipeline(tmp_path / "big", size=16)
    extra = [str(big) if a == "BIG" else a for a in extra]
    out = tmp_path / "m.json"
    code = main([str(a) for a in ["evaluate", "--model", tiny_model, "--data", tiny_data, "--forget", "3",
                                  "--metrics", metric, "--fid-features", features, "--out", out, *extra, *FAST]])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not out.with_name("m.run.json").exists()


def test_sample_cache_reuses_the_reference_samples_and_only_for_the_same_settings(
        tiny_model, tiny_data, tmp_path, features, monkeypatch):
    import retrack.sampling as sampling

    calls = []
    real = sampling.sample

    def counted(*args, **kwargs):
        calls.append(args[5] if len(args) > 5 else kwargs.get("seed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample", counted)
    cache = tmp_path / "cache"
    other = perturbed(tiny_model, tmp_path / "other", 0.05)
    settings = dict(fid_features=str(features), num_samples=12, steps=2, batch_size=12, device="cpu",
                    progress=False, reference_model=str(tiny_model), sample_cache=str(cache))
    first = evaluate(other, tiny_data, "3", ["fid_reference"], **settings)
    assert len(calls) == 2 and len(list(cache.glob("samples-*.npy"))) == 1  # model and reference
    from retrack.evaluate import companion_cache_path  # readers (the experiment's nearest.md) find it

    path = companion_cache_path(cache, tiny_model, {"seed": 0, "num_samples": 12, "steps": 2, "sampler": "ddim"},
                                12, "cpu")
    assert list(cache.glob("samples-*.npy")) == [path]
    again = evaluate(other, tiny_data, "3", ["fid_reference"], **settings)
    assert len(calls) == 3 and again["fid_reference"]["value"] == first["fid_reference"]["value"]
    evaluate(other, tiny_data, "3", ["fid_reference"], **{**settings, "seed": 1})
    assert len(calls) == 5 and len(list(cache.glob("samples-*.npy"))) == 2  # another seed: redrawn
    for entry in cache.glob("samples-*.npy"):
        entry.write_bytes(b"damaged")
    redrawn = evaluate(other, tiny_data, "3", ["fid_reference"], **settings)
    assert len(calls) == 7 and redrawn["fid_reference"]["value"] == first["fid_reference"]["value"]
    uncached = evaluate(other, tiny_data, "3", ["fid_reference"], **{**settings, "sample_cache": None})
    assert uncached["fid_reference"]["value"] == first["fid_reference"]["value"]
