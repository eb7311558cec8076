"""Frame sources: files, folders, synthetic streams, and the live-device reconnect policy."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest

from iadgpt.errors import SourceError
from iadgpt.runtime import sources
from iadgpt.runtime.sources import (FRAME_BUFFER_RETRY_S, CaptureSource, Frame, FrameSource, _ReconnectingCapture,
                                     csi_pipeline, open_source)
from iadgpt.runtime.synthetic import SyntheticProduct


def _solid(rgb: tuple[int, int, int], h: int = 24, w: int = 32) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = rgb
    return img


def _write_rgb(path: Path, rgb: tuple[int, int, int]) -> None:
    assert cv2.imwrite(str(path), cv2.cvtColor(_solid(rgb), cv2.COLOR_RGB2BGR))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    _write_rgb(d / "b.png", (0, 255, 0))
    _write_rgb(d / "a.png", (255, 0, 0))
    (d / "b_bad.png").write_bytes(b"\x89PNG not really an image")
    _write_rgb(d / "c.png", (0, 0, 255))
    (d / "notes.txt").write_text("not an image")
    return d


# ----------------------------------------------------------------------------- folders and globs


def test_folder_is_read_in_name_order_and_a_corrupt_file_does_not_stop_it(folder: Path) -> None:
    with open_source(folder) as src:
        assert isinstance(src, FrameSource)
        frames = list(src)
        assert all(isinstance(f, Frame) for f in frames)
        assert src.ended and src.errors == 1
    assert [Path(f.meta["path"]).name for f in frames] == ["a.png", "b.png", "b_bad.png", "c.png"]
    assert [f.frame_id for f in frames] == [0, 1, 2, 3]
    bad = frames[2]
    assert bad.image is None and bad.meta["error"] == f"cannot decode {folder / 'b_bad.png'}"
    assert tuple(frames[0].image[0, 0]) == (255, 0, 0)  # RGB, not BGR
    assert tuple(frames[3].image[0, 0]) == (0, 0, 255)
    assert all(f.source == str(folder) and abs(f.timestamp - time.time()) < 60 for f in frames)


def test_glob_and_single_image(folder: Path) -> None:
    frames = list(open_source(str(folder / "[ac].png")))
    assert [Path(f.meta["path"]).name for f in frames] == ["a.png", "c.png"]
    assert len(list(open_source(folder / "c.png"))) == 1
    with pytest.raises(SourceError, match="matches no files"):
        open_source(str(folder / "*.jpg"))


def test_folder_loop_wraps_with_monotonic_ids(folder: Path) -> None:
    src = open_source(str(folder / "*.png"), loop=True)
    frames = [src.read() for _ in range(9)]
    assert [f.frame_id for f in frames] == list(range(9))
    assert [Path(f.meta["path"]).name for f in frames][4:6] == ["a.png", "b.png"]
    assert not src.ended


def test_a_looped_folder_whose_files_all_vanish_stops_instead_of_spinning(tmp_path: Path) -> None:
    # Emptied mid-run, a looped folder wrote 59,037 "cannot decode" events in 10 s
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), np.zeros((8, 8, 3), np.uint8))
    src = open_source(tmp_path, loop=True)
    assert src.read().image is not None
    for name in ("a.png", "b.png"):
        (tmp_path / name).unlink()
    frames = [src.read(), src.read(), src.read()]  # b (rest of pass 1), then a full pass of a and b
    assert all(f.image is None and "is missing (deleted or moved" in f.meta["error"] for f in frames)
    with pytest.raises(SourceError, match="all 2 files of .* failed in the last pass"):
        src.read()


def test_a_truncated_jpeg_is_an_error_frame_not_a_part(tmp_path: Path) -> None:
    """cv2.imread gives a truncated JPEG a grey band and no error: the part would be judged."""
    ok, data = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8))
    (tmp_path / "a.jpg").write_bytes(data.tobytes())
    (tmp_path / "b.jpg").write_bytes(data.tobytes()[: len(data) * 3 // 4])
    frames = list(open_source(tmp_path))
    assert frames[0].image is not None and frames[0].image.shape == (64, 80, 3)
    assert frames[1].image is None and frames[1].meta["error"] == f"cannot decode {tmp_path / 'b.jpg'}"


def test_folder_takes_what_export_and_calibrate_take(folder: Path) -> None:
    """Hidden files (macOS `._x.png`, `.DS_Store`) are skipped as export and calibrate skip them; a
    broken link is an error frame naming it and its target, not a silent skip; extensions are one set."""
    from iadgpt.data import IMAGE_EXTENSIONS

    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / ".DS_Store").write_bytes(b"\x00" * 8)
    (folder / "d_gone.png").symlink_to(folder / "missing.png")
    _write_rgb(folder / "e.webp", (9, 9, 9))
    with open_source(folder) as src:
        frames = list(src)
        assert src.errors == 2
    assert [Path(f.meta["path"]).name for f in frames] == ["a.png", "b.png", "b_bad.png", "c.png", "d_gone.png",
                                                           "e.webp"]
    gone = frames[4]
    assert gone.image is None and "broken link" in gone.meta["error"] and "missing.png" in gone.meta["error"]
    assert frames[5].image is not None
    assert set(sources.IMAGE_EXTS) == IMAGE_EXTENSIONS


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no images"):
        open_source(tmp_path)


# ----------------------------------------------------------------------------- video files


@pytest.fixture()
def video(tmp_path: Path) -> Path:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(8):
        writer.write(cv2.cvtColor(_solid((200, 20 * i, 10), 48, 64), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_video_file_round_trip(video: Path) -> None:
    frames = list(open_source(video))
    assert len(frames) == 8
    assert frames[0].image.shape == (48, 64, 3)
    r, g, b = frames[5].image[24, 32].astype(int)
    assert r > 150 and b < 60 and abs(g - 100) < 25  # colours survive, in RGB order
    assert [f.meta["pos"] for f in frames] == list(range(8))


def test_a_video_that_grows_while_read_ends_with_a_warning(video: Path, caplog) -> None:
    """A clip still being recorded: its frames up to the end it had when opened, then a warning
    that says the file grew (not a silent, normal-looking end)."""
    src = open_source(video)
    frames = [src.read() for _ in range(8)]
    with open(video, "ab") as f:  # the recorder appends while the station reads
        f.write(b"\0" * 4096)
    with caplog.at_level("WARNING", logger="iadgpt.runtime.sources"):
        assert src.read() is None and src.ended
    assert all(f is not None and f.image is not None for f in frames)
    assert any("grew from" in r.getMessage() and "still being recorded" in r.getMessage() for r in caplog.records)
    src.close()
    caplog.clear()
    with caplog.at_level("WARNING", logger="iadgpt.runtime.sources"):
        assert len(list(open_source(video))) == 8  # a finished file ends quietly
    assert not any("grew from" in r.getMessage() for r in caplog.records)


class _Buffers:
    """Hands out frame buffers as the GPU fast path does (fresh memory per call), recording them."""

    def __init__(self, fail: bool = False) -> None:
        self.given: list[np.ndarray] = []
        self.fail = fail

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        if self.fail:
            raise RuntimeError("CUDA error: out of memory (pinned)")
        self.given.append(np.full(shape, 7, np.uint8))
        return self.given[-1]


def test_only_sources_that_convert_frames_take_frame_buffers(folder: Path, video: Path) -> None:
    """Image folders and synthetic parts are RGB already (nothing to convert into a buffer), so the
    station does not offer them one; videos and live devices do convert."""
    assert not hasattr(open_source(folder), "use_frame_buffers")
    assert not hasattr(open_source("synthetic://part?count=1"), "use_frame_buffers")
    assert hasattr(open_source(video), "use_frame_buffers") and hasattr(CaptureSource, "use_frame_buffers")


def test_decoded_frames_land_in_the_detectors_frame_buffers(video: Path) -> None:
    """With frame buffers, each frame IS one of them (no second copy for the GPU), one per frame so
    a kept frame is never overwritten, with the same RGB pixels as without."""
    plain = list(open_source(video))
    buffers = _Buffers()
    src = open_source(video)
    src.use_frame_buffers(buffers)
    frames = list(src)
    assert len(frames) == len(buffers.given) == 8
    for f, p, buf in zip(frames, plain, buffers.given):
        assert f.image is buf
        np.testing.assert_array_equal(f.image, p.image)


def test_a_camera_fills_frame_buffers_and_a_failing_one_is_said_once_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    """A failing allocator costs no frame: ordinary memory, one warning, and the buffers are tried
    again after FRAME_BUFFER_RETRY_S (pinned memory can run short for a while)."""
    clock = FakeClock()
    opener, _ = _opener([(True, 100)])
    src = CaptureSource("cam://fake", opener, sleep=clock.sleep, clock=clock)
    src._now = clock
    buffers = _Buffers()
    src.use_frame_buffers(buffers)
    first = src.read()
    assert first.image is buffers.given[0] and int(first.image[0, 0, 0]) == 0
    buffers.fail = True
    with caplog.at_level("INFO", logger="iadgpt.runtime.sources"):
        rest = [src.read() for _ in range(3)]
        assert [int(f.image[0, 0, 0]) for f in rest] == [1, 2, 3]  # no frame lost, ordinary memory
        buffers.fail = False  # memory is back, but the source does not ask before the retry time
        clock.now += FRAME_BUFFER_RETRY_S - 1
        assert int(src.read().image[0, 0, 0]) == 4 and len(buffers.given) == 1
        clock.now += 1
        back = src.read()
    assert back.image is buffers.given[-1] and len(buffers.given) == 2 and int(back.image[0, 0, 0]) == 5
    said = [r.getMessage() for r in caplog.records if "frame buffers" in r.getMessage()]
    assert len(said) == 2 and "out of memory" in said[0] and "ordinary memory" in said[0]
    assert "work again" in said[1]
    buffers.fail = True  # fails again, then offered anew: used at once
    assert int(src.read().image[0, 0, 0]) == 6 and len(buffers.given) == 2
    buffers.fail = False
    src.use_frame_buffers(buffers)
    again = src.read()
    assert len(buffers.given) == 3 and again.image is buffers.given[-1] and int(again.image[0, 0, 0]) == 7
    src.use_frame_buffers(None)  # withdrawn: fresh arrays, no buffer asked for
    last = src.read()
    assert len(buffers.given) == 3 and last.image is not buffers.given[-1] and int(last.image[0, 0, 0]) == 8


def test_video_loop_wraps(video: Path) -> None:
    src = open_source(str(video), loop=True)
    frames = [src.read() for _ in range(20)]
    assert all(f is not None for f in frames)
    assert [f.frame_id for f in frames] == list(range(20))
    assert [f.meta["pos"] for f in frames][6:11] == [6, 7, 0, 1, 2]
    src.close()
    with pytest.raises(SourceError, match="closed"):
        src.read()


def _noise_video(path: Path, n: int = 10) -> list[int]:
    """An MJPG AVI of `n` noise frames; returns where each frame's JPEG starts in the file."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for _ in range(n):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    data = path.read_bytes()
    starts = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]
    assert len(starts) == n
    return starts


def test_a_damaged_video_frame_is_an_error_frame_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "damaged.avi"
    starts = _noise_video(path)
    data = bytearray(path.read_bytes())
    data[starts[4]:starts[5] - 8] = b"\xff" * (starts[5] - 8 - starts[4])  # frame 4's JPEG wiped
    path.write_bytes(bytes(data))
    with open_source(path) as src:
        frames = list(src)
        assert [f.meta["pos"] for f in frames] == list(range(10))  # frames 5-9 are not lost
        assert [f.image is None for f in frames] == [i == 4 for i in range(10)]
        assert "cannot decode frame 4" in frames[4].meta["error"] and src.errors == 1


def test_a_truncated_video_ends_early_with_an_error_not_silently(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cut.avi"
    starts = _noise_video(path)
    path.write_bytes(path.read_bytes()[:starts[6] + 50])  # cut inside frame 6
    with open_source(path) as src:
        frames = list(src)
    assert len(frames) == 6 and all(f.image is not None for f in frames)  # no error frames for frames never there
    assert src.errors == 1 and "ended after 6 of the 10 frames its header announces" in caplog.text


def test_a_complete_video_ends_without_errors(video: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open_source(video) as src:
        assert len(list(src)) == 8 and src.errors == 0 and "will not decode" not in caplog.text


def test_files_are_not_live_devices_are(folder: Path, video: Path) -> None:
    assert open_source(folder).live is False and open_source(video).live is False
    assert open_source("synthetic://part?count=1").live is True


def test_unreadable_video(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(SourceError, match="re-encode"):
        open_source(bad)


# ----------------------------------------------------------------------------- errors


def test_missing_path_names_it_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(SourceError, match="no such file or folder") as e:
        open_source(missing)
    assert str(missing) in str(e.value) and "synthetic://" in str(e.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="device nodes are a Linux thing")
def test_missing_camera_names_it_and_the_fix() -> None:
    with pytest.raises(SourceError, match=r"camera 57 not found.*v4l2-ctl"):
        open_source(57)
    with pytest.raises(SourceError, match="/dev/video57"):
        open_source("/dev/video57")
    with pytest.raises(SourceError, match="/dev/video58"):
        open_source("58")


def test_bad_uris_and_options(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown source scheme"):
        open_source("ftp://host/x.mp4")
    with pytest.raises(SourceError, match="unknown option"):
        open_source("synthetic://part", colour="red")
    with pytest.raises(SourceError, match="appsink"):
        open_source("gst:videotestsrc ! fakesink")
    with pytest.raises(SourceError):
        open_source("")


def test_unreachable_stream_fails_fast_with_a_hint() -> None:
    with pytest.raises(SourceError, match="ffprobe"):
        open_source("rtsp://127.0.0.1:1/line3", timeout=0.5)
    with pytest.raises(SourceError, match="server is up"):
        open_source("http://127.0.0.1:1/clip.mp4", timeout=0.5)


def test_csi_pipeline_and_gstreamer_check() -> None:
    p = csi_pipeline(1, 1920, 1080, 30, flip=2)
    assert p.startswith("nvarguscamerasrc sensor-id=1 ")
    assert "width=(int)1920" in p and "framerate=(fraction)30/1" in p and "flip-method=2" in p
    assert p.rstrip().split(" ! ")[-1].startswith("appsink")
    if not sources._has_gstreamer():
        with pytest.raises(SourceError, match="GStreamer"):
            open_source("csi://0?width=1280")
        with pytest.raises(SourceError, match="GStreamer"):
            open_source("gst:videotestsrc ! videoconvert ! appsink")
    with pytest.raises(SourceError, match="integers"):
        open_source("csi://0?width=big")


# ----------------------------------------------------------------------------- live reconnect


class FakeCapture:
    """Delivers frames numbered from `start`, then dies (reads fail) after `lives` frames."""

    def __init__(self, start: int, lives: int, opened: bool = True) -> None:
        self.n, self.left, self.opened, self.released = start, lives, opened, False

    def isOpened(self) -> bool:
        return self.opened and not self.released

    def read(self) -> tuple[bool, Optional[np.ndarray]]:
        if self.left <= 0:
            return False, None
        self.left -= 1
        self.n += 1
        return True, np.full((4, 4, 3), self.n - 1, np.uint8)

    def release(self) -> None:
        self.released = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(round(s, 3))
        self.now += s


def _opener(plan: list[tuple[bool, int]]):
    """Each call opens the next capture: (opens?, frames before it dies); numbering continues."""
    state: dict = {"caps": []}

    def opener() -> FakeCapture:
        ok, lives = plan.pop(0)
        start = state["caps"][-1].n if state["caps"] else 0
        cap = FakeCapture(start, lives, opened=ok)
        state["caps"].append(cap)
        return cap

    return opener, state


def test_a_capture_killed_mid_stream_is_reconnected() -> None:
    clock = FakeClock()
    opener, state = _opener([(True, 3), (True, 100)])
    src = CaptureSource("cam://fake", opener, sleep=clock.sleep, clock=clock)
    frames = [src.read() for _ in range(6)]
    assert [f.frame_id for f in frames] == list(range(6))
    assert [int(f.image[0, 0, 0]) for f in frames] == list(range(6))  # pixels continue too
    assert src.reconnects == 1 and src.errors == 1
    assert state["caps"][0].released
    assert clock.sleeps == [0.5]
    src.close()
    assert state["caps"][1].released


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    clock = FakeClock()
    opener, _ = _opener([(True, 1), (False, 0), (False, 0), (False, 0), (False, 0), (True, 1), (True, 5)])
    cap = _ReconnectingCapture(opener, "fake", max_backoff=1.5, sleep=clock.sleep, clock=clock)
    cap.open()
    assert cap.read() is not None
    assert cap.read() is not None  # lost, four failed reopens, then back
    assert clock.sleeps == [0.5, 1.0, 1.5, 1.5, 1.5]
    assert cap.reconnects == 1 and cap.failures == 5
    assert cap.read() is not None  # lost again: backoff was reset to 0.5
    assert clock.sleeps[-1] == 0.5 and cap.reconnects == 2


def test_read_timeout_while_reconnecting_returns_none_then_continues() -> None:
    clock = FakeClock()
    opener, _ = _opener([(True, 1), (True, 5)])
    src = CaptureSource("cam://fake", opener, timeout=0.2, sleep=clock.sleep, clock=clock)
    assert src.read().frame_id == 0
    assert src.read() is None  # device lost; 0.5 s backoff exceeds the 0.2 s timeout
    assert src.read(timeout=0.1) is None
    f = src.read(timeout=1.0)
    assert f is not None and f.frame_id == 1 and src.reconnects == 1


def test_no_reconnect_raises_and_first_open_must_work() -> None:
    opener, _ = _opener([(True, 1)])
    src = CaptureSource("cam://fake", opener, reconnect=False)
    src.read()
    with pytest.raises(SourceError, match="reconnect"):
        src.read()
    opener, _ = _opener([(False, 0)])
    with pytest.raises(SourceError, match="cannot open cam://fake: plug it"):
        CaptureSource("cam://fake", opener, open_hint="plug it")


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_source_count_meta_and_determinism() -> None:
    src = open_source("synthetic://part?seed=1&size=64&count=5&defect_rate=0.5")
    frames = list(src)
    assert len(frames) == 5 and src.ended
    ref = SyntheticProduct("part", size=64, seed=1, defect_rate=0.5)
    for i, f in enumerate(frames):
        s = ref.sample(i)
        assert f.frame_id == i and f.meta["index"] == i
        assert np.array_equal(f.image, s.image) and np.array_equal(f.meta["mask"], s.mask)
        assert f.meta["defect_type"] == s.defect_type


def test_synthetic_loop_and_keyword_overrides() -> None:
    src = open_source("synthetic://tile?count=3", loop=True, size=64, seed=2)
    frames = [src.read() for _ in range(7)]
    assert [f.meta["index"] for f in frames] == [0, 1, 2, 0, 1, 2, 0]
    assert [f.frame_id for f in frames] == list(range(7))
    assert frames[0].image.shape == (64, 64, 3)


def test_synthetic_fps_pacing() -> None:
    src = open_source("synthetic://part?size=64&fps=50&count=6")
    t0 = time.monotonic()
    assert len(list(src)) == 6
    assert time.monotonic() - t0 >= 5 / 50 - 0.01
    slow = open_source("synthetic://part?size=64&fps=2")
    assert slow.read(timeout=0.01) is not None  # the first frame is due at once
    assert slow.read(timeout=0.01) is None  # the next one is 0.5 s away
    assert slow.ended is False
