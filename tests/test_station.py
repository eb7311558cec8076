"""The station loop: one event per frame read, drops, bad frames, signals, failing sinks/sources."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import pytest

from iadgpt.errors import ConfigError, ScorerError, SourceError
from iadgpt.runtime.sinks import JsonlSink, read_events
from iadgpt.runtime.sources import Frame, open_source
from iadgpt.runtime.station import DROPPED_ERROR, STOPPED_ERROR, Station, StationStats
from iadgpt.runtime.verdict import Region, Verdict

URI = "synthetic://part?seed=1&count=30&fps=0"


class FakeDetector:
    """Flags synthetic frames that carry a defect; optionally slow, failing or misconfigured."""

    threshold = 0.5

    def __init__(self, delay: float = 0.0, fail: tuple[int, ...] = (), bug: tuple[int, ...] = (),
                 config_error_at: Optional[int] = None, hook: Any = None) -> None:
        self.delay, self.fail, self.bug, self.config_error_at, self.hook = delay, fail, bug, config_error_at, hook
        self.seen: list[int] = []

    def detect(self, frame: Frame) -> Verdict:
        self.seen.append(frame.frame_id)
        if self.hook is not None:
            self.hook(frame)
        if self.delay:
            time.sleep(self.delay)
        if frame.frame_id in self.fail:
            raise ScorerError("cannot score this frame: re-export the bundle")
        if frame.frame_id in self.bug:
            raise ZeroDivisionError("oops")
        if frame.frame_id == self.config_error_at:
            raise ConfigError("threshold missing: set threshold in station.yaml")
        bad = frame.meta.get("defect_type") is not None if "defect_type" in frame.meta \
            else int(frame.image.mean()) % 2 == 1
        h, w = frame.image.shape[:2]
        return Verdict(frame_id=frame.frame_id, timestamp=frame.timestamp, source=frame.source,
                       score=0.9 if bad else 0.1, threshold=self.threshold, anomalous=bad,
                       regions=[Region((1, 1, 5, 5), 16, 0.9, (3.0, 3.0))] if bad else [],
                       timings_ms={"preprocess": 0.1, "encoder": 0.1, "scorer": 0.1, "postprocess": 0.1},
                       frame_shape=frame.image.shape, anomaly_map=np.zeros((h, w), np.float32))


class RecordingSink:
    name = "rec"

    def __init__(self) -> None:
        self.got: list[tuple[Verdict, Frame]] = []
        self.errors = 0
        self.closed = False

    def write(self, verdict: Verdict, frame: Optional[Frame]) -> None:
        self.got.append((verdict, frame))

    def close(self) -> None:
        self.closed = True

    @property
    def ids(self) -> list[int]:
        return [v.frame_id for v, _ in self.got]


class BoomSink(RecordingSink):
    name = "boom"

    def write(self, verdict: Verdict, frame: Optional[Frame]) -> None:
        raise OSError(errno.EIO, "Input/output error")


def _consistent(stats: StationStats, rec: RecordingSink) -> None:
    assert stats.frames == len(rec.got) == stats.judged + stats.errors + stats.dropped
    assert sorted(rec.ids) == list(range(stats.frames))  # each frame read: exactly one event
    assert rec.closed


def test_one_event_per_frame_read(tmp_path: Path) -> None:
    rec = RecordingSink()
    jsonl = JsonlSink(tmp_path / "events.jsonl")
    with open_source(URI) as src:
        stats = Station(FakeDetector(), src, [jsonl, rec], queue_size=64).run()
    _consistent(stats, rec)
    assert stats.frames == 30 and stats.judged == 30 and stats.dropped == 0 and stats.stop_reason == "end"
    assert stats.flagged == sum(bool(v.anomalous) for v, _ in rec.got) > 0
    assert all({"capture_wait", "total", "encoder"} <= set(v.timings_ms) for v, _ in rec.got)
    assert all(v.timings_ms["total"] >= v.timings_ms["capture_wait"] for v, _ in rec.got)
    assert stats.latency_p50_ms is not None and stats.latency_p99_ms >= stats.latency_p50_ms and stats.fps > 0
    assert stats.ended >= stats.started and stats.sink_errors == {"events:events.jsonl": 0, "rec": 0}
    assert [e["frame_id"] for e in read_events(tmp_path / "events.jsonl")] == rec.ids


def test_slow_detector_drops_oldest_but_every_frame_gets_an_event(caplog: pytest.LogCaptureFixture) -> None:
    rec = RecordingSink()
    caplog.set_level(logging.INFO, logger="iadgpt.runtime.station")
    with open_source(URI) as src:
        stats = Station(FakeDetector(delay=0.08), src, [rec], queue_size=1, stats_interval_s=0.2).run()
    _consistent(stats, rec)
    assert stats.frames == 30 and stats.dropped > 0
    dropped = [(v, f) for v, f in rec.got if v.error == DROPPED_ERROR]
    assert len(dropped) == stats.dropped and all(f.image is None for _, f in dropped)
    assert all(v.anomalous is None and v.frame_shape == (256, 256, 3) for v, _ in dropped)
    assert {v.frame_id: v for v, _ in rec.got}[29].error is None  # the newest frame is never the one dropped
    assert any(r.getMessage().startswith("station: frames") for r in caplog.records)  # periodic stats


def test_files_are_not_dropped_every_frame_is_judged(tmp_path: Path) -> None:
    for i in range(12):
        assert cv2.imwrite(str(tmp_path / f"{i:02d}.png"), np.full((16, 16, 3), i, np.uint8))
    rec = RecordingSink()
    with open_source(tmp_path) as src:  # a folder is not live: the capture thread waits for room
        stats = Station(FakeDetector(delay=0.03), src, [rec], queue_size=1).run()
    _consistent(stats, rec)
    assert (stats.frames, stats.judged, stats.dropped) == (12, 12, 0)
    assert sorted(v.extra["path"] for v, _ in rec.got) == sorted(str(p) for p in tmp_path.glob("*.png"))


def test_a_file_source_logs_its_undecodable_frames_in_file_order(tmp_path: Path) -> None:
    """A corrupt file's error event used to go out at once, ahead of the verdicts of the files before
    it still being judged: the log of a folder was out of order whenever inference was slower."""
    for i in range(6):
        assert cv2.imwrite(str(tmp_path / f"{i:02d}.png"), np.full((16, 16, 3), i, np.uint8))
    for i in (2, 4):
        (tmp_path / f"{i:02d}.png").write_bytes(b"\x89PNG not really")
    rec = RecordingSink()
    with open_source(tmp_path) as src:
        stats = Station(FakeDetector(delay=0.05), src, [rec], queue_size=1).run()
    _consistent(stats, rec)
    assert rec.ids == list(range(6)) and (stats.judged, stats.errors) == (4, 2)
    assert [v.error is not None for v, _ in rec.got] == [False, False, True, False, True, False]
    assert "02.png" in rec.got[2][0].error


class _LiveStub:
    """A live source of `n` frames without pause; every odd frame came without pixels."""

    uri, reconnects, errors, ended, live = "stub://", 0, 0, False, True

    def __init__(self, n: int) -> None:
        self.n, self.i = n, 0

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        if self.i >= self.n:
            self.ended = True
            return None
        i, self.i = self.i, self.i + 1
        image = None if i % 2 else np.full((8, 8, 3), 2 * i, np.uint8)
        return Frame(image=image, frame_id=i, timestamp=time.time(), source=self.uri,
                     meta={} if image is not None else {"error": f"cannot decode frame {i}"})


def test_a_frame_without_pixels_keeps_its_own_error_even_when_frames_are_dropped() -> None:
    rec = RecordingSink()
    stats = Station(FakeDetector(delay=0.02), _LiveStub(40), [rec], queue_size=1).run()
    _consistent(stats, rec)
    by_id = {v.frame_id: v for v, _ in rec.got}
    assert all(by_id[i].error == f"cannot decode frame {i}" for i in range(1, 40, 2))
    assert stats.errors == 20 and stats.dropped > 0  # the good frames were dropped, not the broken ones
    assert all(by_id[i].error in (None, DROPPED_ERROR) for i in range(0, 40, 2))


class _HungSource(_LiveStub):
    """Gives one frame, then its read blocks like a hung camera driver (until released)."""

    def __init__(self) -> None:
        super().__init__(1)
        self.release = threading.Event()

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        if self.i >= 1:
            self.release.wait(30.0)
            return None
        return super().read(timeout)


def test_stop_returns_even_when_the_source_read_hangs() -> None:
    rec = RecordingSink()
    source = _HungSource()
    station = Station(FakeDetector(), source, [rec], join_timeout_s=0.5)
    threading.Timer(0.3, station.stop).start()
    t0 = time.monotonic()
    try:
        stats = station.run()
    finally:
        source.release.set()
    assert time.monotonic() - t0 < 5.0  # stop + join_timeout_s twice at most, not the 30 s read
    assert stats.stop_reason == "stop" and stats.frames == 1
    _consistent(stats, rec)


def test_second_signal_skips_inference_but_still_writes_events() -> None:
    rec = RecordingSink()

    def hook(frame: Frame) -> None:
        if frame.frame_id == 0:
            time.sleep(0.3)  # let the queue fill up
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with open_source("synthetic://part?seed=1&fps=0") as src:
        detector = FakeDetector(hook=hook)
        stats = Station(detector, src, [rec], queue_size=4).run()
    _consistent(stats, rec)
    stopped = [v for v, _ in rec.got if v.error == STOPPED_ERROR]
    assert stats.stop_reason == "signal" and detector.seen == [0] and len(stopped) >= 1
    assert stats.frames == 1 + len(stopped) + stats.dropped


def test_corrupt_image_and_detector_errors_become_error_events(tmp_path: Path) -> None:
    for name, value in [("a.png", 10), ("c.png", 11), ("d.png", 12), ("e.png", 13)]:
        assert cv2.imwrite(str(tmp_path / name), np.full((16, 16, 3), value, np.uint8))
    (tmp_path / "b_bad.png").write_bytes(b"\x89PNG broken")
    rec = RecordingSink()
    with open_source(tmp_path) as src:  # a.png b_bad.png c.png d.png e.png -> ids 0..4
        stats = Station(FakeDetector(fail=(3,), bug=(4,)), src, [rec], queue_size=64).run()
    _consistent(stats, rec)
    by_id = {v.frame_id: v for v, _ in rec.got}
    assert "cannot decode" in by_id[1].error and by_id[1].anomalous is None
    assert "re-export the bundle" in by_id[3].error
    assert by_id[4].error == "internal error: ZeroDivisionError: oops"
    assert by_id[0].error is None and by_id[2].anomalous is True  # mean 11 is odd
    assert (stats.judged, stats.errors, stats.source_errors) == (2, 3, 1)


def test_sigterm_finishes_what_was_read_and_returns(tmp_path: Path) -> None:
    rec = RecordingSink()
    jsonl = JsonlSink(tmp_path / "events.jsonl", fsync="always")
    fallback = signal.signal(signal.SIGTERM, lambda *a: None)  # never let the test runner die
    try:
        ours = signal.getsignal(signal.SIGTERM)
        with open_source("synthetic://part?seed=2&fps=0") as src:  # endless
            station = Station(FakeDetector(delay=0.01), src, [jsonl, rec], queue_size=4)
            kill = threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGTERM))
            safety = threading.Timer(10.0, station.stop)
            kill.start()
            safety.start()
            try:
                stats = station.run()
            finally:
                kill.cancel()
                safety.cancel()
        assert signal.getsignal(signal.SIGTERM) is ours  # handler restored
    finally:
        signal.signal(signal.SIGTERM, fallback)
    assert stats.stop_reason == "signal"
    _consistent(stats, rec)
    assert stats.frames > 3 and stats.errors == 0
    assert [e["frame_id"] for e in read_events(tmp_path / "events.jsonl")] == rec.ids


def test_failing_sink_and_describer_are_counted_not_fatal() -> None:
    rec, boom = RecordingSink(), BoomSink()

    class Describer:
        calls = 0

        def submit(self, verdict: Verdict, frame: Frame) -> None:
            Describer.calls += 1
            assert verdict.anomalous
            raise RuntimeError("LLM offline")

    with open_source(URI) as src:
        stats = Station(FakeDetector(), src, [boom, rec], describer=Describer(), queue_size=64).run()
    _consistent(stats, rec)
    assert stats.sink_errors == {"boom": 30, "rec": 0}
    assert Describer.calls == stats.flagged == stats.describer_errors > 0


def test_lost_sink_events_and_failed_descriptions_are_in_the_stats() -> None:
    # A broker down long enough overflows the MQTT buffer, and a describer whose queue is full records
    # the part as failed: both were missing from the station's counters (errors 3, describer errors 0).
    from types import SimpleNamespace

    class LossySink(RecordingSink):
        dropped, buffered = 35, 7  # an MQTT sink whose broker is away

    class QueueFullDescriber:
        stats = SimpleNamespace(failed=0)

        def submit(self, verdict: Verdict, frame: Frame) -> None:
            QueueFullDescriber.stats.failed += 1  # recorded as "failed: queue full", not raised

    rec = LossySink()
    with open_source(URI) as src:
        stats = Station(FakeDetector(), src, [rec], describer=QueueFullDescriber(), queue_size=64).run()
    assert stats.sink_lost == {"rec": 35} and "sink lost rec=35, sink waiting rec=7" in stats.summary()
    assert stats.describer_errors == stats.flagged > 0


def test_disk_full_during_a_run_loses_no_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path, fsync="never")
    real = os.write
    full = {"on": False}

    def write(fd: int, data: bytes) -> int:
        if full["on"] and fd == sink._fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    def hook(frame: Frame) -> None:  # disk full from frame 5 to frame 14
        full["on"] = 5 <= frame.frame_id < 15

    monkeypatch.setattr(os, "write", write)
    with open_source(URI) as src:
        stats = Station(FakeDetector(hook=hook), src, [sink], queue_size=64).run()
    assert stats.frames == 30 and stats.sink_errors["events:events.jsonl"] >= 10
    assert [e["frame_id"] for e in read_events(path)] == list(range(30))
    assert sink.dropped == 0


class _FailingSource:
    """Synthetic frames, then a SourceError like a camera whose reconnects gave up."""

    def __init__(self, after: int) -> None:
        self.inner = open_source("synthetic://part?seed=3&fps=0")
        self.after, self.uri, self.ended = after, "cam://flaky", False
        self.reconnects, self.errors = 2, 1

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        if self.inner._next_id >= self.after:
            raise SourceError("lost camera and reconnect gave up: check the cable")
        return self.inner.read(timeout)

    def close(self) -> None:
        self.inner.close()


def test_source_error_mid_run_ends_cleanly() -> None:
    rec = RecordingSink()
    stats = Station(FakeDetector(), _FailingSource(after=5), [rec], queue_size=64).run()  # type: ignore[arg-type]
    _consistent(stats, rec)
    assert stats.frames == 5 and stats.stop_reason == "source_error"
    assert "reconnect gave up" in stats.source_error and stats.reconnects == 2 and stats.source_errors == 1


def test_config_error_propagates_after_closing_sinks() -> None:
    rec = RecordingSink()
    with open_source(URI) as src:
        station = Station(FakeDetector(config_error_at=3), src, [rec], queue_size=64)
        with pytest.raises(ConfigError, match="threshold"):
            station.run()
    assert rec.closed and station.stats.stop_reason == "config_error"
    assert not any(t.name == "iadgpt-capture" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="runs once"):
        station.run()


def test_max_frames_and_bad_arguments() -> None:
    rec = RecordingSink()
    with open_source("synthetic://part?seed=1&fps=0") as src:
        stats = Station(FakeDetector(), src, [rec]).run(max_frames=7)
    _consistent(stats, rec)
    assert stats.frames == 7 and stats.stop_reason == "max_frames"
    with pytest.raises(ConfigError, match="queue_size"):
        Station(FakeDetector(), src, [], queue_size=0)


def test_describer_is_paused_while_a_frame_is_judged() -> None:
    """A describer with `loop_busy()` holds it exactly around each detect call (its LLM waits)."""
    state = {"busy": False, "holds": 0}
    seen_busy: list[bool] = []

    class PausableDescriber:
        @contextlib.contextmanager
        def loop_busy(self):
            state["busy"] = True
            state["holds"] += 1
            try:
                yield
            finally:
                state["busy"] = False

        def submit(self, verdict: Verdict, frame: Frame) -> None:
            seen_busy.append(state["busy"])  # submitted after judging: no longer held

    det = FakeDetector(hook=lambda frame: seen_busy.append(state["busy"]))
    with open_source(URI) as src:
        stats = Station(det, src, [RecordingSink()], describer=PausableDescriber(), queue_size=64).run()
    assert state["holds"] == stats.judged == 30
    assert seen_busy[:1] == [True] and seen_busy.count(True) == 30 and seen_busy.count(False) == stats.flagged > 0


def test_bridge_features_are_kept_or_their_absence_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """A describer whose bridge reads features turns them on in the detector; a detector that cannot
    keep them is named in a warning instead of the bridge answers silently never coming."""
    class BridgeDescriber:
        wants_features = True

        def submit(self, verdict: Verdict, frame: Frame) -> None: ...

    class KeepingDetector(FakeDetector):
        keep_features = False

    keeping = KeepingDetector()
    caplog.set_level(logging.WARNING, logger="iadgpt.runtime.station")
    Station(keeping, source=None, sinks=[], describer=BridgeDescriber())
    assert keeping.keep_features and not caplog.records
    Station(FakeDetector(), source=None, sinks=[], describer=BridgeDescriber())
    assert [r.getMessage() for r in caplog.records if "FakeDetector keeps none" in r.getMessage()]


def test_the_source_decodes_into_the_detectors_frame_buffers(tmp_path: Path) -> None:
    """A detector offering `frame_buffer` (the GPU fast path) gets its frames in that memory: the
    station connects the two, every frame is judged, and each is a buffer of its own."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for i in range(6):
        writer.write(np.full((48, 64, 3), 30 * i, np.uint8))
    writer.release()
    given: list[np.ndarray] = []
    judged: list[np.ndarray] = []

    class BufferedDetector(FakeDetector):
        def frame_buffer(self, shape):
            given.append(np.empty(shape, np.uint8))
            return given[-1]

    with open_source(path) as source:
        stats = Station(BufferedDetector(hook=lambda f: judged.append(f.image)), source, [RecordingSink()]).run()
    assert stats.frames == 6 and len(given) == 6
    assert all(img is buf for img, buf in zip(judged, given))
    assert [round(img.mean() / 30) for img in judged] == [0, 1, 2, 3, 4, 5]  # in order, none overwritten


def test_the_queue_evicts_the_oldest_frame_when_full():
    from iadgpt.runtime.station import _DropOldestQueue, _Queued

    def queued(i):
        return _Queued(Frame(None, i, 0.0, "t"), 0.0)

    q = _DropOldestQueue(2)
    assert q.put(queued(0)) is None and q.put(queued(1)) is None
    evicted = q.put(queued(2))
    assert evicted is not None and evicted.frame.frame_id == 0
    assert [q.get(0).frame.frame_id, q.get(0).frame.frame_id] == [1, 2]


class _PixellessSource(_LiveStub):
    """A live source whose frames all failed to decode, then ends."""

    def read(self, timeout: Optional[float] = None) -> Optional[Frame]:
        if self.i >= self.n:
            self.ended = True
            return None
        time.sleep(0.03)  # the loop is waiting on its queue when the last one comes
        self.i += 1
        return Frame(None, self.i - 1, time.time(), self.uri, {"error": "broken"})


def test_error_events_made_as_the_run_ends_are_written():
    """One event per frame, also for the undecodable frames that arrive just before the source ends;
    the detector is never asked about a frame without pixels."""
    calls: list[Frame] = []

    class NeverCalled:
        def detect(self, frame):
            calls.append(frame)
            raise AssertionError("no frame has pixels")

    for _ in range(3):
        rec = RecordingSink()
        stats = Station(NeverCalled(), _PixellessSource(3), [rec]).run()
        assert stats.frames == 3 == len(rec.got) == stats.errors
        assert sorted(rec.ids) == [0, 1, 2] and [v.error for v, _ in rec.got] == ["broken"] * 3
    assert calls == []
