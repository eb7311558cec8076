"""Engines: onnxruntime vs numpy/torch, input checks, no silent provider fallback, TensorRT naming."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from iadgpt.errors import EngineError, ExportError  # noqa: E402
from iadgpt.runtime import engines as eng  # noqa: E402
from iadgpt.runtime.engines import (  # noqa: E402
    Engine,
    EngineInfo,
    OrtEngine,
    TorchEngine,
    build_trt_engine,
    check_engine_compat,
    engine_compat_problems,
    engine_filename,
    has_qdq_nodes,
    open_engine,
    parse_engine_filename,
    read_engine_info,
)

TRT_SKIP = "TensorRT is not installed here (cannot be installed on this machine): native TensorRT engine tests skipped"
RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)


@pytest.fixture(scope="module")
def linear_onnx(tmp_path_factory) -> Path:
    """y = x @ W + b and s = sum(relu(y), axis=1), dynamic batch, two outputs."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["y"]),
         helper.make_node("Relu", ["y"], ["r"]),
         helper.make_node("ReduceSum", ["r", "axes"], ["s"], keepdims=0)],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b"),
                     numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("onnx") / "linear.onnx"
    onnx.save(model, str(path))
    return path


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    y = x @ W + B
    return {"y": y, "s": np.maximum(y, 0).sum(axis=1)}


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory):
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, img):
            f = torch.relu(self.conv(img))
            return f, self.fc(f.mean(dim=(2, 3)))

    torch.manual_seed(0)
    module = Tiny().eval()
    path = tmp_path_factory.mktemp("torch") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 3, 8, 8),), str(path), input_names=["img"],
                          output_names=["feat", "logit"], dynamic_axes={"img": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return module, path


def test_ort_matches_numpy(linear_onnx: Path) -> None:
    with OrtEngine(linear_onnx, threads=1) as e:
        assert isinstance(e, Engine)
        assert e.backend == "onnxruntime" and e.provider == "cpu" and e.precision == "fp32"
        assert e.input_names == ["x"] and e.output_names == ["y", "s"]
        assert e.input_shapes == {"x": ("batch", 4)}
        for batch in (1, 5):
            x = RNG.standard_normal((batch, 4)).astype(np.float32)
            out = e.run({"x": x})
            ref = reference(x)
            for k in ("y", "s"):
                np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-5)
        assert e.last_run_ms is not None and e.last_run_ms >= 0
    with pytest.raises(EngineError, match="closed"):
        e.run({"x": x})


@pytest.mark.parametrize("feeds, pattern", [
    ({"x": np.zeros((2, 4), np.float64)}, r"input 'x' expects float32 with shape \(batch, 4\), got float64.*astype"),
    ({"x": np.zeros((2, 5), np.float32)}, r"input 'x' expects float32 with shape \(batch, 4\), got shape \(2, 5\)"),
    ({"x": np.zeros((4,), np.float32)}, r"input 'x' expects .* got shape \(4,\)"),
    ({}, r"missing input\(s\) \['x'\]"),
    ({"x": np.zeros((1, 4), np.float32), "extra": np.zeros(1)}, r"unknown input\(s\) \['extra'\]"),
    ({"x": [[0.0] * 4]}, r"input 'x' must be a numpy array"),
])
def test_ort_input_errors(linear_onnx: Path, feeds: dict, pattern: str) -> None:
    with OrtEngine(linear_onnx) as e:
        with pytest.raises(EngineError, match=pattern):
            e.run(feeds)


def test_cuda_provider_on_cpu_build_is_an_error(linear_onnx: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(EngineError, match=r"no CUDAExecutionProvider.*iadgpt\[gpu\]"):
        OrtEngine(linear_onnx, provider="cuda")
    with pytest.raises(EngineError, match=r"TensorrtExecutionProvider.*iadgpt\[gpu\]"):
        OrtEngine(linear_onnx, provider="tensorrt")
    with pytest.raises(EngineError, match="unknown onnxruntime provider"):
        OrtEngine(linear_onnx, provider="rocm")


def test_listed_but_inactive_provider_is_an_error(linear_onnx: Path, monkeypatch) -> None:
    """onnxruntime-gpu lists CUDA even when its libraries fail to load, then runs on CPU."""
    seen = {}

    class FakeSession:
        def __init__(self, path, sess_options=None, providers=None):
            seen["providers"] = providers

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    with pytest.raises(EngineError, match=r"runs on \['CPUExecutionProvider'\].*Refusing to run on CPU silently"):
        OrtEngine(linear_onnx, provider="cuda", device_id=1)
    assert seen["providers"][0] == ("CUDAExecutionProvider", {"device_id": 1})


def test_threads_and_optimisation_level(linear_onnx: Path, monkeypatch) -> None:
    captured = {}
    real = ort.InferenceSession

    def spy(path, sess_options=None, providers=None):
        captured["so"], captured["providers"] = sess_options, providers
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    e = OrtEngine(linear_onnx, threads=3)
    so = captured["so"]
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert captured["providers"] == ["CPUExecutionProvider"]
    assert e.session_options is so
    with pytest.raises(EngineError, match="threads must be >= 1"):
        OrtEngine(linear_onnx, threads=0)


def test_missing_onnxruntime_names_the_extra(linear_onnx: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(EngineError, match=r"pip install iadgpt\[cpu\]"):
        OrtEngine(linear_onnx)


def test_missing_or_bad_graph(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="does not exist.*iadgpt export"):
        OrtEngine(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(EngineError, match=r"cannot load .*bad\.onnx"):
        OrtEngine(bad)


def test_torch_engine_equals_ort(torch_model) -> None:
    module, path = torch_model
    img = RNG.standard_normal((3, 3, 8, 8)).astype(np.float32)
    with OrtEngine(path) as o, TorchEngine(module, ["img"], ["feat", "logit"]) as t:
        assert t.backend == "torch" and t.provider == "cpu"
        a, b = o.run({"img": img}), t.run({"img": img})
        assert set(a) == set(b) == {"feat", "logit"}
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
        with pytest.raises(EngineError, match=r"missing input\(s\) \['img'\]"):
            t.run({"x": img})


def test_torch_engine_output_count_and_device_checks(torch_model) -> None:
    torch = pytest.importorskip("torch")
    module, _ = torch_model
    with pytest.raises(EngineError, match="returned 2 outputs, expected 1"):
        TorchEngine(module, ["img"], ["feat"]).run({"img": np.zeros((1, 3, 8, 8), np.float32)})
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no CUDA GPU"):
            TorchEngine(module, ["img"], ["feat", "logit"], device="cuda")
    with pytest.raises(EngineError, match="cuda_graph=True needs device='cuda'"):
        TorchEngine(module, ["img"], ["feat", "logit"], cuda_graph=True)
    shaped = TorchEngine(module, ["img"], ["feat", "logit"], input_shapes={"img": (None, 3, 8, 8)})
    with pytest.raises(EngineError, match=r"input 'img' expects .*\(\?, 3, 8, 8\)"):
        shaped.run({"img": np.zeros((1, 3, 9, 9), np.float32)})


def test_torch_cuda_graph_recaptures_on_shape_change(torch_model) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: CUDA graph capture not tested")
    module, path = torch_model
    with OrtEngine(path) as o, TorchEngine(module, ["img"], ["feat", "logit"], device="cuda", cuda_graph=True) as t:
        for batch in (2, 2, 4, 2):
            img = RNG.standard_normal((batch, 3, 8, 8)).astype(np.float32)
            a, b = o.run({"img": img}), t.run({"img": img})
            for k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_open_engine_factory(linear_onnx: Path) -> None:
    with open_engine("onnxruntime", linear_onnx, threads=1) as e:
        assert isinstance(e, OrtEngine)
    with open_engine("ort", linear_onnx) as e:
        assert e.backend == "onnxruntime"
    with pytest.raises(EngineError, match=r"unknown inference backend 'openvino'.*onnxruntime.*tensorrt"):
        open_engine("openvino", linear_onnx)


# ----------------------------------------------------------------- TensorRT naming/compat (no TensorRT needed)


def test_engine_filename_round_trip() -> None:
    name = engine_filename("encoder", "fp16", "10.3.0.26", (8, 9))
    assert name == "encoder.fp16.trt10.3.0.sm89.engine"
    assert engine_filename("a.b", "int8", "10.0", "9.0") == "a.b.int8.trt10.0.0.sm90.engine"
    assert engine_filename("x", "fp32", "10.8.0", "sm120") == "x.fp32.trt10.8.0.sm120.engine"
    info = parse_engine_filename(name)
    assert info == EngineInfo("encoder", "fp16", "10.3.0", (8, 9))
    assert parse_engine_filename("a.b.int8.trt10.0.0.sm100.engine") == EngineInfo("a.b", "int8", "10.0.0", (10, 0))
    assert parse_engine_filename("model.engine") is None
    with pytest.raises(EngineError, match="unknown TensorRT precision"):
        engine_filename("x", "fp8", "10.3.0", (8, 9))


def test_engine_compat_check() -> None:
    info = EngineInfo("encoder", "fp16", "10.3.0", (8, 9))
    assert engine_compat_problems(info, "10.3.0.26", (8, 9)) == []
    check_engine_compat(info, "10.3.0", "8.9")
    with pytest.raises(EngineError, match=r"TensorRT 10\.3\.0, this host has TensorRT 10\.4\.0"
                                          r".*iadgpt build BUNDLE --precision fp16"):
        check_engine_compat(info, "10.4.0", (8, 9), "encoder.fp16.trt10.3.0.sm89.engine")
    with pytest.raises(EngineError, match=r"sm89\), this GPU is 8\.7 \(sm87\).*--precision fp16"):
        check_engine_compat(info, "10.3.0", (8, 7))
    assert len(engine_compat_problems(info, "9.0.0", (7, 5))) == 2


def test_read_engine_info_sidecar_and_name(tmp_path: Path) -> None:
    p = tmp_path / "encoder.int8.trt10.3.0.sm87.engine"
    p.write_bytes(b"x")
    (tmp_path / (p.name + ".json")).write_text(json.dumps(
        {"stem": "encoder", "precision": "int8", "trt_version": "10.3.0", "compute_capability": "8.7",
         "source_sha256": "ab" * 32}))
    side, by_name = read_engine_info(p)
    assert side.source_sha256 == "ab" * 32 and side.compute_capability == (8, 7)
    assert by_name == EngineInfo("encoder", "int8", "10.3.0", (8, 7))
    (tmp_path / (p.name + ".json")).write_text("{")
    with pytest.raises(EngineError, match="sidecar.*unreadable.*iadgpt build"):
        read_engine_info(p)


def test_int8_build_needs_qdq_and_missing_tensorrt(linear_onnx: Path, tmp_path: Path, monkeypatch) -> None:
    assert not has_qdq_nodes(linear_onnx)
    with pytest.raises(ExportError, match="no QuantizeLinear nodes.*explicitly quantized"):
        build_trt_engine(linear_onnx, tmp_path, precision="int8")
    with pytest.raises(ExportError, match="unknown TensorRT precision"):
        build_trt_engine(linear_onnx, tmp_path, precision="fp8")

    q = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "sc", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.array(0.1, np.float32), "sc"),
                     numpy_helper.from_array(np.array(0, np.int8), "zp")])
    qpath = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(q, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(qpath))
    assert has_qdq_nodes(qpath)

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError, match=r"pip install iadgpt\[trt\].*NVIDIA GPU"):
        build_trt_engine(qpath, tmp_path, precision="int8")
    with pytest.raises(EngineError, match=r"pip install iadgpt\[trt\]"):
        eng.TensorRTEngine(tmp_path / "x.fp16.trt10.3.0.sm89.engine")
    with pytest.raises(EngineError, match=r"pip install iadgpt\[trt\]"):
        open_engine("tensorrt", linear_onnx)


# ----------------------------------------------------------------- native TensorRT (needs tensorrt + GPU)


def test_tensorrt_build_and_run_matches_ort(linear_onnx: Path, tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt", reason=TRT_SKIP)
    path = build_trt_engine(linear_onnx, tmp_path, precision="fp32", timing_cache=tmp_path / "timing.cache",
                            batch_range=(1, 2, 8))
    assert path.name == engine_filename("linear", "fp32", trt.__version__, parse_engine_filename(path.name).compute_capability)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    with eng.TensorRTEngine(path) as t:
        assert t.input_names == ["x"] and set(t.output_names) == {"y", "s"}
        out = t.run({"x": x})
        for k, v in reference(x).items():
            np.testing.assert_allclose(out[k], v, rtol=1e-4, atol=1e-4)
        with pytest.raises(EngineError, match="outside the engine's profile"):
            t.run({"x": np.zeros((9, 4), np.float32)})
    with open_engine("tensorrt", linear_onnx, precision="fp32", engine_dir=tmp_path) as t:
        np.testing.assert_allclose(t.run({"x": x})["y"], reference(x)["y"], rtol=1e-4, atol=1e-4)
