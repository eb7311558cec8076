"""The records the station produces: one `Verdict` per frame read, JSON-ready."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import numpy as np


@dataclass
class Region:
    """A connected area of the thresholded anomaly map, in frame pixel coordinates."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), frame pixels
    area_px: int
    peak: float  # highest anomaly value inside the region
    centroid: tuple[float, float]  # x, y, frame pixels

    def to_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "area_px": int(self.area_px), "peak": float(self.peak),
                "centroid": [float(c) for c in self.centroid]}


@dataclass
class Verdict:
    """What the station decided about one frame; `to_dict()` is the JSON event.

    `error` is set (and `anomalous` is None) when the frame could not be judged, so that every
    frame read still yields exactly one event.
    """

    frame_id: int
    timestamp: float  # wall clock (time.time()) when the frame was captured
    score: Optional[float] = None
    threshold: Optional[float] = None
    anomalous: Optional[bool] = None
    regions: list[Region] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    source: str = ""
    frame_shape: Optional[tuple[int, ...]] = None
    error: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)
    anomaly_map: Optional[np.ndarray] = field(default=None, repr=False)  # frame-sized float32, not serialised
    # the encoder's per-layer features of a flagged frame, kept only when the describer's bridge
    # reads them (`Detector.keep_features`); not serialised
    features: Optional[list] = field(default=None, repr=False)

    @property
    def event_id(self) -> str:
        """Unique across station restarts (frame ids restart at 0): capture time (UTC, ms) + frame id."""
        seconds = int(self.timestamp)
        millis = int(round((self.timestamp - seconds) * 1000)) % 1000
        return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(seconds))}{millis:03d}-{self.frame_id}"

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("anomaly_map", "regions", "features")}
        data["timings_ms"] = dict(self.timings_ms)
        data["extra"] = dict(self.extra)
        data["event_id"] = self.event_id
        data["regions"] = [r.to_dict() for r in self.regions]
        if self.frame_shape is not None:
            data["frame_shape"] = list(self.frame_shape)
        return data
