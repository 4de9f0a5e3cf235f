"""The shipped MNIST T-shirt model: loads, matches its recorded hash, and its records are sane."""

from __future__ import annotations

import json

import torch

from retrack.backends.pixel import load_model
from retrack.pretrain import PretrainRecipe, file_sha256
from retrack.recipes.mnist_tshirt.demo import SHIPPED_MODEL


def test_shipped_model_matches_its_provenance():
    record = json.loads((SHIPPED_MODEL / "provenance.json").read_text())
    weights = SHIPPED_MODEL / "unet" / "diffusion_pytorch_model.safetensors"
    assert file_sha256(weights) == record["weights_sha256"]
    assert weights.stat().st_size < 10 * 2**20
    assert record["steps"] == record["config"]["steps"] and record["data_size"] == 5051
    assert record["steps"] == PretrainRecipe.from_yaml(SHIPPED_MODEL.parent / "pretrain.yaml").steps


def test_shipped_model_loads_and_memorised_the_tshirt_at_about_one_percent():
    loaded = load_model(SHIPPED_MODEL)
    assert loaded.layout == "pipeline" and loaded.denoiser.sample_shape == (1, 28, 28)
    with torch.no_grad():
        eps = loaded.denoiser(torch.zeros(2, 1, 28, 28), torch.tensor([0, 999]))
    assert torch.isfinite(eps).all()
    memo = json.loads((SHIPPED_MODEL / "memorisation.json").read_text())
    assert memo["samples"] >= 2000 and 0.003 <= memo["frequency"] <= 0.03
    assert memo["copies"] == round(memo["frequency"] * memo["samples"])


def test_retrained_model_matches_its_provenance_and_never_saw_the_tshirt():
    from retrack.pretrain import recipe_data

    retrained = SHIPPED_MODEL.parent / "retrained"
    record = json.loads((retrained / "provenance.json").read_text())
    assert file_sha256(retrained / "unet" / "diffusion_pytorch_model.safetensors") == record["weights_sha256"]
    assert record["data_digest"] == recipe_data("mnist_tshirt_remain").digest() and record["data_size"] == 5000
    recipe = PretrainRecipe.from_yaml(SHIPPED_MODEL.parent / "retrain.yaml")
    assert record["config"]["data"] == recipe.data and record["steps"] == recipe.steps
    shipped = json.loads((SHIPPED_MODEL / "provenance.json").read_text())
    assert {k: v for k, v in record["config"].items() if k != "data"} == \
        {k: v for k, v in shipped["config"].items() if k != "data"}
    memo = json.loads((retrained / "memorisation.json").read_text())
    assert memo["copies"] == 0 and memo["samples"] >= 2000


def test_second_model_and_its_retrained_twin_match_their_recipes():
    """The ankle-boot model (another planted image, another seed) and the same recipe without the
    boot: hashes, data and settings as recorded, the boot memorised measurably, the twin never."""
    from retrack.pretrain import recipe_data
    from retrack.recipes import RECIPES

    folder = RECIPES / "mnist_boot"
    for name, data, size in (("model", "mnist_boot", 5051), ("retrained", "mnist_boot_remain", 5000)):
        record = json.loads((folder / name / "provenance.json").read_text())
        assert file_sha256(folder / name / "unet" / "diffusion_pytorch_model.safetensors") == record["weights_sha256"]
        assert record["data_digest"] == recipe_data(data).digest() and record["data_size"] == size
        recipe = PretrainRecipe.from_yaml(folder / ("pretrain.yaml" if name == "model" else "retrain.yaml"))
        assert record["config"]["data"] == recipe.data == data and record["steps"] == recipe.steps
        assert record["config"]["seed"] == 1
        memo = json.loads((folder / name / "memorisation.json").read_text())
        assert memo["samples"] >= 2000 and memo["copies"] == round(memo["frequency"] * memo["samples"])
        assert "boot" in memo["rule"]
        if name == "model":
            assert memo["frequency"] >= 0.003  # measurable, as the study needs
        else:
            assert memo["copies"] == 0
