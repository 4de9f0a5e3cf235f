"""What every output shares, whoever writes it: an exclusive lock, and a full disk as one sentence.

`validation.check_output` takes the lock when it accepts an output, before any work: a second
process given the same output (a rival `retrack` run) is refused at once instead of replacing the
first one's result. The lock is an `flock` on a file named by the output's resolved path in a
folder of the system's temporary directory, so nothing appears beside the output; it is released
when the output is renamed into place, when the command ends, or when the process dies.

`disk_error` turns what a full disk, an exhausted quota or a read-only file system raise (an
OSError, or the RuntimeError of a library that wraps it) into one sentence naming the output.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path

from retrack.errors import UserError

DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_DISK_TEXT = re.compile(r"No space left on device|Disk quota exceeded|Read-only file system|StorageFull|"
                        r"os error (28|122|30)\b|file write failed", re.IGNORECASE)
_HELD: dict[str, tuple[int, Path, bool]] = {}  # resolved output → (lock fd, lock file, overwrite allowed)


def _lock_dir() -> Path:
    folder = Path(tempfile.gettempdir()) / f"retrack-locks-{os.getuid() if hasattr(os, 'getuid') else 0}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def lock_path(out: Path) -> Path:
    """The lock file of an output (it holds the pid of the process writing it)."""
    key = str(Path(out).resolve())
    return _lock_dir() / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")


def lock_output(out: Path, flag: str = "--out", overwrite: bool = False) -> None:
    """Hold an exclusive lock on `out` (resolved) for this process, or refuse: another process holds it."""
    import fcntl  # POSIX only: imported where a lock is taken, so the module loads everywhere

    key = str(Path(out).resolve())
    if key in _HELD or os.environ.get("RANK", "0") not in ("", "0"):
        return  # under `accelerate launch` only the main process writes, so only it holds the output
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{flag} {str(out)!r} is being written by another retrack process (pid {holder}); "
                            f"wait for it to finish, or choose another {flag}.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino  # not a file its last holder removed
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = (fd, path, overwrite)


def may_replace(out: Path) -> bool:
    """Whether this process was allowed to replace `out` (an output it holds without --overwrite
    must still not exist when its result is renamed into place)."""
    held = _HELD.get(str(Path(out).resolve()))
    return held is None or held[2]


def release_output(out: Path) -> None:
    held = _HELD.pop(str(Path(out).resolve()), None)
    if held is not None:
        fd, path, _ = held
        with contextlib.suppress(OSError):
            os.unlink(path)  # before closing: a waiting process then sees another file and retries
        os.close(fd)


def release_all() -> None:
    for key in list(_HELD):
        release_output(Path(key))


atexit.register(release_all)


def disk_error(e: BaseException, out: Path | str) -> UserError | None:
    """One sentence for a full disk, an exhausted quota or a read-only file system, else None."""
    code = getattr(e, "errno", None)
    if code not in DISK_ERRNOS and not (isinstance(e, OSError | RuntimeError) and _DISK_TEXT.search(str(e))):
        return None
    if code == errno.EROFS or (code is None and "read-only" in str(e).lower()):
        reason, fix = "the file system is read-only", "choose another --out"
    else:
        reason = "the disk quota is exhausted" if code == errno.EDQUOT else "the disk is full"
        fix = "free some space or choose another --out"
    return UserError(f"could not write {str(out)!r}: {reason} (nothing was written); {fix}.")
