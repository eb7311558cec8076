#!/usr/bin/env python3
"""How long a camera frame takes to reach a pinned-style buffer, quiet and with busy neighbours.

    python benchmarks/host_copy.py --busy 0
    python benchmarks/host_copy.py --busy 1     # one process spinning on a core, as a loaded station

Compares the two `CudaGraphPipeline(host_copy=...)` modes on the host side (no GPU needed):
"numpy" (the default: np.copyto on the calling thread) and "torch" (Tensor.copy_ on torch's CPU
thread pool), into a pinned buffer where a CUDA GPU is visible, over frames rotated so the source is
not cache-hot. A parallel copy waits for its slowest thread, so it slows down as soon as another
process takes a core; a one-thread copy does not wait for anyone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gpu_latency import busy_processes, stats, time_calls  # the GPU benchmark's helpers (same folder)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iadgpt.cli import run_reporting_errors  # noqa: E402


def _time(fn, frames: list[np.ndarray], n: int) -> dict:
    return stats(time_calls(fn, frames, n, warmup=3))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frame-size", default="1920x1080", help="WIDTHxHEIGHT of the RGB uint8 frame")
    p.add_argument("--busy", type=int, default=0, help="processes spinning on a core during the timing")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads(N) first; 0: torch's default")
    args = p.parse_args(argv)
    import torch

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    w, h = (int(v) for v in args.frame_size.lower().split("x"))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8) for _ in range(8)]
    pinned = torch.cuda.is_available()
    dst = torch.empty((1, h, w, 3), dtype=torch.uint8, pin_memory=pinned)
    dst_np = dst.numpy()
    with busy_processes(args.busy):
        res = {"numpy": _time(lambda s: np.copyto(dst_np, s), frames, args.calls),
               "torch": _time(lambda s: dst.copy_(torch.from_numpy(s)), frames, args.calls)}
    print(f"{w}x{h} RGB frame ({frames[0].nbytes / 1e6:.1f} MB) into a {'pinned' if pinned else 'pageable'} buffer, "
          f"torch threads {torch.get_num_threads()}, {args.busy} busy process(es), {args.calls} calls")
    for mode, r in res.items():
        print(f"  host_copy={mode:6s} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  max {r['max_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
