"""Metrics agree with scikit-learn (image/pixel level) and with the MVTec AD definition of AUPRO."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn import metrics as skm

from iadgpt.errors import DataError, IadGptError
from iadgpt.metrics import (aupro, f1_max, f1_max_threshold, image_auroc, pixel_auroc, pixel_auroc_gain,
                            pro_curve, roc_curve)
from iadgpt.metrics import _image_pair_counts

TOL = 1e-9


def _random_case(seed: int, n: int = 200, levels: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores; ``levels`` > 0 rounds scores onto that many values to force ties."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if levels:
        scores = np.round(scores * levels / 4) / (levels / 4)
    return labels.astype(int), scores


CASES = [(seed, levels) for seed in range(6) for levels in (0, 3, 10)]


@pytest.mark.parametrize("seed,levels", CASES)
def test_image_auroc_matches_sklearn(seed, levels):
    y, s = _random_case(seed, levels=levels)
    assert image_auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=TOL)


@pytest.mark.parametrize("seed,levels", CASES)
@pytest.mark.parametrize("drop", [True, False])
def test_roc_curve_matches_sklearn(seed, levels, drop):
    y, s = _random_case(seed, levels=levels)
    ours = roc_curve(y, s, drop_intermediate=drop)
    ref = skm.roc_curve(y, s, drop_intermediate=drop)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize("seed,levels", CASES)
def test_f1_max_matches_sklearn(seed, levels):
    y, s = _random_case(seed, levels=levels)
    p, r, _ = skm.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    assert f1_max(y, s) == pytest.approx(f1.max(), abs=TOL)
    best, threshold = f1_max_threshold(y, s)
    assert best == pytest.approx(skm.f1_score(y, s >= threshold), abs=TOL)


def test_image_auroc_extremes_and_bool_labels():
    y = np.array([False, False, True, True])
    assert image_auroc(y, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert image_auroc(y, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert image_auroc(y, [1, 1, 1, 1]) == 0.5  # all tied: one half, as sklearn


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn_on_flattened(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((5, 32, 40), dtype=bool)
    masks[1, 5:12, 8:20] = True
    masks[3, 20:30, 30:38] = True
    maps = (rng.random(masks.shape) + masks * 0.5).astype(np.float32)
    maps[0, :10] = 0.25  # plenty of ties
    expected = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=TOL)
    assert pixel_auroc(list(masks.astype(np.uint8)), list(maps)) == pytest.approx(expected, abs=TOL)


# --------------------------------------------------------------------------- paired bootstrap of a pixel AUROC gain

def _two_scorers(seed: int = 0, n: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks on half the images; scorer A sees the defects more clearly than scorer B."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 24, 24), dtype=bool)
    for i in range(n // 2):
        y, x = rng.integers(0, 16, 2)
        masks[i, y:y + 6, x:x + 5] = True
    noise = rng.random(masks.shape)
    return masks, noise + masks * 0.6, noise + masks * 0.3


def test_pair_counts_give_the_pixel_auroc_of_any_resample():
    masks, maps, _ = _two_scorers()
    maps[3, :4] = 0.5  # ties across images
    maps[0, 10:12] = 0.5
    u2, pos, neg = _image_pair_counts(masks, maps)
    rng = np.random.default_rng(1)
    for c in [np.ones(len(masks))] + [np.bincount(rng.integers(0, len(masks), len(masks)), minlength=len(masks))
                                      for _ in range(5)]:
        idx = np.repeat(np.arange(len(masks)), c.astype(int))  # the resampled test set, duplicates and all
        expected = skm.roc_auc_score(masks[idx].ravel(), maps[idx].ravel())
        assert c @ u2 @ c / (2 * (c @ pos) * (c @ neg)) == pytest.approx(expected, abs=TOL)


def test_pixel_auroc_gain_separates_a_better_scorer_from_an_equal_one():
    masks, better, worse = _two_scorers()
    gain = pixel_auroc_gain(masks, better, worse, resamples=300)
    assert gain.gain == pytest.approx(pixel_auroc(masks, better) - pixel_auroc(masks, worse), abs=TOL)
    assert 0 < gain.low <= gain.gain <= gain.high and gain.se > 0  # clearly better: the interval excludes 0
    same = pixel_auroc_gain(masks, better, better.copy(), resamples=50)
    assert (same.gain, same.low, same.high, same.se) == (0.0, 0.0, 0.0, 0.0)
    # A scorer differing from another by noise alone: the interval straddles 0.
    rng = np.random.default_rng(5)
    noisy = better + rng.normal(0, 0.05, better.shape)
    tie = pixel_auroc_gain(masks, better, noisy, resamples=300)
    assert tie.low < 0 < tie.high
    again = pixel_auroc_gain(masks, better, noisy, resamples=300)
    assert again == tie  # seeded


def test_pixel_auroc_gain_rejects_bad_input():
    masks, a, b = _two_scorers()
    with pytest.raises(DataError, match="same shape"):
        pixel_auroc_gain(masks, a, b[:, :5])
    with pytest.raises(DataError, match="resamples"):
        pixel_auroc_gain(masks, a, b, resamples=1)
    with pytest.raises(DataError, match="NaN"):
        pixel_auroc_gain(masks, a, np.full(b.shape, np.nan))


# --------------------------------------------------------------------------- AUPRO

def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """One 4x4 image, two ground-truth regions, 12 normal pixels.

    mask (A = region of 1 px, B = region of 3 px that is connected only diagonally, so it is one
    region under 8-connectivity but would be three under 4-connectivity):
        A . . .
        . . . .
        . . B .
        . B . B
    map: A=0.9; B: (2,2)=0.8, (3,1)=0.4, (3,3)=0.2; normal: one pixel 0.7, two 0.4, nine 0.0.

    PRO = mean over regions of the flagged fraction; FPR = flagged normal pixels / 12.
        t=0.9: fpr 0     pro (1 + 0)/2   = 1/2
        t=0.8: fpr 0     pro (1 + 1/3)/2 = 2/3
        t=0.7: fpr 1/12  pro 2/3
        t=0.4: fpr 3/12  pro (1 + 2/3)/2 = 5/6   (the tie at 0.4 flags normal and defect px)
        t=0.2: fpr 3/12  pro 1
        t=0.0: fpr 1     pro 1
    Area up to FPR 0.3, from (0, 0):
        [0, 1/12]     at 2/3                -> 1/18
        [1/12, 1/4]   trapezoid 2/3 .. 5/6  -> (3/4)(1/6) = 1/8
        [1/4, 0.3]    at 1                  -> 1/20
        total 83/360, normalised by 0.3     -> 83/108
    Up to FPR 0.2 the curve is interpolated between (1/12, 2/3) and (1/4, 5/6) (slope 1):
        pro(0.2) = 2/3 + 7/60 = 47/60; area = 1/18 + (2/3 + 47/60)/2 * 7/60 = 1009/7200
        normalised by 0.2 -> 1009/1440
    """
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[2, 2] = mask[3, 1] = mask[3, 3] = True
    amap = np.zeros((4, 4))
    amap[0, 0], amap[2, 2], amap[3, 1], amap[3, 3] = 0.9, 0.8, 0.4, 0.2
    amap[0, 3], amap[1, 0], amap[1, 1] = 0.7, 0.4, 0.4
    return mask[None], amap[None]


def test_aupro_hand_computed():
    masks, maps = _hand_case()
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 12, 3 / 12, 3 / 12, 1, 1], atol=TOL)
    np.testing.assert_allclose(pro, [0, 1 / 2, 2 / 3, 2 / 3, 5 / 6, 1, 1, 1], atol=TOL)
    assert aupro(masks, maps) == pytest.approx(83 / 108, abs=TOL)
    assert aupro(masks, maps, fpr_limit=0.2) == pytest.approx(1009 / 1440, abs=TOL)
    assert aupro(masks, maps, fpr_limit=0.25) == pytest.approx((1 / 18 + 1 / 8) / 0.25, abs=TOL)


def test_aupro_perfect_and_inverted():
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:6, 2:6] = True
    masks[0, 10:12, 9:15] = True
    masks[2, 7:9, 0:3] = True
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=TOL)
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0, abs=TOL)
    rng = np.random.default_rng(0)
    noise = rng.random(masks.shape)
    assert aupro(masks, noise - masks) < 0.05 < 0.95 < aupro(masks, noise + 2 * masks)


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Straight transcription of the MVTec AD procedure: per-pixel increments, sort, keep the
    last pixel of each run of equal scores, trapezoid with interpolation at the limit."""
    fp_inc = np.zeros(masks.shape)
    pro_inc = np.zeros(masks.shape)
    n_regions = 0
    for i, mask in enumerate(masks):
        lab = sk_label(mask, connectivity=2)
        fp_inc[i][lab == 0] = 1
        for k in range(1, lab.max() + 1):
            pro_inc[i][lab == k] = 1.0 / np.sum(lab == k)
        n_regions += lab.max()
    order = np.argsort(maps.ravel())[::-1]
    scores = maps.ravel()[order]
    fpr = np.cumsum(fp_inc.ravel()[order]) / fp_inc.sum()
    pro = np.cumsum(pro_inc.ravel()[order]) / n_regions
    keep = np.r_[np.diff(scores) != 0, True]
    x = np.r_[0.0, fpr[keep], 1.0]
    y = np.r_[0.0, pro[keep], 1.0]
    inside = x <= limit
    area = np.trapezoid(y[inside], x[inside])
    j = np.count_nonzero(inside)
    if x[j - 1] < limit:
        y_lim = np.interp(limit, x[j - 1:j + 1], y[j - 1:j + 1])
        area += 0.5 * (y[j - 1] + y_lim) * (limit - x[j - 1])
    return area / limit


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference_procedure(seed, limit):
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 20, 24), dtype=bool)
    for _ in range(6):  # random blobs, some touching diagonally or overlapping
        i, r, c = rng.integers(0, 4), rng.integers(0, 17), rng.integers(0, 21)
        masks[i, r:r + rng.integers(1, 4), c:c + rng.integers(1, 4)] = True
    maps = np.round(rng.random(masks.shape) + masks * rng.uniform(0, 1), 1)  # coarse: many ties
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
        _reference_aupro(masks, maps, limit), abs=TOL)


def test_aupro_threshold_grid_is_close_to_exact():
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 40, 40), dtype=bool)
    masks[::2, 10:20, 5:25] = True
    maps = rng.random(masks.shape) + masks * 0.4
    assert aupro(masks, maps, num_thresholds=2000) == pytest.approx(aupro(masks, maps), abs=2e-3)


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("labels,scores,message", [
    ([0, 1, 1], [0.1, 0.2], "same shape"),
    ([1, 1, 1], [0.1, 0.2, 0.3], "no normal"),
    ([0, 0, 0], [0.1, 0.2, 0.3], "no anomalous"),
    ([0, 2, 1], [0.1, 0.2, 0.3], r"0 \(normal\) or 1 \(anomalous\); found 2"),
    ([0, 1, 1], [0.1, np.nan, 0.3], "NaN"),
])
@pytest.mark.parametrize("fn", [image_auroc, roc_curve, f1_max])
def test_image_metrics_reject_bad_input(fn, labels, scores, message):
    with pytest.raises(DataError, match=message):
        fn(labels, scores)


def test_pixel_metrics_reject_bad_input():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1, 1] = True
    maps = np.zeros((2, 4, 4))
    with pytest.raises(DataError, match="same shape"):
        pixel_auroc(masks, maps[:, :3])
    with pytest.raises(DataError, match="same shape"):
        aupro(masks, maps[0])
    with pytest.raises(DataError, match="0 defect pixels"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(DataError, match="masks contain no anomalous"):
        pixel_auroc(np.zeros_like(masks), maps)
    with pytest.raises(DataError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0)
    with pytest.raises(DataError, match="num_thresholds"):
        aupro(masks, maps, num_thresholds=1)
    with pytest.raises(IadGptError, match="NaN"):
        aupro(masks, np.full(maps.shape, np.nan))


def test_f1_ties_go_to_the_highest_threshold():
    """F1 2/3 is reached at thresholds 5 and 2; the higher one raises fewer alarms."""
    best, threshold = f1_max_threshold([1, 0, 0, 1, 0], [5, 4, 3, 2, 1])
    assert best == pytest.approx(2 / 3) and threshold == 5.0


def test_gain_interval_is_the_95_percent_interval_of_the_image_bootstrap():
    """`pixel_auroc_gain`'s (low, high, se) are the 2.5/97.5 percentiles and the spread of the gain
    over images drawn with replacement, recomputed here the slow way (same seed, same draws)."""
    rng = np.random.default_rng(0)
    masks = np.zeros((8, 16, 16), bool)
    masks[:, 4:9, 5:11] = True
    a = masks * 0.8 + rng.standard_normal(masks.shape)
    b = masks * 0.6 + rng.standard_normal(masks.shape)
    gain = pixel_auroc_gain(masks, a, b, resamples=200, seed=5)
    draws, gains = np.random.default_rng(5), []
    while len(gains) < 200:
        idx = draws.integers(0, 8, 8)
        if masks[idx].any() and (~masks[idx]).any():
            gains.append(pixel_auroc(masks[idx], a[idx]) - pixel_auroc(masks[idx], b[idx]))
    low, high = np.percentile(gains, [2.5, 97.5])
    assert (gain.low, gain.high, gain.se) == pytest.approx((low, high, np.std(gains)), abs=1e-9)
