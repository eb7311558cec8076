"""Procedural inspection products with exactly known defects, deterministic per (seed, index).

Why: the demo and the tests need plausible products and pixel-exact ground truth without
downloading a dataset. Every index is rendered from ``np.random.default_rng([seed, index])``,
so a seed always yields the same stream on any machine, and any frame can be re-rendered
alone (``sample(i)``) or without its defect (``clean(i)``) to see exactly what the defect changed.

Two products:

* ``part``: a turned metal flange (bore, hub step, bolt circle of six holes, chamfered rims,
  circumferential brushing with the anisotropic "bow-tie" sheen of turned metal) lying on a
  darker table, with a soft shadow. Pose, lighting and texture vary a little per index.
* ``tile``: a wood-grain surface filling the frame; grain warp, phase, tilt and lighting vary.

Defects (``scratch``, ``crack``, ``hole``, ``stain``, ``missing``) are drawn on solid material
only and are large enough for a patch-feature detector at 224 px (blobs ~2-5 % of the part's
area, lines 4-6 px wide at 256 px). ``mask`` is exactly the set of pixels the defect changed,
each by at least ``MIN_CHANGE`` grey levels; sensor noise is shared with the clean render.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence
from urllib.parse import parse_qsl, urlsplit

import cv2
import numpy as np

from iadgpt.errors import SourceError

log = logging.getLogger(__name__)

KINDS = ("part", "tile")
DEFECT_KINDS = ("scratch", "crack", "hole", "stain", "missing")
MIN_CHANGE = 8.0  # grey levels: a pixel is part of the defect mask only if it moved this much
_LIGHT = math.radians(-135.0)  # nominal light from the upper left (image y points down)


@dataclass
class SyntheticFrame:
    """One rendered product: RGB image, exact defect mask, and what the defect is."""

    image: np.ndarray  # HxWx3 uint8 RGB
    mask: np.ndarray  # HxW bool, exactly the pixels the defect changed
    defect_type: Optional[str]  # None for a good product
    index: int

    @property
    def is_defective(self) -> bool:
        return self.defect_type is not None


@dataclass
class _Scene:
    """A good product before defects and sensor noise (float32, 0..255)."""

    image: np.ndarray  # HxWx3
    background: np.ndarray  # HxWx3: what shows where material is missing
    solid: np.ndarray  # HxW bool: full-coverage material, where defects may go
    coverage: np.ndarray  # HxW float32 in [0, 1]: material coverage (anti-aliased edges)
    noise: np.ndarray  # HxWx3 sensor noise, added last to clean and defective renders alike
    center: tuple[float, float]
    radius: float  # outer radius of the part; 0 for a tile
    light: float  # light direction (radians) used for this frame
    scale: float = 1.0  # defect size factor: a tile's whole frame is material, so defects grow


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return xx, yy


def _value_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth noise, roughly unit variance, with features about `cell` pixels wide."""
    h, w = shape
    gh, gw = max(2, int(math.ceil(h / cell)) + 1), max(2, int(math.ceil(w / cell)) + 1)
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _fine_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    n = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), sigma)
    return n * (2.0 * sigma * math.sqrt(math.pi))  # blurring white noise divides its std by this


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _pick_point(rng: np.random.Generator, solid: np.ndarray, clearance: float) -> Optional[tuple[float, float]]:
    """A random solid pixel at least `clearance` px from non-solid pixels and from the frame edge."""
    padded = np.pad(solid.astype(np.uint8), 1)  # the frame edge counts as non-solid
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    cand = np.flatnonzero(dist >= clearance)
    if cand.size == 0:
        return None
    k = int(cand[rng.integers(cand.size)])
    return float(k % solid.shape[1]), float(k // solid.shape[1])


def _shape_alpha(shape: tuple[int, int], draw: Callable[[np.ndarray], None]) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    draw(canvas)
    return canvas.astype(np.float32) / 255.0


def _fixed(points: np.ndarray) -> np.ndarray:
    """Sub-pixel points for cv2 drawing with shift=4."""
    return np.round(np.asarray(points, np.float64) * 16).astype(np.int32).reshape(-1, 1, 2)


# ----------------------------------------------------------------------------- products


def _render_part(rng: np.random.Generator, s: int) -> _Scene:
    xx, yy = _grid(s)
    k = s / 256.0
    cx = s / 2 + rng.uniform(-0.03, 0.03) * s
    cy = s / 2 + rng.uniform(-0.03, 0.03) * s
    rot = math.radians(rng.uniform(-12.0, 12.0))
    gain = rng.uniform(0.93, 1.07)
    grad = rng.uniform(-0.06, 0.06, size=2)
    light = _LIGHT + math.radians(rng.uniform(-15.0, 15.0))

    # Table: dark, slightly blue-grey, mottled, with the part's soft shadow towards the lower right.
    bg_level = 50.0 * (1.0 + 0.04 * _value_noise(rng, (s, s), 40 * k)) + 1.2 * _fine_noise(rng, (s, s), 0.8)
    r_out, r_bore, r_hub, r_bc, r_bolt = 0.38 * s, 0.11 * s, 0.19 * s, 0.275 * s, 0.034 * s
    sx, sy = 4.0 * k, 5.0 * k
    rs = np.hypot(xx - cx - sx, yy - cy - sy)
    shadow = 1.0 - _smoothstep(r_out - 4 * k, r_out + 10 * k, rs)
    bg_level = bg_level * (1.0 - 0.45 * shadow)
    background = bg_level[..., None] * np.array([0.95, 1.0, 1.08], np.float32)

    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    cos_l = (dx * math.cos(light) + dy * math.sin(light)) / np.maximum(r, 1e-3)  # cos(angle - light)
    cover = np.clip(r_out - r + 0.5, 0, 1) * np.clip(r - r_bore + 0.5, 0, 1)

    # Turned metal: circumferential brushing = a fine 1-D radial profile, plus grain and sheen.
    n = int(r_out * 3) + 16
    fine = cv2.GaussianBlur(rng.standard_normal((1, n), dtype=np.float32), (0, 0), 0.9).ravel() * 2.4
    coarse = cv2.GaussianBlur(rng.standard_normal((1, n), dtype=np.float32), (0, 0), 14 * k).ravel() * 6
    ridx = np.arange(n, dtype=np.float32) / 3.0
    metal = 150.0 + np.interp(r, ridx, 5.0 * fine + 3.0 * coarse).astype(np.float32)
    metal += 1.6 * _fine_noise(rng, (s, s), 0.7)
    metal += 11.0 * (2.0 * cos_l * cos_l - 1.0) * _smoothstep(0, r_out, r)  # bow-tie sheen
    metal += 8.0 * (r < r_hub)  # hub face sits higher, catches more light
    groove = np.exp(-(((r - r_hub) / (1.6 * k)) ** 2))
    metal -= groove * (40.0 + 15.0 * cos_l)
    cw = 0.022 * s  # chamfer width: rims face the light on one side, away on the other
    metal += 42.0 * cos_l * ((r > r_out - cw) & (r <= r_out + 1))
    metal -= 38.0 * cos_l * ((r >= r_bore - 1) & (r < r_bore + 0.6 * cw))
    half = int(math.ceil(r_bolt + cw + 2))
    for i in range(6):  # bolt holes: only touch a small window around each
        a = rot + i * math.pi / 3
        bx, by = cx + r_bc * math.cos(a), cy + r_bc * math.sin(a)
        x0, y0 = max(0, int(bx) - half), max(0, int(by) - half)
        x1, y1 = min(s, int(bx) + half + 1), min(s, int(by) + half + 1)
        ddx, ddy = xx[y0:y1, x0:x1] - bx, yy[y0:y1, x0:x1] - by
        d = np.hypot(ddx, ddy)
        cos_b = (ddx * math.cos(light) + ddy * math.sin(light)) / np.maximum(d, 1e-3)
        cover[y0:y1, x0:x1] *= np.clip(d - r_bolt + 0.5, 0, 1)
        metal[y0:y1, x0:x1] -= 38.0 * cos_b * ((d >= r_bolt - 1) & (d < r_bolt + 0.45 * cw))
    shade = gain * (1.0 + grad[0] * dx / s + grad[1] * dy / s)
    metal = (metal * shade)[..., None] * np.array([1.0, 1.01, 1.035], np.float32)

    cover = cover.astype(np.float32)
    image = background * (1 - cover[..., None]) + metal * cover[..., None]
    noise = 1.5 * rng.standard_normal((s, s, 3), dtype=np.float32)
    return _Scene(image=image.astype(np.float32), background=background.astype(np.float32),
                  solid=cover >= 0.999, coverage=cover, noise=noise, center=(cx, cy),
                  radius=r_out, light=light)


def _render_tile(rng: np.random.Generator, s: int) -> _Scene:
    k = s / 256.0
    big = int(math.ceil(s * 1.12))  # room to tilt by a few degrees and crop
    xx, yy = _grid(big)
    gain = rng.uniform(0.94, 1.06)
    grad = rng.uniform(-0.05, 0.05, size=2)
    period = rng.uniform(15.0, 19.0) * k
    warp = 9.0 * k * _value_noise(rng, (big, big), 90 * k) + 2.0 * k * _value_noise(rng, (big, big), 20 * k)
    phase = (yy + warp) / period + rng.uniform(0, 1)
    ring = (0.5 + 0.5 * np.sin(2 * np.pi * phase)) ** 4  # thin dark latewood lines
    streaks = cv2.resize(rng.standard_normal((big, max(2, big // 28)), dtype=np.float32), (big, big),
                         interpolation=cv2.INTER_CUBIC)
    streaks = cv2.GaussianBlur(streaks, (0, 0), 0.6)
    pores = _fine_noise(rng, (big, big), 0.7)
    blotch = _value_noise(rng, (big, big), 60 * k)
    t = np.clip(0.62 * ring + 0.10 * streaks + 0.05 * pores + 0.12 * blotch, -0.3, 1.2)
    light_c = np.array([208.0, 168.0, 118.0], np.float32)
    dark_c = np.array([146.0, 98.0, 58.0], np.float32)
    tex = light_c * (1 - t[..., None]) + dark_c * t[..., None]
    angle = rng.uniform(-4.0, 4.0)
    m = cv2.getRotationMatrix2D((big / 2, big / 2), angle, 1.0)
    m[:, 2] += s / 2 - big / 2  # crop the central s x s window
    tex = cv2.warpAffine(tex, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    sx, sy = _grid(s)
    shade = gain * (1.0 + grad[0] * (sx / s - 0.5) + grad[1] * (sy / s - 0.5))
    image = tex * shade[..., None]
    sub = 66.0 + 7.0 * _value_noise(rng, (s, s), 6 * k) + 3.0 * _fine_noise(rng, (s, s), 0.8)
    substrate = sub[..., None] * np.array([1.0, 0.9, 0.85], np.float32)  # core under the veneer
    noise = 1.5 * rng.standard_normal((s, s, 3), dtype=np.float32)
    return _Scene(image=image.astype(np.float32), background=substrate.astype(np.float32),
                  solid=np.ones((s, s), bool), coverage=np.ones((s, s), np.float32), noise=noise,
                  center=(s / 2, s / 2), radius=0.0, light=_LIGHT, scale=1.3)


# ----------------------------------------------------------------------------- defects
# Each returns (alpha HxW in [0,1], colour HxWx3) or None when it found no room; the caller
# restricts alpha to material, drops unnoticeable pixels and composites.

_Defect = Optional[tuple[np.ndarray, np.ndarray, bool]]  # alpha, colour, may_touch_edge


def _scratch(rng: np.random.Generator, sc: _Scene) -> _Defect:
    s = sc.image.shape[0]
    k = s / 256.0
    p = _pick_point(rng, sc.solid, 0.04 * s)
    if p is None:
        return None
    length = rng.uniform(0.30, 0.45) * s * sc.scale
    theta = rng.uniform(0, math.pi)
    bow = rng.uniform(-0.03, 0.03) * s
    t = np.linspace(-0.5, 0.5, 9)
    ux, uy = math.cos(theta), math.sin(theta)
    pts = np.stack([p[0] + t * length * ux - np.cos(t * np.pi) * bow * uy,
                    p[1] + t * length * uy + np.cos(t * np.pi) * bow * ux], 1)
    width = max(3, int(round(rng.uniform(4.0, 6.0) * k)))
    alpha = _shape_alpha((s, s), lambda c: cv2.polylines(c, [_fixed(pts)], False, 255, width, cv2.LINE_AA, 4))
    base = sc.image
    colour = np.minimum(base + 80.0, 252.0) if rng.random() < 0.5 else base * 0.4
    return alpha, colour, False


def _crack(rng: np.random.Generator, sc: _Scene) -> _Defect:
    s = sc.image.shape[0]
    k = s / 256.0
    p = _pick_point(rng, sc.solid, 0.05 * s)
    if p is None:
        return None
    heading = rng.uniform(0, 2 * math.pi)
    step = 0.024 * s * sc.scale
    pts = [p]
    for _ in range(int(rng.integers(12, 17))):
        heading += rng.uniform(-0.7, 0.7)
        x, y = pts[-1]
        pts.append((x + step * rng.uniform(0.6, 1.3) * math.cos(heading),
                    y + step * rng.uniform(0.6, 1.3) * math.sin(heading)))
    off = np.asarray(p) - np.mean(pts, axis=0)  # centre the walk on the chosen point
    pts = [(x + off[0], y + off[1]) for x, y in pts]
    j = int(rng.integers(3, len(pts) - 3))
    branch = [pts[j]]
    bh = heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2)
    for _ in range(int(rng.integers(4, 7))):
        bh += rng.uniform(-0.6, 0.6)
        x, y = branch[-1]
        branch.append((x + 0.8 * step * math.cos(bh), y + 0.8 * step * math.sin(bh)))
    width = max(3, int(round(3.5 * k)))

    def draw(c: np.ndarray) -> None:
        cv2.polylines(c, [_fixed(np.array(pts))], False, 255, width, cv2.LINE_AA, 4)
        cv2.polylines(c, [_fixed(np.array(branch))], False, 255, max(2, width - 1), cv2.LINE_AA, 4)

    alpha = _shape_alpha((s, s), draw)
    return alpha, sc.image * 0.18, False


def _hole(rng: np.random.Generator, sc: _Scene) -> _Defect:
    s = sc.image.shape[0]
    rad = rng.uniform(0.052, 0.068) * s * sc.scale
    p = _pick_point(rng, sc.solid, rad + 2)
    if p is None:
        return None
    xx, yy = _grid(s)
    d = np.hypot(xx - p[0], yy - p[1])
    cos_l = ((xx - p[0]) * math.cos(sc.light) + (yy - p[1]) * math.sin(sc.light)) / np.maximum(d, 1e-3)
    alpha = np.clip(rad - d + 0.5, 0, 1).astype(np.float32)
    inner = 16.0 + 22.0 * (d / rad) ** 2 * (1 - cos_l) / 2  # dark, lit wall opposite the light
    rim = (d > rad - max(1.5, 0.14 * rad)).astype(np.float32)
    base = sc.image
    rim_c = base * (0.55 - 0.25 * cos_l)[..., None]
    colour = inner[..., None] * np.ones(3, np.float32) * (1 - rim[..., None]) + rim_c * rim[..., None]
    return alpha, colour.astype(np.float32), False


def _stain(rng: np.random.Generator, sc: _Scene) -> _Defect:
    s = sc.image.shape[0]
    k = s / 256.0
    p = _pick_point(rng, sc.solid, 0.05 * s * sc.scale)
    if p is None:
        return None
    xx, yy = _grid(s)
    field = np.zeros((s, s), np.float32)
    for _ in range(int(rng.integers(4, 8))):
        bx, by = p[0] + rng.normal(0, 0.03 * s * sc.scale), p[1] + rng.normal(0, 0.03 * s * sc.scale)
        sg = rng.uniform(0.028, 0.045) * s * sc.scale
        field += np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * sg * sg))
    field *= np.clip(1.0 + 0.3 * _value_noise(rng, (s, s), 8 * k), 0.7, 1.3)  # ragged edge, no pinholes
    alpha = 0.85 * _smoothstep(0.25, 0.75, field)
    if sc.radius > 0:  # rust / oil on metal
        tint = np.array([128.0, 78.0, 38.0], np.float32) * rng.uniform(0.85, 1.1)
    else:  # dark ink / water stain on wood
        tint = np.array([62.0, 58.0, 72.0], np.float32) * rng.uniform(0.9, 1.2)
    shade = (sc.image.mean(-1, keepdims=True) / 150.0).clip(0.6, 1.4)
    return alpha, tint * shade, False


def _missing(rng: np.random.Generator, sc: _Scene) -> _Defect:
    s = sc.image.shape[0]
    if sc.radius > 0:  # a bite out of the outer rim, showing the table behind
        phi = rng.uniform(0, 2 * math.pi)
        rr = sc.radius + rng.uniform(-0.005, 0.03) * s
        c = (sc.center[0] + rr * math.cos(phi), sc.center[1] + rr * math.sin(phi))
        size = rng.uniform(0.11, 0.14) * s
    else:  # a chip of veneer gone, showing the darker core
        p = _pick_point(rng, sc.solid, 0.12 * s)
        if p is None:
            return None
        c, size = p, rng.uniform(0.065, 0.085) * s * sc.scale
    nv = int(rng.integers(9, 15))
    angs = np.sort(rng.uniform(0, 2 * math.pi, nv))
    radii = size * rng.uniform(0.65, 1.15, nv)
    pts = np.stack([c[0] + radii * np.cos(angs), c[1] + radii * np.sin(angs)], 1)
    alpha = _shape_alpha((s, s), lambda cv: cv2.fillPoly(cv, [_fixed(pts)], 255, cv2.LINE_AA, 4))
    return alpha, sc.background, True


_DEFECTS: dict[str, Callable[[np.random.Generator, _Scene], _Defect]] = {
    "scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain, "missing": _missing,
}
_MIN_AREA = {"scratch": 0.006, "crack": 0.005, "hole": 0.007, "stain": 0.009, "missing": 0.009}  # x size^2


# ----------------------------------------------------------------------------- product


class SyntheticProduct:
    """An endless, reproducible stream of rendered products; see the module docstring."""

    def __init__(self, kind: str = "part", size: int = 256, seed: int = 0, defect_rate: float = 0.3,
                 defect_kinds: Sequence[str] = DEFECT_KINDS) -> None:
        if kind not in KINDS:
            raise SourceError(f"unknown synthetic kind {kind!r}: use one of {', '.join(KINDS)}")
        if not 64 <= int(size) <= 4096:
            raise SourceError(f"synthetic size {size} out of range: use 64..4096 pixels")
        if not 0.0 <= float(defect_rate) <= 1.0:
            raise SourceError(f"defect_rate {defect_rate} out of range: use a fraction in [0, 1]")
        kinds = tuple(defect_kinds)
        bad = [d for d in kinds if d not in DEFECT_KINDS]
        if bad or not kinds:
            raise SourceError(f"unknown defect kinds {bad or '(none given)'}: use some of {', '.join(DEFECT_KINDS)}")
        if int(seed) < 0:
            raise SourceError(f"seed {seed} is negative: use a seed >= 0")
        self.kind, self.size, self.seed = kind, int(size), int(seed)
        self.defect_rate, self.defect_kinds = float(defect_rate), kinds

    def __repr__(self) -> str:
        return (f"SyntheticProduct(kind={self.kind!r}, size={self.size}, seed={self.seed}, "
                f"defect_rate={self.defect_rate}, defect_kinds={self.defect_kinds})")

    def _plan(self, index: int) -> tuple[np.random.Generator, Optional[str]]:
        if index < 0:
            raise SourceError(f"synthetic index {index} is negative: use indices >= 0")
        rng = np.random.default_rng([self.seed, int(index)])
        defective = rng.random() < self.defect_rate  # both draws happen for every index, so the
        pick = int(rng.integers(len(self.defect_kinds)))  # clean render of a defective index matches
        return rng, (self.defect_kinds[pick] if defective else None)

    def defect_type(self, index: int) -> Optional[str]:
        """The defect `sample(index)` will carry, without rendering it."""
        return self._plan(index)[1]

    def sample(self, index: int) -> SyntheticFrame:
        """Render frame `index`; the same (seed, index) always gives the same pixels."""
        return self._render(index, with_defect=True)

    def clean(self, index: int) -> SyntheticFrame:
        """Frame `index` as it would look without its defect (for ground-truth checks)."""
        return self._render(index, with_defect=False)

    def _render(self, index: int, with_defect: bool) -> SyntheticFrame:
        rng, defect = self._plan(index)
        scene = (_render_part if self.kind == "part" else _render_tile)(rng, self.size)
        image = scene.image
        mask = np.zeros((self.size, self.size), bool)
        if defect is not None and with_defect:
            image, mask = self._apply(defect, rng, scene)
        out = np.clip(np.rint(image + scene.noise), 0, 255).astype(np.uint8)
        return SyntheticFrame(image=out, mask=mask, defect_type=defect if with_defect else None,
                              index=int(index))

    def _apply(self, defect: str, rng: np.random.Generator, sc: _Scene) -> tuple[np.ndarray, np.ndarray]:
        made = _composite(defect, rng, sc)
        if made is None:
            log.warning("no room for a %s defect on this %s; rendering it good", defect, self.kind)
            return sc.image, np.zeros(sc.solid.shape, bool)
        return made


def _composite(defect: str, rng: np.random.Generator, sc: _Scene) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(float image with the defect, its exact mask), or None when the defect found no room."""
    min_px = _MIN_AREA[defect] * sc.image.shape[0] ** 2
    best: Optional[tuple[np.ndarray, np.ndarray]] = None
    best_area = 0
    for _ in range(12):  # placement can clip against holes/edges: retry, deterministically
        made = _DEFECTS[defect](rng, sc)
        if made is None:
            continue
        raw, colour, edge = made
        alpha = raw * (sc.coverage if edge else sc.solid.astype(np.float32))
        inside = 1.0 if edge else float(alpha.sum()) / max(1e-6, float(raw.sum()))
        delta = alpha[..., None] * (colour - sc.image)
        ad = np.abs(delta)
        mask = np.maximum(np.maximum(ad[..., 0], ad[..., 1]), ad[..., 2]) >= MIN_CHANGE
        area = int(np.count_nonzero(mask))
        if best is None or area * inside > best_area:
            delta[~mask] = 0.0
            best, best_area = (sc.image + delta, mask), area * inside
        if area >= min_px and inside >= 0.8:  # big enough and not mostly off the material
            break
    return best


def paint_defect(image: np.ndarray, foreground: np.ndarray, defect: str,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one `defect` (a DEFECT_KINDS name) onto a real square RGB uint8 image, on its foreground.

    The painters above see the photo as a scene whose material is `foreground` (HxW bool, e.g.
    `models.synth.foreground_mask`) and whose "background" (what a missing piece shows) is the
    median colour of the frame border. Returns (uint8 image, bool mask of exactly the changed
    pixels); the mask is empty when the foreground has no room for the defect.
    """
    img = np.asarray(image)
    fg = np.asarray(foreground, bool)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] != img.shape[1] or fg.shape != img.shape[:2]:
        raise SourceError(f"paint_defect needs a square HxWx3 image and an HxW foreground, got {img.shape} "
                          f"and {fg.shape}; resize the image to a square first")
    if defect not in _DEFECTS:
        raise SourceError(f"unknown defect kind {defect!r}: use one of {', '.join(DEFECT_KINDS)}")
    s = img.shape[0]
    band = max(2, s // 50)
    border = np.concatenate([img[:band].reshape(-1, 3), img[-band:].reshape(-1, 3),
                             img[:, :band].reshape(-1, 3), img[:, -band:].reshape(-1, 3)])
    f32 = img.astype(np.float32)
    sc = _Scene(image=f32, background=np.broadcast_to(np.median(border, 0).astype(np.float32), f32.shape),
                solid=fg, coverage=fg.astype(np.float32), noise=np.zeros_like(f32), center=(s / 2, s / 2),
                radius=0.0, light=_LIGHT)
    made = _composite(defect, rng, sc)
    if made is None:
        return img.copy(), np.zeros(fg.shape, bool)
    return np.clip(np.rint(made[0]), 0, 255).astype(np.uint8), made[1]


# ----------------------------------------------------------------------------- URIs

_URI_TYPES: dict[str, Callable[[str], Any]] = {
    "seed": int, "size": int, "defect_rate": float, "fps": float, "count": int, "kind": str,
    "defect_kinds": lambda v: tuple(x.strip() for x in v.split(",") if x.strip()),
}


def parse_synthetic_uri(uri: str) -> dict[str, Any]:
    """``synthetic://part?seed=3&size=256&defect_rate=0.3&fps=20&count=100`` -> keyword arguments.

    The host names the kind (``part`` when empty). ``fps`` and ``count`` are for the frame source;
    the rest are `SyntheticProduct` arguments. ``defect_kinds`` is a comma list.
    """
    parts = urlsplit(uri)
    if parts.scheme != "synthetic":
        raise SourceError(f"not a synthetic URI: {uri!r}; write it as synthetic://part?seed=0&count=100")
    out: dict[str, Any] = {"kind": (parts.netloc or parts.path.strip("/") or "part")}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _URI_TYPES:
            raise SourceError(f"unknown option {key!r} in {uri!r}: use {', '.join(sorted(_URI_TYPES))}")
        try:
            out[key] = _URI_TYPES[key](value)
        except ValueError:
            raise SourceError(f"option {key}={value!r} in {uri!r} is not a valid "
                              f"{_URI_TYPES[key].__name__ if key != 'defect_kinds' else 'list'}") from None
    if out["kind"] not in KINDS:
        raise SourceError(f"unknown synthetic kind {out['kind']!r} in {uri!r}: "
                          "use synthetic://part or synthetic://tile")
    if out.get("count", 0) < 0 or out.get("fps", 0.0) < 0:
        raise SourceError(f"count and fps must be >= 0 in {uri!r}")
    return out
