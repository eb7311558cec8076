"""GPU fast path: a uint8 frame in host memory -> anomaly map + score in host memory, one CUDA graph.

Per input shape (batch, height, width) the whole fast path is captured once and replayed per frame:

    host frame --copy--> pinned buffer --H2D--> device uint8 --resize--> round --normalise--> encoder
      --> scorer --> map + score --D2H--> pinned outputs            (one synchronize, at the very end)

Everything after the upload, up to the pinned outputs, is one `torch.cuda.CUDAGraph` replay: no
Python, no launch gaps, no host sync inside. The upload is one asynchronous copy queued just
before the replay, so that it can read the frame wherever it already sits in pinned memory.
Static buffers are allocated per shape before capture; a frame of a new shape captures a new
graph (up to `max_graphs`, least recently used evicted).

Where the frame comes from decides what the host does per frame:
- an ordinary (pageable) numpy array: copied into the shape's pinned buffer first (`host_copy`);
- an array in pinned memory, e.g. one from `frame_buffer(shape)`, which the station's capture
  converts camera frames into (BGR -> RGB, a copy the capture makes anyway): uploaded from where
  it is, no host copy. This is how the station feeds the fast path (`sources.use_frame_buffers`);
- `input_buffer(shape)`: the shape's own pinned buffer, written by the caller: no host copy.

Numerics (what "parity" means here, see `PARITY`):
- Resize "exact" (default) is OpenCV's INTER_AREA (INTER_LINEAR when enlarging, like
  `runtime.preprocess`) expressed as separable taps computed on the host in float64, applied on
  the GPU in float32 and rounded half-up to integers, because the CPU path feeds the encoder
  uint8 pixels. Shrinking (the station case: camera frames are larger than 224/336 px) equals
  cv2.resize except at exact .5 ties, where cv2's tie rule differs between its code paths: at most
  1 grey level on < 0.2% of pixels for 1080p -> 336 (tests). Enlarging differs by 1 grey level on
  ~12% of pixels: cv2 rounds its uint8 bilinear in fixed point, differently across versions.
  "antialias" (F.interpolate bilinear, antialias=True: a triangle filter twice as wide as area) and
  "area" (adaptive average pooling: whole boundary pixels) are single-kernel alternatives; on
  clip-tiny (150 -> 64 px, fp32) they move the map by 4.6% / 7.9% of its range at worst (0.9% /
  1.4% mean) against 1e-6 for "exact": the filter, not fp16 (0.09%), dominates parity.
- The encoder runs in fp16 (fp32 accumulation in every GEMM and in SDPA); scorer GEMMs take fp16
  operands, everything after them is fp32 (see `torch_cuda_engine.FusedTextScorer` and
  `FusedBankScorer`).

torch is imported lazily: `iadgpt.runtime` stays importable on a station without torch.
"""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ..bundle import InputSpec
from ..errors import EngineError

log = logging.getLogger(__name__)

RESIZE_MODES = ("exact", "antialias", "area")
# How a frame that is not already in the pinned input buffer gets there: "numpy" (default: np.copyto
# on the calling thread) or "torch" (Tensor.copy_ on torch's CPU pool, one thread per core). Measured
# on the lent H200 host, 16 cores, 6 MB frame (benchmarks/host_copy.py; results/h200-2026-11-28,
# run 5): quiet, torch 0.03 ms p50 vs numpy 0.5 ms; with ONE other process spinning on one core,
# torch 8.0 ms p50 (its 16 threads wait for the descheduled one, a scheduler time slice per copy)
# while numpy stays at 0.5 / 0.7 ms (p50 / p99). A station always has neighbours (camera decode,
# the describer's LLM on the CPU right after a flagged part), so the default is the copy that does not
# wait for anyone: ViT-H/14 fast path p99 3.09-3.34 ms in four runs, with or without busy neighbours,
# against 2.6-2.7 ms on an idle host and 9.1-9.5 ms on a busy one with torch's pool (runs 4-5).
# Frames in pinned memory (`frame_buffer`, where the station's capture converts them; `input_buffer`)
# skip the copy altogether: ViT-L/14@336 p99 2.20 ms vs 2.86 copied, idle or busy (run 7).
# "direct": no staging in our buffer: the CUDA driver uploads the pageable frame itself (it stages
# through its own pinned buffers on the calling thread). Measured no faster than "numpy" (run 7,
# variant graph-fused-compile-directcopy: ViT-L p99 3.01 vs 2.86 ms), so not the default.
HOST_COPIES = ("numpy", "torch", "direct")
# torch.compile modes that do not capture CUDA graphs themselves (those cannot nest inside ours)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

# Agreement of this path with the CPU onnxruntime fp32 path on the same frames, as checked by the
# tests and by benchmarks/gpu_latency.py. Errors are relative to the reference map's range
# (max - min), so they mean the same for text maps (probabilities) and memory-bank maps (distances).
#   fp32 on CPU (tests, every commit): the same function up to float32 rounding and +-1 grey level
#     at exact resize ties; gated by max_rel <= 2e-3 (observed 1e-6 .. 3e-5).
#   fp16 on CUDA: max_rel <= 0.05, mean_rel <= 0.01, score_rel <= 0.02. fp16 keeps 11 significant bits;
#     through 24-32 residual blocks features drift by ~1e-3 relative, the text head multiplies cosine
#     errors by its logit scale (100) before the softmax, and the NN search may pick a neighbour tied
#     within fp16 rounding. Measured in fp16 on the CPU (same modules, "exact" resize): clip-tiny text
#     0.09% / 0.02% (max / mean), EfficientNet-Lite0 bank (real weights) 1.05% / 0.14%: 5x under the
#     bound; the margin is for depth (ViT-H has 32 blocks), GPU kernels and random weights. The
#     resize filter matters more than fp16: "antialias" alone costs 4.6% / 0.9% (see above).
#   fp8 (opt-in): reported by the benchmark, not gated: FP8 e4m3 keeps 4 significant bits.
PARITY = {
    "fp32": {"max_rel": 2e-3, "mean_rel": 2e-4, "score_rel": 2e-3},
    "fp16": {"max_rel": 0.05, "mean_rel": 0.01, "score_rel": 0.02},
}


def map_parity(maps: np.ndarray, ref_maps: np.ndarray, scores: Optional[np.ndarray] = None,
               ref_scores: Optional[np.ndarray] = None) -> dict[str, float]:
    """How far maps (B, H, W) are from reference maps, relative to each reference map's range.

    max_rel/mean_rel: worst-frame max and mean-over-frames of |map - ref| / (ref.max() - ref.min());
    score_rel: worst |score - ref_score| over the same range; max_abs: plain worst difference.
    NaN anywhere gives inf (never passes).
    """
    got = np.asarray(maps, dtype=np.float64)
    ref = np.asarray(ref_maps, dtype=np.float64)
    if got.shape != ref.shape:
        raise EngineError(f"map shapes differ: {got.shape} vs reference {ref.shape}")
    if got.ndim == 2:
        got, ref = got[None], ref[None]
    flat_ref = ref.reshape(len(ref), -1)
    span = flat_ref.max(axis=1) - flat_ref.min(axis=1)
    span = np.maximum(span, np.maximum(1e-6 * np.abs(flat_ref).max(axis=1), 1e-12))
    diff = np.abs(got - ref).reshape(len(ref), -1)
    if not np.isfinite(got).all():
        return {"max_rel": float("inf"), "mean_rel": float("inf"), "score_rel": float("inf"), "max_abs": float("inf")}
    out = {"max_rel": float((diff.max(axis=1) / span).max()), "mean_rel": float((diff.mean(axis=1) / span).mean()),
           "max_abs": float(diff.max())}
    if scores is not None and ref_scores is not None:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        rs = np.asarray(ref_scores, dtype=np.float64).reshape(-1)
        out["score_rel"] = float((np.abs(s - rs) / span).max()) if np.isfinite(s).all() else float("inf")
    return out


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class FuseOptions:
    """What the fast path fuses beyond a plain graph capture; each flag can be turned off to compare.

    sdpa           CLIP towers are rebuilt as fused ViT blocks: one QKV GEMM per block and
                   F.scaled_dot_product_attention (FlashAttention / cuDNN / memory-efficient kernels
                   on CUDA), only up to the last tapped block. Off: the transformers layers as loaded
                   (eager attention), i.e. the "plain graph".
    fused_scorer   Scoring heads batched over the tapped layers: one projection GEMM for all layers;
                   text maps as sigmoid(upsample(logit difference)) (= the 2-way softmax);
                   memory-bank search as one fp16 GEMM (fp32 accumulation) + argmax, then the exact
                   fp32 distance to the chosen neighbour. Off: the scorer module as is, in fp32.
    channels_last  CNN backbones: NHWC tensors and batch norm folded into the convolutions.
    compile        torch.compile mode for the encoder and the scorer before capture ("default":
                   Triton kernels fuse the norms, activations and residual adds around the cuBLAS
                   GEMMs; "max-autotune-no-cudagraphs" also autotunes GEMMs, minutes); None = no
                   compilation. The resize is not compiled, so a new frame size recaptures
                   without recompiling; a new batch size recompiles (20-25 s for ViT-L on an H200).
    fp8            FP8 (e4m3) GEMMs for the ViT linear layers (Hopper/Ada, compute capability >= 8.9),
                   per-tensor weight scales and static activation scales calibrated on
                   `calibration_frames`. Needs sdpa=True.
    resize         "exact" (OpenCV-equivalent, default), "antialias" or "area" (see the module doc).
    """

    sdpa: bool = True
    fused_scorer: bool = True
    channels_last: bool = True
    compile: Optional[str] = None
    fp8: bool = False
    resize: str = "exact"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise EngineError(f"unknown resize mode {self.resize!r}; choose one of {', '.join(RESIZE_MODES)}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise EngineError(f"unknown torch.compile mode {self.compile!r}; choose one of {', '.join(COMPILE_MODES)} "
                              "or None")
        if self.fp8 and not self.sdpa:
            raise EngineError("fp8=True needs sdpa=True (FP8 replaces the linear layers of the fused ViT blocks)")

    @classmethod
    def for_device(cls, device_type: str) -> "FuseOptions":
        """The defaults (`fuse=None`): the fastest options measured per device. On CUDA the fused
        modules compiled with torch.compile("default") (NVIDIA H200, graph replay ViT-L/14@336
        2.20 -> 1.79 ms, ViT-H/14 2.46 -> 2.21 ms; 20-24 s of compilation once per process and
        batch size); elsewhere uncompiled (CPU runs are for tests)."""
        return cls(compile="default") if device_type == "cuda" else cls()

    @classmethod
    def plain(cls, resize: str = "exact") -> "FuseOptions":
        """No fusion: the modules as loaded, captured as they are (the 'plain graph' baseline)."""
        return cls(sdpa=False, fused_scorer=False, channels_last=False, compile=None, fp8=False, resize=resize)

    @classmethod
    def coerce(cls, value: Union["FuseOptions", Mapping[str, Any], str, None]) -> "FuseOptions":
        if value is None:
            return cls()
        if isinstance(value, FuseOptions):
            return value
        if isinstance(value, str):
            if value == "plain":
                return cls.plain()
            if value in ("fused", "default"):
                return cls()
            raise EngineError(f"unknown fuse preset {value!r}; use 'plain', 'fused' or a FuseOptions")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise EngineError(f"unknown fuse option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(value))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- resize taps (numpy only)


def resize_taps(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV-equivalent 1-D resampling as taps: out[j] = sum_k weights[j, k] * in[index[j, k]].

    mode "area" is cv2.INTER_AREA for shrinking (cv2's computeResizeAreaTab: fractional box
    weights), "bilinear" is cv2.INTER_LINEAR (half-pixel centres, clamped borders). Rows are padded
    with zero weights to the same tap count. float64 weights, int64 indices.
    """
    in_size, out_size = int(in_size), int(out_size)
    if in_size < 1 or out_size < 1:
        raise EngineError(f"cannot resize {in_size} -> {out_size} pixels")
    scale = in_size / out_size
    rows: list[list[tuple[int, float]]] = []
    if mode == "area":
        if in_size < out_size:
            raise EngineError("area resampling only shrinks; use 'bilinear' to enlarge")
        for dx in range(out_size):
            fsx1 = dx * scale
            fsx2 = fsx1 + scale
            cell = min(scale, in_size - fsx1)
            sx1, sx2 = math.ceil(fsx1), math.floor(fsx2)
            sx2 = min(sx2, in_size - 1)
            sx1 = min(sx1, sx2)
            taps = []
            if sx1 - fsx1 > 1e-3:
                taps.append((sx1 - 1, (sx1 - fsx1) / cell))
            taps += [(sx, 1.0 / cell) for sx in range(sx1, sx2)]
            if fsx2 - sx2 > 1e-3:
                taps.append((sx2, min(min(fsx2 - sx2, 1.0), cell) / cell))
            rows.append(taps)
    elif mode == "bilinear":
        for dx in range(out_size):
            fx = (dx + 0.5) * scale - 0.5
            sx = math.floor(fx)
            fx -= sx
            if sx < 0:
                fx, sx = 0.0, 0
            if sx >= in_size - 1:
                fx, sx = 0.0, in_size - 1
            rows.append([(sx, 1.0 - fx), (min(sx + 1, in_size - 1), fx)])
    else:
        raise EngineError(f"resize_taps supports 'area' and 'bilinear', not {mode!r}")
    k = max(len(r) for r in rows)
    index = np.zeros((out_size, k), dtype=np.int64)
    weights = np.zeros((out_size, k), dtype=np.float64)
    for j, taps in enumerate(rows):
        for t, (src, w) in enumerate(taps):
            index[j, t], weights[j, t] = src, w
        index[j, len(taps):] = taps[-1][0]  # zero-weight padding points at a valid pixel
    return index, weights


def cv2_equivalent_mode(in_hw: Sequence[int], out_hw: Sequence[int], resize: str) -> str:
    """The interpolation `runtime.preprocess.resize_frame` applies: area only when nothing is enlarged."""
    if resize == "area":
        return "area" if in_hw[0] >= out_hw[0] and in_hw[1] >= out_hw[1] else "bilinear"
    if resize == "bilinear":
        return "bilinear"
    raise EngineError(f"the GPU fast path reproduces resize modes 'area' and 'bilinear' of the bundle's input "
                      f"spec, not {resize!r}; re-export the bundle with resize='area'")


# --------------------------------------------------------------------------- graph backends


class _Replayable:
    """What a backend's `capture` returns: `replay()` runs the captured work again."""

    def replay(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class _EagerBackend:
    """No capture: `replay` calls the function (CPU, or CUDA with graphs=False for comparison)."""

    name = "eager"

    def __init__(self, torch: Any, device: Any) -> None:
        self.torch, self.device = torch, device
        self.pin = device.type == "cuda"

    def empty_host(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def is_pinned(self, tensor: Any) -> bool:
        """Whether the GPU can read this host memory directly (page-locked: cudaHostAlloc/Register)."""
        return self.pin and bool(tensor.is_pinned())

    def capture(self, fn: Callable[[], None], warmup: int) -> Any:
        class _Call(_Replayable):
            def replay(self) -> None:
                fn()
        return _Call()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.current_stream(self.device).synchronize()


class _CudaGraphBackend(_EagerBackend):
    """Real capture: warm-up on a side stream (lazy init, cuBLAS/cuDNN handles, autotuning), then
    `torch.cuda.graph` records the work; the graph holds its own memory pool."""

    name = "cuda_graph"

    def capture(self, fn: Callable[[], None], warmup: int) -> Any:
        torch = self.torch
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(max(1, int(warmup))):
                fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph


# --------------------------------------------------------------------------- the pipeline


class _ShapeState:
    """Static buffers and the graph of one input shape."""

    __slots__ = ("shape", "host_in", "host_in_np", "dev_in", "host_map", "host_score", "graph", "taps", "feats")

    def __init__(self) -> None:
        self.graph: Any = None
        self.feats: list[Any] = []  # the encoder outputs of the last replay (the graph's static tensors)


class CudaGraphPipeline:
    """The whole fast path for one backbone + scorer, replayed as one CUDA graph per input shape.

    backbone_module  an `iadgpt.models` Backbone (float NCHW RGB 0..255 in, per-layer maps out; CLIP
                     towers and EfficientNet-Lite0 get fused rebuilds, others run as they are)
    scorer_module    MemoryBankScorer or TextPromptScorer (or any module taking the features then the
                     references, returning (map (B, h, w), score (B,)); a decoder scorer
                     (`reference_free`) takes no references)
    references       the scorer's reference inputs in order, e.g. {"text_embeddings": (2, D)} or
                     {"bank": (M, D)}; arrays or tensors
    input_spec       the bundle's InputSpec (size, mean/std in 0..255 units, resize)
    dtype            encoder precision: torch.float16 (default on CUDA) or torch.float32
    device           "cuda", "cuda:N" or "cpu" (CPU runs the same forward eagerly: for tests)
    fuse             FuseOptions (or "plain" / "fused" / a dict); None = `FuseOptions.for_device`:
                     on CUDA fused + torch.compile, the fastest measured (README, GPU fast path)
    host_copy        how frames in pageable memory reach the GPU: "numpy" (default: one-thread copy
                     into the pinned buffer, a bounded tail), "torch" (torch's pool: faster on an idle
                     host only) or "direct" (the CUDA driver uploads from pageable memory; HOST_COPIES).
                     Frames already in pinned memory (`frame_buffer`, `input_buffer`) are never copied.

    `pipeline(frame)` takes one RGB uint8 (H, W, 3) frame and returns (map, score): the map is
    float32 at the encoder input resolution `input_spec.size` (as `Detector.score_batch` returns
    it; the Detector scales regions to frame pixels), the score a float. `run_batch(frames)` takes
    (B, H, W, 3). Returned arrays are copies, safe to keep. Not thread-safe: one pipeline per
    camera thread. The given modules are not modified (the pipeline works on its own copies).
    """

    def __init__(self, backbone_module: Any, scorer_module: Any,
                 references: Union[Mapping[str, Any], Sequence[Any]], input_spec: Union[InputSpec, Mapping[str, Any]],
                 dtype: Any = None, device: str = "cuda", *,
                 fuse: Union[FuseOptions, Mapping[str, Any], str, None] = None, graphs: Optional[bool] = None,
                 warmup: int = 2, max_graphs: int = 4, calibration_frames: Optional[Sequence[np.ndarray]] = None,
                 host_copy: str = "numpy", _backend: Any = None) -> None:
        try:
            import torch
        except ImportError as exc:
            raise EngineError("the GPU fast path needs torch: `pip install iadgpt[export]` (a CUDA build)") from exc
        from . import torch_cuda_engine as tce

        self._torch, self._tce = torch, tce
        self.spec = input_spec if isinstance(input_spec, InputSpec) else InputSpec.from_dict(input_spec)
        self.size = (int(self.spec.size[0]), int(self.spec.size[1]))
        if len(self.spec.mean) != 3 or len(self.spec.std) != 3 or any(float(s) == 0 for s in self.spec.std):
            raise EngineError(f"input spec needs 3 means and 3 non-zero stds, got {self.spec.mean} / {self.spec.std}; "
                              "re-export the bundle")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise EngineError("device='cuda' but torch sees no CUDA GPU (CPU-only torch build or no driver); "
                                  "install a CUDA build of torch, or use the onnxruntime backend")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.device.type != "cpu":
            raise EngineError(f"unknown device {device!r}; choose 'cuda', 'cuda:N' or 'cpu'")
        self.dtype = dtype if dtype is not None else (torch.float16 if self.device.type == "cuda" else torch.float32)
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise EngineError(f"dtype {self.dtype} not supported; use torch.float16 (GPU), torch.bfloat16 or "
                              "torch.float32")
        self.fuse = FuseOptions.for_device(self.device.type) if fuse is None else FuseOptions.coerce(fuse)
        if self.fuse.resize == "exact":
            cv2_equivalent_mode((1, 1), (1, 1), self.spec.resize)  # refuses modes it cannot reproduce
        if self.fuse.fp8:
            tce.check_fp8_device(torch, self.device)
        self.graphs = (self.device.type == "cuda") if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda" and _backend is None:
            raise EngineError("graphs=True needs a CUDA device; use graphs=False on the CPU")
        self.warmup = int(warmup)
        self.max_graphs = max(1, int(max_graphs))
        if host_copy not in HOST_COPIES:
            raise EngineError(f"unknown host_copy {host_copy!r}; choose one of {', '.join(HOST_COPIES)}")
        self.host_copy = host_copy
        self.captures = 0  # graphs captured so far (recaptures included)
        self._last: Optional[_ShapeState] = None  # the state of the last run_batch (its features)
        self._states: "OrderedDict[tuple[int, ...], _ShapeState]" = OrderedDict()
        if _backend is not None:
            self._backend = _backend
        elif self.graphs:
            self._backend = _CudaGraphBackend(torch, self.device)
        else:
            self._backend = _EagerBackend(torch, self.device)

        mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._mean = mean.to(self.device)
        self._inv_std = (1.0 / std).to(self.device)
        self._channels_last = False
        with torch.no_grad():
            self.encoder, self._channels_last = tce.prepare_backbone(backbone_module, self.fuse, self.dtype,
                                                                     self.device)
            self.scorer = tce.prepare_scorer(scorer_module, self.fuse, self.device, gemm_dtype=self.dtype)
        self._encode: Callable[..., Any] = self.encoder  # torch.compile'd below when fuse.compile is set
        self._score: Callable[..., Any] = self.scorer
        self._ref_names: list[str] = []
        self._refs: list[Any] = []
        self.set_references(references)
        if self.fuse.fp8:
            if not calibration_frames:
                raise EngineError("fp8=True needs calibration_frames=[a few typical (normal) frames] to fix the "
                                  "activation scales; or run without fp8")
            self.calibrate(calibration_frames)
        if self.fuse.compile:  # after the FP8 calibration, which runs the modules eagerly
            self._encode = torch.compile(self.encoder, mode=self.fuse.compile, dynamic=False)
            self._score = torch.compile(self.scorer, mode=self.fuse.compile, dynamic=False)
        log.info("GPU fast path on %s: %s, %s, fuse=%s", self.device, str(self.dtype).replace("torch.", ""),
                 self._backend.name, self.fuse.to_dict())

    # -- references
    def set_references(self, references: Union[Mapping[str, Any], Sequence[Any]]) -> None:
        """Swap the scorer references (new prompts, a new bank). Same shapes: copied into the static
        buffers, the graphs stay valid. New shapes: the graphs are recaptured at the next frame."""
        torch = self._torch
        if isinstance(references, Mapping):
            names, arrays = list(references), list(references.values())
        else:
            arrays = list(references)
            names = [f"reference{i}" for i in range(len(arrays))]
        if not arrays and not getattr(self.scorer, "reference_free", False):
            raise EngineError("the scorer needs its references (text embeddings or a memory bank); got none. "
                              "Pass the bundle's scorer.references arrays")
        tensors = [torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a) for a in arrays]
        with torch.inference_mode():
            prepared = self.scorer.prepare_references(tensors)
        same = len(prepared) == len(self._refs) and all(
            p.shape == r.shape and p.dtype == r.dtype for p, r in zip(prepared, self._refs))
        if same:
            with torch.inference_mode():
                for dst, src in zip(self._refs, prepared):
                    dst.copy_(src)
        else:
            self._refs = prepared
            if self._states:
                log.info("reference shapes changed: dropping %d captured graph(s)", len(self._states))
            self._states.clear()
        self._ref_names = names

    # -- the static computation (pure torch; what each graph replays between its copies)
    def resize(self, frames: Any, taps: Optional[tuple[Any, Any, Any, Any]] = None) -> Any:
        """(B, H, W, 3) uint8 on the device -> (B, 3, h, w) float32 integer-valued 0..255."""
        torch = self._torch
        F = torch.nn.functional
        b, hi, wi, _ = frames.shape
        h, w = self.size
        if (hi, wi) == (h, w):
            return frames.permute(0, 3, 1, 2).float()
        if self.fuse.resize == "exact":
            iy, wy, ix, wx = taps if taps is not None else self._taps((hi, wi))
            ky, kx = iy.shape[1], ix.shape[1]
            x = frames.index_select(2, ix.reshape(-1))  # (B, H, w*kx, 3), still uint8
            x = (x.view(b, hi, w, kx, 3) * wx.view(1, 1, w, kx, 1)).sum(dim=3)  # (B, H, w, 3) float32
            x = x.index_select(1, iy.reshape(-1))  # (B, h*ky, w, 3)
            x = (x.view(b, h, ky, w, 3) * wy.view(1, h, ky, 1, 1)).sum(dim=2)  # (B, h, w, 3)
            x = x.permute(0, 3, 1, 2)
        else:
            x = frames.permute(0, 3, 1, 2).float()
            enlarge = hi < h or wi < w
            if self.fuse.resize == "area" and not enlarge:
                x = F.interpolate(x, size=(h, w), mode="area")
            else:
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=not enlarge)
        return torch.floor(x + 0.5).clamp_(0.0, 255.0)  # the CPU path feeds uint8 pixels: round half up

    def forward(self, frames: Any, taps: Optional[tuple[Any, Any, Any, Any]] = None) -> tuple[Any, Any]:
        """(B, H, W, 3) uint8 device tensor -> (map (B, h, w) float32, score (B,) float32). No host sync."""
        amap, score, _ = self._forward(frames, taps)
        return amap, score

    def _forward(self, frames: Any, taps: Optional[tuple[Any, Any, Any, Any]]) -> tuple[Any, Any, list[Any]]:
        torch = self._torch
        x = (self.resize(frames, taps) - self._mean) * self._inv_std
        x = x.to(self.dtype)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = list(self._encode(x))
        amap, score = self._score(feats, *self._refs)
        return amap.float(), score.float(), feats

    # -- per-shape state and capture
    def _taps(self, in_hw: tuple[int, int]) -> tuple[Any, Any, Any, Any]:
        torch = self._torch
        mode = cv2_equivalent_mode(in_hw, self.size, self.spec.resize)
        iy, wy = resize_taps(in_hw[0], self.size[0], mode)
        ix, wx = resize_taps(in_hw[1], self.size[1], mode)
        dev = self.device
        return (torch.from_numpy(iy).to(dev), torch.from_numpy(wy).float().to(dev),
                torch.from_numpy(ix).to(dev), torch.from_numpy(wx).float().to(dev))

    def _state(self, shape: tuple[int, int, int, int]) -> _ShapeState:
        st = self._states.get(shape)
        if st is not None:
            self._states.move_to_end(shape)
            return st
        torch = self._torch
        while len(self._states) >= self.max_graphs:
            old, _ = self._states.popitem(last=False)
            log.info("evicted the CUDA graph for frames of shape %s (max_graphs=%d)", old, self.max_graphs)
        st = _ShapeState()
        st.shape = shape
        st.host_in = self._backend.empty_host(shape, torch.uint8)
        st.host_in.zero_()
        st.host_in_np = st.host_in.numpy()
        st.dev_in = torch.zeros(shape, dtype=torch.uint8, device=self.device)
        st.host_map = self._backend.empty_host((shape[0],) + self.size, torch.float32)
        st.host_score = self._backend.empty_host((shape[0],), torch.float32)
        st.taps = self._taps((shape[1], shape[2])) if self.fuse.resize == "exact" else None
        t0 = time.perf_counter()
        with torch.inference_mode():
            st.graph = self._backend.capture(lambda: self._body(st), self.warmup)
        self.captures += 1
        self._states[shape] = st
        log.info("captured the fast path for frames of shape %s (%s, %.0f ms)", shape, self._backend.name,
                 (time.perf_counter() - t0) * 1e3)
        return st

    def _body(self, st: _ShapeState) -> None:
        """What the graph replays: from the uploaded frame (`st.dev_in`) to the pinned outputs."""
        blocking = self.device.type != "cuda"
        amap, score, st.feats = self._forward(st.dev_in, st.taps)
        st.host_map.copy_(amap, non_blocking=not blocking)
        st.host_score.copy_(score, non_blocking=not blocking)

    # -- public calls
    def frame_buffer(self, shape: Sequence[int]) -> np.ndarray:
        """A fresh uint8 host array of `shape` in pinned memory (on CUDA) for a capture to write a frame into.

        A frame passed in it is uploaded from where it is, without the host copy into the pipeline's
        own buffer (0.5-0.8 ms for 1080p on one core). Every call gives memory of its own, so the
        frame may be kept (queued, saved, described) as long as needed; when its last view is gone
        the memory goes back to torch's pinned-memory cache and is handed out again (no new
        page-locking per frame). Pinned memory in use is about (frames alive) x (frame size rounded
        up to a power of two by torch's cache: 8 MB for 1080p RGB). Safe to call from the capture
        thread while another thread runs the pipeline. On the CPU an ordinary array."""
        shape = tuple(int(s) for s in shape)
        self._shape4(shape)  # the same shape rules as the frames themselves
        return self._backend.empty_host(shape, self._torch.uint8).numpy()

    def input_buffer(self, shape: Sequence[int]) -> np.ndarray:
        """The pinned host buffer frames of `shape` ((H, W, 3) or (B, H, W, 3)) are read from.

        Write a camera frame straight into it and pass the same array to the pipeline: the host
        copy is then skipped. Its contents are read at the next call only."""
        shape = tuple(int(s) for s in shape)
        buf = self._state(self._shape4(shape)).host_in_np
        return buf if len(shape) == 4 else buf[0]

    @staticmethod
    def _shape4(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        if len(shape) == 3 and shape[2] == 3:
            return (1,) + shape  # type: ignore[return-value]
        if len(shape) == 4 and shape[3] == 3:
            return shape  # type: ignore[return-value]
        raise EngineError(f"frames must be RGB uint8 (H, W, 3) or (B, H, W, 3), got shape {shape}; convert grey or "
                          "RGBA frames with iadgpt.runtime.preprocess.to_rgb")

    def run_batch(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, H, W, 3) uint8 RGB -> (maps (B, h, w) float32, scores (B,) float32)."""
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
            raise EngineError(f"frames must be a uint8 numpy array, got "
                              f"{type(frames).__name__} {getattr(frames, 'dtype', '')}; convert with "
                              "iadgpt.runtime.preprocess.to_rgb")
        shape = self._shape4(tuple(frames.shape))
        st = self._state(shape)
        if frames.ndim == 3:
            frames = frames[None]
        source = self._upload_source(st, frames)
        with self._torch.inference_mode():  # (eager backends run the forward here)
            st.dev_in.copy_(source, non_blocking=self.device.type == "cuda")
            st.graph.replay()
        self._backend.synchronize()  # the one host sync: map and score are in the pinned outputs
        self._last = st
        return st.host_map.numpy().copy(), st.host_score.numpy().copy()

    def _upload_source(self, st: _ShapeState, frames: np.ndarray) -> Any:
        """The host tensor the upload reads: the frame itself when the GPU can read it, else a copy."""
        torch = self._torch
        in_place = (frames.__array_interface__["data"][0] == st.host_in_np.__array_interface__["data"][0]
                    and frames.strides[1:] == st.host_in_np.strides[1:])  # the buffer itself, not a view of it
        if in_place:
            return st.host_in
        # torch reads only contiguous, writeable arrays without complaint: anything else is copied first
        tensor = torch.from_numpy(frames) if frames.flags.c_contiguous and frames.flags.writeable else None
        if tensor is not None and self._backend.is_pinned(tensor):  # e.g. a frame_buffer the capture wrote into
            return tensor
        if self.host_copy == "numpy":
            np.copyto(st.host_in_np, frames)  # one thread: no wait for a descheduled pool thread
            return st.host_in
        if tensor is None:
            tensor = torch.from_numpy(np.array(frames, order="C"))
        if self.host_copy == "direct":
            return tensor
        st.host_in.copy_(tensor)  # torch's thread pool
        return st.host_in

    def last_features(self) -> list[np.ndarray]:
        """The encoder outputs of the last `run_batch` call as float32 (B, C, h, w) arrays, in the
        bundle encoder's output order: what the describer's bridge reads for a flagged part.

        Copied from the device only when asked (the Detector asks for flagged frames, once the score
        has decided); they live in the graph's own buffers until the next call. At the pipeline's
        precision (fp16 on CUDA)."""
        st = self._last
        if st is None or not st.feats:
            raise EngineError("no frame has been run yet: call the pipeline with a frame first")
        with self._torch.inference_mode():
            return [f.detach().float().contiguous().cpu().numpy() for f in st.feats]

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        if not isinstance(frame, np.ndarray) or frame.ndim != 3:
            raise EngineError(f"pipeline(frame) takes one (H, W, 3) uint8 frame, got "
                              f"{getattr(frame, 'shape', type(frame).__name__)}; use run_batch for (B, H, W, 3)")
        maps, scores = self.run_batch(frame)
        return maps[0], float(scores[0])

    def calibrate(self, frames: Sequence[np.ndarray]) -> None:
        """Fix the FP8 activation scales from typical frames (eager, before any capture)."""
        torch = self._torch
        self._tce.set_fp8_mode(self.encoder, "calibrate")
        try:
            with torch.inference_mode():
                for f in frames:
                    arr = np.asarray(f)
                    arr = arr[None] if arr.ndim == 3 else arr
                    shape = self._shape4(tuple(arr.shape))
                    dev = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)
                    taps = self._taps((shape[1], shape[2])) if self.fuse.resize == "exact" else None
                    self.forward(dev, taps)
        finally:
            self._tce.set_fp8_mode(self.encoder, "fp8")
        self._states.clear()
        log.info("FP8 activation scales calibrated on %d frame(s)", len(frames))

    def device_times_ms(self, frames: np.ndarray, n: int = 100) -> list[float]:
        """GPU time of `n` back-to-back replays of the graph for frames of this shape (CUDA events).

        Includes the upload from the pinned buffer and the in-graph D2H copies, not the host copy into
        the pinned buffer nor the final synchronize: the device-side floor of `run_batch`. A
        diagnostic for benchmarks."""
        if self.device.type != "cuda":
            raise EngineError("device_times_ms needs a CUDA device")
        torch = self._torch
        st = self._state(self._shape4(tuple(frames.shape)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        with torch.inference_mode():
            for s, e in zip(starts, ends):
                s.record()
                st.dev_in.copy_(st.host_in, non_blocking=True)
                st.graph.replay()
                e.record()
        ends[-1].synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Input shapes with a captured graph, least recently used first."""
        return list(self._states)

    def close(self) -> None:
        self._states.clear()
        self._last = None

    def __enter__(self) -> "CudaGraphPipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
