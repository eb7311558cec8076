"""Frame -> encoder input, shared by evaluation, calibration and the station so all agree.

The encoder graph normalises by itself; here a frame is only converted to 3-channel RGB,
stretched to the bundle's input size with its interpolation, and laid out as float32 NCHW 0..255.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..bundle import InputSpec
from ..errors import SourceError

_INTERPOLATION = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                  "nearest": cv2.INTER_NEAREST}


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Grey (HxW or HxWx1) and RGBA frames become RGB uint8; anything else is refused clearly."""
    if image is None or not isinstance(image, np.ndarray) or image.size == 0:
        raise SourceError("empty frame: the camera returned no pixels; check the source")
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:  # 16-bit industrial cameras
            image = (image >> 8).astype(np.uint8)
        else:
            raise SourceError(f"frame dtype {image.dtype} is not supported; send uint8 (or uint16) frames")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2RGB)
    raise SourceError(f"frame of shape {image.shape} is not an image: expected HxW, HxWx3 or HxWx4")


def resize_frame(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """RGB uint8 frame stretched to the input size (H, W, 3)."""
    h, w = spec.size
    rgb = to_rgb(image)
    if rgb.shape[:2] == (h, w):
        return rgb
    interp = _INTERPOLATION.get(spec.resize)
    if interp is None:
        raise SourceError(f"unknown resize mode {spec.resize!r} in the bundle; expected one of {sorted(_INTERPOLATION)}")
    if spec.resize == "area" and (rgb.shape[0] < h or rgb.shape[1] < w):
        interp = cv2.INTER_LINEAR  # area is only defined for shrinking
    return cv2.resize(rgb, (w, h), interpolation=interp)


def to_batch(images: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    """(B, 3, H, W) float32 batch in 0..255, the encoder graph's input."""
    batch = np.stack([resize_frame(im, spec) for im in images]).astype(np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
