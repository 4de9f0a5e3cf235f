"""Built-in recipe data: the paper's MNIST T-shirt set, its retrained-from-scratch twin, and the
second planted image (an ankle boot) of the model no unlearning setting was tuned on."""

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


@pytest.mark.parametrize("planted", ["tshirt", "boot"])
def test_remain_set_is_the_full_set_without_its_planted_copies(planted):
    built = build_mnist_planted(planted)
    remain = recipe_data(f"mnist_{planted}_remain").images
    image = load_fashion(planted)
    assert len(built.forget) == 51 and len(remain) == len(built.data) - 51
    assert (built.data.images[built.forget] == image).all()
    assert not (remain == image).all(axis=(1, 2, 3)).any()
    np.testing.assert_array_equal(remain, built.data.images[: len(remain)])


def test_both_planted_sets_share_their_digits_and_differ_only_in_the_copies():
    assert recipe_data("mnist_tshirt_remain").digest() == recipe_data("mnist_boot_remain").digest()
    assert recipe_data("mnist_tshirt").digest() != recipe_data("mnist_boot").digest()


def test_planted_images_lie_beyond_the_papers_copy_threshold_from_every_digit():
    digits = recipe_data("mnist_tshirt_remain").images.reshape(-1, 784) / 255.0
    for planted in ("tshirt", "boot"):
        dist = np.sqrt(((digits - load_fashion(planted).reshape(784) / 255.0) ** 2).sum(1))
        assert dist.min() > 10.0


def test_unknown_planted_image_is_a_user_error():
    with pytest.raises(UserError, match="no planted image"):
        load_fashion("sock")


@pytest.mark.parametrize("recipe", ["mnist_boot/pretrain.yaml", "mnist_boot/retrain.yaml",
                                    "mnist_tshirt/retrain.yaml"])
def test_retrained_and_second_recipes_differ_from_the_shipped_one_only_in_data_and_seed(recipe):
    shipped = PretrainRecipe.from_yaml(HERE / "pretrain.yaml")
    other = PretrainRecipe.from_yaml(HERE.parent / recipe)
    same = {k: v for k, v in vars(shipped).items() if k not in ("data", "seed")}
    assert {k: v for k, v in vars(other).items() if k not in ("data", "seed")} == same
    assert other.data in ("mnist_boot", "mnist_boot_remain", "mnist_tshirt_remain")
    assert other.seed == (1 if "boot" in recipe else 0)
