"""Staging folders carry their process id; the next build of the same target sweeps a killed one's."""
import os
import subprocess
import sys
import time

import pytest

from iadgpt.bundle import BundleWriter
from iadgpt.staging import STALE_S, make_staging_dir, staging_dir, sweep_leftovers


@pytest.fixture(scope="module")
def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


@pytest.fixture()
def alive_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _folder(parent, name, age_s):
    path = parent / name
    path.mkdir()
    (path / "half-written.onnx").write_bytes(b"\0" * 10)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


@pytest.mark.skipif(os.name == "nt", reason="process ids are not probed on Windows")
def test_sweep_removes_only_old_folders_of_dead_processes(tmp_path, dead_pid, alive_pid):
    old, new = STALE_S + 600, 60
    prefix = ".B.onnx-"
    gone = [_folder(tmp_path, f"{prefix}{dead_pid}-a1", old),  # SIGKILLed or a power cut, long ago
            _folder(tmp_path, f"{prefix}xyz", old)]  # from before folders carried their process id
    kept = [_folder(tmp_path, f"{prefix}{dead_pid}-b2", new),  # maybe a reused id / another container: wait
            _folder(tmp_path, f"{prefix}{alive_pid}-c3", old),  # a long build still running
            _folder(tmp_path, f"{prefix}{os.getpid()}-d4", old),  # this process's own
            _folder(tmp_path, f"{prefix}abc", new),
            _folder(tmp_path, f".C.onnx-{dead_pid}-e5", old)]  # another target's, another prefix
    (tmp_path / f"{prefix}{dead_pid}-file").write_text("not a folder")
    os.symlink(kept[0], tmp_path / f"{prefix}{dead_pid}-link")
    assert sorted(sweep_leftovers(tmp_path, prefix)) == sorted(gone)
    assert not any(p.exists() for p in gone) and all(p.is_dir() for p in kept)
    assert (tmp_path / f"{prefix}{dead_pid}-file").is_file() and (tmp_path / f"{prefix}{dead_pid}-link").is_symlink()


def test_staging_folders_carry_the_pid_and_sweep_first(tmp_path, dead_pid):
    leftover = _folder(tmp_path, f".llm-build-{dead_pid}-zz", STALE_S + 600)
    with staging_dir(tmp_path, ".llm-build-") as tmp:
        assert os.path.basename(tmp).startswith(f".llm-build-{os.getpid()}-")
        assert not leftover.exists()
    made = make_staging_dir(tmp_path, ".x.tmp-")
    assert made.name.startswith(f".x.tmp-{os.getpid()}-") and made.is_dir()


def test_a_bundle_write_sweeps_a_killed_write_of_the_same_bundle(tmp_path, dead_pid):
    leftover = _folder(tmp_path, f".B.tmp-{dead_pid}-k1", STALE_S + 600)
    other = _folder(tmp_path, f".B.old-{dead_pid}-k2", STALE_S + 600)  # a swap's previous bundle: never swept
    writer = BundleWriter(tmp_path / "B")
    try:
        assert not leftover.exists() and other.is_dir()
        assert writer.tmp_dir.name.startswith(f".B.tmp-{os.getpid()}-")
    finally:
        writer.abort()
