"""Defect facts: what the describer is allowed to say about a flagged part, measured, not guessed.

Per region of a verdict (from the frame-sized anomaly map and the frame itself):

* **position** on a 3x3 grid of the *part* (its bounding box when the part stands out from the
  background, else the frame): rows top/middle/bottom, columns left/centre/right, named like the
  IAD-GPT training answers: "top left", "top", "top right", "left", "center", "right", "bottom
  left", "bottom", "bottom right". Image y grows downwards: row 0 is the top. A region lying
  mostly beside the found part (``on_part`` false: dirt on the fixture, a part out of place) keeps
  the nearest cell's name but is worded "off the part, beside its top left", never "on" it.
* **size**: area in pixels and in % of the part's area (holes filled), bounding box, centroid.
  The region's mask comes from the anomaly map, which is coarse (a feature grid upsampled to the
  frame): thresholded, it spreads over the normal surface around a defect (1.4-3.8x the true area
  on the demo parts and MVTec bottle). So the area is counted on the pixels *inside* that mask
  whose grey level stands out from the ring around it (``area_source`` "image"); when too few do
  (a defect seen by texture, not brightness) the map's area is kept and worded as a coarse
  estimate (``area_source`` "map").
* **shape**: elongation (major/minor axis ratio of the region's second moments) and orientation
  of the major axis; "scratch-like" (elongated) or "blob-like".
* **appearance**: contrast (mean grey level of those standing-out pixels, else of the whole
  mask, minus a ring around it, 0..255 units) -> "darker"/"lighter"/"similar brightness", and
  their mean colour with a colour name. The ring is at most `RING_MAX_PX` wide and measured on a
  crop (distance transform), so facts stay fast on large frames.
* **type**: by retrieval over the APG defect-prompt embeddings when a region embedding and the
  bundle's ``defect_embeddings`` exist (text-tower backbones), else by the nearest labelled
  defect examples of the product (`ExampleTypeClassifier`), else "unknown".

Everything here is numpy + OpenCV: it runs in the describer's worker process on the station.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import cv2
import numpy as np

from iadgpt.errors import DescriberError

log = logging.getLogger(__name__)

GRID_NAMES = (("top left", "top", "top right"),
              ("left", "center", "right"),
              ("bottom left", "bottom", "bottom right"))
POSITION_WORDS = tuple(name for row in GRID_NAMES for name in row)
UNKNOWN = "unknown"
ELONGATED = 2.5  # major/minor axis ratio from which a region is "scratch-like"
TONE_LEVELS = 4.0  # grey levels of contrast below which brightness is "similar"
MIN_PART_FRACTION = 0.15  # a "part" smaller than this share of the frame is not believed
ON_PART_SHARE = 0.5  # a region with less than this share of its pixels on the part, covering less than this share of it, is "off the part"
RING_MAX_PX = 32  # the ring a region is compared with is at most this wide (a cropped, bounded ring: fast at 900 px)
# a pixel of the map's region is part of the *visible* defect when its grey level is this far from the
# ring's median: DEVIATION_SIGMAS robust standard deviations (1.4826 MAD) of the ring, and >= MIN_DEVIATION
DEVIATION_SIGMAS = 3.0
MIN_DEVIATION = 8.0
MIN_TONE_SHARE = 0.01  # visible pixels (>= this share of the map region) give the tone and colour
MIN_VISIBLE_SHARE = 0.15  # visible pixels (>= this share of the map region) give the area; else the map's is kept
PathLike = Union[str, "os.PathLike[str]"]


def grid_position(x: float, y: float, box: Sequence[float]) -> tuple[int, int, str]:
    """(row, col, name) of point (x, y) on the 3x3 grid of `box` = (x0, y0, x1, y1); y grows down."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)
    col = int(min(2, max(0, math.floor(3 * (x - x0) / w))))
    row = int(min(2, max(0, math.floor(3 * (y - y0) / h))))
    return row, col, GRID_NAMES[row][col]


def colour_name(rgb: Sequence[float]) -> str:
    """A plain colour word for an RGB mean (0..255): grey levels by value, hues by HSV angle."""
    px = np.uint8([[np.clip(np.nan_to_num(np.asarray(rgb, np.float64)), 0, 255)]])
    h, s, v = (float(c) for c in cv2.cvtColor(px, cv2.COLOR_RGB2HSV_FULL)[0, 0])
    hue = h * 360.0 / 255.0
    if v < 45:
        return "black"
    if s < 40:
        return "white" if v > 210 else ("grey" if v > 90 else "dark grey")
    if hue < 15 or hue >= 345:
        name = "red"
    elif hue < 45:
        name = "orange"
    elif hue < 70:
        name = "yellow"
    elif hue < 165:
        name = "green"
    elif hue < 200:
        name = "cyan"
    elif hue < 260:
        name = "blue"
    elif hue < 300:
        name = "purple"
    else:
        name = "pink"
    if name in ("orange", "red", "yellow") and v < 150:
        return "brown"
    return name


def part_mask(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """(HxW bool mask of the part with holes filled, found). Not found -> the whole frame.

    The part is the Otsu class that does *not* cover the frame border, when the border is
    (almost) all the other class; a surface filling the frame (a tile, a web) has both classes on
    its border and is taken whole.
    """
    grey = _grey(image)
    h, w = grey.shape
    blur = cv2.GaussianBlur(grey, (0, 0), max(1.0, min(h, w) / 200))
    _, fg = cv2.threshold(blur, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
    bright_border = float(border.mean())
    if 0.05 < bright_border < 0.95:
        return np.ones((h, w), bool), False
    part = (fg == 0) if bright_border >= 0.95 else (fg == 1)
    big = largest_component(part)
    if big is None:
        return np.ones((h, w), bool), False
    filled = fill_holes(big)
    if filled.mean() < MIN_PART_FRACTION:  # a dark defect on a surface, not a part on a table
        return np.ones((h, w), bool), False
    return filled, True


def largest_component(mask: np.ndarray) -> Optional[np.ndarray]:
    """The largest 8-connected region of a mask (nonzero = in) as a bool array, or None for an empty mask."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, bool).astype(np.uint8), connectivity=8)
    if n <= 1:
        return None
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` plus every background pixel it encloses (not reachable from the frame border)."""
    h, w = mask.shape
    outside = np.pad((~mask).astype(np.uint8), 1, constant_values=1)
    cv2.floodFill(outside, None, (0, 0), 2)
    return mask | (outside[1:-1, 1:-1] != 2)


def _grey(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        return img.astype(np.uint8) if img.dtype == np.uint8 else np.clip(img, 0, 255).astype(np.uint8)
    rgb = img[..., :3]
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def _rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3].astype(np.float32)


# ----------------------------------------------------------------------------- the facts


@dataclass
class RegionFacts:
    """Measured facts about one anomalous region (frame pixel units)."""

    position: str
    grid: tuple[int, int]  # (row, col), row 0 = top
    area_px: int
    area_pct: float  # % of the part's area
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    centroid: tuple[float, float]  # x, y
    elongation: float  # >= 1
    orientation_deg: float  # major axis angle: 0 horizontal, 90 vertical (image y down, counter-clockwise)
    orientation: str  # horizontal | vertical | diagonal | none
    shape: str  # scratch-like | blob-like
    contrast: float  # mean grey inside minus the surrounding ring
    tone: str  # darker | lighter | similar brightness
    mean_rgb: tuple[int, int, int]
    colour: str
    surround_colour: str
    peak: float
    defect_type: str = UNKNOWN
    type_source: str = "none"  # prompt retrieval | labelled examples | none
    type_score: Optional[float] = None
    map_area_px: int = 0  # the thresholded anomaly map's area (coarse: spreads beyond the defect)
    map_area_pct: float = 0.0
    area_source: str = "map"  # image: area counted on the pixels that stand out | map: the map's area
    on_part: bool = True  # False: most of the region lies beside the found part (position = nearest cell)
    features: list[float] = field(default_factory=list, repr=False)  # for ExampleTypeClassifier

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("features")
        d["grid"], d["box"], d["centroid"], d["mean_rgb"] = (list(self.grid), list(self.box),
                                                             [round(c, 1) for c in self.centroid], list(self.mean_rgb))
        for k in ("area_pct", "map_area_pct", "elongation", "orientation_deg", "contrast", "peak"):
            d[k] = round(float(d[k]), 3)
        if d["type_score"] is not None:
            d["type_score"] = round(float(d["type_score"]), 3)
        return d

    def size_text(self) -> str:
        """The size with its real precision: 'about 1.2% of the part (~340 px)' when counted on the
        pixels that stand out (with the map's extent), 'roughly 3.4% of the part (coarse anomaly-map
        estimate)' otherwise. On the demo parts the first is 0.27-1.54x the true area (median 0.92),
        the map's own extent 1.65-3.8x."""
        if self.area_source == "image":
            return (f"about {_pct(self.area_pct)}% of the part (~{self.area_px} px; the coarse anomaly map marks "
                    f"{_pct(self.map_area_pct)}%)")
        return f"roughly {_pct(self.area_pct)}% of the part (coarse anomaly-map estimate)"

    def where(self, product: str = "part") -> str:
        """'at the top left of the part', 'in the center of the part', or for a region beside the
        part 'off the part, beside its top left' (the grid cell is then only the nearest one)."""
        if not self.on_part:
            return f"off the {product}, beside its {self.position}"
        return f"in the center of the {product}" if self.position == "center" else f"at the {self.position} of the {product}"

    def phrase(self) -> str:
        """One compact line: 'scratch at the top left of the part, 2.1% of the part, scratch-like diagonal, ...'."""
        what = self.defect_type if self.defect_type != UNKNOWN else "defect of unknown type"
        return (f"{what} {self.where()}, {self.size_text()}, {self.shape}"
                f"{'' if self.orientation == 'none' else ' ' + self.orientation}, {self.tone}"
                f"{'' if self.tone == 'similar brightness' else ' than its surroundings'}, {self.colour}")


@dataclass
class DefectFacts:
    """All regions of a flagged part, largest first, plus frame/part context."""

    regions: list[RegionFacts]
    frame_size: tuple[int, int]  # width, height
    part_box: tuple[int, int, int, int]
    part_area_px: int
    part_found: bool
    score: Optional[float] = None
    threshold: Optional[float] = None

    @property
    def n_regions(self) -> int:
        return len(self.regions)

    @property
    def main(self) -> Optional[RegionFacts]:
        return self.regions[0] if self.regions else None

    def to_dict(self) -> dict[str, Any]:
        return {"n_regions": self.n_regions, "regions": [r.to_dict() for r in self.regions],
                "frame_size": list(self.frame_size), "part_box": list(self.part_box),
                "part_area_px": int(self.part_area_px), "part_found": bool(self.part_found),
                "score": None if self.score is None else round(float(self.score), 4),
                "threshold": None if self.threshold is None else round(float(self.threshold), 4)}

    def lines(self) -> list[str]:
        """The facts as short lines for a prompt or a log."""
        if not self.regions:
            return ["no anomalous region could be located (the score alone flagged the part)"]
        if self.n_regions == 1:
            return [f"Defect: {self.regions[0].phrase()}."]
        return [f"{self.n_regions} defects."] + [f"Defect {i + 1}: {r.phrase()}." for i, r in enumerate(self.regions)]


def _region_masks(amap: Optional[np.ndarray], regions: Sequence[Any], threshold: Optional[float],
                  hw: tuple[int, int]) -> list[tuple[np.ndarray, float]]:
    """(bool mask, peak) per region: the thresholded map's largest component inside each box."""
    h, w = hw
    out: list[tuple[np.ndarray, float]] = []
    if amap is not None:
        amap = np.asarray(amap, np.float32).squeeze()
        if amap.shape != (h, w):
            amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    if amap is not None and threshold is not None:
        above = amap >= float(threshold)
    else:
        above = None
    if regions:
        for r in regions:
            x0, y0, x1, y1 = (int(v) for v in r.box)
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, max(x1, x0 + 1)), min(h, max(y1, y0 + 1))
            mask = np.zeros((h, w), bool)
            if above is not None:
                big = largest_component(above[y0:y1, x0:x1])
                if big is not None:
                    mask[y0:y1, x0:x1] = big
            if not mask.any():
                mask[y0:y1, x0:x1] = True
            out.append((mask, float(getattr(r, "peak", float("nan")))))
        return out
    if above is None:
        return out
    n, labels, stats, _ = cv2.connectedComponentsWithStats(above.astype(np.uint8), connectivity=8)
    order = np.argsort(-stats[1:, cv2.CC_STAT_AREA]) + 1
    for i in order:
        mask = labels == i
        out.append((mask, float(amap[mask].max())))
    return out


def region_facts(image: np.ndarray, mask: np.ndarray, *, part: Optional[np.ndarray] = None,
                 peak: float = float("nan")) -> RegionFacts:
    """Facts of one region given its bool mask (frame-sized) and the frame (RGB or grey)."""
    h, w = mask.shape
    if part is None:
        part, _ = part_mask(image)
    pys, pxs = np.nonzero(part)
    part_box = (int(pxs.min()), int(pys.min()), int(pxs.max()) + 1, int(pys.max()) + 1) if len(pxs) else (0, 0, w, h)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise DescriberError("an anomalous region has no pixels; check the detector's regions")
    area = int(len(xs))
    cx, cy = float(xs.mean()), float(ys.mean())
    row, col, position = grid_position(cx, cy, part_box)
    on_mask = part[mask]
    # beside the part: most of the region is off it, and it does not cover most of it either (a region
    # spanning the whole part and some background is on the part)
    on_part = float(on_mask.mean()) >= ON_PART_SHARE or int(on_mask.sum()) >= ON_PART_SHARE * int(part.sum())
    # shape: second moments
    cov = np.cov(np.stack([xs, ys]).astype(np.float64)) if area > 2 else np.eye(2)
    evals, evecs = np.linalg.eigh(cov + np.eye(2) * (1.0 / 12.0))  # + pixel's own extent
    major, minor = float(evals[1]), float(max(evals[0], 1e-9))
    elongation = math.sqrt(major / minor)
    vx, vy = evecs[:, 1]
    angle = (math.degrees(math.atan2(-vy, vx)) + 180.0) % 180.0  # counter-clockwise, y up
    if elongation < 1.5:
        orientation = "none"
    elif angle < 22.5 or angle >= 157.5:
        orientation = "horizontal"
    elif 67.5 <= angle < 112.5:
        orientation = "vertical"
    else:
        orientation = "diagonal"
    shape = "scratch-like" if elongation >= ELONGATED else "blob-like"
    # appearance: region vs a ring around it (on the part), on a crop around the region
    grey_full = _grey(image)
    k = max(3, min(RING_MAX_PX, int(round(math.sqrt(area) * 0.6))))
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    cx0, cy0, cx1, cy1 = max(0, x0 - k - 1), max(0, y0 - k - 1), min(w, x1 + k + 1), min(h, y1 + k + 1)
    crop = (slice(cy0, cy1), slice(cx0, cx1))
    m = mask[crop]
    grey = grey_full[crop].astype(np.float32)
    rgb = _rgb(np.asarray(image)[crop])
    dist = cv2.distanceTransform((~m).astype(np.uint8), cv2.DIST_L2, 3)  # px to the region
    ring = (dist <= k) & ~m
    if (ring & part[crop]).sum() >= 8:
        ring &= part[crop]
    if ring.sum() == 0:  # the region fills its crop, i.e. the frame: compare with the rest of the frame
        grey, rgb, m = grey_full.astype(np.float32), _rgb(image), mask
        ring = ~mask
    if ring.sum() == 0:  # the region is the whole frame: nothing to compare with
        ring = m
    ring_grey = float(grey[ring].mean())
    # the visible defect: pixels of the (coarse) map region that stand out from the ring
    centre = float(np.median(grey[ring]))
    spread = 1.4826 * float(np.median(np.abs(grey[ring] - centre)))
    visible = m & (np.abs(grey - centre) > max(DEVIATION_SIGMAS * spread, MIN_DEVIATION))
    map_area, n_visible, source = area, int(visible.sum()), "map"
    inside = visible if n_visible >= max(4, MIN_TONE_SHARE * area) and ring is not m else m
    if n_visible >= max(4, MIN_VISIBLE_SHARE * area) and ring is not m:
        area, source = n_visible, "image"
    contrast = float(grey[inside].mean()) - ring_grey
    tone = "similar brightness" if abs(contrast) < TONE_LEVELS else ("darker" if contrast < 0 else "lighter")
    mean_in = rgb[inside].mean(axis=0)
    mean_ring = rgb[ring].mean(axis=0)
    part_area = int(part.sum()) or h * w
    area_pct = 100.0 * area / part_area
    fill = area / float((x1 - x0) * (y1 - y0))
    sat_in = _saturation(mean_in)
    sat_ring = _saturation(mean_ring)
    features = [math.log(area_pct + 1e-3), math.log(elongation), contrast / 32.0, abs(contrast) / 32.0,
                fill, (sat_in - sat_ring) / 64.0, float(np.std(grey[m]) / 32.0)]
    return RegionFacts(
        position=position, grid=(row, col), area_px=area, area_pct=area_pct, box=(x0, y0, x1, y1),
        centroid=(cx, cy), elongation=elongation, orientation_deg=angle, orientation=orientation, shape=shape,
        contrast=contrast, tone=tone, mean_rgb=tuple(int(round(c)) for c in mean_in),  # type: ignore[arg-type]
        colour=colour_name(mean_in), surround_colour=colour_name(mean_ring), peak=peak, map_area_px=map_area,
        map_area_pct=100.0 * map_area / part_area, area_source=source, on_part=on_part, features=features)


def _pct(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _saturation(rgb: Sequence[float]) -> float:
    px = np.uint8([[np.clip(np.nan_to_num(np.asarray(rgb, np.float64)), 0, 255)]])
    return float(cv2.cvtColor(px, cv2.COLOR_RGB2HSV_FULL)[0, 0, 1])


def compute_facts(image: np.ndarray, anomaly_map: Optional[np.ndarray] = None, regions: Sequence[Any] = (), *,
                  threshold: Optional[float] = None, score: Optional[float] = None,
                  typer: Optional["TypeResolver"] = None,
                  region_embeddings: Optional[np.ndarray] = None, max_regions: int = 5) -> DefectFacts:
    """Facts for a flagged frame: `regions` (verdict regions, frame px) and/or a thresholded map.

    `threshold` is the map value that separates anomalous pixels (the detector's pixel
    threshold); without it the regions' boxes are used as their masks.
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise DescriberError(f"frame of shape {img.shape} is not an image")
    h, w = img.shape[:2]
    part, found = part_mask(img)
    masks = _region_masks(anomaly_map, list(regions)[:max_regions], threshold, (h, w))[:max_regions]
    facts = [region_facts(img, m, part=part, peak=p) for m, p in masks if m.any()]
    facts.sort(key=lambda r: -r.area_px)
    if typer is not None:
        for i, r in enumerate(facts):
            emb = None if region_embeddings is None or i >= len(region_embeddings) else region_embeddings[i]
            r.defect_type, r.type_source, r.type_score = typer.classify(r, emb)
    pys, pxs = np.nonzero(part)
    return DefectFacts(regions=facts, frame_size=(w, h),
                       part_box=(int(pxs.min()), int(pys.min()), int(pxs.max()) + 1, int(pys.max()) + 1),
                       part_area_px=int(part.sum()), part_found=found, score=score, threshold=threshold)


def facts_from_verdict(verdict: Any, image: np.ndarray, *, threshold: Optional[float] = None,
                       typer: Optional["TypeResolver"] = None) -> DefectFacts:
    """`compute_facts` for a station `Verdict` (its frame-sized `anomaly_map` and regions)."""
    embeddings = (verdict.extra or {}).get("region_embeddings")
    return compute_facts(image, verdict.anomaly_map, verdict.regions,
                         threshold=threshold if threshold is not None else verdict.extra.get("pixel_threshold",
                                                                                               verdict.threshold),
                         score=verdict.score, typer=typer,
                         region_embeddings=None if embeddings is None else np.asarray(embeddings, np.float32))


# ----------------------------------------------------------------------------- defect type


class PromptTypeRetriever:
    """Defect type = the APG defect prompt whose (pooled, normalised) text embedding is closest
    to the region's image embedding (cosine). Needs a text-tower backbone's embeddings."""

    source = "prompt retrieval"

    def __init__(self, embeddings: np.ndarray, types: Sequence[str]) -> None:
        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or len(emb) != len(types) or not len(types):
            raise DescriberError(f"defect_embeddings of shape {emb.shape} do not match {len(types)} defect types; "
                                 "re-export the bundle with `iadgpt export`")
        self.embeddings = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        self.types = [str(t) for t in types]

    @classmethod
    def from_bundle(cls, bundle: Any) -> Optional["PromptTypeRetriever"]:
        """From the bundle's ``defect_embeddings`` reference (None when it has none)."""
        entry = bundle.references.get("defect_embeddings")
        if not entry:
            return None
        types = (entry.get("provenance") or {}).get("defect_types") or []
        return cls(bundle.array("defect_embeddings"), types) if types else None

    def retrieve(self, embedding: np.ndarray) -> tuple[str, float]:
        e = np.asarray(embedding, np.float32).reshape(-1)
        if e.shape[0] != self.embeddings.shape[1]:
            raise DescriberError(f"region embedding has {e.shape[0]} dims, defect prompts {self.embeddings.shape[1]}")
        sims = self.embeddings @ (e / max(float(np.linalg.norm(e)), 1e-12))
        i = int(np.argmax(sims))
        return self.types[i], float(sims[i])


class ExampleTypeClassifier:
    """Defect type = majority of the k nearest labelled examples in the facts' feature space
    (log area %, log elongation, contrast, fill ratio, saturation change, texture), standardised
    by the examples' spread. Score = share of the k neighbours that agree."""

    source = "labelled examples"
    FEATURES = "features.npy"
    LABELS = "labels.json"

    def __init__(self, features: np.ndarray, labels: Sequence[str], k: int = 3) -> None:
        f = np.asarray(features, np.float32)
        if f.ndim != 2 or len(f) != len(labels) or not len(labels):
            raise DescriberError(f"{len(labels)} labelled defect examples for features of shape {f.shape}; "
                                 "give one label per example")
        self.features, self.labels, self.k = f, [str(x) for x in labels], int(k)
        self.mean = f.mean(axis=0)
        self.std = np.maximum(f.std(axis=0), 1e-3)

    @classmethod
    def from_examples(cls, examples: Sequence[tuple[np.ndarray, np.ndarray, str]], k: int = 3) -> "ExampleTypeClassifier":
        """From (image, region mask or anomaly map thresholded to bool, label) triples."""
        feats, labels = [], []
        for image, mask, label in examples:
            m = np.asarray(mask).astype(bool)
            if not m.any():
                continue
            feats.append(region_facts(image, largest_component(m)).features)
            labels.append(label)
        if not feats:
            raise DescriberError("no labelled defect example has a non-empty mask")
        return cls(np.asarray(feats, np.float32), labels, k)

    def predict(self, features: Sequence[float]) -> tuple[str, float]:
        z = (np.asarray(features, np.float32) - self.mean) / self.std
        d = np.linalg.norm((self.features - self.mean) / self.std - z, axis=1)
        nearest = np.argsort(d)[: self.k]
        votes: dict[str, float] = {}
        for rank, i in enumerate(nearest):
            votes[self.labels[i]] = votes.get(self.labels[i], 0.0) + 1.0 + 1e-3 * (self.k - rank)
        label = max(votes, key=votes.get)  # type: ignore[arg-type]
        return label, float(int(votes[label]) / len(nearest))

    def save(self, directory: PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / self.FEATURES, self.features, allow_pickle=False)
        (out / self.LABELS).write_text(json.dumps({"labels": self.labels, "k": self.k}) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, directory: PathLike) -> "ExampleTypeClassifier":
        d = Path(directory)
        try:
            meta = json.loads((d / cls.LABELS).read_text(encoding="utf-8"))
            feats = np.load(d / cls.FEATURES, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DescriberError(f"cannot read labelled defect examples from {d} ({exc}); save them with "
                                 "ExampleTypeClassifier.save") from None
        return cls(feats, meta["labels"], int(meta.get("k", 3)))


class TypeResolver:
    """The type rule of the issue: prompt retrieval when possible, else labelled examples, else unknown."""

    def __init__(self, retriever: Optional[PromptTypeRetriever] = None,
                 examples: Optional[ExampleTypeClassifier] = None) -> None:
        self.retriever, self.examples = retriever, examples

    def classify(self, region: RegionFacts, embedding: Optional[np.ndarray] = None) -> tuple[str, str, Optional[float]]:
        if self.retriever is not None and embedding is not None:
            label, score = self.retriever.retrieve(embedding)
            return label, PromptTypeRetriever.source, score
        if self.examples is not None:
            label, score = self.examples.predict(region.features)
            return label, ExampleTypeClassifier.source, score
        return UNKNOWN, "none", None
