"""`iadgpt eval` end to end on a tiny synthetic MVTec-layout dataset, the text-prompt path with the
tiny CLIP, the errors a user sees, and one check on real MVTec AD data when it is present."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from iadgpt import evaluate
from iadgpt.cli import main
from iadgpt.data import load_split
from iadgpt.evaluate import evaluate_torch
from iadgpt.models.backbones import get_backbone
from iadgpt.models.prompts import load_prompts
from iadgpt.runtime.synthetic import SyntheticProduct

CATEGORY = "part"
SIZE = 128
N_TRAIN, N_TEST_GOOD, N_DEFECTIVE = 8, 4, 6
REQUIRED_KEYS = {"backbone", "shots", "resolution", "coreset", "seeds", "image_auroc", "pixel_auroc", "aupro",
                 "f1_max", "image_auroc_std", "pixel_auroc_std", "aupro_std", "seconds_per_image"}
FRACTIONS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "image_auroc_std", "pixel_auroc_std", "aupro_std")
MVTEC_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def build_dataset(root: Path) -> dict[str, np.ndarray]:
    """MVTec layout from rendered parts; returns the exact defect mask of each defective file stem."""
    cat = root / CATEGORY
    good = SyntheticProduct(kind="part", size=SIZE, seed=1, defect_rate=0.0)
    bad = SyntheticProduct(kind="part", size=SIZE, seed=2, defect_rate=1.0)
    for i in range(N_TRAIN):
        _write_rgb(cat / "train" / "good" / f"{i:03d}.png", good.sample(i).image)
    for i in range(N_TEST_GOOD):
        _write_rgb(cat / "test" / "good" / f"{i:03d}.png", good.sample(1000 + i).image)
    masks: dict[str, np.ndarray] = {}
    index = 0
    while len(masks) < N_DEFECTIVE:
        frame = bad.sample(index)
        index += 1
        if not frame.mask.any():  # no room for the defect: rendered good, not a defective sample
            continue
        stem = f"{frame.index:03d}"
        _write_rgb(cat / "test" / frame.defect_type / f"{stem}.png", frame.image)
        mask_path = cat / "ground_truth" / frame.defect_type / f"{stem}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(mask_path), frame.mask.astype(np.uint8) * 255)
        masks[stem] = frame.mask
    return masks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("synthetic_mvtec")
    return root, build_dataset(root)


def _check_fractions(data: dict) -> None:
    for key in FRACTIONS:
        assert 0.0 <= data[key] <= 1.0, (key, data[key])
    assert data["seconds_per_image"] > 0


# ------------------------------------------------------------------------------ dataset


def test_dataset_round_trips_masks(dataset):
    """The evaluation sees exactly the rendered ground truth (0/255 PNG -> bool, no resize at 128)."""
    root, masks = dataset
    samples = load_split(root, CATEGORY, "test")
    assert sum(s.label == 0 for s in samples) == N_TEST_GOOD
    assert sum(s.label == 1 for s in samples) == N_DEFECTIVE
    spec = get_backbone("efficientnet-lite0", size=SIZE).input_spec
    test = evaluate.TestSet.load(root, CATEGORY, spec, progress=False)
    assert test.batch.shape == (N_TEST_GOOD + N_DEFECTIVE, 3, SIZE, SIZE)
    for sample, mask, label in zip(test.samples, test.masks, test.labels):
        assert label == sample.label
        if sample.label:
            assert np.array_equal(mask, masks[sample.path.stem])
        else:
            assert not mask.any()


# ------------------------------------------------------------------------------ CLI, memory bank


def _spy_train_loading(monkeypatch) -> list[list[Path]]:
    from iadgpt.models import references
    calls: list[list[Path]] = []
    original = references.load_batch

    def spy(paths, backbone):
        paths = list(paths)
        calls.append(paths)
        return original(paths, backbone)

    monkeypatch.setattr(references, "load_batch", spy)
    return calls


def _forbid_test_loading(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the test set was loaded before a configuration error was reported")

    monkeypatch.setattr(evaluate.TestSet, "load", fail)


def test_cli_eval_bank(dataset, tmp_path, capsys, monkeypatch):
    root, _ = dataset
    train_loads = _spy_train_loading(monkeypatch)
    out, plots = tmp_path / "metrics.json", tmp_path / "plots"
    code = main(["eval", "--data", str(root), "--category", CATEGORY, "--shots", "2", "--seeds", "2",
                 "--resolution", str(SIZE), "--json", str(out), "--plots", str(plots)])
    assert code == 0
    assert "I-AUROC" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(data), REQUIRED_KEYS - set(data)
    assert data["backbone"] == "efficientnet-lite0"
    assert data["shots"] == 2 and data["seeds"] == 2 and data["resolution"] == SIZE and data["coreset"] is None
    _check_fractions(data)
    # clearly visible defects: a working detector must separate them from good parts and find them
    assert data["image_auroc"] >= 0.9, data
    assert data["pixel_auroc"] >= 0.9, data
    # only the shots some seed draws are decoded (2 shots x 2 seeds: at most 4 of the 8)
    assert len(train_loads) == 1 and 2 <= len(train_loads[0]) <= 4
    assert all(p.parent.name == "good" and p.parent.parent.name == "train" for p in train_loads[0])

    roc = cv2.imread(str(plots / "roc.png"))
    assert roc is not None and roc.shape[0] > 100
    overlays = sorted(p.name for p in plots.glob("*.png") if p.name != "roc.png")
    assert any(n.startswith("normal_good_") for n in overlays), overlays
    assert any(n.startswith("defect_") for n in overlays), overlays
    for name in overlays:
        img = cv2.imread(str(plots / name))
        assert img is not None and img.shape == (SIZE, SIZE, 3)


def test_cli_eval_all_shots_with_coreset(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "metrics.json"
    code = main(["eval", "--data", str(root), "--category", CATEGORY, "--shots", "0", "--coreset", "0.5",
                 "--resolution", str(SIZE), "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(data)
    assert data["shots"] == 0 and data["coreset"] == 0.5 and data["seeds"] == 1
    _check_fractions(data)
    assert data["image_auroc"] >= 0.9, data


def test_shots_more_than_train_images(dataset, capsys, monkeypatch):
    root, _ = dataset
    _forbid_test_loading(monkeypatch)
    code = main(["eval", "--data", str(root), "--category", CATEGORY, "--shots", str(N_TRAIN + 1),
                 "--resolution", str(SIZE)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--shots {N_TRAIN + 1}" in err and f"only {N_TRAIN} train images" in err


@pytest.mark.parametrize("flags,words", [
    (["--shots", "0", "--seeds", "3"], "--seeds 3 would repeat one evaluation: --shots all takes every one"),
    (["--shots", str(N_TRAIN), "--seeds", "2"], f"--shots {N_TRAIN} takes every one of the {N_TRAIN}"),
    # an engine flag without --bundle: the torch model ran on the CPU and the flag was ignored
    (["--backend", "tensorrt"], "--backend choose the engine that runs --bundle"),
    (["--threads", "0"], "--threads choose the engine"),
], ids=["all-shots", "every-train-image", "backend", "threads"])
def test_flags_the_torch_evaluation_cannot_honour_are_refused(dataset, capsys, monkeypatch, flags, words):
    root, _ = dataset
    _forbid_test_loading(monkeypatch)
    assert main(["eval", "--data", str(root), "--category", CATEGORY, "--resolution", str(SIZE), *flags]) == 2
    assert words in capsys.readouterr().err


# ------------------------------------------------------------------------------ text prompts


def test_text_scorer_needs_clip(dataset, capsys, monkeypatch):
    root, _ = dataset
    _forbid_test_loading(monkeypatch)  # refused before any image is read or encoded
    code = main(["eval", "--data", str(root), "--category", CATEGORY, "--scorer", "text",
                 "--resolution", str(SIZE)])
    assert code != 0
    err = capsys.readouterr().err.lower()
    assert "clip" in err and "memory-bank" in err, err


def test_unknown_object_prompts_fall_back_to_generic():
    prompts = load_prompts(CATEGORY)
    assert "generic.yaml" in prompts.source
    assert prompts.object_name == CATEGORY
    assert all(CATEGORY in s for s in prompts.normal + prompts.abnormal)


def test_tiny_clip_text_scorer_end_to_end(dataset, monkeypatch):
    """Random weights: no accuracy claim, only that the text path runs and maps have the image size."""
    root, _ = dataset
    seen = []
    original = evaluate.compute_metrics

    def spy(test, maps, scores):
        seen.append((maps.shape, test.masks.shape, scores.shape))
        return original(test, maps, scores)

    monkeypatch.setattr(evaluate, "compute_metrics", spy)
    result = evaluate_torch(root, CATEGORY, "clip-tiny", scorer="text", progress=False)
    n = N_TEST_GOOD + N_DEFECTIVE
    image = get_backbone("clip-tiny").input_spec.size[0]
    assert seen == [((n, image, image), (n, image, image), (n,))]
    data = result.to_json()
    assert REQUIRED_KEYS <= set(data)
    assert data["backbone"] == "clip-tiny" and data["shots"] == 0 and data["seeds"] == 1
    assert data["resolution"] == image
    _check_fractions(data)


def test_bad_arguments_fail_fast(dataset, monkeypatch):
    root, _ = dataset
    _forbid_test_loading(monkeypatch)
    with pytest.raises(evaluate.IadGptError, match="unknown scorer"):
        evaluate_torch(root, CATEGORY, scorer="magic", resolution=SIZE, progress=False)
    with pytest.raises(evaluate.IadGptError, match="shots"):
        evaluate_torch(root, CATEGORY, shots=-1, resolution=SIZE, progress=False)
    with pytest.raises(evaluate.IadGptError, match="seeds"):
        evaluate_torch(root, CATEGORY, shots=1, seeds=0, resolution=SIZE, progress=False)


# ------------------------------------------------------------------------------ malformed data


def test_missing_ground_truth_exit_2(dataset, tmp_path, capsys):
    root, _ = dataset
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    defect_type = next(p.name for p in (broken / CATEGORY / "test").iterdir() if p.name != "good")
    gt = broken / CATEGORY / "ground_truth" / defect_type
    shutil.rmtree(gt)
    code = main(["eval", "--data", str(broken), "--category", CATEGORY, "--resolution", str(SIZE)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(gt) in err, err


def test_unknown_category_exit_2(dataset, capsys):
    root, _ = dataset
    code = main(["eval", "--data", str(root), "--category", "bottle", "--resolution", str(SIZE)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(root / "bottle") in err and CATEGORY in err, err


def test_missing_train_folder_exit_2(dataset, tmp_path, capsys):
    root, _ = dataset
    broken = tmp_path / "no_train"
    shutil.copytree(root, broken)
    shutil.rmtree(broken / CATEGORY / "train")
    code = main(["eval", "--data", str(broken), "--category", CATEGORY, "--resolution", str(SIZE)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(broken / CATEGORY / "train" / "good") in err, err


# ------------------------------------------------------------------------------ real data


def test_real_mvtec_bottle_one_shot():
    """Published few-shot PatchCore-style results put 1-shot bottle near 0.99 image AUROC; a
    mis-normalised, mis-weighted or mis-wired model drops well below 0.97."""
    if not (MVTEC_ROOT / "bottle" / "test").is_dir():
        pytest.skip(f"MVTec AD bottle not found under {MVTEC_ROOT}")
    result = evaluate_torch(MVTEC_ROOT, "bottle", shots=1, seeds=1, progress=False)
    assert result.shots == 1 and result.seeds == 1 and result.resolution == 224
    assert result.image_auroc >= 0.97, result
    assert 0.0 <= result.pixel_auroc <= 1.0 and 0.0 <= result.aupro <= 1.0


def test_each_seed_draws_its_own_shots_and_up_to_8_shots_are_augmented(dataset, monkeypatch):
    """Seeds must draw different shots (else the reported spread over seeds means nothing), and the
    bank is augmented for 0 < shots <= 8 as documented, not for all train images."""
    from iadgpt.models import references
    root, _ = dataset
    calls: list[tuple[np.ndarray, bool]] = []
    original = references.memory_bank

    def spy(backbone, scorer, shot_batch, *, augment, **kw):
        calls.append((np.array(shot_batch, copy=True), bool(augment)))
        return original(backbone, scorer, shot_batch, augment=augment, **kw)

    monkeypatch.setattr(references, "memory_bank", spy)
    evaluate_torch(root, CATEGORY, shots=2, seeds=2, resolution=SIZE, progress=False)
    assert len(calls) == 2 and not np.array_equal(calls[0][0], calls[1][0])
    assert all(augmented for _, augmented in calls)
    calls.clear()
    evaluate_torch(root, CATEGORY, shots=N_TRAIN, resolution=SIZE, progress=False)  # N_TRAIN = 8
    assert [augmented for _, augmented in calls] == [True]
    calls.clear()
    evaluate_torch(root, CATEGORY, shots=0, resolution=SIZE, progress=False)
    assert [augmented for _, augmented in calls] == [False]


def test_summarise_reports_each_metric_as_its_mean_over_seeds():
    runs = [evaluate.RunMetrics(0.9, 0.8, 0.7, 0.6, np.zeros(1), np.zeros(1)),
            evaluate.RunMetrics(0.7, 0.6, 0.5, 0.4, np.zeros(1), np.zeros(1))]
    r = evaluate.summarise(runs, backbone="x", shots=1, resolution=32, coreset=None)
    assert (r.image_auroc, r.pixel_auroc, r.aupro, r.f1_max) == pytest.approx((0.8, 0.7, 0.6, 0.5))
    assert (r.image_auroc_std, r.pixel_auroc_std, r.aupro_std) == pytest.approx((0.1, 0.1, 0.1))


def test_maps_are_resized_to_non_square_masks_the_right_way_round():
    """A map at half the input resolution of a 16 x 24 (H x W) input is upsampled to 16 x 24, not
    24 x 16: a map that marks exactly the defect scores P-AUROC 1."""
    masks = np.zeros((2, 16, 24), bool)
    masks[0, 4:12, 14:22] = True
    maps = np.zeros((2, 8, 12), np.float32)
    maps[0, 2:6, 7:11] = 1.0
    test = evaluate.TestSet(samples=[], batch=np.zeros((2, 3, 16, 24), np.float32), masks=masks,
                            labels=np.array([1, 0]))
    run = evaluate.compute_metrics(test, maps, np.array([1.0, 0.0], np.float32))
    assert run.maps.shape == (2, 16, 24)
    assert run.pixel_auroc > 0.99 and run.image_auroc == 1.0


@pytest.mark.parametrize("flags", [["--backbone", "x"], ["--scorer", "bank"], ["--shots", "2"], ["--seeds", "2"],
                                   ["--coreset", "0.1"], ["--resolution", "128"], ["--no-augment"]])
def test_eval_bundle_refuses_every_torch_model_flag(tmp_path, capsys, flags):
    assert main(["eval", "--data", str(tmp_path), "--category", "c", "--bundle", str(tmp_path / "b"), *flags]) == 2
    assert f"{flags[0]} describe the torch model" in capsys.readouterr().err


def test_eval_forwards_engine_and_model_flags(tmp_path, monkeypatch):
    seen = {}

    def fake(name):
        def f(*args, **kwargs):
            seen[name] = (args, kwargs)
            raise KeyboardInterrupt
        return f

    monkeypatch.setattr(evaluate, "evaluate_bundle", fake("bundle"))
    monkeypatch.setattr(evaluate, "evaluate_torch", fake("torch"))
    assert main(["eval", "--data", str(tmp_path), "--category", "c", "--bundle", str(tmp_path / "b"),
                 "--backend", "torch", "--threads", "3"]) == 130
    assert seen["bundle"][1]["backend"] == "torch" and seen["bundle"][1]["threads"] == 3
    assert main(["eval", "--data", str(tmp_path), "--category", "c", "--shots", "2", "--seeds", "3",
                 "--coreset", "0.5", "--resolution", "160", "--no-augment", "--plots", str(tmp_path / "p")]) == 130
    kw = seen["torch"][1]
    assert (kw["shots"], kw["seeds"], kw["coreset"], kw["resolution"], kw["augment"], kw["plots"]) == \
        (2, 3, 0.5, 160, False, tmp_path / "p")
