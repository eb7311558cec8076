"""Frame -> encoder input, shared by evaluation, calibration and the station so all agree.

The encoder graph normalises by itself; here a frame is only converted to 3-channel RGB,
stretched to the bundle's input size with its interpolation, and laid out as float32 NCHW 0..255
(`to_batch`). An integer-input INT8 encoder (`calibration.int8`, keep_float "none") reads the same
pixels as uint8 (B, H, W, C), the layout they come in, padded to the channels its stem takes
(`to_pixels`): no float conversion, no transpose, on the host or in the graph.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import cv2
import numpy as np

from ..bundle import InputSpec
from ..errors import EngineError, SourceError

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


def pixel_channels(dtype: Any, shape: Optional[Sequence[Any]]) -> Optional[int]:
    """Channels of an encoder input that reads uint8 (B, H, W, C) pixels, from its declared dtype
    and shape; None for the float (B, 3, H, W) input of every other encoder."""
    if dtype is None or np.dtype(dtype) != np.uint8 or shape is None or len(shape) != 4:
        return None
    channels = shape[3]
    return int(channels) if isinstance(channels, int) and channels >= 3 else None


def to_pixels(images: list[np.ndarray], spec: InputSpec, channels: int) -> np.ndarray:
    """(B, H, W, channels) uint8: the pixels `to_batch` lays out, as an integer-input encoder reads
    them. Channels past the third carry nothing (the graph's weights for them are zero): a 4th is
    cv2's opaque alpha, one vectorised pass."""
    rgb = [resize_frame(im, spec) for im in images]
    if channels == 4:
        rgb = [cv2.cvtColor(x, cv2.COLOR_RGB2RGBA) for x in rgb]
    elif channels != 3:
        rgb = [np.concatenate([x, np.zeros((*x.shape[:2], channels - 3), np.uint8)], 2) for x in rgb]
    return np.stack(rgb)


def encoder_input(batch: np.ndarray, channels: Optional[int]) -> np.ndarray:
    """A `to_batch` batch in the layout its encoder reads: as is, or as uint8 pixels
    (`batch_to_pixels`) for an encoder that reads `channels` of them (`pixel_channels`)."""
    return batch_to_pixels(batch, channels) if channels and batch.dtype != np.uint8 else batch


def batch_to_pixels(batch: np.ndarray, channels: int = 3) -> np.ndarray:
    """`to_batch` output (B, 3, H, W) float32, integer-valued 0..255, as (B, H, W, channels) uint8.

    Lossless, so evaluation and calibration, which lay images out with `to_batch`, score with the
    very pixels the station feeds an integer-input encoder (extra channels are zeros: ignored)."""
    arr = np.asarray(batch)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise EngineError(f"expected a (B, 3, H, W) batch from preprocess.to_batch, got {arr.shape}")
    pixels = np.rint(arr)
    if not np.array_equal(pixels, arr) or pixels.min() < 0 or pixels.max() > 255:
        raise EngineError("this engine reads uint8 pixels: pass preprocess.to_batch output "
                          "(integer-valued 0..255), not normalised or interpolated floats")
    out = np.zeros((arr.shape[0], arr.shape[2], arr.shape[3], channels), np.uint8)
    out[..., :3] = pixels.astype(np.uint8).transpose(0, 2, 3, 1)
    return out
