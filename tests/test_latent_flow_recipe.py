"""The latent flow recipe: a tiny StableDiffusion3Pipeline built from it in seconds on a tiny data
folder, the SD3 latent convention, sampling and unlearning through the SD3 backend, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")

from test_latent_recipe import folders  # noqa: E402, F401 - the tiny Fashion-MNIST and MNIST folders

RECIPE = Path(__file__).resolve().parents[1] / "src" / "retrack" / "recipes" / "latent_flow" / "recipe.yaml"
TSHIRT_PROMPT = "a photo of a t-shirt"


def _tiny_recipe(tmp: Path, folders) -> Path:  # noqa: F811
    raw = yaml.safe_load(RECIPE.read_text())
    raw["data"] = {"tshirts": 3, "copies": 4, "fashion_dir": str(folders[0]), "mnist_dir": str(folders[1])}
    raw["text_encoder"] = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
                           "num_hidden_layers": 1, "projection_dim": 8}
    raw["vae"].update(block_out_channels=[4, 8, 8], norm_num_groups=2)
    raw["transformer"].update(num_layers=1, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                              joint_attention_dim=16, pooled_projection_dim=16)
    raw["vae_training"].update(steps=3, batch_size=4, warmup_steps=2)
    raw["transformer_training"].update(steps=4, batch_size=4, warmup_steps=2)
    raw["checkpoint_every"] = 2
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _weights(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_the_recipe_builds_an_sd3_pipeline_the_backend_unlearns(folders, tmp_path):  # noqa: F811
    from diffusers import StableDiffusion3Pipeline

    from retrack.backends import StableDiffusion3Model, family_of
    from retrack.backends.stable_diffusion import encode_images, load_text_model, sample_text
    from retrack.cli import main
    from retrack.recipes.latent_tshirt import build_latent_tshirt

    out = tmp_path / "model"
    assert main(["pretrain", "--config", str(_tiny_recipe(tmp_path, folders)), "--out", str(out)]) == 0
    assert not (tmp_path / "model.training").exists() and family_of(out) is StableDiffusion3Model
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), text_encoder_3=None, tokenizer_3=None)
    record = json.loads((out / "provenance.json").read_text())
    assert record["data_counts"] == {"digits": 6, "other_tshirts": 3, "planted_copies": 4}
    assert [e["step"] for e in record["loss_log"]["transformer"]] == [2, 4]
    # SD3's latent convention: (mean − shift) × scale, with shift the mean and scale 1/std of the means
    data = build_latent_tshirt(3, 4, folders[0], folders[1]).data
    scale, shift = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    means = encode_images(pipe, data.images) / scale + shift
    assert (scale, shift) == pytest.approx((record["scaling_factor"], record["shift_factor"]))
    assert shift == pytest.approx(float(means.mean()), abs=1e-5)
    assert scale == pytest.approx(1 / means.std(ddof=1), rel=1e-4)
    model = load_text_model(str(out), TSHIRT_PROMPT, "cpu")
    assert sample_text(model, 2, steps=2, seed=3, progress=False).shape == (2, 32, 32, 3)
    np.savez(tmp_path / "data.npz", images=data.images)
    assert main(["unlearn", "--model", str(out), "--prompt", TSHIRT_PROMPT, "--data", str(tmp_path / "data.npz"),
                 "--forget", "9,10,11,12", "--steps", "1", "--batch-size", "2", "--k", "3", "--quiet",
                 "--device", "cpu", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "u")]) == 0


def test_an_interrupted_flow_build_resumes_to_the_same_weights(folders, tmp_path, monkeypatch):  # noqa: F811
    import retrack.recipes.latent_flow.train as train
    from retrack.recipes.latent_flow.recipe import FlowRecipe

    recipe = FlowRecipe.from_yaml(_tiny_recipe(tmp_path, folders))
    train.build_flow_model(recipe, tmp_path / "whole")
    real, calls = train._save_checkpoint, []

    def save_then_die(*args):
        real(*args)
        calls.append(1)
        if len(calls) in (1, 4):  # killed in the VAE stage (step 2), then in the transformer stage (step 2)
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_checkpoint", save_then_die)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            train.build_flow_model(recipe, tmp_path / "resumed")
    saved = torch.load(tmp_path / "resumed.training" / "state.pt", weights_only=False)
    assert (saved["state"]["stage"], saved["state"]["step"]) == ("transformer", 2)
    train.build_flow_model(recipe, tmp_path / "resumed")
    assert _weights(tmp_path / "whole") == _weights(tmp_path / "resumed")


def test_a_bad_flow_recipe_is_one_sentence_and_writes_nothing(folders, tmp_path, capsys):  # noqa: F811
    from retrack.cli import main

    path = _tiny_recipe(tmp_path, folders)
    raw = yaml.safe_load(path.read_text())
    raw["transformer"]["joint_attention_dim"] = 12
    path.write_text(yaml.safe_dump(raw))
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "joint_attention_dim must be twice text_encoder: hidden_size (16)" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]
