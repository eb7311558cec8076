"""Staging folders beside what they build, and the sweep of those a killed process left behind.

Bundles, calibrations, quantized LLMs and the demo are written into a hidden folder next to their
target and renamed into place at the end, so a crash never leaves half of one. SIGKILL or a power
cut skips the clean-up, and a station that re-runs a build after every cut would fill its disk. So
each staging folder carries its process id, and the next build of the same target removes those
whose process is gone and that nothing has touched for an hour (the hour covers a process id
reused, or a build in another container sharing the folder).
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

STALE_S = 3600.0


def staging_dir(parent: Path, prefix: str) -> "tempfile.TemporaryDirectory[str]":
    """`tempfile.TemporaryDirectory` in `parent` named `<prefix><pid>-...`, after sweeping leftovers."""
    sweep_leftovers(parent, prefix)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def make_staging_dir(parent: Path, prefix: str) -> Path:
    """The same as a plain folder the caller removes or renames (`tempfile.mkdtemp`)."""
    sweep_leftovers(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def sweep_leftovers(parent: Path, prefix: str, stale_s: float = STALE_S) -> list[Path]:
    """Remove `parent/<prefix>*` folders of dead processes untouched for `stale_s` seconds."""
    removed: list[Path] = []
    try:
        candidates = list(Path(parent).glob(glob.escape(prefix) + "*"))
    except OSError:
        return removed
    now = time.time()
    for path in candidates:
        try:
            if path.is_symlink() or not path.is_dir() or now - path.stat().st_mtime <= stale_s:
                continue
        except OSError:
            continue
        owner = _owner_pid(path.name[len(prefix):])
        if owner is not None and (owner == os.getpid() or _alive(owner)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
            log.info("removed %s, left by an interrupted build", path)
    return removed


def _owner_pid(rest: str) -> "int | None":
    head, sep, _ = rest.partition("-")
    return int(head) if sep and head.isdigit() else None


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: never sweep by process id
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM), or we cannot tell: keep its folder
        return True
    return True
