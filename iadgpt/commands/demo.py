"""`iadgpt demo`: build, calibrate and run a station on a synthetic product stream, offline."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole station on synthetic parts (no data, no download)")
    p.add_argument("--out", type=Path, default=Path("iadgpt-demo"), help="folder for events, overlays, summary.json")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--fps", type=float, default=20.0, help="camera rate of the synthetic stream")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached demo bundle")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    s = run_demo(args.out, frames=args.frames, fps=args.fps, backend=args.backend, threads=args.threads,
                 on_flag=print, rebuild=args.rebuild)
    print(f"\n{s['frames']} frames, {s['flagged']} flagged: recall {100 * s['recall']:.1f}% of {s['defective']} "
          f"defective parts, false alarms {100 * s['false_alarm_rate']:.1f}% of {s['good']} good parts")
    lat = s["latency_ms"]  # None when no frame was judged
    lat = "-" if lat["p50"] is None else f"p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms"
    print(f"latency per frame {lat} ({s['backend']}); dropped {s['dropped']}, errors {s['errors']}")
    print(f"events {s['events']}\noverlays {s['overlays']}\nbundle {s['bundle']}\nsummary {args.out / 'summary.json'}")
    return 0
