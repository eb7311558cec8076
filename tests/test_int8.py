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
from iadgpt.runtime.preprocess import batch_to_pixels, to_batch  # noqa: E402
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


def _session(model, optimise=True):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if not optimise:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])


def test_cpu_preset_is_qdq_u8s8_and_close_to_fp32(cpu_int8):
    path, report, _ = cpu_int8
    ops = _ops(path)
    assert ops.count("QuantizeLinear") == report.qdq_nodes > 10 and "DequantizeLinear" in ops
    assert (report.activation_type, report.weight_type, report.reduce_range) == ("uint8", "int8", "auto")
    assert report.calibration_images == 8 and report.cosine_images == 4
    assert set(report.cosine) == {"feat0", "feat1", "feat2"}
    # measured 0.996-0.997 with the stem stage in float (0.96-0.97 with only the stem conv in float)
    assert report.stem == "float" and report.min_cosine >= 0.99, report.cosine


@pytest.fixture(scope="module")
def all_int8(encoder, images, tmp_path_factory):
    """keep_float="none": every conv INT8, the stem reading integer pixels."""
    out = tmp_path_factory.mktemp("int8") / "encoder_all_int8.onnx"
    report = int8.quantize_encoder(encoder, out, images["calib"], threads=2, eval_batches=images["check"],
                                   keep_float="none")
    return out, report


def test_all_int8_is_close_to_fp32(all_int8):
    path, report = all_int8
    assert report.stem == "integer-input" and report.excluded_nodes == []
    # measured 0.95-0.97 here (bottle 224 px: 0.965 / 0.919 / 0.958)
    assert report.min_cosine >= 0.9, report.cosine


def test_all_int8_reads_the_pixels_as_integers(all_int8, images):
    """The graph takes the uint8 (B, H, W, 4) pixels the station has (`to_pixels`), and the stem
    reads them as (x - 127) / 128: no float normalisation, no quantization of the image, is left."""
    model = onnx.load(str(all_int8[0]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    image = model.graph.input[0]
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in image.type.tensor_type.shape.dim][1:] == [TINY_SIZE, TINY_SIZE, 4]
    readers = [n for n in model.graph.node if "image" in n.input]
    assert [(n.op_type, list(n.attribute[0].ints)) for n in readers] == [("Transpose", [0, 3, 1, 2])]
    assert not {"Sub", "Div"} & set(_ops(all_int8[0]))
    # simulate the Q/DQ arithmetic and read the tensor the stem conv sees
    stem = next(n for n in model.graph.node if n.name == "/backbone/_conv_stem/Conv")
    dq = next(n for n in model.graph.node if stem.input[0] in n.output)
    assert dq.op_type == "DequantizeLinear"
    assert float(inits[dq.input[1]]) == 1 / 128 and int(inits[dq.input[2]]) == 127
    model.graph.output.append(onnx.helper.make_tensor_value_info(stem.input[0], onnx.TensorProto.FLOAT, None))
    x = images["check"][0]
    seen = _session(model.SerializeToString(), optimise=False).run([stem.input[0]], {"image": batch_to_pixels(x, 4)})[0]
    assert seen.shape == (x.shape[0], 4, *x.shape[2:])
    np.testing.assert_array_equal(seen[:, :3], (x - 127) / 128)


def test_all_int8_ignores_the_padding_channel(all_int8, images):
    """The 4th channel's weights are zero: whatever it holds (zeros from `batch_to_pixels`, cv2's
    alpha from `to_pixels`, noise), the features are the same, in the fused kernels too."""
    x = batch_to_pixels(images["check"][0], 4)
    noisy = x.copy()
    noisy[..., 3] = np.random.default_rng(0).integers(0, 256, noisy.shape[:3], dtype=np.uint8)
    session = _session(all_int8[0])
    for a, b in zip(session.run(None, {"image": x}), session.run(None, {"image": noisy})):
        np.testing.assert_array_equal(a, b)


def test_all_int8_stem_bias_follows_the_exact_input_scale(all_int8, encoder):
    """The stem's int32 bias is re-expressed in the new input scale: it still dequantizes to the fp32 bias."""
    fp32 = onnx.load(str(encoder))
    f_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    f_stem = next(n for n in fp32.graph.node if n.name == "/backbone/_conv_stem/Conv")
    model = onnx.load(str(all_int8[0]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    stem = next(n for n in model.graph.node if n.name == "/backbone/_conv_stem/Conv")
    bias_dq, w_dq = (next(n for n in model.graph.node if t in n.output) for t in (stem.input[2], stem.input[1]))
    bias = inits[bias_dq.input[0]] * inits[bias_dq.input[1]].astype(np.float64)
    np.testing.assert_allclose(inits[bias_dq.input[1]], inits[w_dq.input[1]] / 128, rtol=1e-6)
    np.testing.assert_allclose(bias, f_inits[f_stem.input[2]], atol=float(inits[bias_dq.input[1]].max()))


def test_all_int8_runs_every_conv_in_integer_kernels(all_int8, tmp_path):
    """What makes it faster: after ONNX Runtime's fusions no float Conv is left (the stem included)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(all_int8[0]), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") >= 20 and "Conv" not in ops


@pytest.mark.parametrize("graph", ["cpu_int8", "all_int8"])
def test_fused_kernels_do_not_saturate(graph, images, request):
    """ORT's fused integer kernels (the integer-input stem's included) give what the Q/DQ arithmetic
    says: results do not depend on the CPU."""
    path = request.getfixturevalue(graph)[0]
    x = images["check"][0]
    x = batch_to_pixels(x, 4) if graph == "all_int8" else x
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


# EfficientNet's stem stage: the stem conv and the first block (no widening, stride 1)
STEM_STAGE = ["/backbone/_conv_stem/Conv", "/backbone/_blocks.0/_depthwise_conv/Conv",
              "/backbone/_blocks.0/_project_conv/Conv"]


def _float_convs(model):
    """Names of the convs whose weights are float initializers (quantized ones read a DQ output)."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Conv"
            and n.input[1] in inits and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]


def test_cpu_preset_keeps_the_stem_stage_in_float(cpu_int8):
    """EfficientNet's stem and first block (no widening, stride 1) stay float; INT8 starts at its 16-channel output."""
    model = onnx.load(str(cpu_int8[0]))
    inits = {i.name: i for i in model.graph.initializer}
    float_convs = _float_convs(model)
    assert float_convs == STEM_STAGE
    assert set(float_convs) <= set(cpu_int8[1].excluded_nodes)
    first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)
    assert first_q.input[0] == "/backbone/_blocks.0/_project_conv/Conv_output_0"


def _normalising_graph(path, mean, std, stems=1):
    """image -> (x - mean) / std -> `stems` 3x3 convs on it (enough for `_integer_input_plan`)."""
    from onnx import TensorProto, helper
    inits = [numpy_helper.from_array(np.asarray(mean, np.float32).reshape(1, -1, 1, 1), "mean"),
             numpy_helper.from_array(np.asarray(std, np.float32).reshape(1, -1, 1, 1), "std")]
    nodes = [helper.make_node("Sub", ["image", "mean"], ["centred"], name="sub"),
             helper.make_node("Div", ["centred", "std"], ["norm"], name="div")]
    outputs = []
    for k in range(stems):
        n, w = _conv(f"stem{k}", "norm", 3, 8)
        nodes.append(n), inits.append(w), outputs.append(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT,
                                                                                        ["batch", 8, 16, 16]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                         ["batch", 3, 16, 16])],
                              outputs, initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("mean,std,stems,plan", [
    (127.0, 128.0, 1, (127, 1 / 128)),                                  # EfficientNet-Lite
    (0.0, 255.0, 1, (0, 1 / 255)),                                      # plain 0..1 scaling
    ((122.77, 116.75, 104.09), (68.5, 66.6, 70.3), 1, None),           # CLIP: per-channel, not integers
    (127.5, 127.5, 1, None),                                            # zero point between two integers
    (127.0, 128.0, 2, None),                                            # two convs read the image
    (0.0, 1.0, 1, (0, 1.0)),                                            # raw pixels
])
def test_integer_input_plan(tmp_path, mean, std, stems, plan):
    got = int8._integer_input_plan(_normalising_graph(tmp_path / "g.onnx", mean, std, stems), "uint8", [])
    if plan is None:
        assert got is None
    else:
        assert (got["zero_point"], got["channels"], got["padded"]) == (plan[0], 3, 4)
        assert got["scale"] == pytest.approx(plan[1], rel=1e-6)


def test_integer_input_needs_uint8_activations(tmp_path):
    assert int8._integer_input_plan(_normalising_graph(tmp_path / "g.onnx", 127.0, 128.0), "int8", []) is None


def test_all_int8_quantizes_a_stem_that_cannot_read_integers_from_calibrated_ranges(tmp_path):
    """A CLIP-like normalisation is no uint8 zero point: the stem is quantized like any conv, and the report says so."""
    path = _normalising_graph(tmp_path / "g.onnx", (122.77, 116.75, 104.09), (68.5, 66.6, 70.3))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (4, 3, 16, 16)).astype(np.float32)]
    report = int8.quantize_encoder(path, tmp_path / "q.onnx", batches, threads=1, keep_float="none")
    assert report.stem == "calibrated" and report.excluded_nodes == []
    assert "Sub" in _ops(tmp_path / "q.onnx")
    assert int8.quantize_encoder(path, tmp_path / "f.onnx", batches, threads=1).stem == "float"


def _conv(name, x, cin, cout, stride=1):
    from onnx import helper
    w = numpy_helper.from_array(np.ones((cout, cin, 3, 3), np.float32), name + "_w")
    return helper.make_node("Conv", [x, w.name], [name + "_y"], name=name, strides=[stride, stride],
                            pads=[1, 1, 1, 1]), w


@pytest.mark.parametrize("layout,stage", [
    ("widen", ["stem", "relu", "narrow"]),    # stem -> relu -> conv 8->4 -> conv 4->16 (widens: stop; not a stem)
    ("stride", ["stem", "relu"]),             # the next conv halves the resolution
    ("branch", ["stem", "relu"]),             # the relu output feeds two nodes (a residual)
])
def test_stem_stage_walk(tmp_path, layout, stage):
    from onnx import TensorProto, helper
    scale = numpy_helper.from_array(np.full((1, 3, 1, 1), 1 / 128, np.float32), "scale")
    norm = helper.make_node("Mul", ["image", "scale"], ["norm_y"], name="norm")  # per-pixel ops may come first
    stem, w0 = _conv("stem", "norm_y", 3, 8)
    relu = helper.make_node("Relu", ["stem_y"], ["relu_y"], name="relu")
    nodes, inits = [norm, stem, relu], [scale, w0]
    if layout == "widen":
        for n, w in (_conv("narrow", "relu_y", 8, 4), _conv("wide", "narrow_y", 4, 16)):
            nodes.append(n), inits.append(w)
        out, channels = "wide_y", 16
    elif layout == "stride":
        n, w = _conv("down", "relu_y", 8, 8, stride=2)
        nodes.append(n), inits.append(w)
        out, channels = "down_y", 8
    else:
        n, w = _conv("side", "relu_y", 8, 8)
        nodes += [n, helper.make_node("Add", ["relu_y", "side_y"], ["sum_y"], name="add")]
        inits.append(w)
        out, channels = "sum_y", 8
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, channels, None, None])],
                              initializer=inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert int8._stem_stage(path) == stage


from onnx import TensorProto, helper  # noqa: E402


def test_keep_float_auto_on_the_cpu_starts_from_the_float_stem(encoder, images, tmp_path):
    """"auto" starts from the CPU preset's choice, the whole stem stage in float."""
    report = int8.quantize_encoder(encoder, tmp_path / "q.onnx", images["calib"], threads=1,
                                   keep_float="auto", eval_batches=images["check"])
    assert report.stem == "float"
    assert set(STEM_STAGE) <= set(report.excluded_nodes), report.excluded_nodes
    assert set(STEM_STAGE) <= set(_float_convs(onnx.load(str(tmp_path / "q.onnx"))))


def _two_conv_graph(path):
    """image -> conv A (benign) -> relu -> conv B (an outlier weight on a dead channel: per-tensor int8
    leaves B three levels for its other weights)."""
    rng = np.random.default_rng(0)
    wa = (rng.standard_normal((8, 3, 3, 3)) * 0.05).astype(np.float32)
    wb = (rng.standard_normal((8, 8, 1, 1)) * 0.01).astype(np.float32)
    wa[0] = -np.abs(wa[0])  # channel 0 is dead after the relu (pixels are >= 0) ...
    wb[0, 0, 0, 0] = 2.0  # ... so this weight changes nothing in float but sets B's per-tensor int8 scale
    bias = rng.uniform(-1e-3, 1e-3, 8).astype(np.float32)
    nodes = [helper.make_node("Conv", ["image", "wa"], ["a"], name="A", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"], name="relu"),
             helper.make_node("Conv", ["ar", "wb", "bias"], ["feat0"], name="B")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("feat0", TensorProto.FLOAT, ["batch", 8, 16, 16])],
                              initializer=[numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb"),
                                           numpy_helper.from_array(bias, "bias")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_keep_float_auto_excludes_the_most_damaging_node(tmp_path):
    """"auto" keeps the conv that ruins the features in float, and only that one."""
    src = _two_conv_graph(tmp_path / "g.onnx")
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (4, 3, 16, 16)).astype(np.float32)]
    report = int8.quantize_encoder(src, tmp_path / "q.onnx", batches, preset="tensorrt", per_channel=False,
                                   keep_float="auto", min_cosine=0.99, max_float_nodes=2, threads=1)
    assert report.excluded_nodes == ["B"]
    assert report.min_cosine >= 0.99, report.cosine


def test_integer_input_plan_respects_an_excluded_stem(tmp_path):
    """A stem the user keeps in float gets no integer-pixel plan (quantization would fail on it)."""
    path = _normalising_graph(tmp_path / "g.onnx", 127.0, 128.0)  # its one conv, "stem0", reads the image
    assert int8._integer_input_plan(path, "uint8", []) is not None
    assert int8._integer_input_plan(path, "uint8", ["stem0"]) is None
