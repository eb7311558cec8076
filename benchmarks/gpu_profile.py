#!/usr/bin/env python3
"""Where the GPU fast path spends its time: per stage, per kernel, per attention backend.

    python benchmarks/gpu_profile.py --presets clip-vit-l14-336,clip-vit-h14 --json prof.json

Per preset (random weights, fp16, the pipeline's CUDA defaults unless --fuse says otherwise):
  stages     each stage captured as its own CUDA graph and replayed (device time, CUDA events):
             h2d (1080p uint8 frame, pinned -> device), preprocess (resize + round + normalise),
             encoder, scorer, d2h (map + score); plus the host side of a call: the copy of the frame
             into the pinned buffer, and a whole `pipeline(frame)` with and without that copy
  kernels    torch.profiler over eager forwards: CUDA time per kernel class and the top kernels
  sdpa       the attention shapes of the tower with each scaled_dot_product_attention backend
Companion of benchmarks/gpu_latency.py (the end-to-end numbers); this one says what to fuse next.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from iadgpt.cli import run_reporting_errors, writable_output  # noqa: E402

KERNEL_CLASSES = (  # first match wins; names of cuBLAS/cuDNN/flash/Triton/ATen kernels
    ("gemm", r"gemm|sm90_xmma|cutlass|cublas|matmul|s16816|h16816|wgmma|nvjet"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*mha"),
    ("norm", r"layer_norm|LayerNorm|layernorm|batch_norm"),
    ("copy/layout", r"copy|transpose|permute|cat|index|gather|Memcpy|memcpy|elementwise_kernel_with_index"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|triton_poi|sigmoid|gelu|add|mul"),
    ("reduce", r"reduce|softmax|amax|sum|triton_red|triton_per"),
)


def replay_ms(torch: Any, fn: Callable[[], None], n: int = 100, warmup: int = 3) -> float:
    """Median device time of `fn` captured as one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        g.replay()
        e.record()
    torch.cuda.synchronize()
    return float(np.median([s.elapsed_time(e) for s, e in zip(starts, ends)]))


def host_ms(fn: Callable[[], Any], n: int = 200, warmup: int = 10) -> dict:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(out)
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4)}


def stages(pipe: Any, frame: np.ndarray, torch: Any) -> dict:
    """Device time per stage (each its own graph) and the host-side costs of one call."""
    st = pipe._state((1,) + frame.shape)
    st.host_in.copy_(torch.from_numpy(frame[None]))
    out: dict[str, Any] = {}
    with torch.inference_mode():
        st.dev_in.copy_(st.host_in)
        x = pipe.resize(st.dev_in, st.taps)
        x_in = ((x - pipe._mean) * pipe._inv_std).to(pipe.dtype)
        if pipe._channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        feats = pipe._encode(x_in)  # the compiled modules where fuse.compile is set
        amap, score = pipe._score(list(feats), *pipe._refs)

        def pre() -> None:
            pipe.resize(st.dev_in, st.taps).sub(pipe._mean).mul(pipe._inv_std).to(pipe.dtype)

        out["h2d_ms"] = replay_ms(torch, lambda: st.dev_in.copy_(st.host_in, non_blocking=True))
        out["preprocess_ms"] = replay_ms(torch, pre)
        out["encoder_ms"] = replay_ms(torch, lambda: pipe._encode(x_in))
        out["scorer_ms"] = replay_ms(torch, lambda: pipe._score(list(feats), *pipe._refs))
        out["d2h_ms"] = replay_ms(torch, lambda: (st.host_map.copy_(amap, non_blocking=True),
                                                  st.host_score.copy_(score, non_blocking=True)))
        out["whole_graph_ms"] = float(np.median(pipe.device_times_ms(frame[None], 100)))
    src = np.ascontiguousarray(frame[None])
    out["host_copy"] = pipe.host_copy  # the pipeline's own way (cuda_graph.HOST_COPIES)
    out["host_copy_into_pinned"] = host_ms(
        (lambda: np.copyto(st.host_in_np, src)) if pipe.host_copy == "numpy" else
        (lambda: st.host_in.copy_(torch.from_numpy(src))))
    out["call_with_copy"] = host_ms(lambda: pipe(frame))
    buf = pipe.input_buffer(frame.shape)
    buf[...] = frame
    out["call_zero_copy"] = host_ms(lambda: pipe(buf))
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def kernels(pipe: Any, frame: np.ndarray, torch: Any, n: int = 5, top: int = 25) -> dict:
    """CUDA time per kernel class and the top kernels over `n` eager forwards (microseconds per forward)."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.from_numpy(frame[None]).to(pipe.device)
    taps = pipe._taps(frame.shape[:2]) if pipe.fuse.resize == "exact" else None
    with torch.inference_mode():
        for _ in range(3):
            pipe.forward(dev, taps)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                pipe.forward(dev, taps)
            torch.cuda.synchronize()
    per: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        per.setdefault(ev.name, []).append(ev.device_time if hasattr(ev, "device_time") else ev.cuda_time)
    rows = sorted(((sum(v) / n, len(v) / n, k) for k, v in per.items()), reverse=True)
    classes: dict[str, float] = {}
    launches: dict[str, float] = {}
    for us, count, name in rows:
        cls = next((c for c, pat in KERNEL_CLASSES if re.search(pat, name, re.I)), "other")
        classes[cls] = classes.get(cls, 0.0) + us
        launches[cls] = launches.get(cls, 0.0) + count
    return {"us_per_forward_by_class": {k: round(v, 1) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
            "kernels_per_forward_by_class": {k: round(v, 1) for k, v in launches.items()},
            "kernels_per_forward": round(sum(launches.values()), 1),
            "top": [{"us": round(us, 1), "per_forward": round(c, 1), "name": name[:140]} for us, c, name in rows[:top]]}


def sdpa_backends(torch: Any, heads: int, tokens: int, head_dim: int, layers: int) -> dict:
    """Device time of one attention call of the tower's shape with each SDPA backend (x layers)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device="cuda", dtype=torch.float16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out: dict[str, Any] = {}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, k, v)
                err = float((o.float() - ref).norm() / ref.norm())
                ms = replay_ms(torch, lambda: F.scaled_dot_product_attention(q, k, v))
            out[name.lower()] = {"ms_per_call": round(ms, 4), "ms_per_tower": round(ms * layers, 3),
                                 "rel_err": float(f"{err:.2g}")}
        except Exception as exc:  # noqa: BLE001 - a backend unavailable for this shape is a result too
            out[name.lower()] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    try:
        out["default"] = {"ms_per_call": round(replay_ms(torch, lambda: F.scaled_dot_product_attention(q, k, v)), 4)}
    except Exception as exc:  # noqa: BLE001
        out["default"] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="clip-vit-l14-336,clip-vit-h14")
    p.add_argument("--fuse", default=None, help='FuseOptions as JSON, e.g. \'{"compile": null}\' (default: '
                   "the pipeline's CUDA defaults)")
    p.add_argument("--frame-size", default="1920x1080")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    writable_output(args.json)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: run this on the GPU machine", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    from gpu_latency import build_preset, build_scorer, make_frames

    from iadgpt.runtime.cuda_graph import CudaGraphPipeline, FuseOptions

    w, h = (int(v) for v in args.frame_size.lower().split("x"))
    frame = make_frames(1, w, h, 0)[0]
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "frame": list(frame.shape), "presets": {}}
    for name in [s.strip() for s in args.presets.split(",") if s.strip()]:
        t0 = time.monotonic()
        bb = build_preset(name, "cuda", 0, torch)
        kind = "text" if getattr(bb, "has_text", False) else "bank"
        clean = make_frames(4, w, h, 1, clean=True) if kind == "bank" else []
        scorer, refs, _ = build_scorer(bb, kind, 16384, clean, "cuda", 0, torch)
        fuse = FuseOptions.for_device("cuda") if args.fuse is None else FuseOptions.coerce(json.loads(args.fuse))
        pipe = CudaGraphPipeline(bb, scorer, refs, bb.input_spec, torch.float16, "cuda", fuse=fuse)
        entry: dict[str, Any] = {"fuse": fuse.to_dict()}
        for part, fn in (("stages", stages), ("kernels", kernels)):
            try:
                entry[part] = fn(pipe, frame, torch)
            except Exception as exc:  # noqa: BLE001 - report what works
                entry[part] = {"error": f"{type(exc).__name__}: {exc}"}
        if hasattr(bb, "clip"):
            vc = bb.clip.config.vision_config
            tokens = (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1
            entry["sdpa"] = sdpa_backends(torch, int(vc.num_attention_heads), tokens,
                                          int(vc.hidden_size) // int(vc.num_attention_heads), int(bb.taps[-1]))
        entry["seconds"] = round(time.monotonic() - t0, 1)
        report["presets"][name] = entry
        print(f"\n== {name} ({report['gpu']})")
        print(json.dumps({k: v for k, v in entry.items() if k != "kernels"}, indent=1))
        k = entry.get("kernels", {})
        print("kernels/forward", k.get("kernels_per_forward"), "us by class", k.get("us_per_forward_by_class"))
        for row in k.get("top", [])[:15]:
            print(f"  {row['us']:8.1f} us  x{row['per_forward']:5.1f}  {row['name']}")
        del pipe, bb, scorer
        torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
