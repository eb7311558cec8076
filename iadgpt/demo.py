"""`iadgpt demo`: the whole product on a fresh machine, with no data and no download.

Builds (once, cached) a bundle from EfficientNet-Lite0 and synthetic normal parts, fits a
threshold on held-apart synthetic normals scored by the same backend the station runs, then runs
the station loop on a synthetic stream with known defects and reports recall and false alarms.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import cv2
import numpy as np

from . import __version__
from .bundle import Bundle, swap_into_place
from .errors import BundleError, ConfigError
from .signals import sigterm_as_interrupt
from .staging import staging_dir
from .runtime.synthetic import SyntheticProduct

log = logging.getLogger(__name__)

DEMO_KIND = "part"
DEMO_SIZE = 256
TRAIN_SEED, HOLDOUT_SEED, STREAM_SEED = 101, 202, 303
TRAIN_IMAGES, HOLDOUT_IMAGES = 30, 60
DEMO_CORESET = 0.1
DEMO_TARGET_FRR = 0.02  # the lowest rate 60 held-out normals can promise is 1/61 (see calibration/thresholds.py)
DEMO_BACKENDS = ("onnxruntime", "torch", "cuda-graph")  # tensorrt needs engines built for the GPU (`iadgpt build`)
BUILD_PREFIX = ".demo-build-"  # a build's staging folder inside the cache
OUTPUTS = ("events.jsonl", "overlays", "summary.json")  # what a demo run writes into --out


def cache_dir() -> Path:
    """Where derived artifacts live: $IADGPT_CACHE, else $XDG_CACHE_HOME/iadgpt, else ~/.cache/iadgpt."""
    if os.environ.get("IADGPT_CACHE"):
        return Path(os.environ["IADGPT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "iadgpt"


def check_backend(backend: str) -> None:
    if backend not in DEMO_BACKENDS:
        raise ConfigError(f"--backend {backend!r}: the demo runs on {', '.join(DEMO_BACKENDS)} (TensorRT needs "
                          "engines built for the GPU: `iadgpt build` a bundle, then `iadgpt run`)")


def demo_bundle(backend: str = "onnxruntime", threads: Optional[int] = None, rebuild: bool = False,
                progress: bool = True) -> Bundle:
    """The cached demo bundle, built and calibrated on first use.

    Built and calibrated in a staging folder of the cache and swapped in when complete: a station or
    a second demo never sees a bundle without thresholds, and an interrupted build leaves only a
    staging folder, swept by a later build."""
    check_backend(backend)  # also keeps the cache path to names we chose
    path = cache_dir() / f"demo-{DEMO_KIND}-{backend}-v{__version__}"
    if not rebuild:
        try:
            bundle = Bundle.load(path)
            if bundle.thresholds.get("image"):
                log.info("using cached demo bundle %s", path)
                return bundle
        except BundleError as exc:
            if path.exists():
                log.warning("rebuilding the demo bundle: %s", exc)
    from .export.bundle_export import export_bundle  # workstation side: torch

    root = _writable_cache(path.parent)
    product = SyntheticProduct(kind=DEMO_KIND, size=DEMO_SIZE, seed=TRAIN_SEED, defect_rate=0.0)
    with sigterm_as_interrupt(), staging_dir(root, BUILD_PREFIX) as tmp:
        train = Path(tmp) / "train"
        train.mkdir()
        for i in range(TRAIN_IMAGES):
            cv2.imwrite(str(train / f"good_{i:03d}.png"), cv2.cvtColor(product.sample(i).image, cv2.COLOR_RGB2BGR))
        bundle, _ = export_bundle("efficientnet-lite0", train, Path(tmp) / "bundle", shots=0, coreset=DEMO_CORESET,
                                  progress=progress)
        fit_demo_threshold(bundle, backend, threads)
        if path.is_symlink() or path.is_file():  # our own name in our own cache: whatever broke it goes
            path.unlink()
        elif path.is_dir() and not (path / "manifest.json").is_file():
            shutil.rmtree(path)
        swap_into_place(bundle.path, path)
    return Bundle.load(path)


def _writable_cache(root: Path) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the demo cache {root} ({exc.strerror or exc}); set IADGPT_CACHE to a "
                          "writable folder") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"the demo cache {root} is not writable by this user; set IADGPT_CACHE to a writable "
                          "folder")
    return root


def fit_demo_threshold(bundle: Bundle, backend: str, threads: Optional[int]) -> float:
    """Image and region thresholds from held-apart synthetic normals, scored on the backend that will run."""
    from .calibration.thresholds import fit_image_threshold, fit_pixel_threshold
    from .runtime.detector import Detector
    from .runtime.preprocess import to_batch

    holdout = SyntheticProduct(kind=DEMO_KIND, size=DEMO_SIZE, seed=HOLDOUT_SEED, defect_rate=0.0)
    detector = Detector(bundle, backend, threads=threads, threshold=float("inf"))
    scores, maps = [], []
    with detector:
        for start in range(0, HOLDOUT_IMAGES, 8):
            images = [holdout.sample(i).image for i in range(start, min(start + 8, HOLDOUT_IMAGES))]
            m, s, _ = detector.score_batch(to_batch(images, bundle.input_spec))
            scores.append(s)
            maps.append(m)
    image = fit_image_threshold(np.concatenate(scores), DEMO_TARGET_FRR)
    pixel = fit_pixel_threshold(np.concatenate(maps), image_threshold=image.value)
    precision = str(bundle.graphs["encoder"].get("precision", "fp32"))
    for rec in (image, pixel):
        rec.backend, rec.precision = backend, precision
    image.params["images"] = f"synthetic {DEMO_KIND} seed {HOLDOUT_SEED}"
    bundle.update_manifest(thresholds={"image": image.to_manifest(), "pixel": pixel.to_manifest()})
    log.info("demo threshold %.4f from %d held-apart normals", image.value, image.n_images)
    return image.value


@dataclass
class GroundTruthSink:
    """Tallies verdicts against the synthetic stream's known defects and reports NG parts."""

    on_flag: Optional[Callable[[str], None]] = None
    errors: int = 0
    tp: int = 0
    fn: int = 0
    fp: int = 0
    tn: int = 0
    flagged: int = 0
    judged_latency_ms: list = field(default_factory=list)

    def write(self, verdict, frame) -> None:
        if verdict.anomalous is None:
            return
        defect = (frame.meta or {}).get("defect_type") if frame is not None else None
        self.judged_latency_ms.append(sum(v for k, v in verdict.timings_ms.items() if k not in ("capture_wait", "total")))
        if verdict.anomalous:
            self.flagged += 1
            if self.on_flag:
                where = verdict.regions[0].centroid if verdict.regions else None
                at = f" at x={where[0]:.0f} y={where[1]:.0f}" if where else ""
                truth = f"(truth: {defect or 'good part'})"
                self.on_flag(f"NG frame {verdict.frame_id}: score {verdict.score:.3f} > {verdict.threshold:.3f}"
                             f"{at}, {len(verdict.regions)} region(s) {truth}")
        if defect:
            self.tp += bool(verdict.anomalous)
            self.fn += not verdict.anomalous
        else:
            self.fp += bool(verdict.anomalous)
            self.tn += not verdict.anomalous

    def close(self) -> None:
        pass


def _prepare_out(out: Path) -> None:
    """`out` is made (or emptied of an earlier demo's output) before minutes of bundle building; a
    folder holding anything else is refused rather than mixed with or overwritten."""
    if str(out) in ("", "."):
        raise ConfigError("--out needs a folder name for events, overlays and summary.json (e.g. demo-out)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the demo writes a folder (events, overlays, summary.json): "
                          "give a new or existing folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create the folder ({exc.strerror or exc}); give a writable path") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} is not writable by this user; give a writable folder")
    present = sorted(p.name for p in out.iterdir())
    foreign = [n for n in present if n not in OUTPUTS and not n.startswith("events.jsonl.")]
    if foreign:
        raise ConfigError(f"--out {out} already holds files the demo did not write ({', '.join(foreign[:3])}"
                          f"{' ...' if len(foreign) > 3 else ''}); give a new or empty folder")
    for name in present:  # an earlier demo's events and overlays would be mixed with this run's
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def run_demo(out: Path, frames: int = 200, fps: float = 20.0, backend: str = "onnxruntime",
             threads: Optional[int] = None, on_flag: Optional[Callable[[str], None]] = None,
             rebuild: bool = False, describer: Optional[Any] = None) -> dict:
    """Build/calibrate (cached), run the station on a synthetic stream, write DIR/summary.json.

    `describer`: an `iadgpt.runtime.describer.AsyncDescriber`; flagged parts are described off the
    loop and the records appended to their events (it is closed, queue drained, at the end).
    """
    from .runtime.detector import Detector
    from .runtime.sinks import JsonlSink, OverlaySink
    from .runtime.sources import open_source
    from .runtime.station import Station

    # Checked before the bundle is built (minutes on a fresh cache): 0 frames would write a summary
    # with NaN latencies, and a file in the way of `out` would fail only then.
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ConfigError(f"--frames {frames!r}: give the number of synthetic parts to inspect, an integer >= 1")
    if not math.isfinite(fps) or (fps != 0 and fps < 0.1):
        raise ConfigError(f"--fps {fps}: give the camera rate in frames per second (>= 0.1), or 0 for an unpaced "
                          "stream (the station judges what it can and drops the rest)")
    check_backend(backend)
    _prepare_out(out)
    bundle = demo_bundle(backend, threads, rebuild=rebuild)
    truth = GroundTruthSink(on_flag=on_flag)
    sinks = [OverlaySink(out / "overlays"), JsonlSink(out / "events.jsonl"), truth]
    uri = f"synthetic://{DEMO_KIND}?seed={STREAM_SEED}&size={DEMO_SIZE}&defect_rate=0.3&count={frames}&fps={fps}"
    if describer is not None:
        sinks = describer.share(sinks)  # their close waits for the describer's last record
    with Detector(bundle, backend, threads=threads) as detector, open_source(uri) as source:
        stats = Station(detector, source, sinks, stats_interval_s=30.0, describer=describer).run()
    described = describer.close().to_dict() if describer is not None else None
    lat = np.array(truth.judged_latency_ms)
    p50, p99 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if lat.size else (None, None)  # no NaN in JSON
    summary = {
        "frames": stats.frames, "judged": stats.judged, "flagged": truth.flagged,
        # no rate over zero parts (a 1-frame run has no good part): null, not 0 %
        "recall": truth.tp / (truth.tp + truth.fn) if truth.tp + truth.fn else None,
        "false_alarm_rate": truth.fp / (truth.fp + truth.tn) if truth.fp + truth.tn else None,
        "defective": truth.tp + truth.fn, "good": truth.fp + truth.tn, "dropped": stats.dropped, "errors": stats.errors,
        "latency_ms": {"p50": p50, "p99": p99},
        "capture_to_verdict_ms": {"p50": stats.latency_p50_ms, "p99": stats.latency_p99_ms},
        "fps": stats.fps, "backend": backend, "threshold": bundle.thresholds["image"]["value"],
        "bundle": str(bundle.path), "events": str(out / "events.jsonl"), "overlays": str(out / "overlays"),
    }
    if described is not None:
        summary["describer"] = described
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
