"""Dataset listing and image/mask reading on tiny synthetic datasets, and the shared real copies."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from iadgpt.data import (Sample, load_split, mvtec_test, mvtec_train, read_image, read_mask,
                         visa_split)
from iadgpt.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _image(h: int = 8, w: int = 10) -> np.ndarray:
    return np.full((h, w, 3), (10, 20, 30), dtype=np.uint8)  # BGR


def _mask(value: int = 255, h: int = 8, w: int = 10) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[2:5, 3:6] = value
    return mask


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """<root>/widget: 3 train, test good 2 / crack 2 / scratch 1, masks for the defects."""
    cat = tmp_path / "widget"
    for name in ("002.png", "000.png", "001.PNG"):
        _png(cat / "train" / "good" / name, _image())
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    for name in ("000.png", "001.png"):
        _png(cat / "test" / "good" / name, _image())
    for defect, names in (("crack", ("001.png", "000.png")), ("scratch", ("000.png",))):
        for name in names:
            _png(cat / "test" / defect / name, _image())
            _png(cat / "ground_truth" / defect / name.replace(".png", "_mask.png"), _mask())
    return tmp_path


def test_mvtec_train_lists_sorted_images_only(mvtec_root):
    paths = mvtec_train(mvtec_root, "widget")
    assert [p.name for p in paths] == ["000.png", "001.PNG", "002.png"]


def test_mvtec_test_labels_order_and_masks(mvtec_root):
    samples = mvtec_test(mvtec_root, "widget")
    assert [(s.defect_type, s.path.name, s.label) for s in samples] == [
        ("crack", "000.png", 1), ("crack", "001.png", 1),
        ("good", "000.png", 0), ("good", "001.png", 0), ("scratch", "000.png", 1)]
    for s in samples:
        if s.label:
            gt_dir = mvtec_root / "widget" / "ground_truth" / s.defect_type
            assert s.mask_path == gt_dir / f"{s.path.stem}_mask.png"
        else:
            assert s.mask_path is None
    assert load_split(mvtec_root, "widget", "test") == samples
    train = load_split(mvtec_root, "widget", "train")
    assert {(s.label, s.defect_type, s.mask_path) for s in train} == {(0, "good", None)}
    assert len(train) == 3


def test_read_image_rgb_and_grey(tmp_path):
    rgb = read_image(_png(tmp_path / "colour.png", _image()))
    assert rgb.shape == (8, 10, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (30, 20, 10)  # BGR on disk -> RGB in memory
    grey = read_image(_png(tmp_path / "grey.png", np.full((5, 7), 77, dtype=np.uint8)))
    assert grey.shape == (5, 7, 3) and (grey == 77).all()


@pytest.mark.parametrize("content", [b"", b"definitely not a png"])
def test_read_image_corrupt_names_the_path(tmp_path, content):
    bad = tmp_path / "broken.png"
    bad.write_bytes(content)
    with pytest.raises(DataError, match="broken.png.*corrupt"):
        read_image(bad)
    with pytest.raises(DataError, match="missing.png: no such file"):
        read_image(tmp_path / "missing.png")


def test_read_mask_binarises_at_128_and_resizes(tmp_path):
    values = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    path = _png(tmp_path / "m_mask.png", values)
    assert read_mask(path, (1, 4)).tolist() == [[False, False, True, True]]
    sample = Sample(tmp_path / "m.png", 1, "crack", path)
    assert read_mask(sample, (1, 4, 3)).tolist() == [[False, False, True, True]]
    # Nearest neighbour: a 2x upscale keeps the mask binary and doubles each pixel.
    assert read_mask(path, (2, 8)).tolist() == [[False] * 4 + [True] * 4] * 2
    assert read_mask(path, (1, 4), threshold=1).tolist() == [[False, True, True, True]]


def test_a_0_1_mask_is_refused_naming_the_file_and_the_convention(tmp_path):
    # Read against the 0/255 convention every defect of a 0/1 mask would vanish, and the metric would
    # later fail with "no anomalous entries" without saying which file or why.
    path = _png(tmp_path / "m_mask.png", np.array([[0, 1, 1, 0]], dtype=np.uint8))
    with pytest.raises(DataError, match=r"m_mask.png: mask values are 0..1, .*0/255"):
        read_mask(Sample(tmp_path / "m.png", 1, "crack", path), (1, 4))
    assert read_mask(path, (1, 4), threshold=1).tolist() == [[False, True, True, False]]  # a 0/1 layout (VisA)


def test_read_mask_normal_sample_is_all_false(tmp_path):
    mask = read_mask(Sample(tmp_path / "x.png", 0, "good", None), (6, 9, 3))
    assert mask.shape == (6, 9) and mask.dtype == bool and not mask.any()
    with pytest.raises(DataError, match="without a mask"):
        read_mask(Sample(tmp_path / "x.png", 1, "crack", None), (6, 9))


# --------------------------------------------------------------------------- MVTec errors

def test_unknown_category_lists_found(mvtec_root):
    (mvtec_root / "gadget").mkdir()
    with pytest.raises(DataError, match=r"unknown category 'bottle'.*found.*: gadget, widget"):
        mvtec_train(mvtec_root, "bottle")


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="nope: no such folder"):
        mvtec_test(tmp_path / "nope", "widget")


def test_missing_train_folder_names_path_and_layout(tmp_path):
    (tmp_path / "widget" / "test").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        mvtec_train(tmp_path, "widget")
    message = str(err.value)
    assert str(tmp_path / "widget" / "train" / "good") in message
    assert "no such folder" in message and "MVTec AD layout" in message


def test_empty_folder(mvtec_root):
    for p in (mvtec_root / "widget" / "train" / "good").glob("*.*"):
        p.unlink()
    with pytest.raises(DataError, match="train/good: no images"):
        mvtec_train(mvtec_root, "widget")
    (mvtec_root / "widget" / "test" / "dent").mkdir()
    with pytest.raises(DataError, match="test/dent: no images"):
        mvtec_test(mvtec_root, "widget")


def test_missing_mask_names_expected_mask_path(mvtec_root):
    missing = mvtec_root / "widget" / "ground_truth" / "crack" / "001_mask.png"
    missing.unlink()
    with pytest.raises(DataError, match="missing ground-truth mask") as err:
        mvtec_test(mvtec_root, "widget")
    assert str(missing) in str(err.value)


def test_a_mask_with_an_upper_case_extension_is_found(mvtec_root):
    # 001_mask.PNG (a Windows tool's name) was reported as a missing mask
    mask = mvtec_root / "widget" / "ground_truth" / "crack" / "001_mask.png"
    mask.rename(mask.with_suffix(".PNG"))
    found = {s.path.name: s.mask_path for s in mvtec_test(mvtec_root, "widget") if s.defect_type == "crack"}
    assert found["001.png"].name == "001_mask.PNG"


def test_a_mask_of_another_aspect_ratio_is_stretched_with_a_warning(tmp_path, caplog):
    path = _png(tmp_path / "m_mask.png", np.full((6, 4), 255, np.uint8))
    assert read_mask(path, (6, 8)).all()  # stretched: 4 wide -> 8 wide
    assert "another aspect ratio" in caplog.text
    caplog.clear()
    assert read_mask(path, (12, 8)).all() and "aspect ratio" not in caplog.text  # a plain 2x rescale


def test_missing_ground_truth_folder(mvtec_root):
    for p in (mvtec_root / "widget" / "ground_truth" / "scratch").iterdir():
        p.unlink()
    (mvtec_root / "widget" / "ground_truth" / "scratch").rmdir()
    with pytest.raises(DataError, match="ground_truth/scratch: no such folder"):
        mvtec_test(mvtec_root, "widget")


# --------------------------------------------------------------------------- VisA

@pytest.fixture
def visa_root(tmp_path: Path) -> Path:
    """VisA-like: raw masks hold region ids (1, 2), not 255, as in the VisA download."""
    rows = ["object,split,label,image,mask"]
    for name in ("0002.JPG", "0001.JPG"):
        _png(tmp_path / "candle" / "Data" / "Images" / "Normal" / name, _image())
        rows.append(f"candle,train,normal,candle/Data/Images/Normal/{name},")
    _png(tmp_path / "candle" / "Data" / "Images" / "Normal" / "0003.JPG", _image())
    rows.append("candle,test,normal,candle/Data/Images/Normal/0003.JPG,")
    _png(tmp_path / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG", _image())
    _png(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "000.png", _mask(value=2))
    rows.append("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,"
                "candle/Data/Masks/Anomaly/000.png")
    _png(tmp_path / "pcb1" / "Data" / "Images" / "Normal" / "0001.JPG", _image())
    rows.append("pcb1,train,normal,pcb1/Data/Images/Normal/0001.JPG,")
    csv_file = tmp_path / "split_csv" / "1cls.csv"
    csv_file.parent.mkdir()
    csv_file.write_text("\n".join(rows) + "\n")
    return tmp_path


def test_visa_split_counts_labels_and_masks(visa_root):
    train = visa_split(visa_root, None, "candle", "train")
    assert [(s.path.name, s.label, s.defect_type, s.mask_path) for s in train] == [
        ("0001.JPG", 0, "good", None), ("0002.JPG", 0, "good", None)]
    test = visa_split(visa_root, visa_root / "split_csv" / "1cls.csv", "candle", "test")
    assert [(s.label, s.defect_type) for s in test] == [(1, "anomaly"), (0, "good")]
    anomaly = test[0]
    assert anomaly.mask_path == visa_root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"
    assert read_mask(anomaly, (8, 10)).sum() == 9  # region id 2 counts as defect
    assert load_split(visa_root, "candle", "test") == test  # auto-detects the CSV


def test_visa_errors(visa_root):
    with pytest.raises(DataError, match="unknown category 'bottle'; categories found: candle, pcb"):
        visa_split(visa_root, None, "bottle", "test")
    with pytest.raises(DataError, match="no split 'test' for 'pcb1'; splits found: train"):
        visa_split(visa_root, None, "pcb1", "test")
    with pytest.raises(DataError, match="other.csv: no such file"):
        visa_split(visa_root, visa_root / "other.csv", "candle", "test")
    mask = visa_root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"
    mask.unlink()
    with pytest.raises(DataError, match="000.png: missing ground-truth mask"):
        visa_split(visa_root, None, "candle", "test")
    bad = visa_root / "bad.csv"
    bad.write_text("object,split,image\ncandle,test,x.png\n")
    with pytest.raises(DataError, match="missing column.*label, mask"):
        visa_split(visa_root, bad, "candle", "test")


def test_load_split_rejects_bad_arguments(mvtec_root):
    with pytest.raises(DataError, match="split must be"):
        load_split(mvtec_root, "widget", "val")
    with pytest.raises(DataError, match="layout must be"):
        load_split(mvtec_root, "widget", "test", layout="kolektor")


# --------------------------------------------------------------------------- real data

def test_shared_real_datasets_counts():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (shared MVTec AD bottle / MPDD metal_plate copies)")
    bottle = SHARED_DATA / "mvtec_ad"
    assert len(mvtec_train(bottle, "bottle")) == 209
    test = mvtec_test(bottle, "bottle")
    assert Counter(s.defect_type for s in test) == {
        "good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}
    assert all(s.mask_path is not None for s in test if s.label)

    plate = SHARED_DATA / "mpdd"
    assert len(mvtec_train(plate, "metal_plate")) == 54
    test = mvtec_test(plate, "metal_plate")
    assert Counter((s.defect_type, s.label) for s in test) == {("good", 0): 26, ("defect", 1): 71}

    sample = next(s for s in test if s.label)  # one read end to end: image and its mask agree
    image = read_image(sample.path)
    mask = read_mask(sample, image.shape)
    assert image.shape[2] == 3 and mask.shape == image.shape[:2] and mask.any()


def test_an_all_black_mask_is_an_empty_mask_not_a_convention_error(tmp_path):
    """An all-black mask is an empty mask, not a refused 0/1 mask."""
    path = _png(tmp_path / "m_mask.png", _mask(0, 4, 6))
    mask = read_mask(path, (4, 6))
    assert mask.shape == (4, 6) and not mask.any()


def test_hidden_folders_in_a_test_split_are_not_defect_types(tmp_path):
    """`.ipynb_checkpoints` or a macOS folder in test/ is not a defect type (nor a missing-ground-truth error)."""
    cat = tmp_path / "widget"
    for sub in ("test/good", "test/crack", "test/.ipynb_checkpoints"):
        _png(cat / sub / "000.png", _image())
    _png(cat / "ground_truth/crack/000_mask.png", _mask())
    samples = mvtec_test(tmp_path, "widget")
    assert sorted(s.defect_type for s in samples) == ["crack", "good"]
