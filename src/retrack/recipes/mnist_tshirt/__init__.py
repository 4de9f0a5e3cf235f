"""MNIST T-shirt: MNIST digits plus ≈1% copies of one Fashion-MNIST T-shirt (the paper's Table 1)."""

from retrack.recipes.mnist_tshirt.builder import (
    PLANTED,
    build_mnist_planted,
    build_mnist_tshirt,
    load_fashion,
    load_tshirt,
)

__all__ = ["PLANTED", "build_mnist_planted", "build_mnist_tshirt", "load_fashion", "load_tshirt"]
