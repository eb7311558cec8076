"""Staging folders are locked while their build runs; the next build of the same target sweeps those
nobody holds any more (SIGKILL, power cut), and nothing else."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from iadgpt.bundle import BundleWriter
from iadgpt.staging import MIN_AGE_S, _try_lock, make_staging_dir, release, staging_dir, sweep_leftovers

pytestmark = pytest.mark.skipif(os.name == "nt", reason="no flock on Windows: nothing is swept there")
OLD = MIN_AGE_S + 3600


def _age(path, seconds):
    when = time.time() - seconds
    os.utime(path, (when, when))
    return path


def _folder(parent, name, age_s):
    path = parent / name
    path.mkdir()
    (path / "half-written.onnx").write_bytes(b"\0" * 10)
    return _age(path, age_s)


def _killed_build(parent, prefix) -> str:
    """A process that makes a staging folder, writes into it and dies by SIGKILL: the folder's name."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from iadgpt.staging import make_staging_dir
        p = make_staging_dir(Path({str(parent)!r}), {prefix!r})
        (p / "fp32").mkdir()
        print(p.name, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    return proc.stdout.strip()


@pytest.fixture()
def live_holder(tmp_path):
    """Another process holding the lock of a folder, as a build in progress does (also in another container)."""
    held = _folder(tmp_path, ".B.onnx-live", 0)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(held)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield _age(held, OLD)  # its top folder untouched for an hour: long steps write into subfolders
    proc.kill()
    proc.wait()


def test_sweep_removes_only_unheld_old_folders(tmp_path, live_holder):
    prefix = ".B.onnx-"
    mine = _age(make_staging_dir(tmp_path, prefix), OLD)  # this process's own build (made first: it sweeps)
    killed = _age(tmp_path / _killed_build(tmp_path, prefix), OLD)
    gone = [killed, _folder(tmp_path, f"{prefix}from-an-older-version", OLD)]
    kept = [live_holder, mine,
            _folder(tmp_path, f"{prefix}just-made", 5),  # its builder may not hold the lock yet
            _folder(tmp_path, f".C.onnx-{killed.name}", OLD)]  # another target's prefix
    (tmp_path / f"{prefix}a-file").write_text("not a folder")
    os.symlink(_folder(tmp_path, "elsewhere", OLD), tmp_path / f"{prefix}a-link")
    assert sorted(sweep_leftovers(tmp_path, prefix)) == sorted(gone)
    assert not any(p.exists() for p in gone) and all(p.is_dir() for p in kept)
    assert (tmp_path / f"{prefix}a-file").is_file() and (tmp_path / f"{prefix}a-link").is_symlink()
    release(mine)


def test_a_killed_build_is_swept_by_the_next_one_even_with_the_same_process_id(tmp_path):
    """Container builders often have the same pid run after run: the lock, not the pid, tells."""
    names = [_killed_build(tmp_path, ".llm-build-") for _ in range(2)]
    for n in names:
        _age(tmp_path / n, OLD)
    with staging_dir(tmp_path, ".llm-build-") as tmp:
        assert not any((tmp_path / n).exists() for n in names)
        assert _try_lock(tmp_path / os.path.basename(tmp)) is None  # held while the build runs
    assert not os.path.exists(tmp)


def test_a_bundle_write_sweeps_a_killed_write_of_the_same_bundle(tmp_path):
    leftover = _age(tmp_path / _killed_build(tmp_path, ".B.tmp-"), OLD)
    previous = _folder(tmp_path, ".B.old-k2", OLD)  # a swap's previous bundle: another prefix, never swept
    writer = BundleWriter(tmp_path / "B")
    try:
        assert not leftover.exists() and previous.is_dir()
        assert _try_lock(writer.tmp_dir) is None
    finally:
        writer.abort()
    assert not writer.tmp_dir.exists()


def test_release_drops_the_lock_so_a_renamed_staging_folder_is_not_held_forever(tmp_path):
    """`release` drops the lock and its descriptor, also once the folder was renamed into place (it is
    released by the path it was made at): a long-running process that builds many times must not keep
    one open per build."""
    from iadgpt import staging

    path = make_staging_dir(tmp_path, ".B.tmp-")
    held = staging._held[str(path)]
    target = tmp_path / "B"
    os.rename(path, target)  # as a finished build is renamed into place
    assert _try_lock(target) is None  # the lock went with the folder: still held
    release(path)
    assert str(path) not in staging._held
    with pytest.raises(OSError):
        os.fstat(held)  # the descriptor is closed, not only unlocked
    fd = _try_lock(target)
    assert fd is not None  # nobody holds it any more
    os.close(fd)
