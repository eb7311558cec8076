"""The CLI's error contract, shared with the benchmark scripts: one `error:` line and status 2."""
from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from iadgpt.cli import run_reporting_errors, writable_output
from iadgpt.errors import BundleError, ConfigError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_errors_become_one_line_and_a_status(capsys: pytest.CaptureFixture) -> None:
    def raises(exc: BaseException):
        def run() -> int:
            raise exc
        return run

    assert run_reporting_errors(raises(BundleError("bundle b is corrupt; re-export it"))) == 2
    assert capsys.readouterr().err == "error: bundle b is corrupt; re-export it\n"
    assert run_reporting_errors(raises(OSError(errno.ENOSPC, "No space left on device", "/data/x.json"))) == 2
    assert capsys.readouterr().err.startswith("error: No space left on device: /data/x.json; check the path")
    assert run_reporting_errors(raises(KeyboardInterrupt())) == 130
    assert run_reporting_errors(lambda: None) == 0
    with pytest.raises(ValueError):  # a bug stays a traceback
        run_reporting_errors(raises(ValueError("bug")))


def test_a_missing_optional_package_names_its_extra(capsys: pytest.CaptureFixture) -> None:
    # `iadgpt export` on a station install (no torch) was a ModuleNotFoundError traceback
    def raises(exc: BaseException):
        def run() -> None:
            raise exc
        return run

    assert run_reporting_errors(raises(ModuleNotFoundError("No module named 'torch'", name="torch"))) == 2
    assert "needs the optional package 'torch'" in capsys.readouterr().err
    assert run_reporting_errors(raises(ModuleNotFoundError("x", name="paho.mqtt"))) == 2
    assert "iadgpt[mqtt]" in capsys.readouterr().err
    with pytest.raises(ModuleNotFoundError):  # a module of our own, or anything unexpected: a bug
        run_reporting_errors(raises(ModuleNotFoundError("x", name="iadgpt.nope")))


def test_version_and_python_dash_m() -> None:
    from iadgpt import __version__
    proc = subprocess.run([sys.executable, "-m", "iadgpt", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"iadgpt {__version__}", proc


def test_writable_output_makes_the_folder_before_the_work(tmp_path: Path) -> None:
    writable_output(tmp_path / "new" / "deeper" / "results.json")
    assert (tmp_path / "new" / "deeper").is_dir()
    writable_output(None)
    with pytest.raises(ConfigError, match="is a folder"):
        writable_output(tmp_path / "new")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="cannot make the folder"):
        writable_output(tmp_path / "afile" / "results.json")


@pytest.mark.parametrize("script, args, words", [
    ("latency.py", ["--bundle", "/nonexistent/bundle", "--frames", "5"], "does not exist"),
    ("latency.py", ["--bundle", "/nonexistent/bundle", "--frames", "0"], "--frames 0 must be at least 1"),
    ("latency.py", ["--bundle", "/nonexistent/bundle", "--warmup", "-1"], "--warmup -1 must be 0 or more"),
    ("thresholds.py", ["--data-root", "/nonexistent", "--category", "screw"], "unknown category screw"),
])
def test_benchmark_scripts_fail_with_one_line(script: str, args: list[str], words: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
