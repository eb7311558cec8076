"""Static INT8 (Q/DQ) encoder graphs made with ONNX Runtime's quantization tools.

Calibration ranges come only from the real normal images handed in (already laid out as the
encoder input): an INT8 graph calibrated on random pixels has activation ranges no real part
produces, and nothing in this module ever makes up data. The output is an explicit Q/DQ ONNX:
ONNX Runtime fuses it into integer kernels on the CPU, and TensorRT builds INT8 engines from the
same kind of file (its Q/DQ scales replace TensorRT's deprecated implicit calibrator).

Presets (`PRESETS`), measured on this project's 2-core AVX2 CPU without VNNI (README, INT8):
- "cpu": uint8 activations, int8 per-channel weights (U8S8), which MLAS runs with fast AVX2
  kernels. Those kernels add pairs of u8 x s8 products in int16 (VPMADDUBSW) and saturate when
  both weights of a pair are large: on EfficientNet-Lite0 that cut feature cosine to 0.77, and the
  result depends on the CPU (VNNI CPUs do not saturate), so a bank or threshold fitted on one box
  would not hold on another. `reduce_range="auto"` therefore stores the weights of every
  non-depthwise Conv/MatMul in 7 bits (255 * 64 * 2 < 2^15, cannot saturate) and keeps depthwise
  convs at 8 bits (their MLAS kernel widens to int32 first).
  The stem stage stays in float (`keep_float="stem"`, the default: the convs reading the
  3-channel image, and the convs after them that neither widen nor stride, EfficientNet's first
  block). The stem's GEMM has only 27 inputs per output, too few for the integer kernel to pay
  (0.99 ms INT8 vs 0.56 ms fp32 on the bottle encoder), and it sees raw pixel ranges; the first
  block's depthwise conv on 112 x 112 x 32 was slower in INT8 (0.34 vs 0.24 ms), and its
  16-channel output is half the size of the stem's, so the float -> INT8 boundary costs half.
  Bottle encoder feature cosine 0.997 / 0.995 / 0.996 (stem conv only in float: 0.980 / 0.965 /
  0.981). `keep_float="none"` quantizes the stem too and reads the pixels as integers
  (`_integer_input_plan`): the station has whole pixel values, and EfficientNet-Lite's
  normalisation (x - 127) / 128 IS a uint8 tensor with zero point 127 and scale 1/128, so the
  graph takes the uint8 (B, H, W, 4) pixels themselves (`preprocess.to_pixels`; a 4th channel with
  zero weights, because MLAS's symmetric conv kernel takes channels in fours and with 3 the stem
  takes the slow generic kernel above) and has no float image, no normalisation and no float ->
  INT8 boundary. Bottle encoder in the station loop: 1.33x fp32 (median of ten runs; the default
  ~1.25-1.28x; README), while feature cosine falls to 0.965 / 0.919 / 0.958 (mostly the stem stage's
  7-bit weights; README), which the bank absorbs (AUROC within 0.05 of fp32) but the
  describer's bridge, trained on fp32 features, does not (yes/no 76 % instead of 93-99 %; the
  station refuses that pair, README): opt-in. A graph whose normalisation is not one integer zero point and one scale
  (CLIP's per-channel means) quantizes its stem from calibrated ranges there (`Int8Report.stem`).
  INT8 S8S8 has no AVX2 kernel and was slower than fp32; U8U8 was 8x slower.
- "tensorrt": int8 activations and weights, both symmetric (zero point 0), the only Q/DQ form
  TensorRT accepts; 8-bit weights (GPUs accumulate in int32). Its cosine is measured with the
  Q/DQ arithmetic simulated in float (ORT without its CPU integer kernels), i.e. what TensorRT
  computes, not what this CPU would.

Sensitive layers can be kept in float (`exclude_nodes`), or found automatically
(`keep_float="auto"`): the node that adds the most error (cosine to fp32 of its input minus that
of its output, from ORT's qdq_loss_debug) is excluded, one at a time, until every feature output
reaches `min_cosine`. On EfficientNet-Lite0 most of the loss came from quantizing the stem stage
(see above); with it in float every output keeps >= 0.995, so this buys little there; detection
accuracy does not need it either, because a bundle's memory bank is built with the same INT8
encoder that scores the parts (README: bottle AUROC unchanged).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from ..errors import CalibrationError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

IMAGE_INPUT = "image"
CALIBRATE_METHODS = ("minmax", "percentile", "entropy", "distribution")
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"activation_type": "uint8", "weight_type": "int8", "symmetric": False, "reduce_range": "auto",
            "keep_float": "stem", "simulate": False, "min_cosine": 0.90},
    "tensorrt": {"activation_type": "int8", "weight_type": "int8", "symmetric": True, "reduce_range": False,
                 "keep_float": "none", "simulate": True, "min_cosine": 0.97},
}
KEEP_FLOAT = ("none", "auto", "stem")
MIN_CALIBRATION_IMAGES = 4


@dataclass
class Int8Report:
    """What was quantized, how, from which images, and how close it stays to fp32."""

    path: Path
    activation_type: str
    weight_type: str
    per_channel: bool
    symmetric: bool
    reduce_range: Union[bool, str]
    calibrate_method: str
    calibration_images: int
    cosine_images: int
    excluded_nodes: list[str]
    cosine: dict[str, float]  # per encoder output: mean cosine of patch feature vectors vs fp32
    cosine_on: str  # "onnxruntime-cpu" (fused integer kernels) or "qdq-simulated" (TensorRT-like)
    qdq_nodes: int
    seconds: float
    image_hashes: list[str] = field(default_factory=list)
    stem: str = "calibrated"  # the convs reading the image: "integer-input", "float" or "calibrated" (Q/DQ)

    @property
    def min_cosine(self) -> float:
        return min(self.cosine.values()) if self.cosine else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d

    def lines(self) -> list[str]:
        head = (f"INT8 encoder {self.path.name}: {self.activation_type} activations / {self.weight_type} weights"
                f"{' per-channel' if self.per_channel else ''}{' symmetric' if self.symmetric else ''}, "
                f"{self.calibrate_method} ranges from {self.calibration_images} real normal images, "
                f"{self.qdq_nodes} QuantizeLinear nodes, {len(self.excluded_nodes)} nodes kept in float, "
                f"stem {self.stem}")
        return [head] + [f"  {k:<8} cosine vs fp32 {v:.4f} ({self.cosine_images} images, {self.cosine_on})"
                         for k, v in self.cosine.items()]


class ImageBatchReader:
    """CalibrationDataReader over the given preprocessed image batches, and nothing else."""

    def __init__(self, batches: Iterable[np.ndarray], input_name: str = IMAGE_INPUT):
        self.batches = [_check_batch(b) for b in batches]
        if not self.batches:
            raise CalibrationError("INT8 calibration needs real normal images and got none: pass the held-out "
                                   "normal images (`iadgpt calibrate BUNDLE --normal DIR --int8`)")
        self.input_name = input_name
        self.yielded = 0
        self._it: Iterator[np.ndarray] = iter(self.batches)

    @property
    def images(self) -> int:
        return int(sum(len(b) for b in self.batches))

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        batch = next(self._it, None)
        if batch is None:
            return None
        self.yielded += 1
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)

    # onnxruntime's CalibrationDataReader protocol is get_next(); iteration is a convenience
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


def _check_batch(batch: np.ndarray) -> np.ndarray:
    b = np.asarray(batch)
    if b.ndim != 4 or b.shape[1] != 3 or b.dtype != np.float32:
        raise CalibrationError(f"calibration batches must be float32 (B, 3, H, W) encoder inputs, got {b.dtype} "
                               f"{b.shape}; lay images out with iadgpt.runtime.preprocess.to_batch")
    if len(b) and (float(b.min()) < 0.0 or float(b.max()) > 255.0 or float(b.max()) <= 1.0):
        raise CalibrationError("calibration batches must hold pixel values in 0..255 (as the station feeds the "
                               f"encoder), got {float(b.min()):.3g}..{float(b.max()):.3g}")
    return np.ascontiguousarray(b)


def rebatch(images: np.ndarray, batch_size: int = 8) -> list[np.ndarray]:
    """Split an (N, 3, H, W) encoder input into calibration batches."""
    return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]


# --------------------------------------------------------------------------- quantization


def quantize_encoder(fp32_onnx: PathLike, out_path: PathLike, calibration_batches: Iterable[np.ndarray], *,
                     preset: Optional[str] = "cpu", activation_type: Optional[str] = None,
                     weight_type: Optional[str] = None, symmetric: Optional[bool] = None,
                     per_channel: bool = True, reduce_range: Union[bool, str, None] = None,
                     calibrate_method: str = "minmax",
                     exclude_nodes: Sequence[str] = (), keep_float: Optional[str] = None,
                     min_cosine: Optional[float] = None, max_float_nodes: int = 4, preprocess: bool = True,
                     threads: Optional[int] = None, image_hashes: Sequence[str] = (),
                     eval_batches: Optional[Iterable[np.ndarray]] = None) -> Int8Report:
    """Write a static INT8 Q/DQ copy of an encoder graph calibrated on real images; returns its report.

    `preset` sets activation/weight types, symmetry and `reduce_range` (explicit arguments override
    it); `reduce_range` True = 7-bit weights everywhere, "auto" = 7-bit except depthwise convs.
    `keep_float` (default: the preset's): "stem" keeps the stem stage in float (`_stem_stage`; the
    CPU default), "none" quantizes every conv (the stem reads the pixels as integers where that is
    exact, `_integer_input_plan`), "auto" starts from the preset's choice and excludes the most
    damaging nodes until all outputs reach `min_cosine` (default: the preset's, 0.90 on the CPU
    where 7-bit weights cost a few hundredths, 0.97 for TensorRT); otherwise a result below
    `min_cosine` is only logged as a warning (the caller decides).
    The cosine is measured on `eval_batches` (other real images) when given, else on the calibration set.
    """
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        raise CalibrationError("INT8 quantization needs onnxruntime with its quantization tools: "
                               "`pip install iadgpt[cpu]`") from exc
    t0 = time.perf_counter()
    src, out = Path(fp32_onnx), Path(out_path)
    if not src.is_file():
        raise CalibrationError(f"fp32 encoder {src} does not exist; export the bundle with `iadgpt export`")
    if preset is not None and preset not in PRESETS:
        raise CalibrationError(f"unknown INT8 preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = dict(PRESETS[preset or "cpu"])
    act = activation_type or base["activation_type"]
    wt = weight_type or base["weight_type"]
    sym = base["symmetric"] if symmetric is None else bool(symmetric)
    rr = base["reduce_range"] if reduce_range is None else reduce_range
    min_cosine = float(base["min_cosine"] if min_cosine is None else min_cosine)
    if rr not in (True, False, "auto"):
        raise CalibrationError(f"reduce_range must be True, False or 'auto', got {rr!r}")
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if act not in types or wt not in types:
        raise CalibrationError(f"activation/weight types must be 'uint8' or 'int8', got {act!r}/{wt!r}")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy, "distribution": CalibrationMethod.Distribution}
    if calibrate_method not in methods:
        raise CalibrationError(f"unknown calibration method {calibrate_method!r}; choose one of "
                               f"{', '.join(CALIBRATE_METHODS)}")
    keep_float = keep_float or base["keep_float"]
    if keep_float not in KEEP_FLOAT:
        raise CalibrationError(f"keep_float must be one of {', '.join(KEEP_FLOAT)}, got {keep_float!r}")
    float_stem = keep_float == "stem" or (keep_float == "auto" and base["keep_float"] == "stem")
    reader = ImageBatchReader(calibration_batches)
    check = [_check_batch(b) for b in eval_batches] if eval_batches is not None else reader.batches
    check = check or reader.batches
    if reader.images < MIN_CALIBRATION_IMAGES:
        raise CalibrationError(f"INT8 calibration needs at least {MIN_CALIBRATION_IMAGES} real normal images, got "
                               f"{reader.images}; add normal images to the folder given to `iadgpt calibrate --normal`")
    out.parent.mkdir(parents=True, exist_ok=True)
    excluded = list(exclude_nodes)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=out.parent) as tmp:
        model_in = src
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process
            model_in = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(model_in), skip_symbolic_shape=False)
        stem_mode, pixels = "calibrated", None
        if float_stem:
            stem_mode = "float"
            excluded += [n for n in _stem_stage(model_in) if n not in excluded]
        elif keep_float == "none":
            pixels = _integer_input_plan(model_in, act, excluded)
        if pixels is not None:
            stem_mode = "integer-input"
            model_in = _pad_stem_channels(model_in, Path(tmp) / "stem_padded.onnx", pixels["stem"])
        extra: dict[str, Any] = {"ActivationSymmetric": sym, "WeightSymmetric": True}
        if rr == "auto":
            seven_bit = _non_depthwise_weights(model_in)
            extra["TensorQuantOverrides"] = {w: [{"reduce_range": True, **({"axis": axis} if per_channel else {})}]
                                             for w, axis in seven_bit.items()}

        def quantize(nodes: list[str]) -> None:
            reader.rewind()
            with _quiet_ort_quantizer():
                quantize_static(str(model_in), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                reduce_range=rr is True, activation_type=types[act], weight_type=types[wt],
                                nodes_to_exclude=nodes or None, calibrate_method=methods[calibrate_method],
                                extra_options=dict(extra))
            if pixels is not None:
                _read_pixels_as_integers(out, pixels)

        quantize(excluded)
        cosine = layer_cosine(src, out, check, threads=threads, simulate=base["simulate"])
        if keep_float == "auto":
            tried = 0
            while min(cosine.values()) < min_cosine and tried < max_float_nodes:
                worst = _most_damaged_node(model_in, out, reader, excluded, threads)
                if worst is None:
                    break
                excluded.append(worst)
                tried += 1
                log.info("keeping %s in float (worst output cosine was %.4f)", worst, min(cosine.values()))
                quantize(excluded)
                cosine = layer_cosine(src, out, check, threads=threads, simulate=base["simulate"])
        if min(cosine.values()) < min_cosine:
            log.warning("INT8 encoder %s keeps only cosine %.4f of fp32 features (< %.2f): keep sensitive layers in "
                        "float (keep_float='auto' / --int8-keep-float auto) or use more calibration images",
                        out, min(cosine.values()), min_cosine)
    report = Int8Report(path=out, activation_type=act, weight_type=wt, per_channel=per_channel, symmetric=sym,
                        reduce_range=rr, calibrate_method=calibrate_method, calibration_images=reader.images,
                        cosine_images=int(sum(len(b) for b in check)), excluded_nodes=excluded, cosine=cosine,
                        cosine_on="qdq-simulated" if base["simulate"] else "onnxruntime-cpu",
                        qdq_nodes=count_quantize_nodes(out), seconds=time.perf_counter() - t0,
                        image_hashes=list(image_hashes), stem=stem_mode)
    for line in report.lines():
        log.info("%s", line)
    return report


@contextlib.contextmanager
def _quiet_ort_quantizer() -> Iterator[None]:
    """ORT's quantizer warns on the root logger once per dead channel ("Increased scale ... bias");
    fold those into one debug line instead of flooding the CLI."""
    dropped = [0]

    def drop(record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and "onnxruntime" in record.pathname and "quantization" in record.pathname:
            dropped[0] += 1
            return False
        return True

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        if dropped[0]:
            log.debug("onnxruntime quantizer: %d warnings (weight scales raised to fit int32 biases)", dropped[0])


def _non_depthwise_weights(onnx_path: Path) -> dict[str, int]:
    """{weight initializer: channel axis} of Convs that are not depthwise and of MatMul/Gemm."""
    import onnx
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, int] = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            w = inits[node.input[1]]
            if group > 1 and w.dims[1] == 1:  # depthwise: one input channel per group
                continue
            out[w.name] = 0
        elif node.op_type in ("MatMul", "Gemm"):
            out[node.input[1]] = 1 if node.op_type == "MatMul" else 0
    return out


_PIXEL_OPS = ("Sub", "Div", "Mul", "Add", "Cast", "Transpose", "Pad", "Identity")


def _stem_convs(model: Any) -> list[str]:
    """Names of the Convs (of an onnx ModelProto) that read the image itself: at most 4 input channels,
    not grouped, and fed by a graph input through per-pixel ops only (normalisation, layout)."""
    inits = {i.name: i for i in model.graph.initializer}
    pixels = {i.name for i in model.graph.input if i.name not in inits}
    for node in model.graph.node:  # topological order: tensors computed from the image by per-pixel ops
        if node.op_type in _PIXEL_OPS and any(i in pixels for i in node.input):
            pixels.update(node.output)
    return [n.name for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits
            and n.input[0] in pixels and next((a.i for a in n.attribute if a.name == "group"), 1) == 1
            and inits[n.input[1]].dims[1] <= 4]


_ACTIVATIONS = ("Clip", "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu")


def _stem_stage(onnx_path: Path) -> list[str]:
    """The stem convs plus what follows them at the stem's resolution without widening it.

    Those convs (EfficientNet's first block: a depthwise and a projecting conv on 112 x 112 x 32)
    run no faster in INT8 here, and moving the float -> INT8 boundary past them quantizes the
    projected tensor (half the stem output) instead of the stem output, so the boundary's
    Quantize/transposes cost half. The walk stops at a conv that widens the channels, strides, or
    at a tensor read by more than one node (a residual branch needs both sides in one precision).
    """
    import onnx
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_name = {n.name: n for n in model.graph.node}
    stage: list[str] = []
    for stem in _stem_convs(model):
        node = by_name[stem]
        width = inits[node.input[1]].dims[0]
        while True:
            stage.append(node.name)
            readers = consumers.get(node.output[0], [])
            if len(readers) != 1:
                break
            nxt = readers[0]
            if nxt.op_type in _ACTIVATIONS:
                node = nxt
                continue
            if nxt.op_type != "Conv" or len(nxt.input) < 2 or nxt.input[1] not in inits:
                break
            strides = next((list(a.ints) for a in nxt.attribute if a.name == "strides"), [1])
            if inits[nxt.input[1]].dims[0] > width or any(s != 1 for s in strides):
                break
            node = nxt
    return [n for n in dict.fromkeys(stage) if n]  # an empty name would exclude every unnamed node


PIXEL_CHANNEL_MULTIPLE = 4  # MLAS's symmetric AVX2 conv kernel needs input channels in fours


def _integer_input_plan(onnx_path: Path, activation_type: str, excluded: Sequence[str]) -> Optional[dict[str, Any]]:
    """How the stem conv can read the pixels as integers (module docstring), or None (it is then
    quantized from calibrated ranges): when the graph's normalisation is (x - m) * a with one
    integer m and one a for every channel, checked on probe images, never assumed from the backbone.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)  # the probe loads the few tensors it needs
    stems = _stem_convs(model)
    if activation_type != "uint8" or len(stems) != 1 or stems[0] in excluded:
        log.info("INT8: the stem cannot read integer pixels (%s)", "excluded" if stems and stems[0] in excluded else
                 f"{len(stems)} stem convs" if len(stems) != 1 else f"{activation_type} activations")
        return None
    stem = next(n for n in model.graph.node if n.name == stems[0])
    inits = {i.name for i in model.graph.initializer}
    images = [i for i in model.graph.input if i.name not in inits]
    dims = [d.dim_value for d in images[0].type.tensor_type.shape.dim] if len(images) == 1 else []
    if len(dims) != 4 or not all(dims[1:]) or sum(stem.input[1] in n.input for n in model.graph.node) != 1:
        log.info("INT8: the stem cannot read integer pixels (needs one image input of fixed size, an unshared weight)")
        return None
    affine = _pixel_affine(model, Path(onnx_path).parent, images[0].name, stem.input[0], dims[1:])
    if affine is None:
        log.info("INT8: the stem cannot read integer pixels (the normalisation is not one integer zero point and scale)")
        return None
    channels = dims[1]
    padded = -(-channels // PIXEL_CHANNEL_MULTIPLE) * PIXEL_CHANNEL_MULTIPLE
    return {"stem": stem.name, "image": images[0].name, "zero_point": affine[0], "scale": affine[1],
            "channels": channels, "padded": padded}


def _pixel_affine(model: Any, base_dir: Path, image: str, tensor: str,
                  chw: Sequence[int]) -> Optional[tuple[int, float]]:
    """(m, a) if `tensor` == (image - m) * a on probe images (black, white, seeded random pixels).

    Runs only the nodes `tensor` depends on (a few per-pixel ops), so a large encoder is not loaded."""
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if tensor == image:  # the stem reads the raw pixels
        return 0, 1.0
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes, todo, seen = [], [tensor], set()
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        todo.extend(node.input)
    order = {id(n): k for k, n in enumerate(model.graph.node)}
    nodes.sort(key=lambda n: order[id(n)])
    needed = {t for n in nodes for t in n.input}
    inits = []
    for init in model.graph.initializer:
        if init.name in needed:
            init = onnx.TensorProto.FromString(init.SerializeToString())
            if uses_external_data(init):
                load_external_data_for_tensor(init, str(base_dir))
            inits.append(init)
    graph = onnx.helper.make_graph(nodes, "pixel_probe", [i for i in model.graph.input if i.name == image],
                                   [onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)],
                                   initializer=inits)
    probe = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.stack([np.zeros(chw, np.float32), np.full(chw, 255.0, np.float32),
                  np.random.default_rng(0).integers(0, 256, chw).astype(np.float32)])
    y = np.concatenate([np.asarray(session.run(None, {image: p[None]})[0], np.float64) for p in x])  # batch 1: any graph
    if y.shape != x.shape:
        return None
    a = float((y[1] - y[0]).mean() / 255.0)
    m = -float(y[0].mean()) / a if a > 0 else float("nan")
    if not (a > 0 and 0 <= round(m) <= 255 and abs(m - round(m)) < 1e-3):
        return None
    expected = (x - round(m)) * a
    if float(np.abs(y - expected).max()) > 1e-5 * max(1.0, float(np.abs(expected).max())):
        return None
    return int(round(m)), a


def _pad_stem_channels(src: Path, dst: Path, stem: str) -> Path:
    """Float copy of the graph whose stem conv reads its input zero-padded to a multiple of 4
    channels, with zero weights for the extra channels: the same function, in the shape the
    integer kernel takes. Returns `src` when the channels already fit."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    conv = next(n for n in graph.node if n.name == stem)
    weight = next(i for i in graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(weight)
    extra = -w.shape[1] % PIXEL_CHANNEL_MULTIPLE
    if extra == 0:
        return src
    weight.CopyFrom(numpy_helper.from_array(np.concatenate([w, np.zeros((w.shape[0], extra, *w.shape[2:]), w.dtype)], 1),
                                            weight.name))
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64), f"{stem}_channel_pads")
    graph.initializer.append(pads)
    padded = f"{conv.input[0]}_channel_padded"
    graph.node.insert(list(graph.node).index(conv), helper.make_node(
        "Pad", [conv.input[0], pads.name], [padded], name=f"{stem}_channel_pad", mode="constant"))
    conv.input[0] = padded
    onnx.save(model, str(dst))
    return dst


def _read_pixels_as_integers(path: Path, plan: dict[str, Any]) -> None:
    """Rewrite a quantized graph's input so the stem conv reads the pixels as integers (see
    `_integer_input_plan`): the input becomes uint8 (B, H, W, C) pixels, C padded to the stem's
    channels (`preprocess.to_pixels`), read by the stem's DequantizeLinear as (x - m) * a through a
    Transpose that ONNX Runtime folds into its channels-last integer conv. The float normalisation
    and its Q/DQ become dead and are removed; the stem's int32 bias is re-expressed in the new input
    scale. The padded channels' weights are zero (`_pad_stem_channels`): their pixels are ignored."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ..export.graph_passes import drop_dead_nodes

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    conv = next(n for n in graph.node if n.name == plan["stem"])
    dq = producer.get(conv.input[0])
    if dq is None or dq.op_type != "DequantizeLinear":
        raise CalibrationError(f"INT8: the stem conv {plan['stem']} does not read a quantized tensor after "
                               "quantization; keep it in float (--int8-keep-float stem)")
    stem = plan["stem"]
    m, a = int(plan["zero_point"]), float(plan["scale"])
    w_scale = numpy_helper.to_array(inits[producer[conv.input[1]].input[1]]).astype(np.float64)
    if len(conv.input) > 2 and conv.input[2]:
        bias_dq = producer[conv.input[2]]
        q, old = (numpy_helper.to_array(inits[t]).astype(np.float64) for t in bias_dq.input[:2])
        new = (a * w_scale).astype(np.float32)
        inits[bias_dq.input[0]].CopyFrom(numpy_helper.from_array(
            np.round(q * old / new.astype(np.float64)).astype(np.int32), bias_dq.input[0]))
        inits[bias_dq.input[1]].CopyFrom(numpy_helper.from_array(new, bias_dq.input[1]))
    image = next(i for i in graph.input if i.name == plan["image"])
    dims = image.type.tensor_type.shape.dim
    batch = dims[0].dim_param or dims[0].dim_value or "batch"
    image.CopyFrom(helper.make_tensor_value_info(plan["image"], TensorProto.UINT8,
                                                 [batch, dims[2].dim_value, dims[3].dim_value, plan["padded"]]))
    names = {k: f"{stem}_pixels_{k}" for k in ("scale", "m", "nchw")}
    graph.initializer.extend([numpy_helper.from_array(np.array(a, np.float32), names["scale"]),
                              numpy_helper.from_array(np.array(m, np.uint8), names["m"])])
    dq.input[:] = [names["nchw"], names["scale"], names["m"]]
    graph.node.insert(list(graph.node).index(dq), helper.make_node(
        "Transpose", [plan["image"]], [names["nchw"]], name=f"{stem}_pixels_to_nchw", perm=[0, 3, 1, 2]))
    drop_dead_nodes(graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def count_quantize_nodes(onnx_path: PathLike) -> int:
    import onnx
    model = onnx.load(str(onnx_path), load_external_data=False)
    return sum(n.op_type == "QuantizeLinear" for n in model.graph.node)


# --------------------------------------------------------------------------- accuracy


def _session(path: PathLike, threads: Optional[int], simulate: bool = False) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    if simulate:  # no Q/DQ fusion into integer kernels: float math on the quantized values
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _session_pixel_channels(session: Any) -> Optional[int]:
    """Channels of an ONNX Runtime session's image input when it reads uint8 pixels (integer-input
    INT8: feed `preprocess.batch_to_pixels` of a `to_batch` batch), else None (feed the batch)."""
    from ..runtime.preprocess import pixel_channels

    image = next(i for i in session.get_inputs() if i.name == IMAGE_INPUT)
    return pixel_channels(np.uint8 if image.type == "tensor(uint8)" else None, image.shape)


def patch_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine of the per-location channel vectors of two (B, C, h, w) feature maps.

    This is what the memory-bank scorer compares (each patch vector is L2-normalised), so it is
    the closeness that matters for anomaly scores; all-zero vectors (ReLU6 dead spots) count as 1.
    """
    a = np.asarray(a, np.float64).reshape(a.shape[0], a.shape[1], -1) if a.ndim == 4 else np.asarray(a, np.float64)
    b = np.asarray(b, np.float64).reshape(a.shape)
    if a.ndim != 3:
        a, b = a.reshape(1, 1, -1), b.reshape(1, 1, -1)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
    return float(cos.mean())


def layer_cosine(fp32_onnx: PathLike, int8_onnx: PathLike, batches: Iterable[np.ndarray],
                 threads: Optional[int] = None, simulate: bool = False) -> dict[str, float]:
    """Per encoder output (feat0, feat1, ...): mean patch cosine of INT8 vs fp32 features.

    `simulate` runs the Q/DQ graph without ONNX Runtime's CPU integer kernels (what TensorRT or
    any int32-accumulating device computes); otherwise it is what this CPU computes.
    """
    from ..runtime.preprocess import encoder_input

    ref, q = _session(fp32_onnx, threads), _session(int8_onnx, threads, simulate)
    names = [o.name for o in ref.get_outputs()]
    channels = _session_pixel_channels(q)
    sums = {n: 0.0 for n in names}
    count = 0
    for batch in batches:
        batch = _check_batch(batch)
        a = ref.run(names, {IMAGE_INPUT: batch})
        b = q.run(names, {IMAGE_INPUT: encoder_input(batch, channels)})
        for n, x, y in zip(names, a, b):
            sums[n] += patch_cosine(x, y) * len(batch)
        count += len(batch)
    if count == 0:
        raise CalibrationError("no images to compare INT8 with fp32 on; pass real normal images")
    return {n: s / count for n, s in sums.items()}


def _most_damaged_node(float_model: Path, qdq_model: Path, reader: ImageBatchReader, excluded: list[str],
                       threads: Optional[int], max_images: int = 4) -> Optional[str]:
    """The quantized Conv/MatMul/Gemm that loses most cosine between its input and its output.

    Activations of both graphs come from ORT's qdq_loss_debug on a few calibration images; the
    damage of a node is cos(input) - cos(output) vs fp32, i.e. what it adds to the error it
    inherits (the deepest nodes are otherwise always "worst").
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    model = onnx.load(str(float_model), load_external_data=False)
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    few = ImageBatchReader([b[:max_images] for b in reader.batches[:1]])
    with tempfile.TemporaryDirectory(prefix=".int8-debug-") as tmp:
        f_aug, q_aug = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        modify_model_output_intermediate_tensors(str(float_model), str(f_aug))
        modify_model_output_intermediate_tensors(str(qdq_model), str(q_aug))
        f_act = collect_activations(str(f_aug), few)
        few.rewind()
        q_act = collect_activations(str(q_aug), few)
    matched = create_activation_matching(q_act, f_act)

    def cos(tensor: str) -> Optional[float]:
        pair = matched.get(tensor)
        if not pair or "float" not in pair or "pre_qdq" not in pair:
            return None
        pairs = zip(pair["float"], pair["pre_qdq"])
        return float(np.mean([patch_cosine(np.asarray(f), np.asarray(q)) for f, q in pairs]))

    worst, worst_damage = None, 0.0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or node.name in excluded:
            continue
        out = node.output[0]
        nxt = consumers.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type in ("Clip", "Relu"):  # fused activation: Q/DQ sits after it
            out = nxt[0].output[0]
        c_in, c_out = cos(node.input[0]), cos(out)
        if c_in is None or c_out is None:
            continue
        if c_in - c_out > worst_damage:
            worst, worst_damage = node.name, c_in - c_out
    if worst is not None:
        log.info("most damaging node %s: loses %.4f cosine", worst, worst_damage)
    return worst
