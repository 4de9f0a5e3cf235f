"""What every run writes beside its output: resolved config, seed, versions, data hashes.

Outputs are built in a temporary sibling directory and renamed into place only when complete, so
an interrupted or failed run never leaves a half-written model where a user expects one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from retrack.errors import UserError
from retrack.outputs import disk_error, may_replace, release_output
from retrack.validation import Validated
from retrack.validation import check_output as check

PACKAGES = ("retrack-unlearning", "torch", "diffusers", "accelerate", "torchmetrics", "numpy", "safetensors")


def threads() -> dict[str, int]:
    """torch's thread counts: they change the order of float sums, so weights at the 1e-7 level."""

    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()}


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def environment_record(config: Any, **extra: Any) -> dict[str, Any]:
    """The provenance block written as run.json beside every output."""
    if isinstance(config, Validated):  # its settings by key, nested groups flat
        cfg = config.settings()
    else:
        cfg = asdict(config) if is_dataclass(config) else dict(config)
    return {
        "config": _jsonable(cfg),
        "versions": versions(),
        "threads": threads(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),  # pastes back into a shell as it was typed
        **_jsonable(extra),
    }


def final_paths(value: Any, staging: Path, final: Path) -> Any:
    """`value` (a record) with every path inside `staging`, the folder an output is written in
    before its rename, naming the same file under `final`: a record read later never points into
    a folder that is gone."""
    if isinstance(value, dict):
        return {k: final_paths(v, staging, final) for k, v in value.items()}
    if isinstance(value, list):
        return [final_paths(v, staging, final) for v in value]
    if isinstance(value, str):  # a staging folder's name is unique, so it is replaced wherever it appears
        for old, new in ((str(staging.resolve()), str(final.resolve())), (str(staging), str(final))):
            value = value.replace(old, new)
    return value


def tree_sha256(folder: Path) -> str:
    """One digest of every file under `folder` (names and bytes; dot files skipped): what a
    model folder holds, so caches and fingerprints change when any weight or config does."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically, with the umask's permissions like any file the user makes."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically (temp file in the same folder, then rename), umask permissions."""
    with atomic_files([Path(path)]) as (tmp,):
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_files(outputs: list[Path]) -> Iterator[list[Path]]:
    """Yield a temporary file beside each of `outputs`; all are renamed into place together only
    if the block finishes. A full disk becomes one sentence; nothing partial is left."""
    outputs = [Path(p) for p in outputs]
    temps: list[Path] = []
    try:
        for path in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            temps.append(temp_file(path))
        yield temps
        for tmp, path in zip(temps, outputs, strict=True):
            _refuse_rival(path)
            os.replace(tmp, path)
            release_output(path)
    except BaseException as e:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        full = disk_error(e, outputs[0] if len(outputs) == 1 else outputs[0].parent)
        if full is not None:
            raise full from None
        raise


def _refuse_rival(out: Path) -> None:
    """An output this process was not allowed to replace must not have appeared meanwhile."""
    if not may_replace(out) and (out.exists() or out.is_symlink()):
        raise UserError(f"{str(out)!r} appeared while this run worked (another process wrote it); this "
                        f"run's result was not written: pass --overwrite to replace it.")


def current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no other portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(out: Path) -> Path:
    """An empty file beside `out` to write into and rename over it, with the umask's permissions
    (mkstemp makes 0600 files, which would surprise anyone sharing the output)."""
    clean_leftovers(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=out.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())
    return Path(tmp)


def check_output(out: Path, overwrite: bool, protected: list[Path] | None = None, flag: str = "--out",
                 suffix: str | None = None) -> None:
    """Refuse an existing output unless asked to overwrite, an input's path, or an unwritable place."""

    check(out, flag, overwrite, protected or [], suffix)


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` only if the block finishes. A full disk
    becomes one sentence; nothing partial is left."""
    out = Path(out)
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".partial"))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700 folders
        yield tmp
        _refuse_rival(out)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        release_output(out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        full = disk_error(e, out)
        if full is not None:
            raise full from None
        raise


def clean_leftovers(out: Path) -> None:
    """Remove what a killed write of `out` left beside it: its `.partial` folders and temporary
    files (named `.<out>.<pid>.…`, whose writing process is gone) and the `.old` copy of a
    replaced output."""
    name = Path(out).name
    for p in Path(out).parent.glob(f".{name}.*"):
        pid = p.name[len(name) + 2:].split(".")[0]
        dead = not (pid.isdecimal() and _alive(int(pid)))
        if p.is_dir() and (p.name.endswith(".partial") and dead or p.name == f".{name}.old"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and pid.isdecimal() and dead:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


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
