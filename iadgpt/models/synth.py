"""NSA (Natural Synthetic Anomalies, Schlueter et al. 2022): self-supervised defects from normal images.

A rectangular patch is cut from ANOTHER normal image of the same product and pasted with Poisson
blending (``cv2.seamlessClone``, NORMAL_CLONE), 1-2 patches per image. Poisson blending removes the
patch's seams, so what stays anomalous is the patch's *content*: a piece of the part where it does
not belong, a shifted structure, a different texture phase. Labels are "logistic intensity" (as
NSA): the per-pixel change the paste made, squashed by a logistic, so a pasted patch that happens
to look like what it covers gets a low label instead of teaching the decoder to flag normal-looking
pixels. The loss uses the binary mask ``label > MASK_THRESHOLD`` (IAD-GPT: 0.3).

Objects (bottle, metal plate): patches land on the part's foreground, never on the background
(a patch of table pasted on table is not a defect), and are cut from the source's foreground.
Textures (the whole frame is material): anywhere.

Opt-in extension (``NSAConfig.colour``, ``iadgpt train --nsa-colour P``): a share of the patches
is a colour change in place instead of a paste, because Poisson blending cannot make the
discolourations (rust, stains) some products fail on. MPDD metal_plate decoder P-AUROC 63.9 ->
81.2 with P = 0.5; bottle 96.8 -> 96.2 (README); off by default, as in the paper.

Deterministic: sample ``index`` with ``seed`` draws from ``np.random.default_rng([seed, index])``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import cv2
import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)

__all__ = ["NSAConfig", "NSASample", "NSASynthesizer", "foreground_mask", "guess_kind", "config_for",
           "MASK_THRESHOLD", "KINDS", "synth_grid"]

KINDS = ("object", "texture")
MASK_THRESHOLD = 0.3  # soft label -> binary loss mask (IAD-GPT)
_TEXTURE_COVERAGE = 0.9  # foreground fraction above which a product is treated as a texture
_MIN_SIDE = 8  # px; seamlessClone fails on thinner patches (its solver needs an interior)


@dataclass(frozen=True)
class NSAConfig:
    """Bounds of the synthesis; sizes are fractions of the image side.

    Defaults per kind come from `config_for(kind)`: objects get smaller patches (a defect on a part
    is local) that must mostly overlap the part; textures get wider and more elongated ones.
    Patch widths are drawn log-uniformly (small patches are as frequent as large ones per octave,
    as real defect sizes are); the height follows from a log-uniform aspect ratio.
    """

    kind: str = "object"
    patches: tuple[int, int] = (1, 2)  # inclusive range of pasted patches per image
    width: tuple[float, float] = (0.06, 0.35)  # patch width / image side
    aspect: tuple[float, float] = (0.3, 3.3)  # height / width
    scale: tuple[float, float] = (0.7, 1.3)  # source patch size / destination size (resampling)
    min_overlap: float = 0.5  # fraction of a patch that must lie on the foreground (objects)
    logistic: tuple[float, float] = (1 / 12, 24.0)  # (k, x0): label = sigmoid(k * (change - x0)), change in grey levels
    min_label_area: float = 0.002  # a synthesized image whose binary mask covers less (x side^2) is redrawn
    tries: int = 20
    colour: float = 0.0  # probability that a patch is a colour change in place instead of a paste (see below)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"unknown NSA kind {self.kind!r}; use one of {', '.join(KINDS)}")
        lo, hi = self.patches
        if not 1 <= lo <= hi:
            raise DataError(f"NSA patches {self.patches} must be a range 1 <= lo <= hi")
        for name in ("width", "aspect", "scale"):
            a, b = getattr(self, name)
            if not 0 < a <= b:
                raise DataError(f"NSA {name} bounds {(a, b)} must satisfy 0 < lo <= hi")
        if not 0.0 <= self.colour <= 1.0:
            raise DataError(f"NSA colour probability {self.colour} must be in [0, 1]")
        if self.width[1] >= 0.9:
            raise DataError(f"NSA width bound {self.width[1]} leaves no room to place a patch; keep it below 0.9")


def config_for(kind: str, **overrides) -> NSAConfig:
    """Default bounds for an object or a texture, with keyword overrides."""
    if kind == "object":
        base = NSAConfig(kind="object")
    elif kind == "texture":
        base = NSAConfig(kind="texture", width=(0.08, 0.45), aspect=(0.2, 5.0), min_overlap=0.0)
    else:
        raise DataError(f"unknown NSA kind {kind!r}; use one of {', '.join(KINDS)}")
    return replace(base, **overrides) if overrides else base


@dataclass
class NSASample:
    """One synthesized image: the pasted image, its soft label and binary mask, and what was pasted."""

    image: np.ndarray  # HxWx3 uint8 RGB
    label: np.ndarray  # HxW float32 in [0, 1], logistic intensity of the change
    mask: np.ndarray  # HxW bool, label > MASK_THRESHOLD
    target: int  # index of the image that was pasted on
    sources: list[int] = field(default_factory=list)  # index of the image each patch came from
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # (x, y, w, h) of each pasted patch


# --------------------------------------------------------------------------- foreground


def foreground_mask(image: np.ndarray, kind: str = "object") -> np.ndarray:
    """Boolean HxW mask of the part (True) against the background (False).

    The background is what the frame border shows: pixels whose colour differs from the median
    border colour by more than an Otsu threshold (at least 20 grey levels) are the part, cleaned
    with a morphological close/open and small-blob removal. Holes through the part (a bore, a
    hanging hole) stay background. A texture is all foreground. When the estimate is implausible
    (under 3 % of the frame, e.g. a product as bright as its table) the whole frame is used, so
    synthesis never silently stops.
    """
    h, w = image.shape[:2]
    if kind == "texture":
        return np.ones((h, w), bool)
    img = cv2.GaussianBlur(image, (0, 0), max(1.0, 0.004 * max(h, w))).astype(np.float32)
    band = max(2, int(round(0.02 * min(h, w))))
    border = np.concatenate([img[:band].reshape(-1, 3), img[-band:].reshape(-1, 3),
                             img[:, :band].reshape(-1, 3), img[:, -band:].reshape(-1, 3)])
    ref = np.median(border, axis=0)
    dist = np.abs(img - ref).max(axis=2)
    d8 = np.clip(dist, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(d8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = (dist > max(20.0, float(otsu))).astype(np.uint8)
    k = max(3, int(round(0.015 * min(h, w))) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, kernel)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, kernel)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= 0.01 * h * w
    fg = keep[labels]
    if fg.mean() < 0.03:
        log.debug("foreground estimate covers %.1f%% of the frame: using the whole frame", 100 * fg.mean())
        return np.ones((h, w), bool)
    return fg


def guess_kind(images: Sequence[np.ndarray], max_images: int = 8) -> str:
    """"texture" when the foreground covers (almost) the whole frame in most images, else "object"."""
    if not images:
        raise DataError("no images to guess the product kind from")
    step = max(1, len(images) // max_images)
    cover = [float(foreground_mask(im, "object").mean()) for im in list(images)[::step][:max_images]]
    kind = "texture" if float(np.median(cover)) > _TEXTURE_COVERAGE else "object"
    log.info("NSA kind %s (median foreground %.0f%% of the frame)", kind, 100 * float(np.median(cover)))
    return kind


# --------------------------------------------------------------------------- synthesis


class NSASynthesizer:
    """Pastes patches between the given normal images; ``sample(index, seed)`` is deterministic.

    Images are RGB uint8 of one common size (synthesize at the training resolution: it is cheaper
    and the patch bounds are relative anyway). Foreground masks are computed once here.
    """

    def __init__(self, images: Sequence[np.ndarray], kind: str = "auto", config: Optional[NSAConfig] = None,
                 foregrounds: Optional[Sequence[np.ndarray]] = None):
        if len(images) == 0:
            raise DataError("NSA synthesis needs at least one normal image; point it at a train/good folder")
        shapes = {im.shape for im in images}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
            raise DataError(f"NSA images must be RGB uint8 of one common size, got shapes {sorted(shapes)[:3]}; "
                            "resize them to the training resolution first (runtime.preprocess.resize_frame)")
        self.images = [np.ascontiguousarray(im, dtype=np.uint8) for im in images]
        if config is None:
            kind = guess_kind(self.images) if kind == "auto" else kind
            config = config_for(kind)
        elif kind not in ("auto", config.kind):
            raise DataError(f"kind {kind!r} contradicts config.kind {config.kind!r}; pass one of them")
        self.config = config
        if foregrounds is None:
            foregrounds = [foreground_mask(im, config.kind) for im in self.images]
        if len(foregrounds) != len(self.images):
            raise DataError(f"{len(foregrounds)} foreground masks for {len(self.images)} images")
        self.foregrounds = [np.asarray(f, bool) for f in foregrounds]
        # Integral images: the foreground fraction of any rectangle in O(1).
        self._integrals = [cv2.integral(f.astype(np.uint8)) for f in self.foregrounds]
        if len(self.images) == 1:
            log.warning("NSA with one normal image: patches are cut from the same image at another place")

    def __len__(self) -> int:
        return len(self.images)

    # -- geometry -------------------------------------------------------------------------------

    def _overlap(self, i: int, x: int, y: int, w: int, h: int) -> float:
        s = self._integrals[i]
        return float(s[y + h, x + w] - s[y, x + w] - s[y + h, x] + s[y, x]) / float(w * h)

    def _place(self, rng: np.random.Generator, i: int, w: int, h: int) -> Optional[tuple[int, int]]:
        """Top-left corner of a w x h box inside image i, 1 px from the border, on its foreground."""
        size_h, size_w = self.images[i].shape[:2]
        if w > size_w - 2 or h > size_h - 2:
            return None
        fg = self.foregrounds[i]
        need = self.config.min_overlap if self.config.kind == "object" else 0.0
        ys, xs = np.nonzero(fg)
        for _ in range(self.config.tries):
            if len(xs) and need > 0:  # centre on a foreground pixel
                k = int(rng.integers(len(xs)))
                x, y = int(xs[k]) - w // 2, int(ys[k]) - h // 2
            else:
                x, y = int(rng.integers(0, size_w - w)), int(rng.integers(0, size_h - h))
            x = min(max(x, 1), size_w - w - 1)
            y = min(max(y, 1), size_h - h - 1)
            if need <= 0 or self._overlap(i, x, y, w, h) >= need:
                return x, y
        return None

    def _patch_size(self, rng: np.random.Generator, side: int) -> tuple[int, int]:
        c = self.config
        width = math.exp(rng.uniform(math.log(c.width[0]), math.log(c.width[1]))) * side
        aspect = math.exp(rng.uniform(math.log(c.aspect[0]), math.log(c.aspect[1])))
        height = width * aspect
        limit = c.width[1] * side * 1.5  # an elongated patch is clipped, not allowed to span the frame
        w = int(round(min(max(width, _MIN_SIDE), limit)))
        h = int(round(min(max(height, _MIN_SIDE), limit)))
        return w, h

    # -- sampling -------------------------------------------------------------------------------

    def sample(self, index: int, seed: int = 0, target: Optional[int] = None) -> NSASample:
        """Synthesized anomaly number ``index``: pastes onto image ``target`` (default index % len)."""
        rng = np.random.default_rng([int(seed), int(index)])
        n = len(self.images)
        t = int(index) % n if target is None else int(target)
        base = self.images[t]
        best: Optional[NSASample] = None
        min_px = self.config.min_label_area * base.shape[0] * base.shape[1]
        for _ in range(self.config.tries):
            out = self._synthesize(rng, t)
            if out is None:
                continue
            if best is None or out.mask.sum() > best.mask.sum():
                best = out
            if out.mask.sum() >= min_px:
                break
        if best is None:  # nowhere to paste (tiny foreground): an honest "no change" sample
            log.debug("NSA: no placement found on image %d; returning it unchanged", t)
            zeros = np.zeros(base.shape[:2], np.float32)
            return NSASample(base.copy(), zeros, zeros > 0, t)
        return best

    def _synthesize(self, rng: np.random.Generator, t: int) -> Optional[NSASample]:
        c = self.config
        n = len(self.images)
        image = self.images[t].copy()
        side = min(image.shape[:2])
        changed = np.zeros(image.shape[:2], bool)
        sources, boxes = [], []
        for _ in range(int(rng.integers(c.patches[0], c.patches[1] + 1))):
            s = t if n == 1 else int((t + 1 + rng.integers(n - 1)) % n)  # another image
            w, h = self._patch_size(rng, side)
            dst = self._place(rng, t, w, h)
            if dst is None:
                continue
            if c.colour > 0 and rng.random() < c.colour:
                x, y = dst
                image = _colour_change(image, x, y, w, h, rng)
                changed[y:y + h, x:x + w] = True
                sources.append(t)
                boxes.append((x, y, w, h))
                continue
            scale = math.exp(rng.uniform(math.log(c.scale[0]), math.log(c.scale[1])))
            sw, sh = max(_MIN_SIDE, int(round(w * scale))), max(_MIN_SIDE, int(round(h * scale)))
            src = self._place(rng, s, sw, sh)
            if src is None:
                continue
            sx, sy = src
            patch = self.images[s][sy:sy + sh, sx:sx + sw]
            if (sw, sh) != (w, h):
                patch = cv2.resize(patch, (w, h), interpolation=cv2.INTER_LINEAR)
            x, y = dst
            image = _poisson_paste(image, patch, x, y)
            changed[y:y + h, x:x + w] = True
            sources.append(s)
            boxes.append((x, y, w, h))
        if not boxes:
            return None
        label = intensity_label(self.images[t], image, changed, c.logistic)
        return NSASample(image, label, label > MASK_THRESHOLD, t, sources, boxes)


def _poisson_paste(dst: np.ndarray, patch: np.ndarray, x: int, y: int) -> np.ndarray:
    """Poisson-blend `patch` into `dst` with its top-left corner at (x, y); NORMAL_CLONE.

    seamlessClone places the bounding box of the mask's non-zero pixels centred on `center`; the
    mask is the patch minus a 1-px rim (the Poisson boundary condition needs it), so the blended
    region is exactly the box.
    """
    h, w = patch.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    mask[1:-1, 1:-1] = 255
    # Centre of the non-zero box [1, w-2] x [1, h-2] in dst coordinates, as seamlessClone computes it.
    center = (x + 1 + (w - 2) // 2, y + 1 + (h - 2) // 2)
    return cv2.seamlessClone(np.ascontiguousarray(patch), dst, mask, center, cv2.NORMAL_CLONE)


def _colour_change(image: np.ndarray, x: int, y: int, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Recolour a soft elliptical blob inside the box (x, y, w, h): per-channel gain and offset
    (rust, stains, discolouration). Poisson blending cannot make such defects: it keeps the pasted
    gradients and takes its colour level from the surroundings, so a decoder trained on NSA alone
    never sees a change of colour. The texture under the blob stays; only its colour moves."""
    blob = np.zeros((h, w), np.float32)
    axes = (max(2, int(w * rng.uniform(0.25, 0.5))), max(2, int(h * rng.uniform(0.25, 0.5))))
    cv2.ellipse(blob, (w // 2, h // 2), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    blob = cv2.GaussianBlur(blob, (0, 0), max(1.0, 0.12 * min(w, h)))
    alpha = (blob / max(float(blob.max()), 1e-6) * rng.uniform(0.6, 1.0))[..., None]
    region = image[y:y + h, x:x + w].astype(np.float32)
    shifted = region * rng.uniform(0.55, 1.45, 3) + rng.uniform(-45.0, 45.0, 3)
    out = image.copy()
    out[y:y + h, x:x + w] = np.clip(region * (1.0 - alpha) + shifted * alpha, 0, 255).round().astype(np.uint8)
    return out


def intensity_label(before: np.ndarray, after: np.ndarray, region: np.ndarray,
                    logistic: tuple[float, float]) -> np.ndarray:
    """NSA "logistic intensity" label: sigmoid(k * (|after - before| - x0)) inside the pasted region.

    The change is the per-pixel mean absolute difference over channels, lightly smoothed (a
    1-grey-level noise speckle is not a defect and a defect's interior is not speckled).
    """
    k, x0 = logistic
    diff = np.abs(after.astype(np.float32) - before.astype(np.float32)).mean(axis=2)
    diff = cv2.GaussianBlur(diff, (0, 0), max(0.8, 0.004 * max(diff.shape)))
    label = 1.0 / (1.0 + np.exp(-k * (diff - x0)))
    label[~region] = 0.0
    return label.astype(np.float32)


# --------------------------------------------------------------------------- visual check


def synth_grid(synth: NSASynthesizer, n: int = 16, seed: int = 0, cols: int = 4) -> np.ndarray:
    """RGB uint8 grid of `n` samples: each cell is the image with its binary mask outlined (green)
    and the soft label beside it (grey), for checking the synthesis by eye."""
    cells = []
    for i in range(n):
        s = synth.sample(i, seed)
        img = s.image.copy()
        contours, _ = cv2.findContours(s.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, (0, 255, 0), 1)
        for (x, y, w, h) in s.boxes:
            cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), (255, 255, 0), 1)
        label = cv2.cvtColor((255 * s.label).astype(np.uint8), cv2.COLOR_GRAY2RGB)
        cells.append(np.hstack([img, label]))
    h, w = cells[0].shape[:2]
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + 2), cols * (w + 2), 3), np.uint8)
    for i, cell in enumerate(cells):
        r, c = divmod(i, cols)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = cell
    return grid
