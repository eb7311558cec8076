"""The inspection loop: capture thread -> bounded queue -> detector -> sinks.

Why a capture thread with a small drop-oldest queue: a camera delivers frames whether or not
inference keeps up. Reading in its own thread keeps the driver's buffer from filling with stale
frames, and dropping the *oldest* queued frame keeps the verdicts current. Every frame read
still yields exactly one event (a dropped frame gets one with ``error="dropped: ..."``), so
the event log can be reconciled with a part counter on the line. Files (video, image folders)
are not live (``source.live`` is False): nothing is lost by waiting, so the capture thread waits
for room in the queue instead and every frame is judged.

Nothing but a configuration error stops the station: a corrupt frame or a detector error
becomes an error event, a failing sink or describer is counted and logged (throttled), a
source that gives up (`SourceError`) ends the run cleanly. SIGINT/SIGTERM stop reading, finish
the frame in flight, judge the frames already queued (a second signal skips judging them, they
still get events), close the sinks and return the stats, also when the source's read hangs
(the capture thread is then left behind after ``join_timeout_s``).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from iadgpt.errors import ConfigError, IadGptError, SourceError
from iadgpt.runtime.sinks import Sink, ThrottledLog
from iadgpt.runtime.sources import Frame, FrameSource
from iadgpt.runtime.verdict import Verdict

log = logging.getLogger(__name__)

DROPPED_ERROR = "dropped: inference too slow"
STOPPED_ERROR = "not judged: station stopped"
# the describer's bridge reads the detector's encoder features but was trained on the float
# backbone's; measured on bottle (README, INT8): its answers held with an INT8 encoder at feature
# cosine 0.995 and broke at 0.92 (yes/no 76 % instead of 93-99 %)
BRIDGE_MIN_FEATURE_COSINE = 0.98


class Detector(Protocol):
    """Anything that judges one frame; raises IadGptError subclasses on a frame it cannot judge."""

    def detect(self, frame: Frame) -> Verdict: ...


class Describer(Protocol):
    """Explains NG verdicts off the inspection path; `submit` must return at once."""

    def submit(self, verdict: Verdict, frame: Frame) -> None: ...


@dataclass
class StationStats:
    """Counters of one run. ``frames == judged + errors + dropped`` == events written."""

    frames: int = 0  # frames read from the source
    judged: int = 0  # frames the detector gave a verdict for
    flagged: int = 0  # judged frames found anomalous
    errors: int = 0  # frames that could not be judged (corrupt, detector error, stopped)
    dropped: int = 0  # frames dropped because inference fell behind
    sink_errors: dict[str, int] = field(default_factory=dict)  # per sink: absorbed + raised
    sink_lost: dict[str, int] = field(default_factory=dict)  # per sink: events its bounded buffer gave up
    sink_waiting: dict[str, int] = field(default_factory=dict)  # per sink: events held back (disk full, broker away)
    describer_errors: int = 0  # flagged parts left undescribed: submit raised, or the describer's failed records
    fps: float = 0.0  # judged frames per second over the run
    latency_p50_ms: Optional[float] = None  # capture-to-verdict, recent judged frames
    latency_p99_ms: Optional[float] = None
    reconnects: int = 0  # source reconnects (live devices)
    source_errors: int = 0  # the source's own error count (undecodable files, lost devices)
    source_error: Optional[str] = None  # the SourceError that ended the run, if one did
    stop_reason: str = ""  # end | max_frames | signal | stop | source_error | config_error
    started: float = 0.0  # time.time()
    ended: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lat = ("-" if self.latency_p50_ms is None
               else f"{self.latency_p50_ms:.1f}/{self.latency_p99_ms:.1f} ms")
        sinks = ", ".join(f"{k}={v}" for k, v in self.sink_errors.items() if v) or "none"
        lost = ", ".join(f"{k}={v}" for k, v in self.sink_lost.items() if v)
        waiting = ", ".join(f"{k}={v}" for k, v in self.sink_waiting.items() if v)
        return (f"frames {self.frames}, judged {self.judged}, NG {self.flagged}, errors {self.errors}, "
                f"dropped {self.dropped}, {self.fps:.1f} fps, latency p50/p99 {lat}, "
                f"reconnects {self.reconnects}, sink errors {sinks}" + (f", sink lost {lost}" if lost else "")
                + (f", sink waiting {waiting}" if waiting else "")
                + f", describer errors {self.describer_errors}")


@dataclass
class _Queued:
    frame: Frame
    t_enqueued: float  # time.monotonic() when the capture thread queued it


class _DropOldestQueue:
    """A bounded FIFO whose `put` evicts (and returns) the oldest item when full; `put_wait` waits."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: deque[_Queued] = deque()
        self._cond = threading.Condition()
        self.closed = False

    def put(self, item: _Queued) -> Optional[_Queued]:
        with self._cond:
            evicted = self._items.popleft() if len(self._items) >= self.size else None
            self._items.append(item)
            self._cond.notify_all()
            return evicted

    def put_wait(self, item: _Queued, stop: threading.Event) -> None:
        """Wait for room, then queue; once `stop` is set, queue at once (a frame read gets its event)."""
        with self._cond:
            while len(self._items) >= self.size and not stop.is_set():
                self._cond.wait(0.1)
            self._items.append(item)
            self._cond.notify_all()

    def get(self, timeout: float) -> Optional[_Queued]:
        """The oldest item, or None after `timeout` s or at once when closed and empty."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            if not self._items:
                return None
            self._cond.notify_all()  # a waiting `put_wait` has room now
            return self._items.popleft()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    @property
    def drained(self) -> bool:
        with self._cond:
            return self.closed and not self._items


def _sink_names(sinks: Sequence[Sink]) -> list[str]:
    names: list[str] = []
    for sink in sinks:
        base = str(getattr(sink, "name", "") or type(sink).__name__)
        name, n = base, 2
        while name in names:
            name, n = f"{base}#{n}", n + 1
        names.append(name)
    return names


def check_features_fit_the_bridge(detector: Any) -> None:
    """Refuse, at start, an INT8 encoder whose features are too far from the float ones the bridge
    was trained on (its answers would be wrong, not slow: nothing at run time would show it)."""
    bundle = getattr(detector, "bundle", None)
    if bundle is None or getattr(detector, "precision", None) != "int8":
        return
    cosine = ((bundle.extra.get("calibration") or {}).get("int8") or {}).get("cosine") or {}
    if not cosine:
        log.warning("the describer's bridge reads INT8 features whose distance from the float ones it was trained "
                    "on is not recorded in %s; check its answers (`iadgpt calibrate --int8` records it)", bundle.path)
        return
    worst = min(float(c) for c in cosine.values())
    if worst < BRIDGE_MIN_FEATURE_COSINE:
        raise ConfigError(
            f"the describer's bridge was trained on float encoder features, but the INT8 encoder of {bundle.path} keeps "
            f"only cosine {worst:.3f} of them (the bridge needs >= {BRIDGE_MIN_FEATURE_COSINE}; at 0.92 its answers "
            "broke): calibrate with the stem stage in float (`iadgpt calibrate BUNDLE --int8`, the default, not "
            "--int8-keep-float none), run the fp32 bundle, or drop `bridge` from the describer settings")


class Station:
    """Runs `detector` on `source` and writes one event per frame read to every sink.

    The station adds ``timings_ms["capture_wait"]`` (time the frame waited in the queue) and
    ``timings_ms["total"]`` (capture to verdict) to each verdict. It closes the sinks at the end
    of `run`; the caller owns (and closes) the source.
    """

    def __init__(self, detector: Detector, source: FrameSource, sinks: Sequence[Sink], *, queue_size: int = 4,
                 stats_interval_s: float = 10.0, describer: Optional[Describer] = None,
                 read_timeout_s: float = 0.5, join_timeout_s: float = 5.0) -> None:
        if int(queue_size) < 1:
            raise ConfigError(f"queue_size={queue_size} must be >= 1")
        if float(stats_interval_s) <= 0:
            raise ConfigError(f"stats_interval_s={stats_interval_s} must be > 0")
        self.detector, self.source, self.describer = detector, source, describer
        if getattr(describer, "wants_features", False):  # its bridge reads the flagged frames' features
            if hasattr(detector, "keep_features"):
                check_features_fit_the_bridge(detector)
                detector.keep_features = True
            else:
                log.warning("the describer's bridge reads encoder features, but %s keeps none: flagged parts get "
                            "the facts description without the bridge's answer (use the bundle Detector, or "
                            "drop `bridge` from the describer settings)", type(detector).__name__)
        allocate = getattr(detector, "frame_buffer", None)
        if callable(allocate) and callable(getattr(source, "use_frame_buffers", None)):
            source.use_frame_buffers(allocate)  # frames decoded straight into the GPU fast path's pinned memory
            log.info("%s converts frames into the detector's frame buffers (no host copy before the GPU)", source)
        self.sinks = list(sinks)
        self.sink_names = _sink_names(self.sinks)
        self.queue_size, self.stats_interval_s = int(queue_size), float(stats_interval_s)
        self.read_timeout_s, self.join_timeout_s = float(read_timeout_s), float(join_timeout_s)
        self.stats = StationStats(sink_errors={n: 0 for n in self.sink_names})
        self._queue = _DropOldestQueue(self.queue_size)
        self._drops: deque[tuple[Verdict, Frame]] = deque()  # made by the capture thread, written by run()
        self._stop = threading.Event()
        self._abort = False  # second signal: do not judge what is still queued
        self._signals: list[int] = []
        self._stop_reason = ""
        self._raised = {n: 0 for n in self.sink_names}
        self._describer_raised = 0
        self._latencies: deque[float] = deque(maxlen=4096)
        self._warn = ThrottledLog(log)
        self._ran = False
        self._t0 = 0.0
        self._stopped_at: Optional[float] = None  # when the loop first saw a stop with an empty queue
        self._abandoned = False  # the loop has returned; the capture thread must not count more frames

    # -- control

    def stop(self) -> None:
        """Ask `run` to finish (thread-safe): what was read is still judged and written."""
        if not self._stop_reason:
            self._stop_reason = "stop"
        self._stop.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Runs in the main thread between bytecodes: set flags only, no logging or locks.
        if self._stop.is_set():
            self._abort = True
        self._signals.append(signum)
        self._stop_reason = self._stop_reason or "signal"
        self._stop.set()

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: leaving SIGINT/SIGTERM handlers alone")
            return {}
        previous: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError) as exc:  # e.g. an embedded interpreter
                log.debug("cannot handle %s: %s", sig, exc)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    # -- run

    def run(self, max_frames: Optional[int] = None) -> StationStats:
        """Inspect until the source ends, `max_frames` are read, a signal or `stop()`; see module doc."""
        if self._ran:
            raise RuntimeError("a Station runs once: build a new one (its sinks are closed)")
        self._ran = True
        self.stats.started, self._t0 = time.time(), time.monotonic()
        capture = threading.Thread(target=self._capture, args=(max_frames,), name="iadgpt-capture", daemon=True)
        previous = self._install_signals()
        log.info("station started: source %s, %d sink(s) (%s), queue %d", getattr(self.source, "uri", "?"),
                 len(self.sinks), ", ".join(self.sink_names) or "none", self.queue_size)
        try:
            capture.start()
            self._loop()
        except ConfigError:
            self._stop_reason = "config_error"
            raise
        finally:
            self._stop.set()
            capture.join(self.join_timeout_s)
            if capture.is_alive():
                log.warning("the capture thread is still blocked in the source's read after %.1f s; "
                            "leaving it (daemon) behind", self.join_timeout_s)
            self._restore_signals(previous)
            self._close_sinks()
            self._finish_stats()
            log.info("station stopped (%s): %s", self.stats.stop_reason, self.stats.summary())
        return self.stats

    def _capture(self, max_frames: Optional[int]) -> None:
        """Capture thread: read, stamp, queue (drop-oldest when live); never writes to sinks."""
        live = bool(getattr(self.source, "live", True))
        try:
            while not self._stop.is_set():
                if max_frames is not None and self.stats.frames >= max_frames:
                    self._stop_reason = self._stop_reason or "max_frames"
                    return
                try:
                    frame = self.source.read(timeout=self.read_timeout_s)
                except SourceError as exc:
                    self.stats.source_error = str(exc)
                    self._stop_reason = self._stop_reason or "source_error"
                    log.error("source %s gave up: %s", getattr(self.source, "uri", "?"), exc)
                    return
                except Exception as exc:  # noqa: BLE001 - a driver bug ends the run, not the process
                    self.stats.source_error = f"{type(exc).__name__}: {exc}"
                    self._stop_reason = self._stop_reason or "source_error"
                    log.exception("reading the source failed unexpectedly; ending the run")
                    return
                if self._abandoned:
                    return
                if frame is None:
                    if getattr(self.source, "ended", False):
                        self._stop_reason = self._stop_reason or "end"
                        return
                    continue
                self.stats.frames += 1
                if frame.image is None and live:  # nothing to judge: its error event goes straight out, never dropped
                    self._drops.append((self._error(frame, str(frame.meta.get("error") or "frame has no image")),
                                        frame))
                    continue
                item = _Queued(frame, time.monotonic())
                if not live:
                    self._queue.put_wait(item, self._stop)
                    continue
                evicted = self._queue.put(item)
                if evicted is not None:
                    self._drops.append(self._dropped(evicted))
        finally:
            self._queue.close()

    def _loop(self) -> None:
        next_stats = time.monotonic() + self.stats_interval_s
        while True:
            self._write_drops()
            if self._signals:
                sig = self._signals.pop(0)
                log.warning("received %s: %s", signal.Signals(sig).name,
                            "skipping inference for the frames still queued" if self._abort
                            else "stopping after the frames already read (again to skip inference)")
            if time.monotonic() >= next_stats:
                next_stats += self.stats_interval_s
                self._finish_stats(final=False)
                log.info("station: %s", self.stats.summary())
            item = self._queue.get(timeout=0.1)
            if item is None:
                if self._queue.drained or self._capture_hung():
                    self._abandoned = True  # a read that returns after this is not counted
                    self._write_drops()
                    return
                continue
            verdict = self._judge(item)
            self._emit(verdict, item.frame)

    def _capture_hung(self) -> bool:
        """Stopped, nothing queued, and the capture thread still inside the source's read after
        `join_timeout_s` (a hung camera driver or pipeline): stop waiting for it."""
        if not self._stop.is_set() or len(self._queue):
            return False
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        return time.monotonic() - self._stopped_at > self.join_timeout_s

    # -- judging

    def _describer_paused(self):
        """The describer's `loop_busy()` (its LLM waits while a frame is judged), if it has one."""
        hold = getattr(self.describer, "loop_busy", None)
        return hold() if hold is not None else contextlib.nullcontext()

    def _judge(self, item: _Queued) -> Verdict:
        frame = item.frame
        t0 = time.monotonic()
        wait_ms = (t0 - item.t_enqueued) * 1000.0
        if frame.image is None:  # a file's undecodable frame, queued in its place: the log keeps file order
            verdict = self._error(frame, str(frame.meta.get("error") or "frame has no image"))
        elif self._abort:
            verdict = self._error(frame, STOPPED_ERROR)
        else:
            try:
                with self._describer_paused():
                    verdict = self.detector.detect(frame)
                if not isinstance(verdict, Verdict):
                    raise TypeError(f"detector returned {type(verdict).__name__}, not a Verdict")
            except ConfigError:
                raise
            except IadGptError as exc:
                self._warn("detect", logging.WARNING, "frame %s not judged: %s", frame.frame_id, exc)
                verdict = self._error(frame, str(exc))
            except Exception as exc:  # noqa: BLE001 - one bad frame must not stop the line
                self._warn("detect-bug", logging.ERROR, "detector failed on frame %s", frame.frame_id,
                           exc_info=True)
                verdict = self._error(frame, f"internal error: {type(exc).__name__}: {exc}")
        verdict.timings_ms["capture_wait"] = wait_ms
        verdict.timings_ms["total"] = wait_ms + (time.monotonic() - t0) * 1000.0
        if verdict.error is None:
            self.stats.judged += 1
            self.stats.flagged += bool(verdict.anomalous)
            self._latencies.append(verdict.timings_ms["total"])
        else:
            self.stats.errors += 1
        return verdict

    @staticmethod
    def _error(frame: Frame, message: str) -> Verdict:
        shape = None if frame.image is None else tuple(frame.image.shape)
        return Verdict(frame_id=frame.frame_id, timestamp=frame.timestamp, source=frame.source,
                       frame_shape=shape, error=message)

    def _dropped(self, item: _Queued) -> tuple[Verdict, Frame]:
        verdict = self._error(item.frame, DROPPED_ERROR)
        verdict.timings_ms["capture_wait"] = (time.monotonic() - item.t_enqueued) * 1000.0
        return verdict, replace(item.frame, image=None)  # do not hold the pixels until written

    # -- output

    def _write_drops(self) -> None:
        """Events the capture thread made: dropped frames and frames that came without pixels."""
        while self._drops:
            verdict, frame = self._drops.popleft()
            if verdict.error == DROPPED_ERROR:
                self.stats.dropped += 1
            else:
                self.stats.errors += 1
            self._emit(verdict, frame)

    def _emit(self, verdict: Verdict, frame: Frame) -> None:
        for key in ("path", "pos"):  # which file (and video frame) the event is about
            if key in frame.meta:
                verdict.extra.setdefault(key, frame.meta[key])
        for name, sink in zip(self.sink_names, self.sinks):
            try:
                sink.write(verdict, frame)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - a sink never stops the station
                self._raised[name] += 1
                self._warn(f"sink:{name}", logging.ERROR, "sink %s failed: %s: %s (event %s); going on",
                           name, type(exc).__name__, exc, verdict.event_id)
        if self.describer is not None and verdict.anomalous:
            try:
                self.describer.submit(verdict, frame)
            except Exception as exc:  # noqa: BLE001
                self._describer_raised += 1
                self._warn("describer", logging.ERROR, "describer failed: %s: %s", type(exc).__name__, exc)

    def _close_sinks(self) -> None:
        for name, sink in zip(self.sink_names, self.sinks):
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                self._raised[name] += 1
                log.error("closing sink %s failed: %s: %s", name, type(exc).__name__, exc)

    def _finish_stats(self, final: bool = True) -> None:
        s = self.stats
        elapsed = max(1e-9, time.monotonic() - self._t0)
        s.fps = s.judged / elapsed
        if self._latencies:
            p50, p99 = np.percentile(np.fromiter(self._latencies, float), [50, 99])
            s.latency_p50_ms, s.latency_p99_ms = float(p50), float(p99)
        s.reconnects = int(getattr(self.source, "reconnects", 0) or 0)
        s.source_errors = int(getattr(self.source, "errors", 0) or 0)
        s.sink_errors = {name: self._raised[name] + int(getattr(sink, "errors", 0) or 0)
                         for name, sink in zip(self.sink_names, self.sinks)}
        # a broker down for long enough overflows MQTT's buffer: those events never arrive, and a
        # connection error count alone (one per attempt) does not say how many
        s.sink_lost = {name: int(getattr(sink, "dropped", 0) or 0) for name, sink in zip(self.sink_names, self.sinks)}
        # a broker that accepts the connection but never answers shows no error for a long time: the
        # events piling up in front of it (and a disk-full backlog) do
        s.sink_waiting = {name: int(getattr(sink, "buffered", None) or getattr(sink, "backlog", 0) or 0)
                          for name, sink in zip(self.sink_names, self.sinks)}
        described = getattr(self.describer, "stats", None)  # queue full, timeouts, crashes: failed records
        s.describer_errors = self._describer_raised + int(getattr(described, "failed", 0) or 0)
        if final:
            s.stop_reason = self._stop_reason or "end"
            s.ended = time.time()


__all__ = ["Station", "StationStats", "Detector", "Describer", "DROPPED_ERROR", "STOPPED_ERROR"]
