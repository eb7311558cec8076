"""Bundle + engines -> one `Verdict` per frame: the station's fast path.

Preprocessing follows the bundle's input spec (shared with evaluation and calibration through
`preprocess.py`), the encoder and scorer graphs run on the chosen backend, and regions come from
the thresholded map at the network resolution, scaled back to frame pixels. The frame-sized map
is only made for NG frames (overlays need it; OK frames do not pay for it).

Backend "cuda-graph" hands the frame itself to the GPU fast path (`cuda_graph.py`: resize,
encoder and scorer replayed as one CUDA graph), rebuilt from the bundle and checked against its
ONNX graphs when opened; torch is imported only then.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, ConfigError, EngineError, IadGptError, SourceError
from .engines import Engine, OrtEngine
from .preprocess import batch_to_pixels, encoder_input, pixel_channels, to_batch, to_pixels, to_rgb
from .sources import Frame
from .verdict import Region, Verdict

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt", "torch", "cuda-graph")


_TRT_PREFERENCE = ("int8", "fp16", "fp32")


def open_bundle_engines(bundle: Bundle, backend: str = "onnxruntime", *, provider: str = "cpu",
                        threads: Optional[int] = None, encoder_role: str = "encoder",
                        precision: Optional[str] = None, weights: Optional[str] = None) -> tuple[Engine, Engine]:
    """(encoder, scorer) engines of a bundle on an explicitly chosen backend; never a fallback.

    onnxruntime runs the bundle's graphs on `provider`; tensorrt loads engines built into the
    bundle by `iadgpt build` for this GPU and TensorRT version (`precision` picks one when
    several); torch rebuilds the reference modules (workstation side, imports torch).
    """
    name = str(backend).lower()
    if name in ("onnxruntime", "ort"):
        encoder = OrtEngine(bundle.graph_path(encoder_role), provider=provider, threads=threads,
                            precision=bundle_precision(bundle, encoder_role))
        with _closing_on_error(encoder):
            return encoder, OrtEngine(bundle.graph_path("scorer"), provider=provider, threads=threads)
    if name in ("tensorrt", "trt"):
        encoder = _trt_engine(bundle, encoder_role, precision)
        with _closing_on_error(encoder):  # `precision` is the encoder's; scorer engines are fp16
            return encoder, _trt_engine(bundle, "scorer", None)
    if name == "torch":
        from ..export.torch_backend import torch_engines  # torch only when asked for
        return torch_engines(bundle, threads, weights)
    raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


class _closing_on_error:
    """Close an engine already opened when opening its partner fails."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.engine.close()


def _trt_engine(bundle, role: str, precision: Optional[str]):
    """The bundle's TensorRT engine for `role` that runs on this host (TensorRT version + GPU)."""
    from .tensorrt_engine import TensorRTEngine

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise EngineError("TensorRT is not installed here (`pip install iadgpt[trt]` on an NVIDIA GPU host); "
                          "evaluate with --backend onnxruntime instead") from None
    graphs = bundle.graphs
    entries = [(k, e) for k, e in bundle.engines.items()
               if e.get("role") == role and (precision is None or e.get("precision") == precision)]
    if not entries:
        raise EngineError(f"bundle {bundle.path} has no TensorRT {precision or ''} engine for the {role}; build it "
                          f"on this station with `iadgpt build {bundle.path} --precision {precision or 'fp16'}`")
    entries.sort(key=lambda ke: _TRT_PREFERENCE.index(ke[1].get("precision")) if ke[1].get("precision")
                 in _TRT_PREFERENCE else len(_TRT_PREFERENCE))
    problems = []
    for key, entry in entries:
        source = graphs.get(entry.get("source_graph", role), {})
        try:
            return TensorRTEngine(bundle.engine_path(key), expected_onnx_sha256=source.get("sha256"))
        except EngineError as exc:
            problems.append(str(exc))
    raise EngineError(f"none of the TensorRT engines for the {role} in {bundle.path} runs here: "
                      + " | ".join(problems))


def bundle_precision(bundle: Bundle, role: str = "encoder") -> str:
    return str(bundle.graphs.get(role, {}).get("precision", "fp32"))


class Detector:
    """Judges frames with a bundle; `threshold` overrides the bundle's calibrated one.

    `precision` picks among TensorRT engines, `weights` is the CLIP weights folder the torch and
    cuda-graph backends rebuild from; both are ignored by onnxruntime, which runs the bundle's
    graphs. `device` is where cuda-graph runs ("cuda", "cuda:N"; "cpu" runs the same modules
    eagerly, for tests).
    """

    def __init__(self, bundle: Bundle, backend: str = "onnxruntime", *, threads: Optional[int] = None,
                 provider: str = "cpu", threshold: Optional[float] = None, encoder_role: str = "encoder",
                 precision: Optional[str] = None, weights: Optional[str] = None, min_region_px: int = 4,
                 device: Optional[str] = None):
        self.bundle = bundle
        self.backend = backend
        self.spec = bundle.input_spec
        self.fast_path: Optional[Any] = None  # the cuda-graph engine: frames in, map + score out
        if str(backend).lower() == "cuda-graph":
            from .torch_cuda_engine import open_cuda_graph_engine  # torch only when asked for

            self.fast_path = open_cuda_graph_engine(bundle, weights=weights, device=device or "cuda",
                                                    threads=threads)
            self.encoder = self.scorer = None
            self.precision = str(self.fast_path.precision)
        else:
            self.encoder, self.scorer = open_bundle_engines(bundle, backend, provider=provider, threads=threads,
                                                            encoder_role=encoder_role, precision=precision,
                                                            weights=weights)
            self.precision = str(self.encoder.precision or bundle_precision(bundle, encoder_role))
        # an integer-input INT8 encoder reads uint8 (B, H, W, C) pixels (preprocess.to_pixels)
        self.pixel_channels = None if self.encoder is None else pixel_channels(
            self.encoder.input_dtypes.get("image"), self.encoder.input_shapes.get("image"))
        # reference arrays fed next to the features (a memory bank, text embeddings; none for a decoder)
        self.references = {name: np.ascontiguousarray(bundle.array(array), dtype=np.float32)
                           for name, array in bundle.scorer.get("references", {}).items()}
        self.threshold, self.pixel_threshold = self._thresholds(threshold)
        self.min_region_px = int(min_region_px)
        # keep a flagged frame's encoder features on its Verdict (the describer's bridge reads them)
        self.keep_features = False
        # where a capture should put frames: the fast path's pinned memory, uploaded without a host
        # copy (the station hands it to its source); None for the other backends
        self.frame_buffer: Optional[Callable[[Sequence[int]], np.ndarray]] = (
            self.fast_path.frame_buffer if self.fast_path is not None else None)

    def _thresholds(self, override: Optional[float]) -> tuple[float, float]:
        th = self.bundle.thresholds
        if override is not None:
            if np.isnan(override):  # `score >= nan` is never true: every part would pass
                raise ConfigError("threshold nan is not a number: give the score above which a part is NG, "
                                  "or leave it out to use the bundle's calibrated one")
            # +inf judges nothing NG: evaluation and calibration score frames that way, on purpose
            pixel = float(th.get("pixel", {}).get("value", override))
            return float(override), min(pixel, float(override))
        image = th.get("image")
        if not image:
            raise BundleError(f"bundle {self.bundle.path} has no threshold yet: run `iadgpt calibrate "
                              f"{self.bundle.path} --normal DIR` or pass --threshold")
        fitted = (image.get("backend"), image.get("precision"))
        if fitted != (self.backend, self.precision) and None not in fitted:
            raise BundleError(f"the threshold in {self.bundle.path} was fitted on {fitted[0]}/{fitted[1]}, but this "
                              f"station runs {self.backend}/{self.precision}: run `iadgpt calibrate "
                              f"{self.bundle.path} --backend {self.backend}` (scores differ across backends and precisions)")
        value = float(image["value"])
        pixel = float(th.get("pixel", {}).get("value", value))  # finite: Bundle.load checks
        return value, min(pixel, value)

    def score_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """(maps (B, H, W), scores (B,), stage timings in ms) for a `to_batch` batch (or, for an
        integer-input encoder, `to_pixels` pixels)."""
        maps, scores, timings, _ = self._score(batch)
        self._check_finite(maps, scores)
        return maps, scores, timings

    def _check_finite(self, maps: np.ndarray, scores: np.ndarray) -> None:
        """EngineError for a NaN/inf score or map: `score >= threshold` is False for NaN, so the part
        would pass (and a threshold fitted on such scores means nothing)."""
        if np.isfinite(scores).all() and np.isfinite(maps).all():
            return
        what = "score" if not np.isfinite(scores).all() else "anomaly map"
        raise EngineError(f"the {self.backend} engines gave a non-finite {what} (NaN or infinity): the references "
                          f"or graphs of {self.bundle.path} hold broken numbers (or an fp16 engine overflows); check "
                          f"it with `iadgpt inspect {self.bundle.path}` and re-export it with `iadgpt export`")

    def self_check(self) -> None:
        """Judge one blank frame as the station does, before the first part; BundleError naming why
        when this bundle cannot judge frames here (graphs that do not fit each other, the references or
        the input size, an unknown resize mode, a NaN score). `iadgpt inspect` and `iadgpt run` call
        it: one frame at start instead of an error event for every part."""
        h, w = self.spec.size
        # larger than the input and not square, so the resize (and its mode) runs as for a camera frame
        probe = Frame(np.zeros((h + h // 2 + 1, 2 * w + 1, 3), np.uint8), -1, time.time(), "self-check")
        keep, self.keep_features = self.keep_features, False
        try:
            self.detect(probe)
        except IadGptError as exc:
            fix = "" if "re-export" in str(exc) else "; re-export the bundle"
            raise BundleError(f"bundle {self.bundle.path} cannot judge a frame on {self.backend}: {exc}{fix}") from exc
        except Exception as exc:  # noqa: BLE001 - the runtime's own errors: the graphs do not fit together
            raise BundleError(f"bundle {self.bundle.path} cannot judge a frame on {self.backend}: "
                              f"{type(exc).__name__}: {exc}; re-export the bundle") from exc
        finally:
            self.keep_features = keep

    def _score(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float], dict[str, np.ndarray]]:
        if self.fast_path is not None:  # one frame per call, as on the line: same graph, same numerics
            parts = [self._fast(f[None]) for f in batch_to_pixels(batch)]
            return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    {"fast_path": sum(p[2]["fast_path"] for p in parts)}, {})
        t0 = time.perf_counter()
        feats = self.encoder.run({"image": encoder_input(batch, self.pixel_channels)})
        t1 = time.perf_counter()
        out = self.scorer.run({**feats, **self.references})
        t2 = time.perf_counter()
        return out["anomaly_map"], out["score"], {"encoder": (t1 - t0) * 1e3, "scorer": (t2 - t1) * 1e3}, feats

    def _fast(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float], dict[str, np.ndarray]]:
        """(B, H, W, 3) uint8 RGB frames through the cuda-graph engine (it resizes on the device)."""
        assert self.fast_path is not None
        t0 = time.perf_counter()
        out = self.fast_path.run({"frame": frames})
        return out["anomaly_map"], out["score"], {"fast_path": (time.perf_counter() - t0) * 1e3}, {}

    def detect(self, frame: Frame) -> Verdict:
        if frame.image is None:
            raise SourceError(str(frame.meta.get("error", "frame without pixels")))
        t0 = time.perf_counter()
        if self.fast_path is not None:
            batch = to_rgb(frame.image)[None]
            t1 = time.perf_counter()
            maps, scores, timings, feats = self._fast(batch)
        else:
            batch = (to_pixels([frame.image], self.spec, self.pixel_channels) if self.pixel_channels
                     else to_batch([frame.image], self.spec))
            t1 = time.perf_counter()
            maps, scores, timings, feats = self._score(batch)
        t2 = time.perf_counter()
        self._check_finite(maps, scores)
        amap, score = maps[0], float(scores[0])
        anomalous = score >= self.threshold
        frame_hw = frame.image.shape[:2]
        regions = self.regions(amap, frame_hw) if anomalous else []
        full_map = cv2.resize(amap, (frame_hw[1], frame_hw[0]), interpolation=cv2.INTER_LINEAR) if anomalous else None
        features = None
        if anomalous and self.keep_features:  # the describer's bridge reads them; the fast path copies them now
            features = list(feats.values()) if self.fast_path is None else self.fast_path.last_features()
        t3 = time.perf_counter()
        timings.update(preprocess=(t1 - t0) * 1e3, postprocess=(t3 - t2) * 1e3)
        return Verdict(frame_id=frame.frame_id, timestamp=frame.timestamp, score=score, threshold=self.threshold,
                       anomalous=anomalous, regions=regions, timings_ms=timings, source=frame.source,
                       frame_shape=tuple(frame.image.shape), anomaly_map=full_map,
                       features=features,
                       # what drew the regions: the describer measures its facts with the same threshold
                       extra={"pixel_threshold": self.pixel_threshold} if anomalous else {})

    def regions(self, amap: np.ndarray, frame_hw: tuple[int, int]) -> list[Region]:
        """Connected areas above the pixel threshold, largest first, in frame pixels."""
        mask = (amap >= self.pixel_threshold).astype(np.uint8)
        n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        sy, sx = frame_hw[0] / amap.shape[0], frame_hw[1] / amap.shape[1]
        out = []
        for i in range(1, n):
            x, y, w, h, area = stats[i]
            if area < self.min_region_px:
                continue
            peak = float(amap[labels == i].max())
            x1 = min(int(np.ceil((x + w) * sx)), frame_hw[1])  # float scale can overshoot the edge by one
            y1 = min(int(np.ceil((y + h) * sy)), frame_hw[0])
            out.append(Region(box=(int(x * sx), int(y * sy), x1, y1),
                              area_px=int(round(area * sx * sy)), peak=peak,
                              centroid=(float(centroids[i][0] * sx), float(centroids[i][1] * sy))))
        return sorted(out, key=lambda r: -r.area_px)

    def close(self) -> None:
        for engine in (self.encoder, self.scorer, self.fast_path):
            if engine is not None:
                engine.close()

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
