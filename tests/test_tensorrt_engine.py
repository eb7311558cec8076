"""TensorRT: engine names and compatibility checks (no TensorRT needed), the builder's refusals, and
native build + run against onnxruntime (needs tensorrt and a GPU: skipped here with the reason)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from iadgpt.errors import EngineError, ExportError  # noqa: E402
from iadgpt.runtime.engines import open_engine  # noqa: E402
from iadgpt.runtime.tensorrt_engine import (  # noqa: E402
    EngineInfo,
    TensorRTEngine,
    build_trt_engine,
    check_engine_compat,
    engine_compat_problems,
    engine_filename,
    has_qdq_nodes,
    parse_engine_filename,
    read_engine_info,
)

TRT_SKIP = "TensorRT is not installed here (cannot be installed on this machine): native TensorRT engine tests skipped"
RNG = np.random.default_rng(0)


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


def test_int8_advice_names_commands_that_exist(linear_onnx: Path, tmp_path: Path) -> None:
    import argparse

    from iadgpt.commands import build, calibrate
    with pytest.raises(ExportError) as err:
        build_trt_engine(linear_onnx, tmp_path, precision="int8")
    commands = str(err.value).split("`")[1::2]  # the quoted commands
    assert commands and all(c.startswith("iadgpt ") for c in commands)
    sub = argparse.ArgumentParser().add_subparsers()
    for module in (build, calibrate):
        module.add_parser(sub)
    for command in commands:  # each parses as written (with its placeholders); `iadgpt export --int8` did not
        words = command.split()
        sub.choices[words[1]].parse_args(words[2:])
    assert any("--int8" in c and "--backend tensorrt" in c for c in commands)


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
        TensorRTEngine(tmp_path / "x.fp16.trt10.3.0.sm89.engine")
    with pytest.raises(EngineError, match=r"pip install iadgpt\[trt\]"):
        open_engine("tensorrt", linear_onnx)


# ----------------------------------------------------------------- native TensorRT (needs tensorrt + GPU)


def test_tensorrt_build_and_run_matches_ort(linear_onnx: Path, linear_reference, tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt", reason=TRT_SKIP)
    path = build_trt_engine(linear_onnx, tmp_path, precision="fp32", timing_cache=tmp_path / "timing.cache",
                            batch_range=(1, 2, 8))
    assert path.name == engine_filename("linear", "fp32", trt.__version__, parse_engine_filename(path.name).compute_capability)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    with TensorRTEngine(path) as t:
        assert t.input_names == ["x"] and set(t.output_names) == {"y", "s"}
        out = t.run({"x": x})
        for k, v in linear_reference(x).items():
            np.testing.assert_allclose(out[k], v, rtol=1e-4, atol=1e-4)
        with pytest.raises(EngineError, match="outside the engine's profile"):
            t.run({"x": np.zeros((9, 4), np.float32)})
    with open_engine("tensorrt", linear_onnx, precision="fp32", engine_dir=tmp_path) as t:
        np.testing.assert_allclose(t.run({"x": x})["y"], linear_reference(x)["y"], rtol=1e-4, atol=1e-4)
