"""TensorRT: engine file names tied to the GPU and TensorRT release, the builder, and the runtime.

An engine only runs on the compute capability and TensorRT release it was built for, so both are
in its file name (and a JSON sidecar with the source ONNX hash): a station picks the engine built
for its own GPU and refuses any other with an error naming `iadgpt build`. tensorrt and the CUDA
bindings (torch or cuda-python) are imported lazily: the names and compatibility checks run
anywhere, building and running need an NVIDIA GPU.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from iadgpt.bundle import sha256_file, write_atomic
from iadgpt.errors import EngineError, ExportError
from iadgpt.staging import staging_dir

from .engines import IOSpec, PathLike, _EngineBase

log = logging.getLogger(__name__)

TRT_PRECISIONS = ("fp32", "fp16", "int8")
_TRT_HINT = "`pip install iadgpt[trt]` (TensorRT needs an NVIDIA GPU and driver)"


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
                          "explicitly quantized (Q/DQ) ONNX; quantize the graph first (for a bundle: "
                          "`iadgpt calibrate BUNDLE --normal GOOD_IMAGES_DIR --shots 0 --int8 --backend tensorrt`, "
                          "which also builds its engines) or build with --precision fp16")
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
    write_atomic(engine_path, serialized)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_path, config.get_timing_cache().serialize())
    sidecar = {"stem": stem or onnx_path.stem, "precision": precision,
               "trt_version": normalize_trt_version(trt.__version__),
               "compute_capability": f"{cc[0]}.{cc[1]}", "source_onnx": onnx_path.name,
               "source_sha256": sha256_file(onnx_path), "engine_sha256": sha256_file(engine_path),
               "built_s": round(time.perf_counter() - t0, 1)}
    write_atomic(sidecar_path(engine_path), (json.dumps(sidecar, indent=2) + "\n").encode())
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


BANK_MAX_ROWS = 65536  # largest memory bank a built scorer engine accepts (swap banks without a rebuild)


def build_bundle_engines(bundle: Any, precision: str = "fp16", *, workspace_gb: float = 4.0,
                         max_batch: int = 8) -> list[str]:
    """Build the encoder (in `precision`) and scorer (fp16) engines of `bundle` for this GPU and
    list them in its manifest; returns their keys. int8 compiles the "encoder_int8" Q/DQ graph
    that `iadgpt calibrate --int8 --backend tensorrt` writes."""
    graphs = bundle.graphs
    if precision == "int8":
        if "encoder_int8" not in graphs:
            # Only calibrate's tensorrt preset (symmetric int8) writes "encoder_int8"; its default onnxruntime
            # backend replaces "encoder" with a uint8-activation CPU graph that TensorRT cannot build.
            raise ExportError(f"bundle {bundle.path} has no INT8 (Q/DQ) encoder graph for TensorRT (encoder_int8); "
                              f"make one with `iadgpt calibrate {bundle.path} --normal GOOD_IMAGES_DIR --shots 0 "
                              "--int8 --backend tensorrt` on this station (--shots 0 keeps the memory bank; it "
                              "builds the engines and fits the thresholds on them), or build with --precision fp16")
        jobs = [("encoder", "encoder_int8", "int8"), ("scorer", "scorer", "fp16")]
    else:
        jobs = [("encoder", bundle.float_encoder_role, "fp16"), ("scorer", "scorer", "fp16")]
    keys = []
    with staging_dir(bundle.path.parent, f".{bundle.path.name}.trt-build-") as tmp:
        for role, source, engine_precision in jobs:
            shapes = None
            inputs, _ = bundle.graph_io(source)
            bank = next((t for t in inputs if t.name == "bank"), None)
            if bank is not None:
                rows = int(bundle.array(bundle.scorer["references"]["bank"], mmap=True).shape[0])
                dim = int(bank.shape[1])
                shapes = {"bank": ((1, dim), (rows, dim), (max(rows, BANK_MAX_ROWS), dim))}
            log.info("building the %s engine (%s) from %s", role, engine_precision, graphs[source]["file"])
            path = build_trt_engine(bundle.graph_path(source), tmp, engine_precision, workspace_gb=workspace_gb,
                                    batch_range=(1, 1, int(max_batch)), input_shapes=shapes,
                                    timing_cache=bundle.path / "engines" / "timing.cache")
            info = read_engine_info(path)[0]
            cc = f"{info.compute_capability[0]}.{info.compute_capability[1]}"
            key = path.name[: -len(".engine")]
            bundle.add_engine(key, path, precision=engine_precision, trt_version=info.trt_version,
                              compute_capability=cc, role=role, source_graph=source,
                              source_sha256=graphs[source]["sha256"])
            keys.append(key)
    return keys


def open_trt_engine(path: Path, **opts: Any) -> TensorRTEngine:
    """`path` a `.engine` file, or an ONNX graph whose engine for this host (TensorRT release + GPU,
    `precision` default fp16) is looked up next to it or in `engine_dir`; never built implicitly
    (that takes minutes: `iadgpt build`)."""
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
        onnx_sha = sha256_file(path)
    return TensorRTEngine(candidate, expected_onnx_sha256=onnx_sha, **opts)
