"""Exact Euclidean k-nearest remain images of each forget image, streamed and cached by content.

Distances are computed on the uint8 pixel values in float64, where ‖a‖² + ‖b‖² − 2⟨a, b⟩ is exact
(every sum is an integer below 2⁵³ up to 10⁸ pixels per image), so the order is the exact order in
the model's input space (an affine rescaling of pixels); float latents of a latent model are
compared as they are, in float64. The remain set is read in chunks (from a memory-mapped store,
see retrack/store.py, without ever being whole in RAM) and compared on the model's device, so
memory is O(F·(K + chunk) + chunk·D) whatever its size. Ties go to the smaller remain index. The
cache key hashes the images themselves and K, so a changed data set can never reuse a stale list.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retrack.errors import require
from retrack.store import Rows, iter_rows, read_rows


def default_cache_dir() -> Path:
    root = os.environ.get("RETRACK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "retrack")
    return Path(root) / "neighbours"


def cache_key(remain: np.ndarray | Rows, forget: np.ndarray, k: int) -> str:
    kind = "" if remain.dtype == np.uint8 else f"|{remain.dtype}"
    h = hashlib.sha256(f"knn-v1|k={k}|{tuple(remain.shape)}|{forget.shape}{kind}".encode())
    for rows in iter_rows(remain):
        h.update(np.ascontiguousarray(rows).data)
    h.update(np.ascontiguousarray(forget).data)
    return h.hexdigest()[:32]


def default_chunk(row_values: int) -> int:
    """Remain rows per chunk: about 2²⁴ float64 values (128 MB) at a time."""
    return max(1, (1 << 24) // max(1, row_values))


def nearest_neighbours(
    remain: np.ndarray | Rows,
    forget: np.ndarray,
    k: int,
    chunk: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (F, K) into `remain` of each forget image's K nearest, and their distances.

    Args:
        remain, forget: uint8 image (or float latent) arrays (N, ...) and (F, ...) of one shape;
            `remain` may be a memmap or store.Rows, read one chunk at a time.
        k: neighbours per forget image, 1 ≤ k ≤ N.
        chunk: remain rows per chunk (default: default_chunk of the image size).
        device: where the distances are computed (the model's device).
    Returns:
        (indices int64 (F, K) sorted nearest first, Euclidean distances float64 (F, K) in pixels).
    """
    require(tuple(remain.shape[1:]) == forget.shape[1:], "forget and remain images differ in shape.")
    n = remain.shape[0]
    require(1 <= k <= n, f"K = {k} must be between 1 and the remain set's size {n}.")
    f = _float64(forget, device)
    f_sq = torch.einsum("nd,nd->n", f, f)[:, None]
    chunk = chunk or default_chunk(f.shape[1])
    best_d = torch.empty((len(forget), 0), dtype=torch.float64, device=device)
    best_i = torch.empty((len(forget), 0), dtype=torch.int64, device=device)
    for start in tqdm(range(0, n, chunk), desc="nearest neighbours", disable=not progress,
                      dynamic_ncols=True):
        rows = read_rows(remain, start, min(n, start + chunk))
        r = _float64(rows, device)
        d = (f_sq + torch.einsum("nd,nd->n", r, r)[None, :] - 2.0 * f @ r.T).clamp_min(0.0)
        del r
        idx = torch.arange(start, start + len(rows), dtype=torch.int64, device=device).expand(len(forget), -1)
        # Earlier chunks hold smaller indices, so a stable sort keeps ties in index order.
        d_all, i_all = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
        order = torch.sort(d_all, dim=1, stable=True).indices[:, :k]
        best_d, best_i = d_all.gather(1, order), i_all.gather(1, order)
    return best_i.cpu().numpy(), best_d.sqrt().cpu().numpy()


def _float64(images: np.ndarray, device) -> torch.Tensor:
    """(N, D) float64 on `device`; on the CPU numpy's conversion is about 3× faster than torch's."""
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    if torch.device(device).type == "cpu":
        return torch.from_numpy(flat.astype(np.float64))
    return torch.from_numpy(flat).to(device).double()


def cached_nearest_neighbours(
    remain: np.ndarray | Rows,
    forget: np.ndarray,
    k: int,
    cache_dir: Path | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """nearest_neighbours() through an on-disk cache keyed by the images' content and K."""
    require(1 <= k <= remain.shape[0],
            f"K = {k} must be between 1 and the remain set's size {remain.shape[0]}.")
    cache_dir = cache_dir or default_cache_dir()
    path = cache_dir / f"{cache_key(remain, forget, k)}.npy"
    cached = _read_cache(path, (len(forget), k), remain.shape[0])
    if cached is not None:
        return cached
    indices, _ = nearest_neighbours(remain, forget, k, progress=progress, device=device)
    save_cached_array(path, indices)
    return indices


def save_cached_array(path: Path, array: np.ndarray) -> None:
    """Write a cache entry atomically (temp file, then rename), so a concurrent run never reads
    half of it; a read-only cache location only costs recomputation next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except OSError:
        pass


def _read_cache(path: Path, shape: tuple[int, int], n_remain: int) -> np.ndarray | None:
    """The cached table if it is a valid one for this key, else None: a corrupt, truncated or
    foreign file only costs recomputation, never the run."""
    try:
        cached = np.load(path, allow_pickle=False)
    except Exception:  # noqa: BLE001 - any unreadable cache is simply recomputed
        return None
    ok = (isinstance(cached, np.ndarray) and cached.shape == shape and cached.dtype.kind in "iu"
          and (cached.size == 0 or (cached.min() >= 0 and cached.max() < n_remain)))
    return cached.astype(np.int64, copy=False) if ok else None
