#!/usr/bin/env python3
"""How long a camera frame takes to reach a pinned-style buffer, quiet and with busy neighbours.

    python benchmarks/host_copy.py --busy 0
    python benchmarks/host_copy.py --busy 1     # one process spinning on a core, as a loaded station

Compares, on the host side (no GPU needed), into a pinned buffer where a CUDA GPU is visible, over
frames rotated so the source is not cache-hot:
- the two `CudaGraphPipeline(host_copy=...)` modes for an RGB frame in ordinary memory: "numpy"
  (the default: np.copyto on the calling thread) and "torch" (Tensor.copy_ on torch's CPU thread
  pool);
- the capture's BGR -> RGB conversion of a decoded frame into the buffer (how a frame buffer is
  filled): `cv2.cvtColor` on OpenCV's thread pool (what the sources do), and on the calling thread
  in row bands OpenCV does not split (`gpu_latency.bgr_to_rgb_in_bands`; slower on the H200 host,
  README "GPU fast path").
A parallel copy waits for its slowest thread, so it slows down as soon as another process takes a
core; a one-thread copy does not wait for anyone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from gpu_latency import bgr_to_rgb_in_bands, busy_processes, stats, time_calls  # the GPU benchmark's helpers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iadgpt.cli import run_reporting_errors  # noqa: E402


def _time(fn, frames: list[np.ndarray], n: int, gap_s: float) -> dict:
    if gap_s <= 0:
        return stats(time_calls(fn, frames, n, warmup=3))
    out = []
    for i in range(n + 3):  # a camera's frames arrive apart: thread pools go idle between them
        time.sleep(gap_s)
        t0 = time.perf_counter()
        fn(frames[i % len(frames)])
        if i >= 3:
            out.append((time.perf_counter() - t0) * 1e3)
    return stats(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frame-size", default="1920x1080", help="WIDTHxHEIGHT of the RGB uint8 frame")
    p.add_argument("--busy", type=int, default=0, help="processes spinning on a core during the timing")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="sleep this long before each call, as between a camera's frames (0: back to back)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads(N) first; 0: torch's default")
    p.add_argument("--json", type=Path, help="also write the timings here")
    args = p.parse_args(argv)
    import cv2
    import torch

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    w, h = (int(v) for v in args.frame_size.lower().split("x"))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8) for _ in range(8)]
    pinned = torch.cuda.is_available()
    dst = torch.empty((1, h, w, 3), dtype=torch.uint8, pin_memory=pinned)
    dst_np = dst.numpy()
    bgr = [f[0] for f in frames]
    gap = args.gap_ms / 1e3
    rgb_np = dst_np[0]
    with busy_processes(args.busy):
        res = {"host_copy=numpy": _time(lambda s: np.copyto(dst_np, s), frames, args.calls, gap),
               "host_copy=torch": _time(lambda s: dst.copy_(torch.from_numpy(s)), frames, args.calls, gap),
               "cvtColor pooled": _time(lambda s: cv2.cvtColor(s, cv2.COLOR_BGR2RGB, dst=rgb_np), bgr, args.calls, gap),
               "cvtColor bands": _time(lambda s: bgr_to_rgb_in_bands(s, dst=rgb_np), bgr, args.calls, gap)}
    head = (f"{w}x{h} frame ({frames[0].nbytes / 1e6:.1f} MB) into a {'pinned' if pinned else 'pageable'} buffer, "
            f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, OpenCV threads {cv2.getNumThreads()}, "
            f"{args.busy} busy process(es), {args.calls} calls"
            + (f" {args.gap_ms:g} ms apart" if gap > 0 else " back to back"))
    print(head)
    for mode, r in res.items():
        print(f"  {mode:16s} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  max {r['max_ms']:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps({"setup": head, "timings": res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
