"""Inference backends behind one small protocol (modelled on Polygraphy's runners).

Every engine takes and returns numpy arrays keyed by tensor name, checks its feeds before
running (a wrong dtype or shape is a clear `EngineError`, never a silent cast), and never
falls back to another device on its own: asking for CUDA and getting CPU would only show up as
a missed cycle time on the line, so it is an error here.

onnxruntime, tensorrt, torch and cuda-python are imported lazily inside the classes that need
them: a station runs with onnxruntime alone and without torch.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from iadgpt.errors import EngineError, ExportError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Dim = Union[int, str, None]
Shape = tuple[Dim, ...]

ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
TRT_PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("onnxruntime", "tensorrt")
_BACKEND_ALIASES = {"onnxruntime": "onnxruntime", "ort": "onnxruntime", "tensorrt": "tensorrt", "trt": "tensorrt"}
_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16, "tensor(int32)": np.int32, "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}
_TRT_HINT = "`pip install iadgpt[trt]` (TensorRT needs an NVIDIA GPU and driver)"


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


# --------------------------------------------------------------------------- TensorRT naming + compat


@dataclass(frozen=True)
class EngineInfo:
    """What a TensorRT engine was built with, from its file name or its JSON sidecar."""

    stem: str
    precision: str
    trt_version: str
    compute_capability: tuple[int, int]
    source_sha256: Optional[str] = None


_ENGINE_RE = re.compile(r"^(?P<stem>.+)\.(?P<precision>[a-z0-9]+)\.trt(?P<ver>\d+(?:\.\d+)*)"
                        r"\.sm(?P<cc>\d{2,})\.engine$")


def normalize_trt_version(version: str) -> str:
    """'10.3.0.26' -> '10.3.0': engines are tied to the release, not the build number."""
    parts = re.findall(r"\d+", str(version))
    if not parts:
        raise EngineError(f"cannot read TensorRT version {version!r}")
    return ".".join((parts + ["0", "0"])[:3])


def parse_compute_capability(cc: Union[str, Sequence[int]]) -> tuple[int, int]:
    """(8, 9), '8.9', 'sm89' or '89' -> (8, 9)."""
    if isinstance(cc, str):
        s = cc.lower().removeprefix("sm").removeprefix("_")
        if "." in s:
            major, minor = s.split(".", 1)
            return int(major), int(minor)
        if s.isdigit() and len(s) >= 2:
            return int(s[:-1]), int(s[-1])
        raise EngineError(f"cannot read compute capability {cc!r}; write it as '8.9'")
    major, minor = cc
    return int(major), int(minor)


def engine_filename(stem: str, precision: str, trt_version: str,
                    compute_capability: Union[str, Sequence[int]]) -> str:
    """`<stem>.<precision>.trt<version>.sm<major><minor>.engine`, e.g. `encoder.fp16.trt10.3.0.sm89.engine`."""
    if precision not in TRT_PRECISIONS:
        raise EngineError(f"unknown TensorRT precision {precision!r}; choose one of {list(TRT_PRECISIONS)}")
    major, minor = parse_compute_capability(compute_capability)
    return f"{stem}.{precision}.trt{normalize_trt_version(trt_version)}.sm{major}{minor}.engine"


def parse_engine_filename(name: str) -> Optional[EngineInfo]:
    m = _ENGINE_RE.match(Path(name).name)
    if m is None:
        return None
    return EngineInfo(m["stem"], m["precision"], m["ver"], parse_compute_capability(m["cc"]))


def engine_compat_problems(engine: EngineInfo, host_trt_version: str,
                           host_compute_capability: Union[str, Sequence[int]]) -> list[str]:
    """Pure check: why an engine built as `engine` cannot run on this host (empty list: it can)."""
    problems = []
    built_v, host_v = normalize_trt_version(engine.trt_version), normalize_trt_version(host_trt_version)
    if built_v != host_v:
        problems.append(f"it was built with TensorRT {built_v}, this host has TensorRT {host_v}")
    host_cc = parse_compute_capability(host_compute_capability)
    if tuple(engine.compute_capability) != host_cc:
        b = engine.compute_capability
        problems.append(f"it was built for a GPU of compute capability {b[0]}.{b[1]} (sm{b[0]}{b[1]}), "
                        f"this GPU is {host_cc[0]}.{host_cc[1]} (sm{host_cc[0]}{host_cc[1]})")
    return problems


def check_engine_compat(engine: EngineInfo, host_trt_version: str,
                        host_compute_capability: Union[str, Sequence[int]],
                        engine_path: Optional[PathLike] = None) -> None:
    """Raise EngineError telling how to rebuild when the engine does not match this host."""
    problems = engine_compat_problems(engine, host_trt_version, host_compute_capability)
    if problems:
        name = Path(engine_path).name if engine_path is not None else engine.stem
        raise EngineError(f"TensorRT engine {name} cannot run here: {'; '.join(problems)}. Engines only run "
                          f"on the TensorRT version and GPU type that built them: rebuild it on this station "
                          f"with `iadgpt build BUNDLE --precision {engine.precision}`")


def sidecar_path(engine_path: PathLike) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def read_engine_info(engine_path: PathLike) -> list[EngineInfo]:
    """Build facts from the JSON sidecar and from the file name (each one found, sidecar first)."""
    path = Path(engine_path)
    infos: list[EngineInfo] = []
    side = sidecar_path(path)
    if side.is_file():
        try:
            d = json.loads(side.read_text(encoding="utf-8"))
            infos.append(EngineInfo(str(d["stem"]), str(d["precision"]), str(d["trt_version"]),
                                    parse_compute_capability(d["compute_capability"]),
                                    d.get("source_sha256")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"engine sidecar {side} is unreadable ({exc}); rebuild the engine with "
                              "`iadgpt build BUNDLE --precision ...`") from exc
    from_name = parse_engine_filename(path.name)
    if from_name is not None:
        infos.append(from_name)
    return infos


# --------------------------------------------------------------------------- TensorRT plumbing


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(f"TensorRT is not installed; {_TRT_HINT}") from exc
    return trt


_TRT_LOGGER: Any = None


def _trt_logger(trt: Any) -> Any:
    """One process-wide TensorRT logger that forwards to Python logging."""
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        sev = trt.ILogger.Severity
        levels = {sev.INTERNAL_ERROR: logging.CRITICAL, sev.ERROR: logging.ERROR,
                  sev.WARNING: logging.WARNING, sev.INFO: logging.INFO, sev.VERBOSE: logging.DEBUG}

        class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                level = levels.get(severity, logging.INFO)
                if log.isEnabledFor(level):
                    log.log(level, "TensorRT: %s", msg)

        _TRT_LOGGER = _Logger()
    return _TRT_LOGGER


class _TorchCuda:
    """Device buffers and a stream through torch (used when torch with CUDA is installed)."""

    def __init__(self, device: int) -> None:
        import torch

        if not torch.cuda.is_available():
            raise EngineError("torch sees no CUDA GPU; TensorRT needs an NVIDIA GPU and driver")
        self.torch = torch
        self.device = torch.device("cuda", device)
        self.stream = torch.cuda.Stream(self.device)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def compute_capability(self) -> tuple[int, int]:
        major, minor = self.torch.cuda.get_device_capability(self.device)
        return int(major), int(minor)

    def alloc(self, nbytes: int) -> Any:
        with self.torch.cuda.stream(self.stream):  # allocate on the stream that uses it
            return self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device=self.device)

    @staticmethod
    def ptr(buf: Any) -> int:
        return int(buf.data_ptr())

    def h2d(self, buf: Any, arr: np.ndarray) -> None:
        if arr.nbytes:
            src = self.torch.from_numpy(arr.reshape(-1).view(np.uint8))
            with self.torch.cuda.stream(self.stream):
                buf[: arr.nbytes].copy_(src)

    def d2h(self, buf: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:
            return np.empty(shape, dtype)
        with self.torch.cuda.stream(self.stream):
            host = buf[:nbytes].cpu()
        return host.numpy().view(dtype).reshape(shape)

    def sync(self) -> None:
        self.stream.synchronize()

    def free(self, buf: Any) -> None:
        del buf

    def close(self) -> None:
        self.stream = None


class _CudaPython:
    """Device buffers and a stream through cuda-python (a station without torch)."""

    def __init__(self, device: int) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self.rt = cudart
        self.device = device
        self._ck(cudart.cudaSetDevice(device))
        (self._stream,) = self._ck(cudart.cudaStreamCreate())

    def _ck(self, result: Any) -> tuple[Any, ...]:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise EngineError(f"CUDA error {err}; check the NVIDIA driver and that a GPU is visible")
        return tuple(rest)

    @property
    def stream_handle(self) -> int:
        return int(self._stream)

    def compute_capability(self) -> tuple[int, int]:
        attr = self.rt.cudaDeviceAttr
        (major,) = self._ck(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, self.device))
        (minor,) = self._ck(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, self.device))
        return int(major), int(minor)

    def alloc(self, nbytes: int) -> int:
        (ptr,) = self._ck(self.rt.cudaMalloc(max(int(nbytes), 1)))
        return int(ptr)

    @staticmethod
    def ptr(buf: Any) -> int:
        return int(buf)

    def h2d(self, buf: int, arr: np.ndarray) -> None:
        if arr.nbytes:
            self._ck(self.rt.cudaMemcpyAsync(buf, arr.ctypes.data, arr.nbytes,
                                             self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))

    def d2h(self, buf: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        if out.nbytes:
            self._ck(self.rt.cudaMemcpyAsync(out.ctypes.data, buf, out.nbytes,
                                             self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
        return out

    def sync(self) -> None:
        self._ck(self.rt.cudaStreamSynchronize(self._stream))

    def free(self, buf: int) -> None:
        self._ck(self.rt.cudaFree(buf))

    def close(self) -> None:
        if self._stream is not None:
            self.rt.cudaStreamDestroy(self._stream)
            self._stream = None


def _cuda_backend(device: int) -> Any:
    """torch when it has CUDA, else cuda-python; neither -> EngineError saying what to install."""
    try:
        import torch

        if torch.cuda.is_available():
            return _TorchCuda(device)
    except ImportError:
        pass
    try:
        return _CudaPython(device)
    except ImportError as exc:
        raise EngineError("TensorRT engines need device buffers from cuda-python or torch with CUDA: "
                          "`pip install cuda-python`") from exc


# --------------------------------------------------------------------------- TensorRT build


def has_qdq_nodes(onnx_path: PathLike) -> bool:
    """True if the graph (or any subgraph/function) has QuantizeLinear nodes (explicit INT8)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def walk(graph: Any) -> bool:
        for node in graph.node:
            if node.op_type == "QuantizeLinear":
                return True
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH and walk(attr.g):
                    return True
                if attr.type == onnx.AttributeProto.GRAPHS and any(walk(g) for g in attr.graphs):
                    return True
        return False

    return walk(model.graph) or any(n.op_type == "QuantizeLinear" for f in model.functions for n in f.node)


def _write_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_trt_engine(onnx_path: PathLike, out_dir: PathLike, precision: str = "fp16", *,
                     timing_cache: Optional[PathLike] = None, workspace_gb: float = 4.0,
                     batch_range: tuple[int, int, int] = (1, 1, 8),
                     input_shapes: Optional[Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]] = None,
                     stem: Optional[str] = None, device: int = 0) -> Path:
    """Build a TensorRT engine for this GPU from an ONNX graph; returns the engine path.

    A dynamic first (batch) dimension gets the profile `batch_range` = (min, opt, max); other
    dynamic dims need `input_shapes={name: (min_shape, opt_shape, max_shape)}`. INT8 needs an
    explicitly quantized (Q/DQ) ONNX: implicit calibration is deprecated in TensorRT 10.
    The timing cache file is read if present and rewritten after the build (faster rebuilds).
    """
    onnx_path = Path(onnx_path)
    if precision not in TRT_PRECISIONS:
        raise ExportError(f"unknown TensorRT precision {precision!r}; choose one of {list(TRT_PRECISIONS)}")
    if not onnx_path.is_file():
        raise ExportError(f"ONNX graph {onnx_path} does not exist; export it with `iadgpt export`")
    if precision == "int8" and not has_qdq_nodes(onnx_path):
        raise ExportError(f"{onnx_path.name} has no QuantizeLinear nodes: INT8 engines are built from an "
                          "explicitly quantized (Q/DQ) ONNX; quantize the graph first (e.g. with "
                          "`iadgpt export --int8`) or build with --precision fp16")
    trt = _import_tensorrt()
    from iadgpt.bundle import sha256_file  # torch-free

    cuda = _cuda_backend(device)
    cc = cuda.compute_capability()
    cuda.close()
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a path so external data is found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}; re-export the graph with `iadgpt export`")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ scales come from the graph, no calibrator

    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    profile = builder.create_optimization_profile()
    needs_profile = False
    shapes = dict(input_shapes or {})
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if tensor.name in shapes:
            lo, opt, hi = shapes.pop(tensor.name)
        elif any(d < 0 for d in shape):
            if any(d < 0 for d in shape[1:]):
                raise ExportError(f"input {tensor.name!r} of {onnx_path.name} has dynamic dims {shape} beyond "
                                  "the batch; pass input_shapes={name: (min, opt, max)}")
            lo, opt, hi = ((b,) + shape[1:] for b in batch_range)
        else:
            continue
        profile.set_shape(tensor.name, tuple(lo), tuple(opt), tuple(hi))
        needs_profile = True
    if shapes:
        raise ExportError(f"input_shapes names {sorted(shapes)} that {onnx_path.name} does not have")
    if needs_profile:
        config.add_optimization_profile(profile)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} ({precision}); see the "
                          "TensorRT log above, try more workspace (workspace_gb) or another precision")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = engine_filename(stem or onnx_path.stem, precision, trt.__version__, cc)
    engine_path = out / name
    _write_atomic(engine_path, serialized)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(cache_path, config.get_timing_cache().serialize())
    sidecar = {"stem": stem or onnx_path.stem, "precision": precision,
               "trt_version": normalize_trt_version(trt.__version__),
               "compute_capability": f"{cc[0]}.{cc[1]}", "source_onnx": onnx_path.name,
               "source_sha256": sha256_file(onnx_path), "engine_sha256": sha256_file(engine_path),
               "built_s": round(time.perf_counter() - t0, 1)}
    _write_atomic(sidecar_path(engine_path), (json.dumps(sidecar, indent=2) + "\n").encode())
    log.info("built TensorRT engine %s in %.1f s", engine_path, sidecar["built_s"])
    return engine_path


# --------------------------------------------------------------------------- TensorRT runtime


class TensorRTEngine(_EngineBase):
    """A serialized TensorRT engine built on this host's TensorRT version and GPU type."""

    backend = "tensorrt"
    provider = "tensorrt"

    def __init__(self, engine_path: PathLike, *, device: int = 0, check_compat: bool = True,
                 expected_onnx_sha256: Optional[str] = None) -> None:
        super().__init__()
        self.path = Path(engine_path)
        trt = _import_tensorrt()
        self._trt = trt
        if not self.path.is_file():
            raise EngineError(f"TensorRT engine {self.path} does not exist; build it with "
                              "`iadgpt build BUNDLE --precision fp16`")
        infos = read_engine_info(self.path)
        if check_compat and not infos:
            raise EngineError(f"cannot tell which TensorRT/GPU built {self.path.name} (no sidecar "
                              f"{sidecar_path(self.path).name}, unrecognised file name); rebuild it with "
                              "`iadgpt build BUNDLE --precision fp16`")
        self.info = infos[0] if infos else None
        self.precision = self.info.precision if self.info else "unknown"
        self._cuda = _cuda_backend(device)
        if check_compat:
            cc = self._cuda.compute_capability()
            for info in infos:
                check_engine_compat(info, trt.__version__, cc, self.path)
        source = self.info.source_sha256 if self.info else None
        if expected_onnx_sha256 and source and source != expected_onnx_sha256:
            raise EngineError(f"TensorRT engine {self.path.name} was built from another ONNX graph than the "
                              f"bundle's; rebuild it with `iadgpt build BUNDLE --precision {self.precision}`")

        self._runtime = trt.Runtime(_trt_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise EngineError(f"TensorRT cannot deserialize {self.path} (see its log); rebuild it with "
                              f"`iadgpt build BUNDLE --precision {self.precision}`")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"TensorRT cannot create an execution context for {self.path} (GPU memory?)")
        self._dtypes: dict[str, np.dtype] = {}
        self._ranges: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            self._dtypes[name] = dtype
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                shape = tuple(None if d < 0 else int(d) for d in self._engine.get_tensor_shape(name))
                self._specs.append(IOSpec(name, dtype, shape))
                if any(d is None for d in shape):
                    lo, _opt, hi = self._engine.get_tensor_profile_shape(name, 0)
                    self._ranges[name] = (tuple(lo), tuple(hi))
            else:
                self._outputs.append(name)
        self._buffers: dict[str, tuple[Any, int]] = {}
        log.info("TensorRT engine %s loaded (%s)", self.path.name, self.precision)

    def _who(self) -> str:
        return f"TensorRT engine {self.path.name}"

    def _buffer(self, name: str, nbytes: int) -> int:
        buf = self._buffers.get(name)
        if buf is None or buf[1] < nbytes:  # grow only; reused across runs
            if buf is not None:
                self._cuda.free(buf[0])
            buf = (self._cuda.alloc(nbytes), max(nbytes, 1))
            self._buffers[name] = buf
        return self._cuda.ptr(buf[0])

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = self._check(feeds)
        ctx = self._context
        t0 = time.perf_counter()
        for name, arr in arrays.items():
            if name in self._ranges:
                lo, hi = self._ranges[name]
                if any(a < lo_d or a > hi_d for a, lo_d, hi_d in zip(arr.shape, lo, hi)):
                    raise EngineError(f"{self._who()}: input {name!r} shape {arr.shape} is outside the engine's "
                                      f"profile {lo}..{hi}; rebuild with a larger batch_range")
            if not ctx.set_input_shape(name, arr.shape):
                raise EngineError(f"{self._who()}: TensorRT rejected shape {arr.shape} for input {name!r}")
            ptr = self._buffer(name, arr.nbytes)
            self._cuda.h2d(self._buffers[name][0], arr)
            ctx.set_tensor_address(name, ptr)
        shapes = {}
        for name in self._outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"{self._who()}: output {name!r} has a data-dependent shape {shape}, "
                                  "which this runner does not support")
            shapes[name] = shape
            nbytes = int(np.prod(shape, dtype=np.int64)) * self._dtypes[name].itemsize
            ctx.set_tensor_address(name, self._buffer(name, nbytes))
        if not ctx.execute_async_v3(self._cuda.stream_handle):
            raise EngineError(f"{self._who()}: execute_async_v3 failed (see the TensorRT log)")
        out = {name: self._cuda.d2h(self._buffers[name][0], shapes[name], self._dtypes[name])
               for name in self._outputs}
        self._cuda.sync()
        self.last_run_ms = (time.perf_counter() - t0) * 1e3
        return out

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        for buf, _ in self._buffers.values():
            self._cuda.free(buf)
        self._buffers.clear()
        self._context = None
        self._engine = None
        self._runtime = None
        self._cuda.close()


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
    name = _BACKEND_ALIASES.get(str(backend).lower())
    if name is None:
        raise EngineError(f"unknown inference backend {backend!r}; choose one of {list(BACKENDS)}")
    path = Path(onnx_path)
    if name == "onnxruntime":
        return OrtEngine(path, **opts)
    if path.suffix == ".engine":
        return TensorRTEngine(path, **opts)
    precision = opts.pop("precision", "fp16")
    engine_dir = Path(opts.pop("engine_dir", path.parent))
    onnx_sha = opts.pop("onnx_sha256", None)
    trt = _import_tensorrt()
    cuda = _cuda_backend(int(opts.get("device", 0)))
    cc = cuda.compute_capability()
    cuda.close()
    candidate = engine_dir / engine_filename(path.stem, precision, trt.__version__, cc)
    if not candidate.is_file():
        raise EngineError(f"no TensorRT engine for {path.name} on this host ({candidate.name} not in {engine_dir}); "
                          f"build it with `iadgpt build BUNDLE --precision {precision}`")
    if onnx_sha is None and path.is_file():
        from iadgpt.bundle import sha256_file

        onnx_sha = sha256_file(path)
    return TensorRTEngine(candidate, expected_onnx_sha256=onnx_sha, **opts)
