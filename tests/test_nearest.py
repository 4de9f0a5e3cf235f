"""nearest.md / nearest.png: each row's samples nearest to the forgotten image, on hand-made images."""

from __future__ import annotations

import io

import numpy as np
import pytest

from retrack.experiments.nearest import SHOWN, distances_to, nearest_markdown, nearest_outputs


def image(lit: int) -> np.ndarray:
    """A 4×4 grey image with its first `lit` pixels at 255: L2 to the blank one is √lit."""
    x = np.zeros(16, np.uint8)
    x[:lit] = 255
    return x.reshape(4, 4, 1)


def test_distances_are_pixel_l2_in_unit_range():
    samples = np.stack([image(0), image(4), image(9)])
    np.testing.assert_allclose(distances_to(samples, image(0)), [0.0, 2.0, 3.0])
    np.testing.assert_allclose(distances_to(samples, image(9)), [3.0, np.sqrt(5), 0.0])


def test_the_table_gives_each_rows_nearest_sample_per_seed():
    target = image(16)
    samples = {"pretrained": {0: np.stack([image(15), image(0)]), 1: np.stack([image(7)])},
               "retrack": {1: np.stack([image(0), image(12)])},  # seed 0 missing
               "reference model": {0: np.stack([image(0)]), 1: np.stack([image(0), image(1)])}}
    md, png = nearest_outputs(samples, target)
    assert md.splitlines() == [
        "| row (L2 of the nearest sample to the forgotten image) | seed 0 | seed 1 |",
        "|---|---|---|",
        "| pretrained | 1.00 | 3.00 |",
        "| retrack | – | 2.00 |",
        "| reference model | 4.00 | 3.87 |",
        "",
        f"| row (median L2 of the {SHOWN} samples nearest to the forgotten image) | seed 0 | seed 1 | mean | "
        "against the reference model |",
        "|---|---|---|---|---|",
        # L2 to the all-lit image is √(16 − lit). pretrained: seed 0 {1, 4} → 2.5, seed 1 {3} → 3;
        # retrack: {4, 2} → 3; reference: {4} → 4, {4, √15} → 3.936, mean 3.968 (2.75/3.968 = 0.69)
        "| pretrained | 2.50 | 3.00 | 2.75 | -31% |",
        "| retrack | – | 3.00 | 3.00 | -24% |",
        "| reference model | 4.00 | 3.94 | 3.97 |  |"]
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:  # three rows of (forgotten + up to SHOWN samples)
        width, height = im.size
    assert (width, height) == (int(100 * (0.9 * (1 + 2) + 1.6)), int(100 * (1.0 * 3 + 0.2)))
    assert SHOWN == 9


def test_an_empty_row_is_drawn_as_a_dash():
    assert nearest_markdown({"a": {0: 1.234}, "b": {2: 5.0}}).splitlines()[2:] == ["| a | 1.23 | – |",
                                                                                   "| b | – | 5.00 |"]


@pytest.mark.parametrize("channels", [1, 3])
def test_the_figure_takes_grey_and_colour_images(channels):
    target = np.repeat(image(8), channels, axis=-1)
    md, png = nearest_outputs({"m": {0: np.repeat(np.stack([image(8)] * 12), channels, axis=-1)}}, target)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and "| m | 0.00 |" in md


def test_changed_counts_visible_changes_among_the_samples_that_did_not_copy():
    from retrack.experiments.changed import changed_fractions, changed_markdown

    target = image(16)
    before = np.stack([image(16), image(0), image(4), image(8)])  # the first one copies the target
    samples = {"pretrained": {0: before, 1: before},
               "a": {0: np.stack([image(0), image(0), image(4), image(9)]),  # copy replaced; one of 3 moved
                     1: before.copy()},
               "b": {2: before}}  # no pretrained run for seed 2: left out
    # on 4×4 images "visible" is L2 > 0.1·√16 = 0.4: image(8) → image(9) is L2 1
    found = changed_fractions(samples, "pretrained", target, copy_threshold=1.5)
    assert found == {"a": {0: pytest.approx(1 / 3), 1: 0.0}}
    assert changed_markdown(found, "pretrained").splitlines() == [
        "| row (samples visibly changed from the pretrained model's, same seeds) | seed 0 | seed 1 | mean |",
        "|---|---|---|---|",
        "| a | 33.3% | 0.0% | 16.7% |"]
