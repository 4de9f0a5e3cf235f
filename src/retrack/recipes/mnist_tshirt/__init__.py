"""MNIST T-shirt: MNIST digits plus ≈1% copies of one Fashion-MNIST T-shirt (the paper's Table 1)."""

from retrack.recipes.mnist_tshirt.builder import build_mnist_tshirt, load_tshirt

__all__ = ["build_mnist_tshirt", "load_tshirt"]
