"""The trainer's gradient rules on a model small enough to differentiate by hand."""

from __future__ import annotations

import pytest
import torch

from retrack.objectives.base import TwoGradientRule, WeightedSum
from retrack.trainer import apply_rule


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def linear_terms(w: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    # main = ½‖w − a‖², corr = ½‖w − b‖²: gradients w − a and w − b.
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 1.0])
    return {"main": 0.5 * (w - a).pow(2).sum(), "corr": 0.5 * (w - b).pow(2).sum()}


@pytest.mark.parametrize("kind,value", [("erasediff", 0.1), ("erasediff", 10.0), ("siss", 5.0)])
def test_two_gradient_rules_leave_the_combined_gradient(accelerator, kind, value):
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 3.0]))
    g_main, g_corr = w.detach() - torch.tensor([1.0, 0.0, 0.0]), w.detach() - torch.tensor([0.0, 2.0, 1.0])
    apply_rule(TwoGradientRule("main", "corr", kind, value), linear_terms(w), [w], accelerator)
    dot, sq = float(g_main @ g_corr), float(g_corr @ g_corr)
    if kind == "erasediff":
        expected = g_main + max(value - dot / sq, 0.0) * g_corr
    else:
        expected = g_main - value / sq**0.5 * g_corr
    torch.testing.assert_close(w.grad, expected)


def test_weighted_sum_is_one_backward_of_the_weighted_terms(accelerator):
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 3.0]))
    apply_rule(WeightedSum({"main": 0.25, "corr": -2.0}), linear_terms(w), [w], accelerator)
    expected = 0.25 * (w.detach() - torch.tensor([1.0, 0.0, 0.0])) - 2.0 * (w.detach() - torch.tensor([0.0, 2.0, 1.0]))
    torch.testing.assert_close(w.grad, expected)
