"""Decision thresholds from held-apart normal scores, with honest error bars (pure numpy).

Scores must come from the backend and precision that will run on the line, on normal images
that are NOT in the memory bank (a bank image scores near zero and would pull the threshold
down). Methods, all with the detector's rule "anomalous when score >= threshold":

- ``quantile`` (default): distribution-free. The threshold sits just above the k-th smallest of
  n held-out scores, k = ceil((n + 1) * (1 - f)). For any continuous score distribution the
  false-reject rate of that threshold on new parts is Beta(n + 1 - k, k) distributed, so its
  mean (n + 1 - k) / (n + 1) <= f and the confidence interval are exact. The smallest rate this
  can promise is 1 / (n + 1) (the threshold above the largest score), hence the rule
  **n >= ceil(1 / f) - 1 held-out images**: 99 for 1%, 199 for 0.5%.
- ``tail``: parametric, for products with fewer normals. An image score is the maximum of
  thousands of patch distances, so by extreme-value theory it is close to Gumbel; a Gumbel fit
  (method of moments) is extrapolated to the 1 - f quantile. Needs >= 20 images
  (`MIN_TAIL_IMAGES`); the interval is a bootstrap of the fitted tail and does not cover a
  wrong model, so prefer more images.
- ``f1`` / ``recall``: need scores of labelled defective images; F1 depends on the defect share
  of the calibration set, ``recall`` keeps at least `target_recall` of the given defects.

Region (pixel) thresholds: a high quantile (default 1 - 1e-4) of every held-out normal pixel,
so on NG frames regions outline what no normal part shows; F1-optimal on pixels when defect
masks are given.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import CalibrationError

log = logging.getLogger(__name__)

__all__ = ["ThresholdRecord", "fit_image_threshold", "fit_pixel_threshold", "min_images_for",
           "clopper_pearson", "beta_ppf", "order_statistic_frr", "METHODS", "MIN_TAIL_IMAGES"]

METHODS = ("quantile", "tail", "f1", "recall")
MIN_TAIL_IMAGES = 20
MIN_DEFECT_IMAGES = 5
CONFIDENCE = 0.95
PIXEL_QUANTILE = 1.0 - 1e-4
_MAX_PIXELS = 2_000_000  # pixels sampled for the F1 search; enough for 4 significant digits
_EULER_GAMMA = 0.5772156649015329
_FIX = "`iadgpt calibrate BUNDLE --normal DIR`"


@dataclass
class ThresholdRecord:
    """One fitted threshold and where it came from, as written into the manifest."""

    value: float
    method: str
    params: dict[str, Any]
    n_images: int
    backend: str = ""
    precision: str = ""
    frr_estimate: Optional[float] = None
    frr_ci: Optional[tuple[float, float]] = None
    miss_estimate: Optional[float] = None
    miss_ci: Optional[tuple[float, float]] = None
    n_defects: int = 0
    confidence: float = CONFIDENCE
    images: list[str] = field(default_factory=list)  # sha256 of the held-out normal images
    defect_images: list[str] = field(default_factory=list)

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("frr_ci", "miss_ci"):
            if d[key] is not None:
                d[key] = [float(v) for v in d[key]]
        return {k: v for k, v in d.items() if v is not None}


# --------------------------------------------------------------------------- beta / binomial


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b) by bisection (no scipy on a station)."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact binomial interval for k events in n trials."""
    if n <= 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else beta_ppf(alpha / 2, k, n - k + 1)
    hi = 1.0 if k == n else beta_ppf(1 - alpha / 2, k + 1, n - k)
    return lo, hi


def order_statistic_frr(n: int, k: int, confidence: float = CONFIDENCE) -> tuple[float, tuple[float, float]]:
    """Mean and interval of P(new normal > k-th smallest of n normals) ~ Beta(n + 1 - k, k)."""
    a, b = n + 1 - k, k
    alpha = 1.0 - confidence
    return a / (n + 1), (beta_ppf(alpha / 2, a, b), beta_ppf(1 - alpha / 2, a, b))


def min_images_for(target_frr: float, method: str = "quantile") -> int:
    """Held-out normal images needed to promise `target_frr` (see the module docstring)."""
    check_rate("target_frr", target_frr)
    if method == "tail":
        return MIN_TAIL_IMAGES
    return max(1, math.ceil(1.0 / target_frr - 1.0 - 1e-9))


# --------------------------------------------------------------------------- image threshold


def fit_image_threshold(normal_scores: Sequence[float], target_frr: float = 0.005, *,
                        defect_scores: Optional[Sequence[float]] = None, method: str = "quantile",
                        target_recall: float = 0.95, confidence: float = CONFIDENCE,
                        seed: int = 0) -> ThresholdRecord:
    """Image-score threshold from held-out normal scores (and defect scores for f1/recall)."""
    normal = _scores("normal_scores", normal_scores)
    defects = None if defect_scores is None or len(defect_scores) == 0 else _scores("defect_scores", defect_scores)
    check_rate("target_frr", target_frr)
    n = len(normal)
    params: dict[str, Any] = {"target_frr": float(target_frr)}
    if method == "quantile":
        need = min_images_for(target_frr)
        if n < need:
            raise CalibrationError(too_few_message(n, target_frr))
        k = math.ceil((n + 1) * (1.0 - target_frr) - 1e-9)
        k = min(max(k, 1), n)
        value = _just_above(np.sort(normal)[k - 1])
        frr, frr_ci = order_statistic_frr(n, k, confidence)
        params["rank"] = int(k)
    elif method == "tail":
        if n < MIN_TAIL_IMAGES:
            raise CalibrationError(f"the tail method needs at least {MIN_TAIL_IMAGES} held-out normal images, got {n}; "
                                   f"add normal images to the folder given to {_FIX}")
        mu, beta = _gumbel_fit(normal)
        value = _gumbel_isf(target_frr, mu, beta)
        frr, frr_ci = _gumbel_bootstrap_frr(normal, value, confidence, seed)
        params.update(distribution="gumbel", loc=mu, scale=beta)
    elif method in ("f1", "recall"):
        if defects is None or len(defects) < MIN_DEFECT_IMAGES:
            got = 0 if defects is None else len(defects)
            raise CalibrationError(f"method {method!r} needs scores of at least {MIN_DEFECT_IMAGES} defective images "
                                   f"(got {got}): pass --defects DIR, or use --method quantile")
        if method == "f1":
            value = _f1_threshold(normal, defects)
        else:
            check_rate("target_recall", target_recall)
            value = _recall_threshold(defects, target_recall)
            params["target_recall"] = float(target_recall)
        rejects = int(np.count_nonzero(normal >= value))
        frr, frr_ci = rejects / n, clopper_pearson(rejects, n, confidence)
    else:
        raise CalibrationError(f"unknown threshold method {method!r}; choose one of {', '.join(METHODS)}")
    rec = ThresholdRecord(value=float(value), method=method, params=params, n_images=n, frr_estimate=float(frr),
                          frr_ci=(float(frr_ci[0]), float(frr_ci[1])), confidence=confidence)
    if defects is not None:
        misses = int(np.count_nonzero(defects < value))
        rec.n_defects = len(defects)
        rec.miss_estimate = misses / len(defects)
        rec.miss_ci = clopper_pearson(misses, len(defects), confidence)
    log.info("image threshold %.5g (%s) from %d normals: expected FRR %.2f%% [%.2f, %.2f]", rec.value, method, n,
             100 * frr, 100 * frr_ci[0], 100 * frr_ci[1])
    return rec


def too_few_message(n: int, target_frr: float) -> str:
    """Why n held-out images cannot promise `target_frr`, and the three ways out."""
    need = min_images_for(target_frr)
    best = math.ceil(1e4 / (n + 1)) / 1e4  # rounded up so the advice always works
    return (f"a {100 * target_frr:g}% false-reject rate needs at least {need} held-out normal images "
            f"(got {n}): add {need - n} more normal images to the folder given to {_FIX}, "
            f"or raise --target-frr to {best:g} ({100 * best:g}%) or more (the lowest {n} images can support), "
            f"or use --method tail (a Gumbel tail fit, needs >= {MIN_TAIL_IMAGES} images)")


def _just_above(x: float) -> float:
    """The next float32 above a score, so that score itself is not flagged whether it is compared
    as float32 (numpy arrays of engine outputs) or float64 (Python floats)."""
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def _gumbel_fit(x: np.ndarray) -> tuple[float, float]:
    beta = float(np.std(x, ddof=1)) * math.sqrt(6.0) / math.pi
    beta = max(beta, 1e-12)
    return float(np.mean(x)) - _EULER_GAMMA * beta, beta


def _gumbel_isf(p: float, mu: float, beta: float) -> float:
    return mu - beta * math.log(-math.log1p(-p))


def _gumbel_bootstrap_frr(x: np.ndarray, value: float, confidence: float, seed: int,
                          rounds: int = 2000) -> tuple[float, tuple[float, float]]:
    """Fitted tail probability above `value` and its bootstrap interval (model error not included)."""
    rng = np.random.default_rng(seed)
    samples = x[rng.integers(0, len(x), size=(rounds, len(x)))]
    beta = np.maximum(samples.std(axis=1, ddof=1) * math.sqrt(6.0) / math.pi, 1e-12)
    mu = samples.mean(axis=1) - _EULER_GAMMA * beta
    tail = -np.expm1(-np.exp(-(value - mu) / beta))
    alpha = 1.0 - confidence
    mu0, beta0 = _gumbel_fit(x)
    point = -math.expm1(-math.exp(-(value - mu0) / beta0))
    return point, (float(np.quantile(tail, alpha / 2)), float(np.quantile(tail, 1 - alpha / 2)))


def _f1_threshold(normal: np.ndarray, defects: np.ndarray) -> float:
    scores = np.concatenate([normal, defects])
    labels = np.concatenate([np.zeros(len(normal), bool), np.ones(len(defects), bool)])
    return _best_f1(scores, labels)[0]


def _best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 with the rule score >= threshold."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # one candidate per distinct score value
    tp, fp, cand = tp[last], fp[last], s[last]
    f1 = 2 * tp / np.maximum(tp + fp + y.sum(), 1)
    i = int(np.argmax(f1))
    return float(cand[i]), float(f1[i])


def _recall_threshold(defects: np.ndarray, target_recall: float) -> float:
    """Largest threshold that still flags at least `target_recall` of the defects."""
    d = np.sort(defects)
    keep = math.ceil(target_recall * len(d) - 1e-9)
    return float(d[len(d) - max(keep, 1)])


# --------------------------------------------------------------------------- pixel threshold


def fit_pixel_threshold(normal_maps: np.ndarray, *, defect_maps: Optional[np.ndarray] = None,
                        defect_masks: Optional[np.ndarray] = None, quantile: float = PIXEL_QUANTILE,
                        image_threshold: Optional[float] = None, seed: int = 0) -> ThresholdRecord:
    """Region threshold: F1-optimal on pixels when masks are given, else a high normal-pixel quantile.

    Never above the image threshold: a frame flagged by its score must show at least its peak.
    """
    maps = np.asarray(normal_maps, dtype=np.float32)
    if maps.ndim != 3 or len(maps) == 0:
        raise CalibrationError(f"pixel threshold needs (N, H, W) maps of held-out normal images, got shape "
                               f"{maps.shape}")
    if defect_maps is not None and defect_masks is not None and len(defect_maps):
        dm = np.asarray(defect_maps, dtype=np.float32)
        mk = np.asarray(defect_masks, dtype=bool)
        if dm.shape != mk.shape:
            raise CalibrationError(f"defect maps {dm.shape} and masks {mk.shape} differ in shape; resize the masks "
                                   "to the map resolution")
        scores = np.concatenate([maps.ravel(), dm.ravel()])
        labels = np.concatenate([np.zeros(maps.size, bool), mk.ravel()])
        if len(scores) > _MAX_PIXELS:
            pick = np.random.default_rng(seed).choice(len(scores), _MAX_PIXELS, replace=False)
            scores, labels = scores[pick], labels[pick]
        if not labels.any():
            raise CalibrationError("the defect masks are empty; give masks that mark the defects or drop them")
        value, f1 = _best_f1(scores, labels)
        method, params = "f1", {"pixel_f1": f1, "sampled_pixels": int(len(scores))}
    else:
        check_rate("quantile", 1.0 - quantile)
        value = float(np.quantile(maps, quantile, method="higher"))
        method, params = "quantile", {"quantile": float(quantile)}
    if image_threshold is not None and value > image_threshold:
        params["capped_at_image_threshold"] = True
        value = float(image_threshold)
    frac = float(np.count_nonzero(maps >= value)) / maps.size
    params["normal_pixel_fraction_above"] = frac
    log.info("pixel threshold %.5g (%s); %.4f%% of held-out normal pixels above it", value, method, 100 * frac)
    return ThresholdRecord(value=float(value), method=method, params=params, n_images=len(maps))


# --------------------------------------------------------------------------- checks


def _scores(name: str, values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise CalibrationError(f"{name} is empty: score held-out normal images first ({_FIX} does this)")
    if not np.isfinite(x).all():
        raise CalibrationError(f"{name} contain NaN or infinity: the scorer output is broken; re-export the bundle "
                               "with `iadgpt export`")
    return x


def check_rate(name: str, value: float) -> None:
    if not 0.0 < float(value) < 1.0:
        example = "0.95 for 95%" if "recall" in name else "0.005 for 0.5%"
        raise CalibrationError(f"{name} must be a fraction in (0, 1), got {value} (e.g. {example})")
