"""What every run writes beside its output: resolved config, seed, versions, data hashes.

Outputs are built in a temporary sibling directory and renamed into place only when complete, so
an interrupted or failed run never leaves a half-written model where a user expects one.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("retrack-unlearning", "torch", "diffusers", "accelerate", "torchmetrics", "numpy", "safetensors")


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def environment_record(config: Any, **extra: Any) -> dict[str, Any]:
    """The provenance block written as run.json beside every output."""
    cfg = asdict(config) if is_dataclass(config) else dict(config)
    return {
        "config": _jsonable(cfg),
        "versions": versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        **_jsonable(extra),
    }


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(_jsonable(obj), fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def check_output(out: Path, overwrite: bool, protected: list[Path] | None = None, flag: str = "--out") -> None:
    """Refuse an existing output unless asked to overwrite, an input's path, or an unwritable place."""
    from retrack.validation import check_output as check

    check(out, flag, overwrite, protected or [])


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` only if the block finishes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj
