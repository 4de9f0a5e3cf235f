"""Exact, streamed, deterministic kNN and its content-keyed cache."""

from __future__ import annotations

import numpy as np
import pytest

from retrack.errors import UserError
from retrack.neighbours import cache_key, cached_nearest_neighbours, nearest_neighbours


def brute_force(remain, forget, k):
    d = ((forget.reshape(len(forget), 1, -1).astype(np.int64)
          - remain.reshape(1, len(remain), -1).astype(np.int64)) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k], np.sqrt(np.sort(d, axis=1)[:, :k])


@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
def test_matches_brute_force_for_any_chunk(chunk):
    rng = np.random.default_rng(0)
    remain = rng.integers(0, 256, (97, 3, 3, 1), dtype=np.uint8)
    forget = rng.integers(0, 256, (4, 3, 3, 1), dtype=np.uint8)
    idx, dist = nearest_neighbours(remain, forget, 10, chunk=chunk, progress=False)
    ref_idx, ref_dist = brute_force(remain, forget, 10)
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=0, atol=1e-9)


def test_ties_go_to_the_smaller_index_whatever_the_chunking():
    remain = np.zeros((20, 2, 2, 1), dtype=np.uint8)
    remain[::3] = 5  # equidistant duplicates everywhere
    forget = np.full((1, 2, 2, 1), 5, dtype=np.uint8)
    for chunk in (1, 4, 7, 20):
        idx, _ = nearest_neighbours(remain, forget, 7, chunk=chunk, progress=False)
        assert idx[0].tolist() == [0, 3, 6, 9, 12, 15, 18]


def test_k_larger_than_remain_is_a_user_error():
    remain = np.zeros((3, 2, 2, 1), dtype=np.uint8)
    with pytest.raises(UserError, match="K = 4"):
        nearest_neighbours(remain, remain[:1], 4, progress=False)


def test_cache_is_keyed_by_content(tmp_path):
    rng = np.random.default_rng(1)
    remain = rng.integers(0, 256, (30, 2, 2, 1), dtype=np.uint8)
    forget = rng.integers(0, 256, (2, 2, 2, 1), dtype=np.uint8)
    first = cached_nearest_neighbours(remain, forget, 3, tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    # A stale file under the key of the same content is what the cache returns (it is a cache) ...
    path = tmp_path / f"{cache_key(remain, forget, 3)}.npy"
    assert np.array_equal(np.load(path), first)
    # ... while changed data gets a new key and a fresh, correct answer.
    changed = remain.copy()
    changed[first[0, 0]] = 255 - changed[first[0, 0]]
    assert cache_key(changed, forget, 3) != cache_key(remain, forget, 3)
    fresh = cached_nearest_neighbours(changed, forget, 3, tmp_path, progress=False)
    assert np.array_equal(fresh, brute_force(changed, forget, 3)[0])
    assert len(list(tmp_path.glob("*.npy"))) == 2
