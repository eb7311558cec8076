"""INT8 Q/DQ encoders: quantized from real images only, close to fp32, no CPU-dependent saturation."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization")
from onnx import numpy_helper  # noqa: E402

from iadgpt.bundle import Bundle  # noqa: E402
from iadgpt.calibration import int8  # noqa: E402
from iadgpt.errors import CalibrationError  # noqa: E402
from iadgpt.runtime.preprocess import to_batch  # noqa: E402
from iadgpt.runtime.synthetic import SyntheticProduct  # noqa: E402

from conftest import TINY_SIZE  # noqa: E402


def parts(n: int, seed: int, spec) -> np.ndarray:
    """Synthetic good parts laid out as the encoder input: real-looking images, not noise."""
    product = SyntheticProduct(kind="part", size=TINY_SIZE, seed=seed, defect_rate=0.0)
    return to_batch([product.sample(i).image for i in range(n)], spec)


@pytest.fixture(scope="module")
def encoder(tiny_bundle_path):
    return Bundle.load(tiny_bundle_path).graph_path("encoder")


@pytest.fixture(scope="module")
def images(tiny_bundle_path):
    spec = Bundle.load(tiny_bundle_path).input_spec
    return {"calib": int8.rebatch(parts(8, 31, spec), 4), "check": int8.rebatch(parts(4, 32, spec))}


@pytest.fixture(scope="module")
def cpu_int8(encoder, images, tmp_path_factory):
    """The default (CPU) preset; every feed the calibration reader hands to onnxruntime is recorded."""
    out = tmp_path_factory.mktemp("int8") / "encoder_int8.onnx"
    seen = []
    original = int8.ImageBatchReader.get_next

    def spy(self):
        item = original(self)
        if item is not None:
            seen.append(item["image"])
        return item

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int8.ImageBatchReader, "get_next", spy)
        report = int8.quantize_encoder(encoder, out, images["calib"], threads=2, eval_batches=images["check"])
    return out, report, seen


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _session(path, optimise=True):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if not optimise:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_cpu_preset_is_qdq_u8s8_and_close_to_fp32(cpu_int8):
    path, report, _ = cpu_int8
    ops = _ops(path)
    assert ops.count("QuantizeLinear") == report.qdq_nodes > 10 and "DequantizeLinear" in ops
    assert (report.activation_type, report.weight_type, report.reduce_range) == ("uint8", "int8", "auto")
    assert report.calibration_images == 8 and report.cosine_images == 4
    assert set(report.cosine) == {"feat0", "feat1", "feat2"}
    # 7-bit pointwise weights (needed against AVX2 saturation) cost ~0.03-0.04 cosine; see int8.py
    assert report.min_cosine >= 0.95, report.cosine


def test_cpu_preset_does_not_saturate(cpu_int8, images):
    """ORT's fused integer kernels give what the Q/DQ arithmetic says: results do not depend on the CPU."""
    path = cpu_int8[0]
    x = images["check"][0]
    fused = _session(path).run(None, {"image": x})
    exact = _session(path, optimise=False).run(None, {"image": x})
    for a, b in zip(fused, exact):
        assert int8.patch_cosine(a, b) > 0.999


def test_reduce_range_auto_keeps_depthwise_at_8_bits(cpu_int8):
    model = onnx.load(str(cpu_int8[0]))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
               if i.data_type == onnx.TensorProto.INT8}
    assert weights
    depthwise = [w for w in weights.values() if w.ndim == 4 and w.shape[1] == 1]
    others = [w for w in weights.values() if w.ndim == 4 and w.shape[1] > 1]
    assert depthwise and others
    assert max(int(np.abs(w).max()) for w in depthwise) == 127
    assert max(int(np.abs(w).max()) for w in others) <= 64  # 255 * 64 * 2 < 2**15


def test_tensorrt_preset_is_symmetric_int8_and_keeps_chosen_nodes_float(encoder, images, tmp_path):
    stem = next(n.name for n in onnx.load(str(encoder)).graph.node if n.op_type == "Conv")
    out = tmp_path / "trt.onnx"
    report = int8.quantize_encoder(encoder, out, images["calib"], preset="tensorrt", threads=2,
                                   eval_batches=images["check"], exclude_nodes=[stem])
    model = onnx.load(str(out))
    inits = {i.name: i for i in model.graph.initializer}
    zps = [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
           if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)  # TensorRT: int8, zero point 0
    assert report.excluded_nodes == [stem]
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert conv.input[1] in inits and inits[conv.input[1]].data_type == onnx.TensorProto.FLOAT  # stem in float
    assert report.cosine_on == "qdq-simulated"
    assert report.min_cosine >= 0.97, report.cosine  # measured 0.973-0.988 (0.978+ with the stem quantized)


def test_calibration_reader_only_yields_the_given_images(cpu_int8, images):
    seen = cpu_int8[2]
    given = images["calib"]
    assert len(seen) >= len(given)  # at least one full pass (a second pass measures nothing new)
    assert all(any(b is g for g in given) for b in seen)


@pytest.mark.parametrize("batches,match", [
    ([], "got none"),
    ([np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)], "0..255"),
    ([np.zeros((4, 64, 64, 3), np.float32)], r"\(B, 3, H, W\)"),
    ([np.full((2, 3, 64, 64), 100.0, np.float32)], "at least 4"),
])
def test_no_made_up_or_malformed_calibration_data(encoder, tmp_path, batches, match):
    with pytest.raises(CalibrationError, match=match):
        int8.quantize_encoder(encoder, tmp_path / "q.onnx", batches)


def test_patch_cosine():
    a = np.random.default_rng(0).random((2, 8, 4, 4))
    assert int8.patch_cosine(a, a) == pytest.approx(1.0)
    assert int8.patch_cosine(a, -a) == pytest.approx(-1.0)
    assert int8.patch_cosine(np.zeros_like(a), np.zeros_like(a)) == pytest.approx(1.0)
