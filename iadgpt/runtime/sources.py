"""Frame sources: one URI picks where frames come from (after jetson-utils' videoSource).

``open_source(uri)`` understands:

==============================  ==========================================================
``part.mp4`` / ``.avi`` ...     video file (ends at the last frame unless ``loop=True``)
``images/`` / ``"imgs/*.png"``  image folder or glob, sorted by name
``0`` / ``/dev/video0``         V4L2 camera (any OpenCV backend off Linux)
``rtsp://...`` / ``http://..``  network stream through FFMPEG (an http URL ending in a video
                                extension is read as a finite file instead)
``gst:<pipeline>``              GStreamer pipeline ending in ``appsink`` (OpenCV built with GStreamer)
``csi://0?width=1920&...``      Jetson CSI camera: builds an ``nvarguscamerasrc`` pipeline (see
                                `csi_pipeline`)
``synthetic://part?seed=3...``  procedural products with known defects (`synthetic.py`)
==============================  ==========================================================

Every frame read yields one `Frame`, even a broken one: an undecodable image file gives a frame
with ``image=None`` and ``meta["error"]``, so the station writes an error event for it instead of
silently skipping it. Live sources (camera, stream, GStreamer, CSI) treat a failed read as a lost
device and reconnect with exponential backoff (`_ReconnectingCapture`); frame ids keep counting.

Cameras, streams and video files convert each BGR frame to RGB, a copy they make anyway; with
`use_frame_buffers(allocate)` that copy lands in memory the detector hands out (the GPU fast
path's pinned frame buffers), which the GPU then reads without a second host copy. The station
connects the two when its detector offers `frame_buffer`.

Reads happen in the caller's thread (the station runs its own capture thread). For devices the
read is OpenCV's blocking read, bounded by the driver (V4L2) or by ``timeout`` (FFMPEG streams);
the ``timeout`` argument of `read` bounds waiting for a reconnect and synthetic frame pacing.
"""
from __future__ import annotations

import glob
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Union, runtime_checkable
from urllib.parse import parse_qsl, urlsplit

import cv2
import numpy as np

from iadgpt.data import IMAGE_EXTENSIONS, check_link, is_image_name, read_image
from iadgpt.errors import DataError, SourceError
from iadgpt.runtime.synthetic import SyntheticProduct, parse_synthetic_uri

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".ts", ".h264", ".h265")
IMAGE_EXTS = tuple(sorted(IMAGE_EXTENSIONS))  # the set export and calibrate take, so all three agree
FRAME_BUFFER_RETRY_S = 30.0  # after a failed frame-buffer allocation, ordinary memory for this long
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp")


@dataclass
class Frame:
    """One captured frame. `image` is RGB uint8 when colour; grey (HxW) and RGBA pass through.

    `image` is None when the frame could not be decoded; `meta["error"]` then says why.
    """

    image: Optional[np.ndarray]
    frame_id: int  # monotonic per source, across loops and reconnects
    timestamp: float  # time.time() at capture
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class FrameSource(Protocol):
    """What the station reads from. `read` returns None on timeout and at the end of a finite
    stream (then `ended` is True); it raises SourceError only when the source cannot go on.
    `live` is False for files: the station then waits for inference instead of dropping frames."""

    uri: str
    live: bool
    reconnects: int
    errors: int
    ended: bool

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]: ...

    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...

    def __enter__(self) -> "FrameSource": ...

    def __exit__(self, *exc: object) -> None: ...


def _to_rgb(img: np.ndarray, dst: Optional[np.ndarray] = None) -> np.ndarray:
    """OpenCV gives BGR(A); the package works in RGB. Grey passes through untouched.

    On OpenCV's thread pool: converting in the calling thread instead (row bands too small to be
    split) was measured for the capture's tail under load and lost, 1080p on the H200 host, 16
    cores, two busy processes: 0.67 vs 0.07 ms p50, 1.10 vs 0.14 ms p99 (`benchmarks/host_copy.py`)."""
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=dst)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    return img


class _BaseSource:
    """Shared bookkeeping: ids, counters, iteration, context manager, close-once."""

    live = True  # frames arrive whether or not they are read (cameras, streams, paced synthetic parts)

    def __init__(self, uri: str, timeout: float) -> None:
        self.uri = uri
        self.timeout = float(timeout)
        self.reconnects = 0
        self.errors = 0
        self.ended = False
        self._closed = False
        self._next_id = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def _frame(self, image: Optional[np.ndarray], **meta: Any) -> Frame:
        frame = Frame(image=image, frame_id=self._next_id, timestamp=time.time(), source=self.uri, meta=meta)
        self._next_id += 1
        return frame

    def _check_open(self) -> None:
        if self._closed:
            raise SourceError(f"source {self.uri} is closed; open a new one with open_source()")

    def _wait(self, timeout: Optional[float]) -> float:
        return self.timeout if timeout is None else max(0.0, float(timeout))

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[Frame]:
        """Frames until the end of the stream; timeouts are waited through."""
        while not self.ended:
            frame = self.read()
            if frame is not None:
                yield frame

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "_BaseSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ConvertsFrames:
    """For sources that decode BGR frames and convert them to RGB (video files, live devices): the
    conversion can write into memory the detector hands out (`use_frame_buffers`)."""

    uri: str
    _allocate: Optional[Callable[[tuple[int, ...]], np.ndarray]] = None
    _allocate_failed_at: Optional[float] = None  # _now() at the last failure; None: working
    _now: Callable[[], float] = staticmethod(time.monotonic)

    def use_frame_buffers(self, allocate: Optional[Callable[[tuple[int, ...]], np.ndarray]]) -> None:
        """Convert decoded colour frames into arrays from `allocate(shape)` (None: fresh arrays).

        For the GPU fast path's pinned frame buffers (`CudaGraphPipeline.frame_buffer`): the
        conversion the source makes anyway then puts the frame where the GPU reads it. If
        `allocate` fails (pinned memory can run short for a while), that is logged once, frames go
        on in ordinary memory (verdicts are the same; the fast path copies them, ~0.5 ms per 1080p
        frame) and the buffers are tried again every `FRAME_BUFFER_RETRY_S` seconds."""
        self._allocate = allocate
        self._allocate_failed_at = None

    def _rgb(self, img: np.ndarray) -> np.ndarray:
        if (self._allocate is not None and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
                and (self._allocate_failed_at is None
                     or self._now() - self._allocate_failed_at >= FRAME_BUFFER_RETRY_S)):
            try:
                rgb = _to_rgb(img, dst=self._allocate(img.shape))
            except Exception as exc:  # noqa: BLE001 - where a frame lives must never stop the capture
                if self._allocate_failed_at is None:
                    log.warning("%s: frame buffers from the detector failed (%s: %s); frames go on in ordinary "
                                "memory, which the GPU fast path copies (~0.5 ms per 1080p frame); trying the "
                                "buffers again every %g s", self.uri, type(exc).__name__, exc, FRAME_BUFFER_RETRY_S)
                self._allocate_failed_at = self._now()
            else:
                if self._allocate_failed_at is not None:
                    log.info("%s: frame buffers from the detector work again", self.uri)
                    self._allocate_failed_at = None
                return rgb
        return _to_rgb(img)


# ----------------------------------------------------------------------------- files


class ImageFolderSource(_BaseSource):
    """Image files in name order. A file that cannot be decoded yields an error frame, not a stop."""

    live = False

    def __init__(self, uri: str, paths: list[str], *, loop: bool = False, timeout: float = 1.0) -> None:
        super().__init__(uri, timeout)
        if not paths:
            raise SourceError(f"no images in {uri}: put {'/'.join(IMAGE_EXTS[:4])}... files there "
                              "or pass a glob such as 'folder/*.png'")
        self.paths = paths
        self.loop = loop
        self._pos = 0
        self._failed_in_pass = 0

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        self._check_open()
        if self._pos >= len(self.paths):
            if not self.loop:
                self.ended = True
                return None
            if self._failed_in_pass == len(self.paths):  # looping on would write thousands of error events a second
                raise SourceError(f"all {len(self.paths)} files of {self.uri} failed in the last pass (deleted, "
                                  "moved or unreadable); stopping the loop: check the folder and start again")
            self._pos, self._failed_in_pass = 0, 0
        path = self.paths[self._pos]
        self._pos += 1
        try:
            check_link(Path(path))
            if not os.path.exists(path):
                raise DataError(f"{path} is missing (deleted or moved since the run started)")
            try:  # strict, as calibrate and export read: cv2.imread gives a truncated JPEG a grey band, no error
                img = read_image(path)  # always 3-channel 8-bit RGB
            except DataError:
                raise DataError(f"cannot decode {path}") from None
        except DataError as exc:
            self.errors += 1
            self._failed_in_pass += 1
            log.warning("%s; emitting an error frame and going on", exc)
            return self._frame(None, path=path, error=str(exc))
        return self._frame(img, path=path)


class VideoFileSource(_ConvertsFrames, _BaseSource):
    """A video file read to its end (or round and round with loop=True).

    A read that fails is followed by up to `MAX_BAD_FRAMES` more: if one of them decodes, the
    failed ones were a damaged stretch of the file and each yields an error frame, then reading
    goes on; if none does, the file has ended. Ending before the frame count its header announces
    (a truncated file) is logged and counted as a source error. A file that grew while it was read
    (still being recorded) ends at the end it had when opened, with a warning saying so.
    """

    live = False
    MAX_BAD_FRAMES = 25

    def __init__(self, uri: str, path: str, *, loop: bool = False, timeout: float = 1.0,
                 api: int = cv2.CAP_ANY, params: Optional[list[int]] = None) -> None:
        super().__init__(uri, timeout)
        self.path, self.loop, self._api, self._params = path, loop, api, list(params or [])
        self._cap = self._open()
        self._size_at_open = _file_size(path)
        self._pos = 0
        self._bad_ahead = 0  # damaged frames found by reading ahead, not yet reported
        self._ahead: Optional[np.ndarray] = None  # the good frame found after them

    def _open(self) -> Any:
        cap = cv2.VideoCapture(self.path, self._api, self._params)
        if not cap.isOpened():
            cap.release()
            if "://" in self.path:
                raise SourceError(f"cannot open video {self.path}: check the URL and that the server is up "
                                  f"(ffprobe '{self.path}')")
            raise SourceError(f"cannot open video {self.path}: the file is corrupt or its codec is not "
                              "supported by this OpenCV build; re-encode it (ffmpeg -i in -c:v mjpeg out.avi) "
                              "or extract frames to an image folder")
        return cap

    def _next_image(self) -> Optional[np.ndarray]:
        """The next decodable image; damaged frames on the way are counted in `_bad_ahead`."""
        for failed in range(self.MAX_BAD_FRAMES + 1):
            ok, img = self._cap.read()
            if ok and img is not None:
                self._bad_ahead = failed
                return img
        self._bad_ahead = 0
        return None

    def _error_frame(self) -> Frame:
        self._bad_ahead -= 1
        self.errors += 1
        self._pos += 1
        log.warning("video %s: frame %d will not decode; emitting an error frame and going on", self.path, self._pos - 1)
        return self._frame(None, path=self.path, pos=self._pos - 1,
                           error=f"cannot decode frame {self._pos - 1} of {self.path}")

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        self._check_open()
        if self.ended:
            return None
        if self._ahead is None:
            self._ahead = self._next_image()
        if self._ahead is not None and self._bad_ahead:
            return self._error_frame()
        img, self._ahead = self._ahead, None
        if img is None:
            count = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
            announced = int(count) if np.isfinite(count) and count > 0 else 0
            if 0 < self._pos < announced:  # truncated, or damaged to the end: the rest is lost
                self.errors += 1
                log.warning("video %s ended after %d of the %d frames its header announces (truncated or "
                            "damaged file); the rest cannot be read", self.path, self._pos, announced)
            if not self.loop or self._pos == 0:  # finished, or a file with no readable frame at all
                self.ended = True
                if self._pos == 0:
                    log.warning("video %s has no readable frames", self.path)
                size = _file_size(self.path)
                if None not in (size, self._size_at_open) and size > self._size_at_open:
                    log.warning("video %s grew from %d to %d bytes while it was read (still being recorded?): "
                                "reading stopped at the end it had when opened; run again on the finished file, "
                                "or inspect the camera or stream itself", self.path, self._size_at_open, size)
                return None
            self._cap.release()
            self._cap = self._open()  # seeking to 0 is unreliable across codecs: reopen
            self._pos = 0
            img = self._next_image()
            if img is None:
                self.ended = True
                return None
            if self._bad_ahead:
                self._ahead = img
                return self._error_frame()
        self._pos += 1
        return self._frame(self._rgb(img), path=self.path, pos=self._pos - 1)

    def close(self) -> None:
        if not self._closed:
            self._cap.release()
        super().close()


def _file_size(path: str) -> Optional[int]:
    """Size of a local file; None for URLs and anything that cannot be stat'ed."""
    if "://" in path:
        return None
    try:
        return os.stat(path).st_size
    except OSError:
        return None


# ----------------------------------------------------------------------------- live devices


class _CaptureLike(Protocol):
    def isOpened(self) -> bool: ...

    def read(self) -> tuple[bool, Optional[np.ndarray]]: ...

    def release(self) -> None: ...


class _ReconnectingCapture:
    """A capture that reopens itself when reads fail, with exponential backoff.

    Why a class of its own: the reconnect policy is the part of camera handling that breaks in
    the field, and with an injected `opener` (and `sleep`/`clock`) it is testable without a camera.
    The first open must succeed (a wrong URI should fail loudly); later failures only back off.
    """

    def __init__(self, opener: Callable[[], _CaptureLike], name: str, *, reconnect: bool = True,
                 initial_backoff: float = 0.5, max_backoff: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.opener, self.name, self.reconnect = opener, name, reconnect
        self.initial_backoff, self.max_backoff = initial_backoff, max(initial_backoff, max_backoff)
        self._sleep, self._clock = sleep, clock
        self.reconnects = 0
        self.failures = 0  # lost devices + failed reopen attempts
        self._backoff = initial_backoff
        self._retry_at = 0.0
        self._cap: Optional[_CaptureLike] = None

    def open(self) -> None:
        cap = self._try_open()
        if cap is None:
            raise SourceError(f"cannot open {self.name}")
        self._cap = cap

    def _try_open(self) -> Optional[_CaptureLike]:
        try:
            cap = self.opener()
        except Exception as exc:  # a driver exception is one more failed attempt
            log.debug("opening %s raised %s", self.name, exc)
            return None
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            return None
        return cap

    def _lost(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self.failures += 1
        if not self.reconnect:
            raise SourceError(f"lost {self.name} and reconnect is off; check the cable/network, "
                              "or open the source with reconnect=True")
        log.warning("lost %s; reconnecting in %.1f s", self.name, self._backoff)
        self._retry_at = self._clock() + self._backoff

    def read(self, timeout: Optional[float] = None) -> Optional[np.ndarray]:
        """The next image, or None if `timeout` seconds pass while reconnecting (None = forever)."""
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            if self._cap is None:
                wait = self._retry_at - self._clock()
                if wait > 0:
                    if deadline is not None and self._clock() + wait > deadline:
                        self._sleep(max(0.0, deadline - self._clock()))
                        return None
                    self._sleep(wait)
                cap = self._try_open()
                if cap is None:
                    self.failures += 1
                    self._backoff = min(self._backoff * 2, self.max_backoff)
                    self._retry_at = self._clock() + self._backoff
                    log.warning("reconnecting %s failed; next try in %.1f s", self.name, self._backoff)
                    continue
                self._cap = cap
                self.reconnects += 1
                self._backoff = self.initial_backoff
                log.info("reconnected %s (reconnect #%d)", self.name, self.reconnects)
            try:
                ok, img = self._cap.read()
            except cv2.error as exc:
                log.debug("read on %s raised %s", self.name, exc)
                ok, img = False, None
            if ok and img is not None:
                return img
            self._lost()

    def release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class CaptureSource(_ConvertsFrames, _BaseSource):
    """A live device (camera, network stream, GStreamer/CSI pipeline) behind `_ReconnectingCapture`.

    `read(timeout)` blocks in OpenCV's read while the device is up; `timeout` bounds the wait
    while the device is being reconnected, after which None is returned and the next call goes on.
    """

    def __init__(self, uri: str, opener: Callable[[], _CaptureLike], *, timeout: float = 1.0,
                 reconnect: bool = True, max_backoff: float = 5.0, open_hint: str = "",
                 **capture_kw: Any) -> None:
        super().__init__(uri, timeout)
        self._cap = _ReconnectingCapture(opener, uri, reconnect=reconnect, max_backoff=max_backoff, **capture_kw)
        try:
            self._cap.open()
        except SourceError:
            raise SourceError(f"cannot open {uri}" + (f": {open_hint}" if open_hint else "")) from None

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        self._check_open()
        img = self._cap.read(self._wait(timeout))
        self.reconnects = self._cap.reconnects
        self.errors = self._cap.failures
        if img is None:
            return None
        return self._frame(self._rgb(img))

    def close(self) -> None:
        if not self._closed:
            self._cap.release()
        super().close()


# ----------------------------------------------------------------------------- synthetic


class SyntheticSource(_BaseSource):
    """Frames from `SyntheticProduct`; meta carries the ground truth (defect type, mask, index).

    With `fps` > 0 frames are paced to that rate (read sleeps until the next frame is due);
    `count` frames then the end (endless when None); loop=True starts again at index 0.
    """

    def __init__(self, uri: str, product: SyntheticProduct, *, count: Optional[int] = None, fps: float = 0.0,
                 loop: bool = False, timeout: float = 1.0) -> None:
        super().__init__(uri, timeout)
        self.product, self.count, self.fps, self.loop = product, count, float(fps), loop
        self._index = 0
        self._due: Optional[float] = None

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        self._check_open()
        if self.count is not None and self._index >= self.count:
            if not self.loop or self.count == 0:
                self.ended = True
                return None
            self._index = 0
        if self.fps > 0:
            now = time.monotonic()
            if self._due is None:
                self._due = now
            wait = self._due - now
            if wait > 0:
                budget = self._wait(timeout)
                if wait > budget:
                    time.sleep(budget)
                    return None
                time.sleep(wait)
            self._due = max(self._due + 1.0 / self.fps, time.monotonic() - 1.0 / self.fps)  # no burst after a stall
        sample = self.product.sample(self._index)
        self._index += 1
        return self._frame(sample.image, defect_type=sample.defect_type, mask=sample.mask, index=sample.index)


# ----------------------------------------------------------------------------- URIs


def csi_pipeline(sensor_id: int = 0, width: int = 1280, height: int = 720, fps: int = 30, flip: int = 0) -> str:
    """The GStreamer pipeline for a Jetson CSI camera (nvarguscamerasrc -> BGR appsink).

    NVMM NV12 from the ISP is converted by nvvidconv (hardware; `flip` = flip-method 0..7) to
    BGRx, then videoconvert drops the x for OpenCV. appsink keeps only the newest buffer so a
    slow consumer sees fresh frames instead of a growing backlog.
    """
    return (f"nvarguscamerasrc sensor-id={int(sensor_id)} ! "
            f"video/x-raw(memory:NVMM), width=(int){int(width)}, height=(int){int(height)}, "
            f"framerate=(fraction){int(fps)}/1, format=(string)NV12 ! "
            f"nvvidconv flip-method={int(flip)} ! video/x-raw, format=(string)BGRx ! "
            "videoconvert ! video/x-raw, format=(string)BGR ! appsink drop=true max-buffers=1 sync=false")


def _has_gstreamer() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


def _gst_opener(pipeline: str) -> Callable[[], Any]:
    if not _has_gstreamer():
        raise SourceError("this OpenCV build has no GStreamer support, so gst:/csi:// sources cannot open; "
                          "on a Jetson use JetPack's python3-opencv (built with GStreamer) in a venv made "
                          "with --system-site-packages, instead of the opencv-python wheel")
    return lambda: cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)


def _take(kw: dict[str, Any], allowed: tuple[str, ...], what: str) -> dict[str, Any]:
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise SourceError(f"unknown option(s) {unknown} for a {what} source: "
                          f"use {', '.join(allowed) if allowed else 'no extra options'}")
    return kw


def _camera_opener(index: int, device: str, opts: dict[str, Any]) -> Callable[[], Any]:
    api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY

    def opener() -> Any:
        cap = cv2.VideoCapture(device if device.startswith("/dev/") else index, api)
        if cap.isOpened():
            if "fourcc" in opts:
                cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*str(opts["fourcc"])[:4].ljust(4)))
            if "width" in opts:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, float(opts["width"]))
            if "height" in opts:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, float(opts["height"]))
            if "fps" in opts:
                cap.set(cv2.CAP_PROP_FPS, float(opts["fps"]))
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # fresh frames over a backlog
        return cap

    return opener


def _open_camera(spec: Union[int, str], common: dict[str, Any], kw: dict[str, Any]) -> CaptureSource:
    opts = _take(kw, ("width", "height", "fps", "fourcc"), "camera")
    if isinstance(spec, int):
        index, device = spec, f"/dev/video{spec}"
    else:
        device = spec
        digits = spec[len("/dev/video"):] if spec.startswith("/dev/video") else ""
        index = int(digits) if digits.isdigit() else 0
    if sys.platform.startswith("linux") and not os.path.exists(device):
        present = sorted(glob.glob("/dev/video*"))
        raise SourceError(f"camera {spec} not found: {device} does not exist "
                          f"(present: {', '.join(present) or 'none'}); plug the camera in, check "
                          "`v4l2-ctl --list-devices`, or pass the right index/device")
    hint = ("the device exists but will not open: is another process using it, is this user in the "
            "'video' group, or is it a metadata node (try the next /dev/videoN)?")
    return CaptureSource(str(spec), _camera_opener(index, device, opts), open_hint=hint, **common)


def _timeout_params(timeout: float) -> list[int]:
    ms = int(max(0.1, timeout) * 1000)
    return [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]


def _stream_opener(url: str, timeout: float) -> Callable[[], Any]:
    params = _timeout_params(timeout)
    return lambda: cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)


def _listed(path: str) -> bool:
    """A file to read, or a broken link (it gets an error event, not a silent skip)."""
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


def _files_for(pattern: str) -> list[str]:
    return sorted(p for p in glob.glob(pattern) if _listed(p))


def open_source(uri: Union[str, int, Path], *, loop: bool = False, timeout: float = 1.0,
                reconnect: bool = True, max_backoff: float = 5.0, **kw: Any) -> FrameSource:
    """Open the frame source a URI names (see the module docstring for the forms).

    loop: restart files, folders and counted synthetic streams at their end.
    timeout: default for `read()`; also the FFMPEG open/read timeout for network streams.
    reconnect / max_backoff: live sources reopen after a lost device, waiting 0.5 s doubling
    up to `max_backoff` between attempts.
    kw: per-kind options: camera width/height/fps/fourcc; csi sensor_id/width/height/fps/flip;
    synthetic kind/seed/size/defect_rate/defect_kinds/count/fps (override the URI's).
    """
    common = {"timeout": timeout, "reconnect": reconnect, "max_backoff": max_backoff}
    if isinstance(uri, bool) or not isinstance(uri, (str, int, Path)):
        raise SourceError(f"cannot open a source from {uri!r}: pass a path, URI or camera index")
    if isinstance(uri, int):
        return _open_camera(uri, common, kw)
    text = str(uri).strip()
    if not text:
        raise SourceError("empty source URI: pass a video file, image folder, camera index or synthetic://part")
    if text.isdigit():
        return _open_camera(int(text), common, kw)
    if text.startswith("/dev/video"):
        return _open_camera(text, common, kw)

    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme == "synthetic":
        args = parse_synthetic_uri(text)
        args.update(_take(kw, ("kind", "seed", "size", "defect_rate", "defect_kinds", "count", "fps"), "synthetic"))
        count, fps = args.pop("count", None), args.pop("fps", 0.0)
        return SyntheticSource(text, SyntheticProduct(**args), count=count, fps=fps, loop=loop, timeout=timeout)
    if scheme == "csi":
        parts = urlsplit(text)
        sensor = parts.netloc or "0"
        if not sensor.isdigit():
            raise SourceError(f"bad CSI sensor id in {text!r}: write csi://0 (or csi://1 ...)")
        opts: dict[str, Any] = {"sensor_id": int(sensor)}
        for key, value in parse_qsl(parts.query):
            opts[key] = value
        opts.update(kw)
        opts = _take(opts, ("sensor_id", "width", "height", "fps", "flip"), "csi")
        try:
            pipeline = csi_pipeline(**{k: int(v) for k, v in opts.items()})
        except ValueError:
            raise SourceError(f"CSI options must be integers in {text!r}: "
                              "e.g. csi://0?width=1920&height=1080&fps=30") from None
        log.info("CSI pipeline: %s", pipeline)
        return CaptureSource(text, _gst_opener(pipeline), open_hint=(
            "is nvargus-daemon running (sudo systemctl restart nvargus-daemon), the ribbon cable seated, "
            "and the mode supported by the sensor?"), **common)
    if text.startswith("gst:"):
        _take(kw, (), "GStreamer")
        pipeline = text[4:].strip()
        if "appsink" not in pipeline:
            raise SourceError(f"GStreamer pipeline must end in appsink: gst:{pipeline} ! videoconvert ! "
                              "video/x-raw,format=BGR ! appsink")
        return CaptureSource(text, _gst_opener(pipeline), open_hint=(
            "test the pipeline with gst-launch-1.0 (replace appsink with fakesink)"), **common)
    if scheme in STREAM_SCHEMES:
        _take(kw, (), "stream")
        path = urlsplit(text).path.lower()
        if scheme in ("http", "https") and path.endswith(VIDEO_EXTS):  # a stalled server must not hang the read
            return VideoFileSource(text, text, loop=loop, timeout=timeout, api=cv2.CAP_FFMPEG,
                                   params=_timeout_params(timeout))
        return CaptureSource(text, _stream_opener(text, timeout), open_hint=(
            f"check the URL, credentials and that the stream is up (ffprobe '{text}'); "
            "raise timeout= for slow networks"), **common)
    if scheme == "file":
        text = urlsplit(text).path
    elif scheme:
        raise SourceError(f"unknown source scheme {scheme}:// in {text!r}: use a path, camera index, "
                          "rtsp://, http(s)://, gst:, csi:// or synthetic://")

    _take(kw, (), "file")
    path = os.path.expanduser(text)
    if any(ch in path for ch in "*?["):
        files = [p for p in _files_for(path) if p.lower().endswith(IMAGE_EXTS)] or _files_for(path)
        if not files:
            raise SourceError(f"glob {text!r} matches no files (cwd {os.getcwd()}): check the pattern "
                              "and quote it so the shell does not expand it")
        return ImageFolderSource(text, files, loop=loop, timeout=timeout)
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).iterdir() if is_image_name(p.name) and _listed(str(p)))
        return ImageFolderSource(text, files, loop=loop, timeout=timeout)
    if os.path.isfile(path):
        if path.lower().endswith(IMAGE_EXTS):
            return ImageFolderSource(text, [path], loop=loop, timeout=timeout)
        return VideoFileSource(text, path, loop=loop, timeout=timeout)
    raise SourceError(f"no such file or folder: {text} (cwd {os.getcwd()}); give the path to a video, "
                      "an image folder or a glob, a camera index such as 0, or synthetic://part for a demo")
