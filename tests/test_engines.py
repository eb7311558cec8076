"""Engines: onnxruntime vs numpy/torch, input checks, no silent provider fallback."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from iadgpt.errors import EngineError  # noqa: E402
from iadgpt.runtime.engines import Engine, OrtEngine, TorchEngine, open_engine  # noqa: E402

RNG = np.random.default_rng(0)


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


def test_ort_matches_numpy(linear_onnx: Path, linear_reference) -> None:
    with OrtEngine(linear_onnx, threads=1) as e:
        assert isinstance(e, Engine)
        assert e.backend == "onnxruntime" and e.provider == "cpu" and e.precision == "fp32"
        assert e.input_names == ["x"] and e.output_names == ["y", "s"]
        assert e.input_shapes == {"x": ("batch", 4)}
        for batch in (1, 5):
            x = RNG.standard_normal((batch, 4)).astype(np.float32)
            out = e.run({"x": x})
            ref = linear_reference(x)
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
    # 100,000 threads took 1.6 GB and hung; the first count past the limit is refused (and a missing
    # limit then fails here in a second instead of hanging the suite)
    too_many = max(64, 4 * (os.cpu_count() or 1)) + 1
    with pytest.raises(EngineError, match=f"threads {too_many} is far more than"):
        OrtEngine(linear_onnx, threads=too_many)


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
