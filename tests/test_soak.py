"""benchmarks/soak.py's verdict: a leak, a growing fd count, an unrotated log or a lost event fails
the soak; the allocator's ups and downs on a flat station do not."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from conftest import load_benchmark

SUMMARY = ("frames 900, judged 880, NG 300, errors 2, dropped 18, 15.0 fps, latency p50/p99 20.1/40.2 ms, "
           "reconnects 0, sink errors none, describer errors 0")


@pytest.fixture(scope="module")
def soak():
    return load_benchmark("soak")


def _samples(minutes: float, rss, fds=11, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for t in np.arange(0, 60 * minutes, 10.0):
        out.append({"t_s": float(t), "rss_mb": float(rss(t) + rng.uniform(-5, 5)), "fds": fds(t) if callable(fds) else fds,
                    "threads": 9, "children": 1, "children_rss_mb": 300.0, "children_fds": 4, "children_threads": 3,
                    "event_bytes": 1_000_000, "event_files": 2, "overlay_bytes": 10, "overlay_files": 50})
    return out


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"max_rss_growth_mb": 20.0, "rss_noise_mb": 10.0, "fd_slack": 4, **kw})


def _failed(checks: dict) -> list[str]:
    return sorted(name for name, c in checks.items() if not c["ok"])


def test_a_flat_noisy_station_passes(soak) -> None:
    checks = soak.judge(_samples(30, lambda t: 140.0), 300, _args(), 0, SUMMARY, "")
    assert _failed(checks) == [], checks
    assert checks["every frame an event"]["frames"] == 900


def test_a_leak_and_a_growing_fd_count_fail(soak) -> None:
    leak = _samples(60, lambda t: 140.0 + 60.0 * t / 3600, fds=lambda t: 11 + int(t // 600))  # 60 MB/h, an fd per 10 min
    checks = soak.judge(leak, 300, _args(), 0, SUMMARY, "")
    assert _failed(checks) == ["fds", "rss_mb growth"]
    assert 30 < checks["rss_mb growth"]["growth_mb"] < 45 and checks["rss_mb growth"]["bound_mb"] == pytest.approx(18.3, abs=0.2)


def test_lost_events_a_traceback_an_unrotated_log_and_a_bad_exit_fail(soak) -> None:
    samples = _samples(10, lambda t: 140.0)
    samples[-1]["event_bytes"] = 50_000_000
    lost = SUMMARY.replace("dropped 18", "dropped 17")
    checks = soak.judge(samples, 60, _args(), -15, lost, "Traceback (most recent call last):\n")
    assert _failed(checks) == ["SIGTERM exit", "event log within rotation", "every frame an event", "no traceback"]
    assert not soak.judge(samples, 60, _args(), 0, "no summary line", "")["every frame an event"]["ok"]


def test_too_few_samples_is_a_failure_not_a_pass(soak) -> None:
    checks = soak.judge(_samples(1, lambda t: 140.0), 300, _args(), 0, SUMMARY, "")
    assert _failed(checks) == ["enough samples"]


def test_a_station_that_ended_by_itself_or_lost_events_fails(soak) -> None:
    samples = _samples(10, lambda t: 140.0)
    checks = soak.judge(samples, 60, _args(), 0, SUMMARY, "", ended_early=True)
    assert _failed(checks) == ["SIGTERM exit", "ran until stopped"]
    lost = SUMMARY.replace("sink errors none", "sink errors none, sink lost events:events.jsonl=400")
    assert _failed(soak.judge(samples, 60, _args(), 0, lost, "")) == ["no event lost or held back"]


def test_processes_started_from_a_thread_are_found(soak) -> None:
    """The describer worker is started from the describer's thread: the main thread's children list
    misses it. The starter thread stays alive during the checks: once it ends, Linux hands its
    children to the main thread and the main thread's list would find them too."""
    import os
    import subprocess
    import sys
    import threading

    procs = []
    started, release = threading.Event(), threading.Event()

    def start() -> None:
        try:
            procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]))
        finally:
            started.set()
        release.wait(30)

    t = threading.Thread(target=start)
    t.start()
    try:
        assert started.wait(30) and procs
        assert t.is_alive()
        assert procs[0].pid in soak._descendants(os.getpid())
        assert soak._proc(procs[0].pid)["rss_mb"] > 0
    finally:
        release.set()
        t.join()
        for proc in procs:
            proc.kill()
            proc.wait()
