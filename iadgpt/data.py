"""Anomaly detection datasets on disk: the MVTec AD folder layout (also MPDD) and VisA's CSV split.

MVTec AD layout::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png            (defect "good" = normal)
    <root>/<category>/ground_truth/<defect>/<name>_mask.png

Listing is eager and strict: a broken copy of a dataset should fail here, with the path and
the expected layout in the message, not as a wrong metric later.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from iadgpt.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["Sample", "IMAGE_EXTENSIONS", "MIN_REFERENCE_SIDE", "mvtec_train", "mvtec_test", "visa_split",
           "load_split", "is_image_name", "check_link", "image_files", "read_image", "read_reference_image",
           "read_mask"]

# what every image listing takes (export, calibrate, eval and the station's folder source), so a
# file judged on the line can also be a reference image; all of them OpenCV decodes
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm"})
# Shorter side, px, below which an image is refused as a reference (export's bank, calibration's
# normals and defects). The coarsest feature cell of every backbone is 14-16 px (EfficientNet's
# stride 16, a ViT patch): a smaller picture holds less than one cell, and stretched to the input it
# is a flat blur, not a part (a stray 1x1 PNG moved a calibrated threshold from 0.93 to 1.0).
MIN_REFERENCE_SIDE = 16
GOOD = "good"
MVTEC_LAYOUT = ("the MVTec AD layout <category>/train/good/*.png, <category>/test/<defect>/*.png, "
                "<category>/ground_truth/<defect>/<name>_mask.png")
VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Sample:
    """One test (or train) image and what is known about it."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images
    mask_path: Optional[Path] = None  # None for normal images
    # Mask pixels >= this are defect. MVTec/MPDD masks are 0/255; raw VisA masks hold small
    # region ids (1, 2, ...), so VisA samples carry 1.
    mask_threshold: int = 128


# --------------------------------------------------------------------------- listing

def is_image_name(name: str) -> bool:
    """An image extension, and not hidden (``.DS_Store``, macOS's ``._x.png`` resource forks)."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def check_link(path: Path) -> None:
    """DataError for a symlink whose target is gone: skipping it would quietly use fewer images
    than the folder shows."""
    if path.is_symlink() and not path.exists():
        raise DataError(f"{path} is a broken link to {os.readlink(path)}: the image it points to is missing; "
                        "restore it or remove the link")


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; hidden files are ignored, a broken link
    is a DataError."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        if is_image_name(p.name):
            check_link(p)
            if p.is_file():  # not a folder named x.png
                out.append(p)
    return out


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _category_dir(root: PathLike, category: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; expected a dataset root holding one folder per "
                        f"category in {MVTEC_LAYOUT}")
    folder = root / category
    if not folder.is_dir():
        found = [p.name for p in _subfolders(root)]
        raise DataError(f"{folder}: unknown category {category!r}; categories found in {root}: "
                        f"{', '.join(found) or 'none'}")
    return folder


def _require_dir(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; expected {what} ({MVTEC_LAYOUT})")
    return folder


def _require_images(folder: Path) -> list[Path]:
    images = image_files(folder)
    if not images:
        raise DataError(f"{folder}: no images; expected files ending in "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}")
    return images


def mvtec_train(root: PathLike, category: str) -> list[Path]:
    """The defect-free training images of ``category``, sorted by name."""
    folder = _require_dir(_category_dir(root, category) / "train" / GOOD,
                          "the defect-free training images")
    return _require_images(folder)


def _mask_for(gt_dir: Path, image: Path) -> Path:
    expected = gt_dir / f"{image.stem}_mask.png"
    if expected.is_file():
        return expected
    for ext in (".png", *sorted(IMAGE_EXTENSIONS - {".png"})):  # MVTec ships png; tolerate re-encoded copies
        for other in (expected.with_suffix(ext), expected.with_suffix(ext.upper())):  # and Windows' .PNG
            if other.is_file():
                return other
    raise DataError(f"{expected}: missing ground-truth mask for the defective image {image}")


def mvtec_test(root: PathLike, category: str) -> list[Sample]:
    """Test images of ``category`` with labels and mask paths, sorted by defect type then name."""
    cat_dir = _category_dir(root, category)
    test_dir = _require_dir(cat_dir / "test", "one folder per defect type plus 'good'")
    defect_dirs = _subfolders(test_dir)
    if not defect_dirs:
        raise DataError(f"{test_dir}: no defect-type folders; expected {MVTEC_LAYOUT}")
    samples: list[Sample] = []
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        images = _require_images(defect_dir)
        if defect == GOOD:
            samples += [Sample(p, 0, GOOD) for p in images]
            continue
        gt_dir = _require_dir(cat_dir / "ground_truth" / defect,
                              f"the masks of the {defect!r} test images")
        samples += [Sample(p, 1, defect, _mask_for(gt_dir, p)) for p in images]
    log.debug("%s/%s test: %d images in %d folders", root, category, len(samples), len(defect_dirs))
    return samples


def visa_split(root: PathLike, csv_path: Optional[PathLike], category: str,
               split: str) -> list[Sample]:
    """Samples of ``category`` in ``split`` ("train"/"test") of a VisA split CSV.

    ``csv_path`` None means VisA's standard ``<root>/split_csv/1cls.csv``; paths in the CSV are
    relative to ``root``. VisA has no defect types, so anomalies get defect_type "anomaly".
    """
    root = Path(root)
    csv_file = root / VISA_CSV if csv_path is None else Path(csv_path)
    if not csv_file.is_file():
        raise DataError(f"{csv_file}: no such file; expected a VisA split CSV with columns "
                        f"{','.join(VISA_COLUMNS)}")
    with csv_file.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_file}: missing column(s) {', '.join(missing)}; expected "
                            f"{','.join(VISA_COLUMNS)}")
        rows = [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]
    categories = sorted({r["object"] for r in rows})
    if category not in categories:
        raise DataError(f"{csv_file}: unknown category {category!r}; categories found: "
                        f"{', '.join(categories) or 'none'}")
    rows = [r for r in rows if r["object"] == category]
    splits = sorted({r["split"] for r in rows})
    if split not in splits:
        raise DataError(f"{csv_file}: no split {split!r} for {category!r}; splits found: "
                        f"{', '.join(splits)}")
    samples = []
    for row in rows:
        if row["split"] != split:
            continue
        label = {"normal": 0, "anomaly": 1}.get(row["label"])
        if label is None:
            raise DataError(f"{csv_file}: label {row['label']!r} for {row['image']}; expected "
                            "'normal' or 'anomaly'")
        image = root / row["image"]
        if not image.is_file():
            raise DataError(f"{image}: no such image (listed in {csv_file})")
        mask = None
        if label == 1:
            if not row["mask"]:
                raise DataError(f"{csv_file}: anomalous image {row['image']} has no mask path")
            mask = root / row["mask"]
            if not mask.is_file():
                raise DataError(f"{mask}: missing ground-truth mask for the anomalous image "
                                f"{image}")
        samples.append(Sample(image, label, "anomaly" if label else GOOD, mask, mask_threshold=1))
    return sorted(samples, key=lambda s: (s.defect_type, s.path.name, str(s.path)))


def load_split(root: PathLike, category: str, split: str, layout: str = "auto") -> list[Sample]:
    """Train or test samples in either layout; "auto" means VisA if split_csv/1cls.csv exists."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if layout == "auto":
        layout = "visa" if (Path(root) / VISA_CSV).is_file() else "mvtec"
    if layout == "visa":
        return visa_split(root, None, category, split)
    if layout != "mvtec":
        raise DataError(f"layout must be 'auto', 'mvtec' or 'visa', got {layout!r}")
    if split == "train":
        return [Sample(p, 0, GOOD) for p in mvtec_train(root, category)]
    return mvtec_test(root, category)


# --------------------------------------------------------------------------- reading

def _decode(path: PathLike, flags: int) -> np.ndarray:
    # np.fromfile + imdecode, not imread: imread fails silently on non-ASCII paths on Windows.
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, flags) if data.size else None
    if img is None:
        raise DataError(f"{path}: cannot decode the image; the file is corrupt or not an image")
    return img


def read_image(path: PathLike) -> np.ndarray:
    """RGB uint8 (H, W, 3); grey images are expanded to 3 channels, alpha dropped."""
    return cv2.cvtColor(_decode(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def read_reference_image(path: PathLike) -> np.ndarray:
    """`read_image` for an image that shows a bundle what a part looks like: a thumbnail or a
    placeholder (shorter side under MIN_REFERENCE_SIDE) is refused, naming the file."""
    img = read_image(path)
    h, w = img.shape[:2]
    if min(h, w) < MIN_REFERENCE_SIDE:
        raise DataError(f"{path}: {w}x{h} px is too small to show a part (the shorter side must be at least "
                        f"{MIN_REFERENCE_SIDE} px); remove it from the folder or replace it with a real capture")
    return img


def read_mask(sample_or_path: Union[Sample, PathLike], shape: tuple[int, ...],
              threshold: Optional[int] = None) -> np.ndarray:
    """Boolean (H, W) defect mask for an image of ``shape`` (H, W[, C]).

    Normal samples give all-False. A mask whose size differs from the image is resized with
    nearest neighbour so it stays binary. ``threshold`` None means the Sample's
    ``mask_threshold`` (128 for a bare path, right for 0/255 masks).
    """
    h, w = int(shape[0]), int(shape[1])
    if isinstance(sample_or_path, Sample):
        sample = sample_or_path
        if sample.mask_path is None:
            if sample.label:
                raise DataError(f"{sample.path}: anomalous sample without a mask path")
            return np.zeros((h, w), dtype=bool)
        path = sample.mask_path
        threshold = sample.mask_threshold if threshold is None else threshold
    else:
        path = sample_or_path
        threshold = 128 if threshold is None else threshold
    mask = _decode(path, cv2.IMREAD_GRAYSCALE)
    top = int(mask.max())
    if 0 < top < threshold:  # e.g. 0/1 masks read against the 0/255 convention: every defect would vanish
        raise DataError(f"{path}: mask values are 0..{top}, all below the defect threshold {threshold}; masks "
                        "are single-channel and mark defects with 255 (write 0/1 masks as 0/255, coloured "
                        "masks as white on black)")
    if mask.shape != (h, w):
        if abs(mask.shape[0] * w - mask.shape[1] * h) > 0.01 * mask.shape[1] * h:  # not a plain rescale
            log.warning("%s: mask %sx%s has another aspect ratio than its image %sx%s; stretched to fit (check "
                        "that it belongs to this image)", path, mask.shape[1], mask.shape[0], w, h)
        log.debug("%s: mask %s resized to image %s", path, mask.shape, (h, w))
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return mask >= threshold
