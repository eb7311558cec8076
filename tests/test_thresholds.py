"""Thresholds from held-out normal scores: the promised false-reject rate holds, intervals are exact."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from iadgpt.calibration import thresholds as th
from iadgpt.errors import CalibrationError


def test_beta_and_clopper_pearson_match_closed_forms():
    # k = 0: upper bound is 1 - (alpha/2)^(1/n); k = n: lower bound is (alpha/2)^(1/n)
    assert th.clopper_pearson(0, 100) == pytest.approx((0.0, 1 - 0.025 ** (1 / 100)), abs=1e-9)
    assert th.clopper_pearson(50, 50)[0] == pytest.approx(0.025 ** (1 / 50), abs=1e-9)
    lo, hi = th.clopper_pearson(5, 100)  # scipy.stats.beta.ppf reference values
    assert lo == pytest.approx(0.0164318792, abs=1e-7) and hi == pytest.approx(0.1128349111, abs=1e-7)
    assert th.beta_ppf(0.5, 2, 3) == pytest.approx(0.3857275681, abs=1e-8)
    assert th.beta_cdf(0.3, 2.5, 4.0) + th.beta_cdf(0.7, 4.0, 2.5) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("frr,need", [(0.01, 99), (0.005, 199), (0.02, 49), (0.05, 19), (0.1, 9)])
def test_min_images_rule(frr, need):
    assert th.min_images_for(frr) == need
    assert th.min_images_for(frr, "tail") == th.MIN_TAIL_IMAGES
    normal = np.random.default_rng(0).gumbel(size=need)
    th.fit_image_threshold(normal, frr)  # exactly enough works
    with pytest.raises(CalibrationError):
        th.fit_image_threshold(normal[:-1], frr)


def test_too_few_images_says_how_many_are_needed():
    with pytest.raises(CalibrationError) as exc:
        th.fit_image_threshold(np.linspace(0, 1, 50), target_frr=0.005)
    msg = str(exc.value)
    assert "at least 199" in msg and "got 50" in msg and "iadgpt calibrate" in msg
    assert "--method tail" in msg and "--target-frr to 0.0197" in msg
    th.fit_image_threshold(np.linspace(0, 1, 50), target_frr=0.0197)  # the advice works


def test_quantile_threshold_keeps_its_promise_on_new_parts():
    """Over many draws, the FRR on fresh normals averages the Beta mean, which is <= the target."""
    rng = np.random.default_rng(1)
    n, target = 120, 0.01
    frrs = []
    for _ in range(400):
        rec = th.fit_image_threshold(rng.gumbel(1.0, 0.2, n), target)
        frrs.append(float(np.mean(rng.gumbel(1.0, 0.2, 4000) >= rec.value)))
    k = math.ceil((n + 1) * (1 - target))
    assert rec.params["rank"] == k and rec.frr_estimate == pytest.approx((n + 1 - k) / (n + 1))
    assert rec.frr_estimate <= target
    assert np.mean(frrs) == pytest.approx(rec.frr_estimate, abs=0.002)
    lo, hi = rec.frr_ci
    coverage = np.mean([(lo <= f <= hi) for f in frrs])
    assert coverage >= 0.9  # a 95% interval (sampling of the 4000 fresh normals widens the spread a little)


def test_held_out_score_at_the_threshold_rank_is_not_flagged():
    scores = np.arange(1, 100, dtype=np.float32)  # 99 values, 1% -> threshold just above the maximum
    rec = th.fit_image_threshold(scores, 0.01)
    assert rec.value > 99.0 and not np.any(scores >= rec.value)
    assert rec.value == pytest.approx(99.0)


def test_tail_method_for_few_images():
    rng = np.random.default_rng(2)
    normal = rng.gumbel(1.0, 0.1, 40)
    rec = th.fit_image_threshold(normal, 0.01, method="tail")
    truth = 1.0 - 0.1 * math.log(-math.log(0.99))
    assert rec.value == pytest.approx(truth, rel=0.08)
    assert rec.frr_estimate == pytest.approx(0.01, rel=1e-6)
    assert rec.frr_ci[0] < 0.01 < rec.frr_ci[1]
    assert rec.params["distribution"] == "gumbel"
    with pytest.raises(CalibrationError, match=f"at least {th.MIN_TAIL_IMAGES}"):
        th.fit_image_threshold(normal[:10], 0.01, method="tail")


def test_f1_and_recall_methods_use_defects_and_report_miss_rate():
    rng = np.random.default_rng(3)
    normal, defects = rng.normal(1.0, 0.1, 200), rng.normal(1.6, 0.2, 60)
    f1 = th.fit_image_threshold(normal, 0.01, defect_scores=defects, method="f1")
    assert 1.1 < f1.value < 1.5
    assert f1.n_defects == 60 and 0 <= f1.miss_estimate < 0.2
    assert f1.miss_ci[0] <= f1.miss_estimate <= f1.miss_ci[1]
    rec = th.fit_image_threshold(normal, 0.01, defect_scores=defects, method="recall", target_recall=0.9)
    assert np.mean(defects >= rec.value) >= 0.9
    assert np.mean(defects >= np.nextafter(rec.value, np.inf)) < 0.9  # the largest such threshold
    with pytest.raises(CalibrationError, match="--defects"):
        th.fit_image_threshold(normal, 0.01, method="f1")


def test_quantile_with_defects_reports_miss_rate():
    normal = np.linspace(0.0, 1.0, 100)
    rec = th.fit_image_threshold(normal, 0.01, defect_scores=[0.5, 2.0, 3.0, 4.0])
    assert rec.miss_estimate == pytest.approx(0.25) and rec.n_defects == 4


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")]])
def test_bad_scores_are_refused(bad):
    with pytest.raises(CalibrationError):
        th.fit_image_threshold(bad, 0.5)


@pytest.mark.parametrize("frr", [0.0, 1.0, -0.1, 5])
def test_bad_rates_are_refused(frr):
    with pytest.raises(CalibrationError, match="fraction"):
        th.fit_image_threshold(np.ones(300), frr)


def test_pixel_threshold_quantile_and_f1():
    rng = np.random.default_rng(4)
    normal_maps = rng.normal(0.0, 1.0, (20, 32, 32)).astype(np.float32)
    rec = th.fit_pixel_threshold(normal_maps, quantile=0.999)
    assert rec.method == "quantile"
    assert np.mean(normal_maps >= rec.value) == pytest.approx(0.001, abs=5e-4)
    capped = th.fit_pixel_threshold(normal_maps, quantile=0.999, image_threshold=1.0)
    assert capped.value == 1.0 and capped.params["capped_at_image_threshold"]

    defect_maps = rng.normal(0.0, 1.0, (10, 32, 32)).astype(np.float32)
    masks = np.zeros_like(defect_maps, dtype=bool)
    masks[:, 8:16, 8:16] = True
    defect_maps[masks] += 6.0
    f1 = th.fit_pixel_threshold(normal_maps, defect_maps=defect_maps, defect_masks=masks)
    assert f1.method == "f1" and 2.0 < f1.value < 5.0 and f1.params["pixel_f1"] > 0.95


def test_record_is_manifest_json():
    rec = th.fit_image_threshold(np.linspace(0, 1, 300), 0.005)
    rec.backend, rec.precision, rec.images = "onnxruntime", "int8", ["ab" * 32]
    d = json.loads(json.dumps(rec.to_manifest(), allow_nan=False))
    for key in ("value", "method", "params", "n_images", "images", "backend", "precision", "frr_estimate", "frr_ci"):
        assert key in d
    assert d["params"]["target_frr"] == 0.005 and len(d["frr_ci"]) == 2


def test_f1_threshold_counts_every_tied_score():
    value, f1 = th._best_f1(np.array([1.0, 1.0, 0.0]), np.array([True, False, False]))
    assert value == 1.0 and f1 == pytest.approx(2 / 3)


def test_the_recall_method_keeps_its_promise():
    fit = th.fit_image_threshold([0.0] * 10, defect_scores=np.arange(1.0, 11.0), method="recall", target_recall=0.95)
    assert fit.miss_estimate <= 0.05


def test_recall_estimates_count_by_the_score_ge_threshold_rule():
    fit = th.fit_image_threshold([0.0] * 9 + [6.0], defect_scores=np.arange(1.0, 11.0), method="recall",
                                 target_recall=0.5)
    assert fit.value == 6.0
    assert fit.miss_estimate == pytest.approx(0.5)  # defects 1..5 missed, 6 caught
    assert fit.frr_estimate == pytest.approx(0.1)  # the normal at 6.0 is rejected
