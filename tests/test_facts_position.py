"""benchmarks/facts_position.py: the description's position scored against labelled masks, missed
defects counted as missed."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from iadgpt.runtime.facts import compute_facts
from iadgpt.runtime.synthetic import SyntheticProduct

from conftest import TINY_SIZE, load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("facts_position")


def _write(root: Path, kind: str, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (root / "test" / kind).mkdir(parents=True, exist_ok=True)
    (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "test" / kind / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(root / "ground_truth" / kind / f"{name}_mask.png"), mask.astype(np.uint8) * 255)


def test_judge_names_the_cells_and_fails_a_defect_elsewhere(bench):
    img = np.full((90, 90, 3), 200, np.uint8)
    img[60:66, 6:12] = 40  # a dark spot at the bottom left
    amap = np.zeros((90, 90), np.float32)
    amap[58:68, 4:14] = 1.0
    facts = compute_facts(img, amap, threshold=0.5)
    here = np.zeros((90, 90), bool)
    here[60:66, 6:12] = True
    row = bench.judge(facts, here)
    assert row["said_frame"] == row["truth_frame"] == "bottom left" and row["box_overlaps_defect"]
    there = np.zeros((90, 90), bool)
    there[5:12, 70:80] = True  # the label says top right: the same description is now wrong
    row = bench.judge(facts, there)
    assert row["truth_frame"] == "top right" and row["said_frame"] == "bottom left"
    assert not row["box_overlaps_defect"]


def test_synthetic_defects_are_flagged_and_placed_and_a_missed_one_counts(bench, tiny_bundle_path, tmp_path):
    root = tmp_path / "data"
    product = SyntheticProduct(kind="part", size=TINY_SIZE, seed=43, defect_rate=1.0)
    defects = [product.sample(i) for i in range(4)]
    for i, s in enumerate(defects):
        _write(root / "cat", s.defect_type, f"{i:03d}", s.image, s.mask)
    # labelled as a defect, but the picture is a normal part: the detector passes it, so it is missed
    normal = SyntheticProduct(kind="part", size=TINY_SIZE, seed=12, defect_rate=0.0).sample(0).image
    label = np.zeros((TINY_SIZE, TINY_SIZE), bool)
    label[50:60, 50:60] = True
    _write(root / "cat", "unseen", "900", normal, label)
    out = tmp_path / "fp.json"
    assert bench.main(["--data", str(root), "--category", "cat", "--bundle", str(tiny_bundle_path),
                       "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    s, rows = report["summary"], {r["image"]: r for r in report["rows"]}
    assert s["defects"] == 5 and not rows["unseen/900.png"]["flagged"]
    assert s["flagged"] == s["judged"] == 4  # every painted defect flagged, each with a main region
    assert s["box_overlaps_defect"] == 1.0 and s["unlabelled"] == 0
    judged = [r for r in report["rows"] if "truth_part" in r]
    hits = sum(r["said_part"] == r["truth_part"] for r in judged)
    assert hits >= 3  # the facts place synthetic defects (tests/test_facts.py); a miss or two at 128 px
    assert s["position_on_part"] == {"of_flagged": pytest.approx(hits / 4), "of_defects": pytest.approx(hits / 5)}
    frame_hits = sum(r["said_frame"] == r["truth_frame"] for r in judged)
    assert s["position_on_frame"] == {"of_flagged": pytest.approx(frame_hits / 4),
                                      "of_defects": pytest.approx(frame_hits / 5)}


def test_a_split_without_defects_is_an_error_and_an_empty_mask_is_set_apart(bench, tiny_bundle_path, tmp_path):
    root = tmp_path / "data"
    image = SyntheticProduct(kind="part", size=TINY_SIZE, seed=43, defect_rate=1.0).sample(0)
    (root / "cat" / "test" / "good").mkdir(parents=True)
    cv2.imwrite(str(root / "cat" / "test" / "good" / "000.png"), cv2.cvtColor(image.image, cv2.COLOR_RGB2BGR))
    args = ["--data", str(root), "--category", "cat", "--bundle", str(tiny_bundle_path), "--threads", "1"]
    from iadgpt.errors import DataError
    with pytest.raises(DataError, match="no defective images"):
        bench.main(args)
    _write(root / "cat", image.defect_type, "001", image.image, image.mask)
    _write(root / "cat", "unmarked", "002", image.image, np.zeros_like(image.mask))  # a defect nobody outlined
    out = tmp_path / "fp.json"
    assert bench.main(args + ["--json", str(out)]) == 0
    s = json.loads(out.read_text())["summary"]
    assert s["defects"] == 1 and s["unlabelled"] == 1 and s["judged"] == 1
