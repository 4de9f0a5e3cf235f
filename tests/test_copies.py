"""Copy detection on hand-made images whose distances are known in closed form.

A constant image of value v against an all-zero 28×28 target lies at L2 = 28·v/255 in [0, 1]
units: v = 91 gives 9.992 (a copy under the paper's rule L2 < 10) and v = 92 gives 10.102 (not).
"""

from __future__ import annotations

import numpy as np
import pytest

from retrack.errors import UserError
from retrack.metrics.copies import copies_descriptor, copies_l2, l2_copies, l2_distances
from retrack.metrics.similarity import PixelCosine


def constant(*values: int, size: int = 28) -> np.ndarray:
    return np.stack([np.full((size, size, 1), v, dtype=np.uint8) for v in values])


def test_l2_distance_is_not_squared_and_in_unit_pixels():
    d = l2_distances(constant(0, 91, 92, 255), constant(0))
    assert np.allclose(d[:, 0], [0.0, 28 * 91 / 255, 28 * 92 / 255, 28.0])


def test_paper_rule_counts_exactly_the_close_samples():
    samples = constant(0, 91, 92, 255, 10)
    res = copies_l2(samples, constant(0))
    assert res.is_copy.tolist() == [True, True, False, False, True]
    assert res.fraction == pytest.approx(3 / 5)
    assert res.summary()["count"] == 3 and res.summary()["rule"] == "l2"


def test_nearest_of_several_targets_decides():
    # 100 is 10.98 from 0 and 16.03 from 255; 200 is 6.04 from 255 (a copy of target 1).
    res = copies_l2(constant(0, 255, 100, 200), constant(0, 255))
    assert res.nearest.tolist() == [0, 1, 0, 1]
    assert np.allclose(res.score, [0.0, 0.0, 28 * 100 / 255, 28 * 55 / 255])
    assert res.is_copy.tolist() == [True, True, False, True]
    assert res.summary()["per_target"] == [1, 2]


def test_descriptor_rule_uses_similarity_threshold():
    target = np.zeros((1, 4, 4, 1), dtype=np.uint8)
    target[0, :2] = 255  # top half white: model range +1 / -1
    flipped = 255 - target
    half = target.copy()
    half[0, :, :2] = 255 - half[0, :, :2]  # left half inverted: cosine 0
    res = copies_descriptor(np.concatenate([target, flipped, half]), target, PixelCosine(), 0.5)
    assert np.allclose(res.score, [1.0, -1.0, 0.0])
    assert res.is_copy.tolist() == [True, False, False]
    assert res.rule == "pixel_cosine"


def test_mismatched_shapes_are_user_errors():
    with pytest.raises(UserError, match="differ in size"):
        copies_l2(constant(0, size=28), constant(0, size=32))
    with pytest.raises(UserError, match="no target"):
        copies_l2(constant(0), constant(0)[:0])


def test_l2_copies_mask_accepts_a_single_target_image():
    mask = l2_copies(constant(0, 91, 92), constant(0)[0])
    assert mask.tolist() == [True, True, False]


def test_descriptor_rule_default_threshold_follows_the_descriptor():
    from retrack.evaluate import EvaluateConfig, resolved
    from retrack.sdsets import DESCRIPTOR_COPY_THRESHOLDS

    def threshold(**kw):
        return resolved(EvaluateConfig(metrics=("copies",), copy_rule="descriptor", device="cpu", **kw)).copy_threshold

    assert threshold() == 0.95 == DESCRIPTOR_COPY_THRESHOLDS["pixel_cosine"]  # the offline default
    assert threshold(descriptor="ssim") == 0.5 and threshold(copy_threshold=0.7) == 0.7
