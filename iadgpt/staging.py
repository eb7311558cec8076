"""Staging folders beside what they build, and the sweep of those a killed process left behind.

Bundles, calibrations, quantized LLMs and the demo are written into a hidden folder next to their
target and renamed into place at the end, so a crash never leaves half of one. SIGKILL or a power
cut skips the clean-up, and a station that re-runs a build after every cut would fill its disk. So
the builder holds an exclusive `flock` on its staging folder while it works, and the next build of
the same target removes the folders nobody holds. The kernel drops a dead process's lock however it
died, and the lock means the same across containers sharing the folder (process ids do not).
A folder younger than `MIN_AGE_S` is left alone: its builder may not have taken the lock yet.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

MIN_AGE_S = 60.0
_held: dict[str, int] = {}  # staging folder -> the descriptor holding its lock


@contextlib.contextmanager
def staging_dir(parent: Path, prefix: str) -> Iterator[str]:
    """Like `tempfile.TemporaryDirectory(prefix=prefix, dir=parent)`, locked, after sweeping leftovers."""
    path = make_staging_dir(parent, prefix)
    try:
        yield str(path)
    finally:
        release(path)
        shutil.rmtree(path, ignore_errors=True)


def make_staging_dir(parent: Path, prefix: str) -> Path:
    """A locked staging folder the caller renames or removes, then `release`s."""
    sweep_leftovers(parent, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = _try_lock(path)
    if fd is not None:
        _held[str(path)] = fd
    return path


def release(path: Path) -> None:
    """Drop the lock of a folder from `make_staging_dir` (also after it was renamed)."""
    fd = _held.pop(str(path), None)
    if fd is not None:
        os.close(fd)


def sweep_leftovers(parent: Path, prefix: str, min_age_s: float = MIN_AGE_S) -> list[Path]:
    """Remove `parent/<prefix>*` folders that no process holds and nothing touched for `min_age_s`."""
    removed: list[Path] = []
    try:
        candidates = list(Path(parent).glob(glob.escape(prefix) + "*"))
    except OSError:
        return removed
    now = time.time()
    for path in candidates:
        try:
            if path.is_symlink() or not path.is_dir() or now - path.stat().st_mtime <= min_age_s:
                continue
        except OSError:
            continue
        fd = _try_lock(path)
        if fd is None:  # held by a live build, or the lock cannot be taken here: keep it
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        if not path.exists():
            removed.append(path)
            log.info("removed %s, left by an interrupted build", path)
    return removed


def _try_lock(path: Path) -> "int | None":
    """A descriptor holding an exclusive lock on the folder, or None (held elsewhere, or no flock here)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; nothing is swept there
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (EWOULDBLOCK), or a file system without flock on folders
        os.close(fd)
        return None
    return fd
