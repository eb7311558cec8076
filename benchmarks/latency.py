#!/usr/bin/env python3
"""Frame -> verdict latency of a bundle on a backend: per stage and end to end, after warm-up.

    python benchmarks/latency.py --bundle B --backend onnxruntime --threads 2 --json F
    python benchmarks/latency.py --bundle FP32 --bundle INT8 --backend onnxruntime --threads 2 --json F
    python benchmarks/latency.py --bundle B --compare onnxruntime,torch
    python benchmarks/latency.py --bundle B --backend onnxruntime --threads 2 --fps 30   # at camera rate

Every run in one invocation sees the same frames (synthetic parts with defects, so NG frames pay
for their regions and overlay map as on the line); several bundles/backends take turns frame by
frame, and the JSON then adds `speedup_p50_vs_first`. Timings are wall clock around
`Detector.detect`, the call the station makes per frame; capture is not included.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iadgpt.cli import run_reporting_errors, writable_output  # noqa: E402

from iadgpt.bundle import Bundle  # noqa: E402
from iadgpt.errors import ConfigError  # noqa: E402
from iadgpt.runtime.detector import Detector  # noqa: E402
from iadgpt.runtime.sources import Frame  # noqa: E402
from iadgpt.runtime.synthetic import SyntheticProduct  # noqa: E402


def environment() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("iadgpt", "numpy", "onnxruntime", "onnxruntime-gpu", "opencv-python-headless", "torch", "tensorrt"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    if "torch" in sys.modules:
        import torch
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    return env


def make_frames(n: int, size: int, seed: int) -> list[Frame]:
    product = SyntheticProduct(kind="part", size=size, seed=seed, defect_rate=0.3)
    return [Frame(image=product.sample(i).image, frame_id=i, timestamp=time.time(), source="bench", meta={})
            for i in range(n)]


def percentiles(values: list[float]) -> dict:
    a = np.asarray(values)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def bench(targets: list[tuple[Bundle, str]], frames: list[Frame], warmup: int, threads: int | None,
          threshold: float | None, fps: float | None = None) -> list[dict]:
    """One report per (bundle, backend); with several, the detectors take turns frame by frame, so
    a change of machine load during the run hits all of them alike instead of whichever ran last.

    `fps`: start each detection on a camera clock (one slot of 1/fps per detection, detectors in
    turn) and wait idle until then, as the station waits for its camera. Back to back, the caches
    stay warm and the cores never idle; at camera rate a CPU that idles between frames (power
    states, a VM's halted vCPU, neighbours evicting the caches) answers slower."""
    with contextlib.ExitStack() as stack:
        dets = []
        for bundle, backend in targets:
            th, image = threshold, bundle.thresholds.get("image")
            if th is None and not image:
                th = float("inf")
                print(f"note: {bundle.path} has no threshold, so no frame is NG and postprocess (regions, "
                      "overlay map) is not timed; calibrate it or pass --threshold", file=sys.stderr)
            elif th is None and image.get("backend") not in (None, backend):
                th = float(image["value"])  # timing does not depend on where it was fitted
                print(f"note: timing {backend} with the threshold {th:.4g} fitted on {image['backend']}",
                      file=sys.stderr)
            dets.append(stack.enter_context(Detector(bundle, backend, threads=threads, threshold=th)))
        for f in frames[:warmup]:
            for det in dets:
                det.detect(f)
        totals: list[list[float]] = [[] for _ in dets]
        stages: list[dict[str, list[float]]] = [{} for _ in dets]
        late = [0 for _ in dets]
        flagged = [0 for _ in dets]
        slot = 0
        start = time.perf_counter()
        for f in frames:
            for i, det in enumerate(dets):
                if fps:
                    slot += 1  # the first slot is one period after the warm-up, like the next camera frame
                    due = start + slot / fps
                    wait = due - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    else:
                        late[i] += 1
                t0 = time.perf_counter()
                v = det.detect(f)
                totals[i].append((time.perf_counter() - t0) * 1e3)
                flagged[i] += bool(v.anomalous)
                for k, ms in v.timings_ms.items():
                    stages[i].setdefault(k, []).append(ms)
    reports = []
    for (bundle, backend), det, total, stage, n_late, n_ng in zip(targets, dets, totals, stages, late, flagged):
        e2e = percentiles(total)
        e2e["fps"] = 1000.0 / float(np.mean(total))
        reports.append({
            "bundle": str(bundle.path), "backend": backend, "threads": threads,
            "paced_fps": fps, "late_frames": n_late if fps else None,
            "precision": det.precision, "backbone": bundle.backbone.get("name"),  # what ran (cuda-graph: fp16)
            "frames": len(frames), "frame_size": list(frames[0].image.shape), "end_to_end": e2e,
            "threshold": det.threshold if np.isfinite(det.threshold) else None, "ng_frames": n_ng,
            "stages": {k: {kk: vv for kk, vv in percentiles(v).items() if kk != "max_ms"} for k, v in stage.items()}})
    return reports


def speedups(runs: list[dict]) -> list[dict]:
    """p50 of the first run / p50 of each run, end to end and per stage (> 1: faster than the first)."""
    base = runs[0]
    out = []
    for r in runs:
        row = {"bundle": r["bundle"], "backend": r["backend"],
               "end_to_end": base["end_to_end"]["p50_ms"] / r["end_to_end"]["p50_ms"]}
        row.update({k: base["stages"][k]["p50_ms"] / v["p50_ms"] for k, v in r["stages"].items()
                    if k in base["stages"] and v["p50_ms"] > 0})
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    device = next((a.split("=", 1)[1] for a in argv if a.startswith("--device=")), None) or \
        (argv[argv.index("--device") + 1] if "--device" in argv[:-1] else "cpu")
    if device.startswith("cuda"):  # the GPU fast path (CUDA graphs): benchmarks/gpu_latency.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu_latency import main as gpu_main
        return gpu_main(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--bundle", action="append", required=True, type=Path, help="repeat to compare bundles")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--compare", default=None, help="comma-separated backends to run side by side, e.g. onnxruntime,torch")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--frame-size", type=int, default=256, help="side of the synthetic square frames, px")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--seed", type=int, default=303)
    p.add_argument("--fps", type=float, default=None,
                   help="pace detections at this camera rate (idle between frames, as on the line); "
                        "default: back to back")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.frames < 1:  # the report's percentiles need at least one timed frame
        raise ConfigError(f"--frames {args.frames} must be at least 1: the number of frames to time")
    if args.warmup < 0:
        raise ConfigError(f"--warmup {args.warmup} must be 0 or more: the frames judged before timing starts")
    writable_output(args.json)

    backends = args.compare.split(",") if args.compare else [args.backend]
    frames = make_frames(args.frames, args.frame_size, args.seed)
    if args.fps is not None and args.fps <= 0:
        p.error("--fps must be > 0")
    runs = bench([(Bundle.load(b), be) for b in args.bundle for be in backends], frames, args.warmup, args.threads,
                 args.threshold, args.fps)
    report = {"environment": environment(), "interleaved": len(runs) > 1, "runs": runs}
    if len(runs) == 1:
        report.update(runs[0])
    else:
        report["speedup_p50_vs_first"] = speedups(runs)

    pacing = (f"paced at {args.fps:g} fps ({', '.join(str(r['late_frames']) for r in runs)} frames started late)"
              if args.fps else "back to back")
    print(f"{report['environment']['cpu']}, {report['environment']['cores']} cores; {args.frames} frames "
          f"{args.frame_size}x{args.frame_size} after {args.warmup} warm-up, {pacing}")
    print("| bundle | backend | precision | p50 ms | p99 ms | max ms | capacity fps | NG frames | stages p50/p99 ms |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        e = r["end_to_end"]
        st = ", ".join(f"{k} {v['p50_ms']:.1f}/{v['p99_ms']:.1f}" for k, v in r["stages"].items())
        print(f"| {Path(r['bundle']).name} | {r['backend']} | {r['precision']} | {e['p50_ms']:.1f} | {e['p99_ms']:.1f} "
              f"| {e['max_ms']:.1f} | {e['fps']:.1f} | {r['ng_frames']} of {r['frames']} | {st} |")
    for row in report.get("speedup_p50_vs_first", [])[1:]:
        print(f"{Path(row['bundle']).name} ({row['backend']}) vs {Path(runs[0]['bundle']).name}: p50 speed-up "
              + ", ".join(f"{k} {v:.2f}x" for k, v in row.items() if k not in ("bundle", "backend")))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
