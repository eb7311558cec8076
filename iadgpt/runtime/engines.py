"""Inference backends behind one small protocol (modelled on Polygraphy's runners).

Every engine takes and returns numpy arrays keyed by tensor name, checks its feeds before
running (a wrong dtype or shape is a clear `EngineError`, never a silent cast), and never
falls back to another device on its own: asking for CUDA and getting CPU would only show up as
a missed cycle time on the line, so it is an error here.

onnxruntime, tensorrt, torch and cuda-python are imported lazily inside the classes that need
them: a station runs with onnxruntime alone and without torch. The TensorRT engine, its builder
and its file naming live in `tensorrt_engine`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from iadgpt.errors import EngineError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Dim = Union[int, str, None]
Shape = tuple[Dim, ...]

ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
BACKENDS = ("onnxruntime", "tensorrt")
BACKEND_ALIASES = {"onnxruntime": "onnxruntime", "ort": "onnxruntime", "tensorrt": "tensorrt", "trt": "tensorrt"}
_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16, "tensor(int32)": np.int32, "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


@runtime_checkable
class Engine(Protocol):
    """What the station needs from any backend: named numpy in, named numpy out."""

    backend: str  # "onnxruntime" | "tensorrt" | "torch"
    provider: str  # where it runs: "cpu", "cuda", "tensorrt"
    precision: str  # "fp32", "fp16", "int8"

    @property
    def input_names(self) -> list[str]: ...

    @property
    def output_names(self) -> list[str]: ...

    @property
    def input_shapes(self) -> dict[str, Optional[Shape]]: ...

    @property
    def input_dtypes(self) -> dict[str, Optional[np.dtype]]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Engine": ...

    def __exit__(self, *exc: Any) -> None: ...


@dataclass(frozen=True)
class IOSpec:
    """Expected dtype/shape of one input; None means "not checked" (dynamic dims are None/str)."""

    name: str
    dtype: Optional[np.dtype]
    shape: Optional[Shape]


def _fmt_shape(shape: Optional[Shape]) -> str:
    if shape is None:
        return "(any)"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def check_feeds(who: str, specs: Sequence[IOSpec], feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate feeds against specs; returns C-contiguous arrays. Raises EngineError naming the input."""
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in feeds]
    unknown = [n for n in feeds if n not in expected]
    if missing:
        raise EngineError(f"{who}: missing input(s) {missing}; it expects {expected}")
    if unknown:
        raise EngineError(f"{who}: unknown input(s) {unknown}; it expects {expected}")
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        arr = feeds[spec.name]
        want = f"{spec.dtype if spec.dtype is not None else 'any dtype'} with shape {_fmt_shape(spec.shape)}"
        if not isinstance(arr, np.ndarray):
            raise EngineError(f"{who}: input {spec.name!r} must be a numpy array ({want}), got {type(arr).__name__}")
        if spec.dtype is not None and arr.dtype != spec.dtype:
            raise EngineError(f"{who}: input {spec.name!r} expects {want}, got {arr.dtype}; "
                              f"convert it with .astype(np.{spec.dtype.name})")
        if spec.shape is not None:
            ok = len(arr.shape) == len(spec.shape) and all(
                not isinstance(d, int) or d < 0 or d == a for d, a in zip(spec.shape, arr.shape))
            if not ok:
                raise EngineError(f"{who}: input {spec.name!r} expects {want}, got shape {tuple(arr.shape)}")
        out[spec.name] = np.ascontiguousarray(arr)
    return out


class _EngineBase:
    """Shared plumbing: context manager, feed checks, timing of the last run."""

    backend = "base"
    provider = "cpu"
    precision = "fp32"

    def __init__(self) -> None:
        self._specs: list[IOSpec] = []
        self._outputs: list[str] = []
        self._closed = False
        self.last_run_ms: Optional[float] = None

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self._specs]

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def input_shapes(self) -> dict[str, Optional[Shape]]:
        return {s.name: s.shape for s in self._specs}

    @property
    def input_dtypes(self) -> dict[str, Optional[np.dtype]]:
        return {s.name: s.dtype for s in self._specs}

    def _who(self) -> str:
        return f"{self.backend} engine"

    def _check(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self._closed:
            raise EngineError(f"{self._who()} is closed; open a new one")
        return check_feeds(self._who(), self._specs, feeds)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- onnxruntime


def _import_ort(provider: str) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        extra = "cpu" if provider == "cpu" else "gpu"
        raise EngineError(f"onnxruntime is not installed; `pip install iadgpt[{extra}]`") from exc
    return ort


class OrtEngine(_EngineBase):
    """ONNX Runtime session on exactly the requested provider (cpu, cuda or tensorrt)."""

    backend = "onnxruntime"

    def __init__(self, onnx_path: PathLike, provider: str = "cpu", threads: Optional[int] = None, *,
                 precision: str = "fp32", device_id: int = 0,
                 provider_options: Optional[Mapping[str, Any]] = None,
                 trt_cache_dir: Optional[PathLike] = None, spin: bool = False) -> None:
        super().__init__()
        self.path = Path(onnx_path)
        if provider not in ORT_PROVIDERS:
            raise EngineError(f"unknown onnxruntime provider {provider!r}; choose one of {sorted(ORT_PROVIDERS)}")
        self.provider = provider
        self.precision = precision
        ort = _import_ort(provider)
        if not self.path.is_file():
            raise EngineError(f"ONNX graph {self.path} does not exist; export it with `iadgpt export`")
        ep = ORT_PROVIDERS[provider]
        available = list(ort.get_available_providers())
        if ep not in available:
            raise EngineError(
                f"onnxruntime here has no {ep} (available: {', '.join(available)}); "
                + ("install onnxruntime-gpu instead of onnxruntime: `pip uninstall onnxruntime && "
                   "pip install iadgpt[gpu]` (needs CUDA/cuDNN" + (" and TensorRT" if provider == "tensorrt" else "")
                   + " libraries), or choose provider='cpu'" if provider != "cpu"
                   else "reinstall it: `pip install --force-reinstall iadgpt[cpu]`"))

        so = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise EngineError(f"threads must be >= 1 (got {threads}); leave it None for onnxruntime's default")
            most = max(64, 4 * (os.cpu_count() or 1))  # each thread has a stack: 100,000 took 1.6 GB and hung
            if threads > most:
                raise EngineError(f"threads {threads} is far more than this machine's {os.cpu_count()} CPUs; give at "
                                  f"most {most}, or leave it out for onnxruntime's default")
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            # A station runs several sessions back to back (encoder, scorer) next to a capture
            # thread: idle pool threads that spin steal the cores the next session needs.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session_options = so

        opts: dict[str, Any] = {}
        if provider in ("cuda", "tensorrt"):
            opts["device_id"] = int(device_id)
        if provider == "tensorrt":
            opts["trt_fp16_enable"] = precision == "fp16"
            opts["trt_int8_enable"] = precision == "int8"
            if trt_cache_dir is not None:
                opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache_dir),
                            trt_timing_cache_enable=True, trt_timing_cache_path=str(trt_cache_dir))
        opts.update(provider_options or {})
        providers: list[Any] = [(ep, opts)] if opts else [ep]
        if provider == "tensorrt":  # nodes TensorRT cannot take go to CUDA, then CPU: ORT partitioning
            providers.append(("CUDAExecutionProvider", {"device_id": int(device_id)}))
        if provider != "cpu":
            providers.append("CPUExecutionProvider")

        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise EngineError(f"onnxruntime cannot load {self.path} on {ep}: {exc}; re-export the graph "
                              "with `iadgpt export` or check the provider's libraries") from exc
        active = list(self._session.get_providers())
        if ep not in active:
            self._session = None
            raise EngineError(f"onnxruntime listed {ep} but the session for {self.path} runs on {active} "
                              "(its CUDA/cuDNN/TensorRT libraries failed to load; see onnxruntime's log). "
                              "Refusing to run on CPU silently: fix the GPU libraries or choose provider='cpu'")
        self._specs = [IOSpec(i.name, np.dtype(_ORT_DTYPES[i.type]) if i.type in _ORT_DTYPES else None,
                              tuple(i.shape) if i.shape is not None else None)
                       for i in self._session.get_inputs()]
        self._outputs = [o.name for o in self._session.get_outputs()]
        log.info("onnxruntime engine %s on %s (threads=%s, precision=%s)", self.path.name, active[0],
                 threads if threads is not None else "default", precision)

    def _who(self) -> str:
        return f"onnxruntime engine {self.path.name}"

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = self._check(feeds)
        t0 = time.perf_counter()
        try:
            results = self._session.run(self._outputs, arrays)
        except Exception as exc:
            raise EngineError(f"{self._who()} failed to run: {exc}") from exc
        self.last_run_ms = (time.perf_counter() - t0) * 1e3
        return dict(zip(self._outputs, results))

    def close(self) -> None:
        super().close()
        self._session = None


# --------------------------------------------------------------------------- torch reference


class TorchEngine(_EngineBase):
    """The reference: an nn.Module under inference_mode, numpy in/out, optional CUDA graph replay.

    With `cuda_graph=True` one graph is captured per input shape/dtype signature (static input
    buffers, replay); a new signature discards the old graph and captures again.
    """

    backend = "torch"

    def __init__(self, module: Any, input_names: Sequence[str], output_names: Sequence[str],
                 device: str = "cpu", *, cuda_graph: bool = False,
                 input_shapes: Optional[Mapping[str, Optional[Shape]]] = None,
                 precision: str = "fp32") -> None:
        super().__init__()
        try:
            import torch
        except ImportError as exc:
            raise EngineError("the torch reference engine needs torch: `pip install iadgpt[export]`") from exc
        self._torch = torch
        if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
            raise EngineError(f"unknown torch device {device!r}; choose 'cpu' or 'cuda'")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise EngineError("device='cuda' requested but torch sees no CUDA GPU (CPU-only torch build or "
                              "no driver); install a CUDA torch build or choose device='cpu'")
        if cuda_graph and not str(device).startswith("cuda"):
            raise EngineError("cuda_graph=True needs device='cuda'")
        self.device = torch.device(device)
        self.provider = "cuda" if self.device.type == "cuda" else "cpu"
        self.precision = precision
        self.cuda_graph = cuda_graph
        self._module = module.eval().to(self.device)
        shapes = dict(input_shapes or {})
        self._specs = [IOSpec(n, None, tuple(shapes[n]) if shapes.get(n) is not None else None)
                       for n in input_names]
        self._outputs = list(output_names)
        self._graph: Any = None
        self._graph_key: Optional[tuple[Any, ...]] = None
        self._static_in: list[Any] = []
        self._static_out: Any = None

    def _who(self) -> str:
        return f"torch engine {type(self._module).__name__}"

    def _as_outputs(self, result: Any) -> dict[str, np.ndarray]:
        torch = self._torch
        if isinstance(result, torch.Tensor):
            items = [result]
        elif isinstance(result, Mapping):
            missing = [n for n in self._outputs if n not in result]
            if missing:
                raise EngineError(f"{self._who()} returned no output(s) {missing}")
            items = [result[n] for n in self._outputs]
        else:
            items = list(result)
        if len(items) != len(self._outputs):
            raise EngineError(f"{self._who()} returned {len(items)} outputs, expected {len(self._outputs)} "
                              f"({self._outputs})")
        return {n: t.detach().to("cpu").numpy() for n, t in zip(self._outputs, items)}

    def _replay(self, arrays: list[np.ndarray]) -> Any:
        torch = self._torch
        key = tuple((a.shape, a.dtype.str) for a in arrays)
        if self._graph is None or key != self._graph_key:
            self._graph = None  # free the old graph's pool before capturing a new one
            self._static_in = [torch.from_numpy(a).to(self.device) for a in arrays]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up off the capture stream (cuDNN autotune, lazy init)
                    self._module(*self._static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._static_out = self._module(*self._static_in)
            self._graph, self._graph_key = graph, key
            log.debug("%s: captured a CUDA graph for %s", self._who(), key)
        else:
            for buf, a in zip(self._static_in, arrays):
                buf.copy_(torch.from_numpy(a), non_blocking=False)
        self._graph.replay()
        return self._static_out

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = self._check(feeds)
        ordered = [arrays[n] for n in self.input_names]
        torch = self._torch
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.cuda_graph:
                result = self._replay(ordered)
            else:
                result = self._module(*(torch.from_numpy(a).to(self.device) for a in ordered))
            out = self._as_outputs(result)  # .to("cpu") synchronises
        self.last_run_ms = (time.perf_counter() - t0) * 1e3
        return out

    def close(self) -> None:
        super().close()
        self._graph = None
        self._static_in = []
        self._static_out = None


# --------------------------------------------------------------------------- factory


def open_engine(backend: str, onnx_path: PathLike, **opts: Any) -> Engine:
    """Open an engine by backend name.

    "onnxruntime": `OrtEngine(onnx_path, **opts)`.
    "tensorrt": `onnx_path` may be a `.engine` file; otherwise the engine built for this host is
    looked up next to the ONNX (or in `engine_dir`) by `engine_filename`, with `precision`
    (default fp16); it is never built implicitly (that takes minutes: `iadgpt build`).
    """
    name = BACKEND_ALIASES.get(str(backend).lower())
    if name is None:
        raise EngineError(f"unknown inference backend {backend!r}; choose one of {list(BACKENDS)}")
    path = Path(onnx_path)
    if name == "onnxruntime":
        return OrtEngine(path, **opts)
    from .tensorrt_engine import open_trt_engine

    return open_trt_engine(path, **opts)
