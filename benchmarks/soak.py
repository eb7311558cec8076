#!/usr/bin/env python3
"""Soak a station: run `iadgpt run` for minutes to hours and check that nothing grows.

    python benchmarks/soak.py --minutes 30 --json soak.json                 # the demo bundle, 15 fps
    python benchmarks/soak.py --bundle B --source /dev/video0 --minutes 480 --describer-llm llm-int4

A station that leaks a few kB per part looks fine in a test and stops a line after a week. This
starts the station as its own process (what a service manager runs), samples it and its describer
worker every `--interval` seconds from /proc (RSS, open files, threads) and the disk its event log
and overlays take, then stops it with SIGTERM as a service stop would. After the warm-up it checks
(the JSON also has each series' fitted slope):

* RSS of the station and of its children (median of the last third of the samples minus the first
  third's) grows by at most `--max-rss-growth-mb` per hour of run, or `--rss-noise-mb` if more;
* open files and threads end where they were after warm-up (within `--fd-slack`);
* the event log stays within its rotation limit and the overlays within `max_files`;
* it runs until the soak stops it, SIGTERM then ends it with exit 0, every frame read got its event
  (StationStats: frames == judged + errors + dropped), no sink lost or held back events, and stderr
  holds no traceback.

Exit 1 when a check fails; the JSON has every sample. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)

from iadgpt.cli import run_reporting_errors, writable_output  # noqa: E402
from iadgpt.errors import ConfigError  # noqa: E402

EVENT_MAX_BYTES = 2_000_000  # small, so a soak of minutes rotates the log many times
EVENT_BACKUPS = 2
OVERLAY_MAX_FILES = 100


def station_yaml(bundle: Path, source: str, threads: int, describer_llm: Optional[str]) -> str:
    describer = ("describer:\n  enabled: false\n" if describer_llm is None else
                 f"describer:\n  enabled: true\n  llm: {json.dumps(describer_llm)}\n")
    return (f"bundle: {json.dumps(str(bundle))}\nsource: {json.dumps(source)}\nthreads: {threads}\n"
            "station_id: soak\nstats_interval_s: 30\nsinks:\n"
            f"  events:\n    path: events/events.jsonl\n    max_bytes: {EVENT_MAX_BYTES}\n    backups: {EVENT_BACKUPS}\n"
            f"  overlays:\n    dir: overlays\n    max_files: {OVERLAY_MAX_FILES}\n" + describer)


def _proc(pid: int) -> Optional[dict]:
    """RSS (MB), open files and threads of one process; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss = fields.get("VmRSS", "0 kB").split()[0]  # a zombie has no memory lines
    return {"rss_mb": int(rss) / 1024, "fds": fds, "threads": int(fields.get("Threads", "0"))}


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, by parent id: the describer worker is started from a thread of the
    station, and /proc/PID/task/PID/children lists only the main thread's children."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
            parents.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _folder_bytes(folder: Path) -> tuple[int, int]:
    """Bytes and count of the finished files (not `.part` files being written), robust to the station
    deleting one between the listing and its stat."""
    total, count = 0, 0
    for p in folder.glob("*") if folder.is_dir() else []:
        if p.suffix == ".part":
            continue
        try:
            total += p.stat().st_size
            count += 1
        except FileNotFoundError:
            pass
    return total, count


def sample(pid: int, work: Path, t0: float) -> Optional[dict]:
    own = _proc(pid)
    if own is None:
        return None
    kids = [k for k in (_proc(c) for c in _descendants(pid)) if k is not None]
    event_bytes, event_files = _folder_bytes(work / "events")
    overlay_bytes, overlay_files = _folder_bytes(work / "overlays")
    return {"t_s": round(time.monotonic() - t0, 1), **own,
            "children": len(kids), "children_rss_mb": sum(k["rss_mb"] for k in kids),
            "children_fds": sum(k["fds"] for k in kids), "children_threads": sum(k["threads"] for k in kids),
            "event_bytes": event_bytes, "event_files": event_files,
            "overlay_bytes": overlay_bytes, "overlay_files": overlay_files}


def slope_per_hour(samples: list[dict], key: str) -> float:
    t = np.array([s["t_s"] for s in samples], np.float64)
    y = np.array([s[key] for s in samples], np.float64)
    if len(t) < 3 or np.ptp(t) == 0:
        return 0.0
    return float(np.polyfit(t, y, 1)[0] * 3600.0)


def judge(samples: list[dict], warmup_s: float, args: argparse.Namespace, rc: int, stdout: str,
          stderr: str, ended_early: bool = False) -> dict:
    """The checks of the module docstring, each with its numbers."""
    steady = [s for s in samples if s["t_s"] >= warmup_s]
    checks: dict[str, dict] = {}
    if ended_early:
        checks["ran until stopped"] = {"ok": False, "rc": rc, "why": "the station ended before the soak stopped it",
                                       "stderr_tail": stderr.strip().splitlines()[-3:]}
    if len(steady) < 3:
        checks["enough samples"] = {"ok": False, "why": f"{len(steady)} samples after the {warmup_s:.0f} s warm-up; "
                                                        "run longer or sample more often", "rc": rc,
                                    "stderr_tail": stderr.strip().splitlines()[-3:]}
        return checks
    hours = (steady[-1]["t_s"] - steady[0]["t_s"]) / 3600.0
    allowed = max(args.max_rss_growth_mb * hours, args.rss_noise_mb)
    third = max(1, len(steady) // 3)
    for key in ("rss_mb", "children_rss_mb"):
        growth = float(np.median([s[key] for s in steady[-third:]]) - np.median([s[key] for s in steady[:third]]))
        checks[f"{key} growth"] = {"ok": growth <= allowed, "growth_mb": round(growth, 1),
                                   "slope_mb_per_hour": round(slope_per_hour(steady, key), 1),
                                   "after_warmup": round(steady[0][key], 1), "end": round(steady[-1][key], 1),
                                   "max": round(max(s[key] for s in steady), 1), "bound_mb": round(allowed, 1)}
    for key in ("fds", "threads", "children_fds", "children_threads"):
        first, last = steady[0][key], steady[-1][key]
        checks[key] = {"ok": last - first <= args.fd_slack, "after_warmup": first, "end": last,
                       "max": max(s[key] for s in steady), "bound": f"end - after warm-up <= {args.fd_slack}"}
    event_limit = (EVENT_BACKUPS + 1) * EVENT_MAX_BYTES * 1.1  # a line may overshoot before it rotates
    most = max(s["event_bytes"] for s in samples)
    checks["event log within rotation"] = {"ok": most <= event_limit, "max_bytes": most, "bound": int(event_limit)}
    most = max(s["overlay_files"] for s in samples)
    checks["overlays within max_files"] = {"ok": most <= OVERLAY_MAX_FILES + 1, "max_files": most,
                                           "bound": f"{OVERLAY_MAX_FILES} (+1 between a write and the oldest's delete)"}
    checks["SIGTERM exit"] = {"ok": rc == 0 and not ended_early, "rc": rc}
    checks["no traceback"] = {"ok": "Traceback" not in stderr, "stderr_lines": len(stderr.splitlines())}
    counts = _final_counts(stdout)
    checks["every frame an event"] = {"ok": bool(counts) and counts["frames"] == counts["judged"] + counts["errors"]
                                      + counts["dropped"] and counts["frames"] > 0, **counts}
    summary = next((line for line in reversed(stdout.splitlines()) if line.startswith("frames ")), "")
    checks["no event lost or held back"] = {"ok": bool(summary) and "sink lost" not in summary
                                            and "sink waiting" not in summary,
                                            "summary": summary[summary.find("sink errors"):] if summary else ""}
    return checks


def _final_counts(stdout: str) -> dict:
    """frames / judged / errors / dropped from the summary line `iadgpt run` prints last."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("frames "):
            words = line.replace(",", "").split()
            try:
                return {k: int(words[words.index(k) + 1]) for k in ("frames", "judged", "errors", "dropped")}
            except (ValueError, IndexError):
                return {}
    return {}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder [the demo bundle, built once]")
    p.add_argument("--source", default=None, help="frame source URI [synthetic://part?seed=1&fps=FPS]")
    p.add_argument("--fps", type=float, default=15.0, help="rate of the synthetic source [15]")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--warmup-minutes", type=float, default=None, help="[a fifth of the run, at most 5]")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples [10]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--describer-llm", default=None,
                   help="run the describer too: an LLM folder, or `none` for facts-only descriptions [off]")
    p.add_argument("--workdir", type=Path, default=Path("soak-run"), help="station.yaml, events, overlays, logs")
    p.add_argument("--max-rss-growth-mb", type=float, default=20.0,
                   help="per hour, station and children each: median of the last third of the samples minus "
                        "the first third's [20]")
    p.add_argument("--rss-noise-mb", type=float, default=10.0,
                   help="growth always allowed: the allocator's ups and downs, which a short run cannot tell from "
                        "a leak [10]")
    p.add_argument("--fd-slack", type=int, default=4, help="open files / threads the end may exceed warm-up by [4]")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0 or args.fps <= 0:
        raise ConfigError("--minutes, --interval and --fps must be > 0")
    writable_output(args.json)
    if args.workdir.exists() and any(args.workdir.iterdir()):
        raise ConfigError(f"--workdir {args.workdir} is not empty; give a new folder (a soak judges its own files)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle
    if bundle is None:
        from iadgpt.demo import demo_bundle
        bundle = demo_bundle("onnxruntime", threads=args.threads).path
    source = args.source or f"synthetic://part?seed=1&fps={args.fps:g}"
    work = args.workdir.resolve()
    (work / "station.yaml").write_text(station_yaml(Path(bundle).resolve(), source, args.threads, args.describer_llm))
    warmup_s = 60.0 * (args.warmup_minutes if args.warmup_minutes is not None else min(5.0, args.minutes / 5))
    out_log, err_log = open(work / "stdout.log", "w"), open(work / "stderr.log", "w")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "iadgpt", "run", "--station", str(work / "station.yaml")],
                            cwd=work, stdout=out_log, stderr=err_log, env=env)  # this checkout's iadgpt
    from tqdm import tqdm
    t0, samples = time.monotonic(), []
    end = t0 + 60.0 * args.minutes
    try:
        with tqdm(total=int(60 * args.minutes), unit="s", desc="soak") as bar:
            while time.monotonic() < end and proc.poll() is None:
                s = sample(proc.pid, work, t0)
                if s is not None:
                    samples.append(s)
                    bar.set_postfix(rss=f"{s['rss_mb']:.0f}MB", fds=s["fds"], thr=s["threads"])
                time.sleep(max(0.0, min(args.interval, end - time.monotonic())))
                bar.n = min(bar.total, int(time.monotonic() - t0))
                bar.refresh()
    finally:
        ended_early = proc.poll() is not None
        if not ended_early:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=120)  # the example service allows 90 s
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        out_log.close()
        err_log.close()
    stdout, stderr = (work / "stdout.log").read_text(), (work / "stderr.log").read_text()
    checks = judge(samples, warmup_s, args, rc, stdout, stderr, ended_early)
    report = {"bundle": str(bundle), "source": source, "minutes": args.minutes, "warmup_s": warmup_s,
              "describer_llm": args.describer_llm, "threads": args.threads, "rc": rc,
              "summary": stdout.strip().splitlines()[-1] if stdout.strip() else "",
              "ok": all(c["ok"] for c in checks.values()), "checks": checks, "samples": samples}
    for name, c in checks.items():
        detail = ", ".join(f"{k} {v}" for k, v in c.items() if k != "ok")
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {name}: {detail}")
    print(report["summary"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
