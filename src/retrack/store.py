"""Image sets converted once into a memory-mapped uint8 array, so no step needs them all in RAM.

A store is a folder with `images.u8` (the raw uint8 (N, H, W, C) bytes, row after row) and
`header.json` (shape, layout, digest, source). The digest is ImageSet.digest() of the same images,
so caches keyed by content treat a store and the data set it came from as the same data.

Reads go through `read_rows`, which copies the asked rows out of the file with positioned reads
instead of touching the mapping: pages of a mapping that were read count towards the process's
resident memory until it unmaps them, while a positioned read leaves them in the kernel's page
cache, which the kernel can drop. Streaming a 6 GB store therefore keeps the process's RSS at the
size of one chunk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from retrack.errors import UserError, require
from retrack.runrecord import atomic_directory

FORMAT = "retrack-images"
VERSION = 1
HEADER = "header.json"
PAYLOAD = "images.u8"
CHUNK_BYTES = 64 << 20  # rows per read/hash chunk: about 64 MB


def is_store(path: Path) -> bool:
    return path.is_dir() and (path / HEADER).is_file() and (path / PAYLOAD).exists()


class Digest:
    """sha256 of (shape, bytes) fed chunk by chunk: equal to ImageSet.digest() of the whole array."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._h = hashlib.sha256(str(tuple(int(s) for s in shape)).encode())

    def update(self, rows: np.ndarray) -> None:
        self._h.update(np.ascontiguousarray(rows).data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def array_digest(images: np.ndarray | Rows) -> str:
    """Content digest of an (N, ...) uint8 array, read one chunk at a time."""
    d = Digest(images.shape)
    for rows in iter_rows(images):
        d.update(rows)
    return d.hexdigest()


def chunk_rows(row_bytes: int, budget: int = CHUNK_BYTES) -> int:
    return max(1, budget // max(1, row_bytes))


def iter_rows(images: np.ndarray | Rows, rows: int | None = None) -> Iterator[np.ndarray]:
    """Consecutive chunks of rows, each an in-RAM copy when `images` is a memmap."""
    row_bytes = int(np.prod(images.shape[1:], dtype=np.int64)) * images.itemsize
    step = rows or chunk_rows(row_bytes)
    for start in range(0, images.shape[0], step):
        yield read_rows(images, start, min(images.shape[0], start + step))


class Rows:
    """Some rows of an image array (e.g. the remain set), read lazily chunk by chunk.

    Stands in for `images[indices]` where that copy would not fit in memory: `read_rows` on it
    reads runs of consecutive indices with one positioned read each.
    """

    def __init__(self, images: np.ndarray, indices: np.ndarray) -> None:
        self.images, self.indices = images, np.asarray(indices, dtype=np.int64)
        self.shape = (len(self.indices), *images.shape[1:])
        self.dtype, self.itemsize = images.dtype, images.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        idx = self.indices[start:stop]
        if len(idx) == 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        runs = np.split(idx, np.nonzero(np.diff(idx) != 1)[0] + 1)
        parts = [read_rows(self.images, int(r[0]), int(r[-1]) + 1) for r in runs]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_rows(images: np.ndarray | Rows, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of `images`; from a memmap by positioned file reads (see module doc)."""
    if isinstance(images, Rows):
        return images.read(start, stop)
    if not isinstance(images, np.memmap) or images.filename is None or not images.flags.c_contiguous:
        return np.asarray(images[start:stop])
    row_bytes = int(np.prod(images.shape[1:], dtype=np.int64)) * images.itemsize
    out = np.empty((stop - start, *images.shape[1:]), dtype=images.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(images.filename, "rb", buffering=0) as fh:
        offset, done = images.offset + start * row_bytes, 0
        while done < len(view):
            n = os.preadv(fh.fileno(), [view[done:]], offset + done)
            require(n > 0, f"{images.filename!r} ended early; the store is truncated.")
            done += n
    return out


def write_store(chunks: Iterable[np.ndarray], shape: tuple[int, int, int, int], out: Path,
                source: str, modes: dict[str, int] | None = None) -> dict:
    """Write (N, H, W, C) uint8 rows arriving in chunks into a store at `out`; returns the header.

    Written into a temporary folder beside `out` and renamed at the end, so an interrupted
    conversion leaves nothing that could be mistaken for a store.
    """

    shape = tuple(int(s) for s in shape)
    with atomic_directory(out) as tmp:
        digest, written = Digest(shape), 0
        with open(tmp / PAYLOAD, "wb") as fh:
            for rows in chunks:
                rows = np.ascontiguousarray(rows, dtype=np.uint8)
                require(rows.shape[1:] == shape[1:],
                        f"image {written} is {rows.shape[1:]} (H,W,C) but the first is {shape[1:]}.")
                fh.write(rows.data)
                digest.update(rows)
                written += rows.shape[0]
        require(written == shape[0], f"expected {shape[0]} images, got {written}.")
        header = {"format": FORMAT, "version": VERSION, "shape": list(shape), "dtype": "uint8",
                  "layout": "NHWC", "digest": digest.hexdigest(), "source": source}
        if modes:  # filled while the chunks were read: the files converted to 8 bits, by source mode
            header["conversion"] = {"modes": dict(modes)}
        (tmp / HEADER).write_text(json.dumps(header, indent=2) + "\n")
    return header


def read_header(path: Path) -> dict:
    try:
        header = json.loads((path / HEADER).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the store header {str(path / HEADER)!r}: {e}.") from None
    require(isinstance(header, dict) and header.get("format") == FORMAT and header.get("version") == VERSION,
            f"{str(path / HEADER)!r} is not a {FORMAT} v{VERSION} header; recreate it with retrack prepare-data.")
    shape = header.get("shape")
    require(isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape)
            and header.get("dtype") == "uint8" and header.get("layout") == "NHWC",
            f"{str(path / HEADER)!r} has a bad shape, dtype or layout; recreate it with retrack prepare-data.")
    return header


def _count_text(n: int) -> str:
    text = str(n)
    return text if len(text) <= 24 else f"{text[:8]}...({len(text)} digits)"


def _shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(_count_text(s) for s in shape)


def open_store(path: Path) -> tuple[np.memmap, dict]:
    """The store's images as a read-only memmap, and its header (sizes checked, bytes not rehashed)."""
    header = read_header(path)
    shape = tuple(header["shape"])
    size = (path / PAYLOAD).stat().st_size
    expected = math.prod(shape)  # Python ints: a forged count cannot overflow into a small number
    require(size == expected, f"{str(path / PAYLOAD)!r} holds {size} bytes but its header says "
                              f"{_shape_text(shape)} = {_count_text(expected)}; the store is damaged.")
    return np.memmap(path / PAYLOAD, dtype=np.uint8, mode="r", shape=shape), header
