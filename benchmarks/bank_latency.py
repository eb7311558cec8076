"""Memory-bank size vs SCORER graph latency on ONNX Runtime CPU.

The scorer's nearest-neighbour search is a GEMM against every bank row, so its cost grows linearly
with the bank: this table is what a coreset fraction buys on a station CPU. Exports the scorer of
the chosen backbone once (the bank is a dynamic input), then times batch-`--batch` runs per bank
size after a warm-up. Bank rows are random unit vectors: the cost does not depend on their values.

    python benchmarks/bank_latency.py --threads 2 --json bank_latency.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iadgpt.cli import run_reporting_errors, writable_output  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--banks", default="1024,4096,16384,65536", help="comma-separated bank sizes (patches)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    writable_output(args.json)
    import onnxruntime
    import torch

    from iadgpt.export.bundle_export import build_backbone
    from iadgpt.export.onnx_export import export_scorer, feature_names
    from iadgpt.models.references import encode
    from iadgpt.models.scorers import MemoryBankScorer
    from iadgpt.runtime.engines import OrtEngine

    torch.set_num_threads(args.threads)
    backbone = build_backbone(args.backbone, resolution=args.resolution)
    h, _w = backbone.input_spec.size
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (args.batch, 3, *backbone.input_spec.size)).astype(np.float32)
    feats = [f.numpy() for f in encode(backbone, images)]
    dim = sum(int(f.shape[1]) for f in feats)
    scorer = MemoryBankScorer(backbone.strides, h)
    sizes = [int(s) for s in args.banks.split(",")]

    def bank(rows: int) -> np.ndarray:
        b = rng.standard_normal((rows, dim)).astype(np.float32)
        return b / np.linalg.norm(b, axis=1, keepdims=True)

    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scorer.onnx"
        export_scorer(scorer, [f.shape[1:] for f in feats], bank(min(sizes)), path, threads=args.threads)
        with OrtEngine(path, "cpu", args.threads) as engine:
            feeds = dict(zip(feature_names(len(feats)), feats))
            for rows in sizes:
                feeds["bank"] = bank(rows)
                for _ in range(args.warmup):
                    engine.run(feeds)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    engine.run(feeds)
                    times.append((time.perf_counter() - t0) * 1e3)
                rows_out.append({"bank_patches": rows, "bank_mb": rows * dim * 4 / 1e6,
                                 "median_ms": statistics.median(times),
                                 "p90_ms": float(np.percentile(times, 90)), "min_ms": min(times)})

    env = {"backbone": args.backbone, "resolution": args.resolution, "patch_dim": dim,
           "queries_per_image": int(scorer.embedder.grid) ** 2, "batch": args.batch, "threads": args.threads,
           "onnxruntime": onnxruntime.__version__, "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
           "repeats": args.repeats}
    print(f"scorer latency, {args.backbone} at {args.resolution} px ({env['queries_per_image']} patches x {dim} "
          f"per image), batch {args.batch}, onnxruntime {env['onnxruntime']} CPU, {args.threads} threads, "
          f"{env['cpu_count']} cores, load {env['loadavg_1m']}")
    print()
    print("| bank patches | bank MB | median ms | p90 ms | min ms |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows_out:
        print(f"| {r['bank_patches']:,} | {r['bank_mb']:.1f} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
              f"{r['min_ms']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": rows_out}, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
