"""`iadgpt run`: the station loop, from a station.yaml or from a bundle and a source URI."""
from __future__ import annotations

import argparse
import math
import signal
from pathlib import Path
from typing import Any

# after a signal stopped the station, the parts still queued for the describer get this long
# (a service manager kills a process that takes too long to stop: systemd's default is 90 s)
SIGNAL_DRAIN_S = 10.0
EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "station.yaml"
EXAMPLE_SERVICE = EXAMPLE_CONFIG.with_name("iadgpt-station.service")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="inspect a camera/file/stream: verdict per frame, events, overlays, MQTT")
    p.add_argument("bundle", nargs="?", type=Path, help="bundle folder (or use --station)")
    p.add_argument("--station", type=Path, help="station.yaml (`iadgpt run --example-config` prints one)")
    p.add_argument("--source", help="frame source URI: file, folder, glob, /dev/video0, 0, rtsp://, gst:..., csi://0, synthetic://part")
    p.add_argument("--events", type=Path, help="JSONL event log")
    p.add_argument("--overlays", type=Path, help="folder for NG overlay images")
    p.add_argument("--max-overlays", type=int, default=None,
                   help="keep only the newest N overlays (default: all; at 10 fps and 60%% NG that is ~8 GB a day)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt", "torch", "cuda-graph"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--weights", type=Path, default=None,
                   help="CLIP weights folder the torch / cuda-graph backends rebuild from (default: the local "
                        "Hugging Face cache); onnxruntime and tensorrt run the bundle's graphs and ignore it")
    p.add_argument("--threshold", type=float, default=None, help="override the bundle's calibrated threshold")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames (>= 1)")
    p.add_argument("--loop", action="store_true", help="restart files and folders at their end")
    p.add_argument("--example-config", action="store_true",
                   help="print a commented station.yaml with every key, and exit")
    p.add_argument("--example-service", action="store_true",
                   help="print a systemd unit that runs the station as a service, and exit")
    p.add_argument("--check", action="store_true",
                   help="commissioning: open the bundle, sinks, source and describer, judge one real frame, "
                        "report each as ok/warn/fail and exit (1 if any failed); writes no event")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..errors import ConfigError
    from ..runtime.config import StationConfig, build_sinks, load_station_config
    from ..runtime.config import EventsConfig, OverlaysConfig, SinksConfig
    from ..runtime.detector import Detector
    from ..runtime.sources import open_source
    from ..runtime.station import Station

    if args.example_config or args.example_service:  # shipped in the package: a wheel has no examples/ folder
        print((EXAMPLE_CONFIG if args.example_config else EXAMPLE_SERVICE).read_text(encoding="utf-8"), end="")
        return 0
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise ConfigError(f"--threshold {args.threshold} is not a finite number: give the score above which a "
                          "part is NG, or leave it out to use the bundle's calibrated one")
    if args.max_frames is not None and args.max_frames < 1:  # 0 or less would judge nothing and exit 0
        raise ConfigError(f"--max-frames {args.max_frames} must be at least 1: the number of frames to judge, "
                          "or leave it out to run until the source ends")
    if args.max_overlays is not None and args.max_overlays < 1:
        raise ConfigError(f"--max-overlays {args.max_overlays} must be at least 1 (leave it out to keep every overlay)")
    if args.station:
        cfg = load_station_config(args.station)
    elif args.bundle and args.source:
        cfg = StationConfig(bundle=args.bundle, source=args.source, backend=args.backend, threads=args.threads,
                            threshold=args.threshold, weights=args.weights, sinks=SinksConfig(
                                events=EventsConfig(path=args.events) if args.events else None,
                                overlays=OverlaysConfig(dir=args.overlays, max_files=args.max_overlays)
                                if args.overlays else None))
    else:
        raise ConfigError("give --station station.yaml, or a BUNDLE and --source URI")
    if args.check:
        return _check(cfg)
    bundle = Bundle.load(cfg.bundle)
    sinks = build_sinks(cfg) + [_PrintSink()]
    describer = None
    if cfg.describer.enabled:  # the LLM runs in its own process; the station never waits for it
        from ..runtime.describer import AsyncDescriber
        describer = AsyncDescriber.from_options(cfg.describer.options, bundle)
        sinks = describer.share(sinks)
    stats = None
    try:
        with Detector(bundle, cfg.backend, threads=cfg.threads, threshold=cfg.threshold,
                      weights=str(cfg.weights) if cfg.weights else None) as det:
            # a bundle that cannot judge a frame stops here, not with an error event for every part
            det.self_check()
            with open_source(cfg.source, loop=args.loop) as source:
                stats = Station(det, source, sinks, queue_size=cfg.queue_size,
                                stats_interval_s=cfg.stats_interval_s,
                                describer=describer).run(max_frames=args.max_frames)
    finally:
        if describer is not None:
            hurry = stats is None or stats.stop_reason == "signal"
            print(f"describer: {close_describer(describer, SIGNAL_DRAIN_S if hurry else None).to_dict()}")
    print(stats.summary())
    if stats.stop_reason == "source_error":  # a non-zero status: a service manager restarts the station
        print(f"the run ended because the source gave up: {stats.source_error}")
        return 1
    return 0


def _check(cfg: Any) -> int:
    from ..runtime.preflight import FAIL, WARN, Preflight

    print(f"checking station {cfg.station_id} ({cfg.path or 'command line'}), backend {cfg.backend}")
    checks = Preflight(cfg).run()
    for c in checks:
        print(f"{c.status.upper():4} {c.name}: {c.detail}")
    failed = [c.name for c in checks if c.status == FAIL]
    warned = [c.name for c in checks if c.status == WARN]
    if failed:
        print(f"{len(failed)} check(s) failed ({', '.join(dict.fromkeys(failed))}): fix them before the line starts")
    elif warned:
        print(f"ready, with {len(warned)} warning(s) ({', '.join(dict.fromkeys(warned))}): the station runs, but read them")
    else:
        print("ready: every check passed")
    return 1 if failed else 0


def close_describer(describer: Any, drain_timeout_s: Any) -> Any:
    """`describer.close` with SIGINT/SIGTERM caught: a signal while it drains stops the waiting,
    and every part still queued gets a "failed" record instead of none; the exit status stays 0."""
    def on_signal(_signum: int, _frame: Any) -> None:
        describer.abort_drain()

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: leave the handlers alone
            pass
    try:
        return describer.close(drain_timeout_s=drain_timeout_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class _PrintSink:
    """One line per NG part or error on the console."""

    errors = 0

    def write(self, verdict, frame) -> None:
        if verdict.error:
            print(f"frame {verdict.frame_id}: {verdict.error}")
        elif verdict.anomalous:
            print(f"NG frame {verdict.frame_id}: score {verdict.score:.3f} >= {verdict.threshold:.3f}, "
                  f"{len(verdict.regions)} region(s)")

    def close(self) -> None:
        pass
