"""`iadgpt run`: the station loop, from a station.yaml or from a bundle and a source URI."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="inspect a camera/file/stream: verdict per frame, events, overlays, MQTT")
    p.add_argument("bundle", nargs="?", type=Path, help="bundle folder (or use --station)")
    p.add_argument("--station", type=Path, help="station.yaml (see examples/station.yaml)")
    p.add_argument("--source", help="frame source URI: file, folder, glob, /dev/video0, 0, rtsp://, gst:..., csi://0, synthetic://part")
    p.add_argument("--events", type=Path, help="JSONL event log")
    p.add_argument("--overlays", type=Path, help="folder for NG overlay images")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt", "torch", "cuda-graph"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--weights", type=Path, default=None,
                   help="CLIP weights folder the torch / cuda-graph backends rebuild from (default: the local "
                        "Hugging Face cache); onnxruntime and tensorrt run the bundle's graphs and ignore it")
    p.add_argument("--threshold", type=float, default=None, help="override the bundle's calibrated threshold")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--loop", action="store_true", help="restart files and folders at their end")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..errors import ConfigError
    from ..runtime.config import StationConfig, build_sinks, load_station_config
    from ..runtime.config import EventsConfig, OverlaysConfig, SinksConfig
    from ..runtime.detector import Detector
    from ..runtime.sources import open_source
    from ..runtime.station import Station

    if args.station:
        cfg = load_station_config(args.station)
    elif args.bundle and args.source:
        cfg = StationConfig(bundle=args.bundle, source=args.source, backend=args.backend, threads=args.threads,
                            threshold=args.threshold, weights=args.weights, sinks=SinksConfig(
                                events=EventsConfig(path=args.events) if args.events else None,
                                overlays=OverlaysConfig(dir=args.overlays) if args.overlays else None))
    else:
        raise ConfigError("give --station station.yaml, or a BUNDLE and --source URI")
    bundle = Bundle.load(cfg.bundle)
    sinks = build_sinks(cfg) + [_PrintSink()]
    describer = None
    if cfg.describer.enabled:  # the LLM runs in its own process; the station never waits for it
        from ..runtime.describer import AsyncDescriber
        describer = AsyncDescriber.from_options(cfg.describer.options, bundle)
        sinks = describer.share(sinks)
    try:
        with Detector(bundle, cfg.backend, threads=cfg.threads, threshold=cfg.threshold,
                      weights=str(cfg.weights) if cfg.weights else None) as det, \
                open_source(cfg.source, loop=args.loop) as source:
            stats = Station(det, source, sinks, queue_size=cfg.queue_size, stats_interval_s=cfg.stats_interval_s,
                            describer=describer).run(max_frames=args.max_frames)
    finally:
        if describer is not None:
            print(f"describer: {describer.close()}")
    print(stats.summary())
    return 0


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
