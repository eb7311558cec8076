"""Frame -> encoder input: the float batch and the uint8 pixels an integer-input encoder reads agree."""
from __future__ import annotations

import numpy as np
import pytest

from iadgpt.bundle import InputSpec
from iadgpt.errors import EngineError
from iadgpt.runtime.preprocess import batch_to_pixels, encoder_input, pixel_channels, to_batch, to_pixels, to_rgb

SPEC = InputSpec((32, 48), (127.0,) * 3, (128.0,) * 3)


def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (60, 90, 3), dtype=np.uint8), rng.integers(0, 256, (60, 90), dtype=np.uint8)]


@pytest.mark.parametrize("channels", [3, 4, 8])
def test_pixels_are_the_batch_in_the_frame_layout(channels):
    batch = to_batch(frames(), SPEC)
    pixels = to_pixels(frames(), SPEC, channels)
    assert pixels.shape == (2, 32, 48, channels) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[..., :3].transpose(0, 3, 1, 2), batch)
    again = batch_to_pixels(batch, channels)
    np.testing.assert_array_equal(again[..., :3], pixels[..., :3])
    assert not again[..., 3:].any()


@pytest.mark.parametrize("bad", [lambda b: (b - 127) / 128, lambda b: b + 0.5, lambda b: b * 2,
                                 lambda b: b.transpose(0, 2, 3, 1)])
def test_only_whole_pixel_batches_become_pixels(bad):
    with pytest.raises(EngineError, match="to_batch"):
        batch_to_pixels(bad(to_batch(frames(), SPEC)), 4)


def test_pixel_channels_only_for_uint8_channels_last():
    assert pixel_channels(np.uint8, ("batch", 224, 224, 4)) == 4
    assert pixel_channels(np.float32, ("batch", 3, 224, 224)) is None
    assert pixel_channels(np.uint8, ("batch", 224, 224, "c")) is None
    assert pixel_channels(None, None) is None


def test_encoder_input_converts_only_for_a_pixel_encoder():
    batch = to_batch(frames(), SPEC)
    assert encoder_input(batch, None) is batch
    np.testing.assert_array_equal(encoder_input(batch, 4), batch_to_pixels(batch, 4))
    pixels = to_pixels(frames(), SPEC, 4)
    assert encoder_input(pixels, 4) is pixels  # the station's frames are already pixels


def test_uint16_frames_keep_their_high_byte():
    out = to_rgb(np.full((4, 4), 0x1234, np.uint16))
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3) and (out == 0x12).all()


def test_the_bundles_interpolation_is_the_one_used():
    """ONNX Runtime and the GPU path read the same pixels only if "bilinear" means INTER_LINEAR."""
    import cv2
    frame = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    spec = InputSpec(size=(32, 48), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize="bilinear")
    want = cv2.resize(frame, (48, 32), interpolation=cv2.INTER_LINEAR).astype(np.float32).transpose(2, 0, 1)
    np.testing.assert_array_equal(to_batch([frame], spec)[0], want)
