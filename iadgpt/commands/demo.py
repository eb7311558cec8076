"""`iadgpt demo`: build, calibrate and run a station on a synthetic product stream, offline."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole station on synthetic parts (no data, no download)")
    p.add_argument("--out", type=Path, default=Path("iadgpt-demo"), help="folder for events, overlays, summary.json")
    p.add_argument("--frames", type=int, default=200, help="synthetic parts to inspect")
    p.add_argument("--fps", type=float, default=20.0,
                   help="camera rate of the synthetic stream; 0: unpaced (parts as fast as they are drawn; the station "
                        "judges what it can and drops the rest, each with its event)")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime | torch | cuda-graph")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: the backend's)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached demo bundle")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    s = run_demo(args.out, frames=args.frames, fps=args.fps, backend=args.backend, threads=args.threads,
                 on_flag=print, rebuild=args.rebuild)
    print(f"\n{s['frames']} frames, {s['flagged']} flagged: recall {_pct(s['recall'])} of {s['defective']} "
          f"defective parts, false alarms {_pct(s['false_alarm_rate'])} of {s['good']} good parts")
    print(f"latency per frame: inference {_ms(s['latency_ms'])}, capture to verdict {_ms(s['capture_to_verdict_ms'])} "
          f"({s['backend']}, {s['fps']:.1f} fps judged); dropped {s['dropped']}, errors {s['errors']}")
    print(f"events {s['events']}\noverlays {s['overlays']}\nbundle {s['bundle']}\nsummary {args.out / 'summary.json'}")
    return 0


def _pct(rate) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"  # a rate over zero parts


def _ms(lat: dict) -> str:
    return "-" if lat["p50"] is None else f"p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms"  # None: nothing judged
