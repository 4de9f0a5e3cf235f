"""Reading files a user may have been sent, without running any of their code.

Python's pickle runs whatever a file tells it to; a checkpoint or a data set from someone else must
never be able to. So:

- checkpoints (pretraining's resume and `--extend` state) are read with
  ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only;
- CIFAR-10's python batches (pickles) go through an unpickler that admits exactly what that format
  holds: a dict of byte strings, lists of ints or byte strings, and uint8 numpy arrays.

Anything else (another class, a function, a module) is refused before it is called.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrack.errors import UserError, first_line


def load_checkpoint(path: Path, map_location: Any = "cpu", what: str = "the checkpoint") -> dict[str, Any]:
    """A torch checkpoint of tensors and plain values; a damaged or foreign file is one sentence."""

    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{what} {str(path)!r} holds more than tensors and plain values, so it is not read "
                        f"(it may run code: {_short(first_line(e))}); delete it to start over.") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise UserError(f"{what} {str(path)!r} cannot be read ({type(e).__name__}); delete it to "
                        f"start over.") from None
    if not isinstance(saved, dict):
        raise UserError(f"{what} {str(path)!r} does not hold a mapping; delete it to start over.")
    return saved


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3's protocol-2 pickles call to make bytes: only the latin-1 codec is admitted."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError("only latin-1 byte strings are admitted")
    return text.encode("latin1")


def _cifar_globals() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray, numeric  # numpy ≥ 2's module: looked up when a batch is read

    found: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found[(module, "_reconstruct")] = multiarray._reconstruct
        found[(module, "scalar")] = multiarray.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        found[(module, "_frombuffer")] = numeric._frombuffer  # protocol 5's arrays
    for module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        found[(module, "ndarray")] = np.ndarray
        found[(module, "dtype")] = np.dtype
    return found


class _CifarUnpickler(pickle.Unpickler):
    allowed: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"{_short(module, 60)}.{_short(name, 60)} is not part of a CIFAR-10 batch")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of a CIFAR-10 batch")


def load_cifar_batch(data: bytes) -> dict:
    """One CIFAR-10 python batch (a pickle of a dict), admitting only what that format holds."""

    unpickler = _CifarUnpickler(io.BytesIO(data), encoding="bytes")
    unpickler.allowed = _cifar_globals()
    batch = unpickler.load()
    if not isinstance(batch, dict):
        raise pickle.UnpicklingError(f"a batch is a dict, not a {type(batch).__name__}")
    array = batch.get(b"data", batch.get("data"))
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        raise pickle.UnpicklingError("its 'data' entry is not a uint8 array")
    return batch
