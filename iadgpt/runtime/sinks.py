"""Where verdicts go: a JSON-lines log, overlay images of NG parts, an MQTT topic.

Every sink has the same small interface (`Sink`): ``write(verdict, frame)``, ``close()`` and an
``errors`` counter. A sink must never stop the line: the station catches whatever a sink raises,
counts it per sink and goes on, and the sinks here go further and absorb their own transient
failures (a full disk, a broker that is down) without losing events where memory allows:

* `JsonlSink` keeps lines that could not be written in a bounded backlog and writes them, in
  order, on the next write once space is back.
* `MqttSink` buffers events while the broker is unreachable and publishes them when the
  connection comes back.

For frames the station dropped (inference too slow) the sinks get a frame with ``image=None``.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import stat
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol, Union, runtime_checkable

import cv2
import numpy as np

from iadgpt.errors import ConfigError
from iadgpt.runtime.sources import Frame
from iadgpt.runtime.verdict import Verdict

log = logging.getLogger(__name__)

FSYNC_POLICIES = ("never", "always", "interval")
PathLike = Union[str, "os.PathLike[str]"]


@runtime_checkable
class Sink(Protocol):
    """A destination for verdicts.

    `errors` counts the failures the sink absorbed itself; anything `write` raises is counted
    (and logged, throttled) by the station instead, so the two never count the same failure.
    """

    errors: int

    def write(self, verdict: Verdict, frame: Optional[Frame]) -> None: ...

    def close(self) -> None: ...


class ThrottledLog:
    """Logs a recurring failure at most once per `interval_s` per key, with the count since.

    Why: a sink failing on every frame at 30 fps would otherwise flood the journal and, on a
    full disk, make things worse.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval_s, self._clock = logger, float(interval_s), clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, level: int, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log now if `key` has been quiet for `interval_s`; returns whether it logged."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            skipped = self._suppressed.pop(key, 0)
        if skipped:
            msg += " (%d similar message(s) suppressed)"
            args = (*args, skipped)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True


# ----------------------------------------------------------------------------- JSON


def _json_default(obj: Any) -> Any:
    """numpy scalars/arrays, paths, sets and tuples from detectors or frame meta."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return repr(obj)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(record: dict[str, Any]) -> str:
    """Strict JSON (NaN/inf become null) on one line, so any consumer can parse the events."""
    try:
        return json.dumps(record, default=_json_default, allow_nan=False, separators=(",", ":"))
    except ValueError:
        plain = json.loads(json.dumps(record, default=_json_default))
        return json.dumps(_finite(plain), allow_nan=False, separators=(",", ":"))


# ----------------------------------------------------------------------------- JSON lines


class JsonlSink:
    """One JSON line per verdict (``verdict.to_dict()``) in `path`, rotated by size.

    Lines are written straight to the file descriptor (no user-space buffer), so a line is with
    the kernel as soon as `write` returns; `fsync` decides when it is forced to the disk:
    ``"never"`` (the OS decides), ``"always"`` (each line; slow on SD cards), ``"interval"``
    (at most every `fsync_interval_s`, checked on each write, and at close).

    Rotation: when a line would take the file past `max_bytes`, ``events.jsonl`` becomes
    ``events.jsonl.1`` (``.1`` -> ``.2`` ... up to `backups`, the oldest is deleted; with
    ``backups=0`` the file is simply started again). ``max_bytes=None`` never rotates.

    Later updates to an event (the describer's text, an operator's decision) are appended with
    `append` as ``{"event_id": ..., "update": true, ...}`` lines; `read_events` merges them into
    their event's ``"updates"`` list. Readers must do the same: an event id is not unique per line.

    Write failures (ENOSPC, EIO ...) are counted in `errors`, logged at most every 30 s, and the
    unwritten lines wait in a backlog of at most `backlog_max` lines (oldest dropped first,
    counted in `dropped`) that is retried, in order, before the next line. A line never appears
    half-written followed by a retry: a partial write resumes where it stopped.
    """

    def __init__(self, path: PathLike, fsync: str = "interval", fsync_interval_s: float = 1.0,
                 max_bytes: Optional[int] = 50_000_000, backups: int = 5, backlog_max: int = 10_000) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ConfigError(f"fsync={fsync!r} is not a policy: use one of {', '.join(FSYNC_POLICIES)}")
        if max_bytes is not None and int(max_bytes) <= 0:
            raise ConfigError(f"max_bytes={max_bytes} must be a positive byte count (or None for no rotation)")
        if int(backups) < 0 or int(backlog_max) < 1:
            raise ConfigError("backups must be >= 0 and backlog_max >= 1")
        self.path = Path(path)
        self.fsync, self.fsync_interval_s = fsync, float(fsync_interval_s)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.backups, self.backlog_max = int(backups), int(backlog_max)
        self.name = f"events:{self.path.name}"
        self.errors = 0
        self.written = 0  # lines completely written
        self.dropped = 0  # lines lost because the backlog overflowed
        self.rotations = 0
        self.reopened = 0  # times the file was found deleted or moved away and started again
        self._backlog: deque[bytes] = deque()
        self._short_of_space = False  # the last failed write was ENOSPC / EDQUOT
        self._head_done = 0  # bytes of _backlog[0] already in the file
        self._lock = threading.Lock()
        self._warn = ThrottledLog(log)
        self._last_sync = time.monotonic()
        self._dirty = False
        self._fd: Optional[int] = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        except OSError as exc:
            raise ConfigError(f"cannot open the event log {self.path}: {exc.strerror or exc}; "
                              "point sinks.events.path at a writable folder") from None

    @property
    def backlog(self) -> int:
        """Lines waiting to be written (after a write failure)."""
        return len(self._backlog)

    @property
    def waiting_for_space(self) -> bool:
        """Lines are waiting because the disk (or the quota) was full at the last try."""
        return bool(self._backlog) and self._short_of_space

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        st = os.fstat(self._fd)
        self._size = st.st_size
        # a device or pipe (events to /dev/null, a FIFO): neither synced nor rotated (renaming
        # /dev/null away as root would break the machine)
        self._regular = stat.S_ISREG(st.st_mode)
        # a line cut off by a full disk or a power cut in an earlier run: end it first, or the next
        # event would be glued onto it and both lost to readers
        self._newline_owed = self._size > 0 and not self._ends_with_newline()

    def _ends_with_newline(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                return f.read(1) == b"\n"
        except OSError:
            return True  # unreadable (write-only): nothing to mend from here

    # -- public API

    def write(self, verdict: Verdict, frame: Optional[Frame] = None) -> None:
        self._put(to_json(verdict.to_dict()))

    def append(self, event_id: str, record: dict[str, Any]) -> None:
        """Add a later update to event `event_id` (thread-safe; e.g. from the describer thread).

        Written as ``{**record, "event_id": event_id, "update": true}``.
        """
        self._put(to_json({**record, "event_id": str(event_id), "update": True}))

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            self._drain()
            if self._backlog:
                log.error("%s: closing with %d event line(s) that could not be written (disk full?); "
                          "they are lost", self.path, len(self._backlog))
            if self.fsync != "never" and self._dirty:
                self._sync()
            os.close(self._fd)
            self._fd = None

    # -- internals (call with the lock held)

    def _put(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        with self._lock:
            if self._fd is None:
                raise RuntimeError(f"{self.name} is closed")
            if len(self._backlog) >= self.backlog_max:
                if self._head_done and len(self._backlog) > 1:
                    del self._backlog[1]  # the head is half in the file: finish it, lose the next
                else:
                    self._backlog.popleft()
                    self._head_done = 0
                self.dropped += 1
                self._warn("drop", logging.ERROR, "%s: backlog full (%d lines); dropping the oldest event "
                           "lines. Free disk space under %s", self.path, self.backlog_max, self.path.parent)
            self._backlog.append(data)
            self._drain()
            if self.fsync == "always" or (self.fsync == "interval" and self._dirty
                                          and time.monotonic() - self._last_sync >= self.fsync_interval_s):
                self._sync()

    def _in_place(self) -> bool:
        """Is the open file still the one at `path`? If it was deleted or moved away (an operator's
        rm -rf, an outside log rotation), start a new one there: writing on into the unlinked file
        would lose every later line without an error. False (lines stay in the backlog) if that fails."""
        try:
            held = os.fstat(self._fd)
            here = os.stat(self.path)
            if (here.st_ino, here.st_dev) == (held.st_ino, held.st_dev):
                return True
        except FileNotFoundError:
            pass
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            old = self._fd
            self._open()
            os.close(old)
        except OSError as exc:
            self.errors += 1
            self._short_of_space = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self._warn("reopen", logging.ERROR, "%s: the event log was deleted or moved and cannot be made again "
                       "(%s); keeping %d line(s) in memory", self.path, exc.strerror or exc, len(self._backlog))
            return False
        self.reopened += 1
        log.warning("%s was deleted or moved away while the station ran; writing on in a new file there",
                    self.path)
        return True

    def _drain(self) -> None:
        if self._backlog and not self._in_place():
            return
        while self._backlog:
            data = self._backlog[0]
            if self._head_done == 0 and self.max_bytes is not None and self._regular and self._size > 0 \
                    and self._size + len(data) > self.max_bytes:
                self._rotate()
            try:
                if self._newline_owed:
                    self._size += os.write(self._fd, b"\n")
                    self._newline_owed = False
                while self._head_done < len(data):
                    n = os.write(self._fd, memoryview(data)[self._head_done:])
                    self._head_done += n
                    self._size += n
                    self._dirty = True
            except OSError as exc:
                self.errors += 1
                self._short_of_space = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                hint = " (disk full: free space or lower max_bytes/backups)" if self._short_of_space else ""
                self._warn("write", logging.ERROR, "%s: cannot write event line: %s%s; keeping %d line(s) "
                           "in memory and retrying on the next event", self.path, exc.strerror or exc, hint,
                           len(self._backlog))
                return
            self._backlog.popleft()
            self._head_done = 0
            self.written += 1

    def _sync(self) -> None:
        if not self._regular:
            self._dirty = False
            return
        try:
            os.fsync(self._fd)
            self._dirty = False
        except OSError as exc:
            self.errors += 1
            self._warn("fsync", logging.ERROR, "%s: fsync failed: %s", self.path, exc.strerror or exc)
        self._last_sync = time.monotonic()

    def _rotate(self) -> None:
        """Rename the files along and start a new one; on failure go on in the current file and
        try again after another `max_bytes`."""
        if self.fsync != "never" and self._dirty:
            self._sync()
        try:
            if self.backups == 0:
                self.path.unlink()
            else:
                for i in range(self.backups - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{i}")
                    if older.exists():
                        os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            old = self._fd
            self._open()
            os.close(old)
            self.rotations += 1
        except OSError as exc:
            self.errors += 1
            self._size = 0
            self._warn("rotate", logging.ERROR, "%s: rotation failed (%s); going on in the current file",
                       self.path, exc.strerror or exc)


def read_events(path: PathLike, include_rotated: bool = True) -> list[dict[str, Any]]:
    """The events of a `JsonlSink` file (and its rotated backups, oldest first), updates merged.

    Each ``"update": true`` line is appended to the ``"updates"`` list of the event with its
    ``event_id`` (an update whose event was rotated away becomes an event of its own with only
    ``event_id`` and ``updates``). Undecodable lines (a power cut mid-line) and lines that are not
    JSON objects are skipped with a warning. A missing file reads as no events.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not an event log; give the JSONL file the station writes "
                          "(sinks.events.path in station.yaml)")
    files = []
    if include_rotated:
        rotated = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
        files += sorted(rotated, key=lambda p: -int(p.suffix[1:]))
    if path.exists():
        files.append(path)
    events: list[dict[str, Any]] = []
    by_id: dict[str, dict[str, Any]] = {}
    for file in files:
        try:
            fh = open(file, encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ConfigError(f"cannot read the event log {file}: {exc.strerror or exc}") from exc
        with fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    log.warning("skipping an undecodable line in %s", file)
                    continue
                if not isinstance(record, dict):  # valid JSON, but not an event (`[1, 2]`, a bare string)
                    log.warning("skipping a line that is not a JSON object in %s", file)
                    continue
                if record.pop("update", False):
                    target = by_id.get(record.get("event_id"))
                    if target is None:
                        target = {"event_id": record.get("event_id")}
                        events.append(target)
                        by_id[str(target["event_id"])] = target
                    target.setdefault("updates", []).append(record)
                else:
                    events.append(record)
                    by_id[str(record.get("event_id"))] = record
    return events


# ----------------------------------------------------------------------------- overlays

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_name(text: str, limit: int = 120) -> str:
    return _UNSAFE.sub("_", text).strip("._")[-limit:] or "frame"


def render_overlay(verdict: Verdict, image: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """BGR uint8 picture for a person: heat map on the frame, region boxes, score and verdict."""
    if image.ndim == 2:
        bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGBA2BGR)
    else:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if bgr.dtype != np.uint8:
        bgr = np.clip(bgr, 0, 255).astype(np.uint8)
    h, w = bgr.shape[:2]
    amap = verdict.anomaly_map
    if amap is not None and np.size(amap):
        amap = np.atleast_2d(np.nan_to_num(np.asarray(amap, np.float32).squeeze()))  # a 1x1 map squeezes to 0-d
        if amap.shape != (h, w):
            amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
        lo, hi = float(amap.min()), float(amap.max())
        norm = (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)
        heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
        bgr = cv2.addWeighted(bgr, 1.0 - alpha, heat, alpha, 0.0)
    thick = max(1, round(min(h, w) / 200))
    colour = (0, 0, 255) if verdict.anomalous else (0, 200, 0)
    for region in verdict.regions:
        x0, y0, x1, y1 = (int(v) for v in region.box)
        cv2.rectangle(bgr, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, thick)
    label = "NG" if verdict.anomalous else ("OK" if verdict.anomalous is False else "ERR")
    text = label
    if verdict.score is not None:
        text += f" score {verdict.score:.3f}"
        if verdict.threshold is not None:
            text += f" / thr {verdict.threshold:.3f}"
    scale = max(0.4, min(h, w) / 600)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    cv2.rectangle(bgr, (0, 0), (min(w - 1, tw + 8), th + base + 8), (0, 0, 0), -1)
    cv2.putText(bgr, text, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick, cv2.LINE_AA)
    return bgr


class OverlaySink:
    """Writes an overlay image (`render_overlay`) per NG frame into `directory`.

    The file is ``<event id>_<UTC capture time>.<ext>`` (event id made filename-safe; the time
    keeps a restarted station, whose frame ids start again at 0, from overwriting evidence).
    Its path is also put in ``verdict.extra["overlay"]``, so sinks after this one (the event
    log, MQTT) point at the picture: `build_sinks` puts this sink first. With `max_files` the
    oldest overlays in the folder are deleted beyond that many. `ext` is ``.jpg`` or ``.png``.

    While `yield_to()` is true, no overlay is written (counted in `dropped`): `build_sinks` passes
    "the event log on the same disk waits for space", so the records of every part get the space
    an operator frees before the pictures (one overlay is 100-500 kB, an event line under 1 kB).
    """

    def __init__(self, directory: PathLike, only_anomalous: bool = True, max_files: Optional[int] = None,
                 ext: str = ".jpg", jpeg_quality: int = 90, yield_to: Optional[Callable[[], bool]] = None) -> None:
        ext = ext if ext.startswith(".") else "." + ext
        if ext.lower() not in (".jpg", ".jpeg", ".png"):
            raise ConfigError(f"overlay format {ext!r} not supported: use .jpg or .png")
        if max_files is not None and int(max_files) < 1:
            raise ConfigError(f"max_files={max_files} must be >= 1 (or None to keep every overlay)")
        self.directory = Path(directory)
        self.only_anomalous, self.ext = bool(only_anomalous), ext.lower()
        self.max_files = None if max_files is None else int(max_files)
        self.name = "overlays"
        self.errors = 0
        self._warn = ThrottledLog(log)
        self.written = 0
        self.dropped = 0  # overlays not written while the event log waited for disk space
        self.yield_to = yield_to
        self._params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if self.ext != ".png" else []
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.directory).close()  # an existing but read-only folder fails here
        except OSError as exc:
            raise ConfigError(f"cannot write to the overlay folder {self.directory}: {exc.strerror or exc}; "
                              "point sinks.overlays.dir at a writable folder") from None
        self._files: deque[Path] = deque()
        if self.max_files is not None:
            existing = [p for p in self.directory.iterdir() if p.suffix.lower() == self.ext and p.is_file()]
            self._files.extend(sorted(existing, key=lambda p: p.stat().st_mtime))

    def path_for(self, verdict: Verdict) -> Path:
        return self.directory / f"{_safe_name(verdict.event_id)}{self.ext}"  # event ids carry the capture time

    def write(self, verdict: Verdict, frame: Optional[Frame]) -> None:
        if self.only_anomalous and not verdict.anomalous:
            return
        if frame is None or frame.image is None:
            return  # nothing to draw on: corrupt or dropped frame
        if self.yield_to is not None and self.yield_to():
            self.dropped += 1
            self._warn("yield", logging.WARNING, "the event log is waiting for disk space: overlays are not written "
                       "until it has caught up (%d so far); free space under %s", self.dropped, self.directory)
            return
        path = self.path_for(verdict)
        picture = render_overlay(verdict, frame.image)
        ok, buf = cv2.imencode(self.ext, picture, self._params)
        if not ok:
            raise RuntimeError(f"OpenCV cannot encode a {picture.shape} overlay as {self.ext}")
        tmp = path.with_name(path.name + ".part")
        try:
            if not self.directory.is_dir():  # deleted under the running station (a cleanup script, rm -rf)
                self.directory.mkdir(parents=True, exist_ok=True)
                self._warn("gone", logging.WARNING, "overlay folder %s had disappeared; made it again", self.directory)
            tmp.write_bytes(buf.tobytes())
            os.replace(tmp, path)  # readers never see half an image
        except OSError as exc:
            self.errors += 1
            hint = "free disk space or set sinks.overlays.max_files" if exc.errno == errno.ENOSPC else \
                "check the folder's permissions and file system"
            self._warn("write", logging.ERROR, "cannot write overlay %s: %s; %s", path, exc.strerror or exc, hint)
            try:
                tmp.unlink()
            except OSError:
                pass
            return
        verdict.extra["overlay"] = str(path)
        self.written += 1
        if self.max_files is not None:
            self._files.append(path)
            while len(self._files) > self.max_files:
                old = self._files.popleft()
                try:
                    old.unlink()
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- MQTT


def _import_paho() -> Any:
    try:
        import paho.mqtt.client as mqtt  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise ConfigError("the MQTT sink needs paho-mqtt: pip install iadgpt[mqtt] "
                          "(or remove sinks.mqtt from station.yaml)") from None
    return mqtt


class MqttSink:
    """Publishes each event's JSON to `topic` (``{station}`` is replaced by `station_id`).

    A broker outage is never fatal. Connection is asynchronous (`connect_async` +
    `loop_start`), so a broker that is down at startup is fine. While disconnected, events wait
    in a buffer of at most `buffer_max` (oldest dropped first, counted in `dropped`); the
    buffer is published, in order, as soon as the connection is back (from ``on_connect``).
    Messages already handed to paho but not yet acknowledged are re-sent by paho itself after
    a reconnect (QoS 1: at least once, so a subscriber may see a duplicate ``event_id``).

    Counters: `published` (acknowledged by the broker), `buffered` (waiting here now),
    `dropped`, `errors` (failed connection attempts, refused connections, publish failures);
    `connected` tells the link state.
    """

    def __init__(self, host: str, port: int = 1883, topic: str = "iadgpt/{station}/events",
                 client_id: Optional[str] = None, qos: int = 1, buffer_max: int = 10_000, *,
                 station_id: str = "station", keepalive: int = 30, username: Optional[str] = None,
                 password: Optional[str] = None, reconnect_min_s: float = 1.0, reconnect_max_s: float = 5.0,
                 close_timeout_s: float = 5.0) -> None:
        mqtt = _import_paho()
        self.topic = topic.replace("{station}", station_id).replace("<station>", station_id)
        if not self.topic or "+" in self.topic or "#" in self.topic:
            raise ConfigError(f"MQTT topic {self.topic!r} must be non-empty and without wildcards (+, #)")
        if qos not in (0, 1, 2):
            raise ConfigError(f"MQTT qos={qos} must be 0, 1 or 2")
        if int(buffer_max) < 1:
            raise ConfigError(f"MQTT buffer_max={buffer_max} must be >= 1")
        self.host, self.port, self.qos = host, int(port), int(qos)
        self.buffer_max, self.close_timeout_s = int(buffer_max), float(close_timeout_s)
        self.client_id = client_id or f"iadgpt-{station_id}-{uuid.uuid4().hex[:8]}"
        self.name = "mqtt"
        self.published = 0
        self.dropped = 0
        self.errors = 0
        self.handed = 0  # messages given to paho (published once acknowledged)
        self.connected = False
        self._buffer: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._warn = ThrottledLog(log)
        self._closed = False
        self._ok = mqtt.MQTT_ERR_SUCCESS
        self._no_conn = mqtt.MQTT_ERR_NO_CONN
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                   protocol=mqtt.MQTTv311, clean_session=True)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.max_queued_messages_set(self.buffer_max)
        self._client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_publish = self._on_publish
        try:
            self._client.connect_async(self.host, self.port, keepalive=int(keepalive))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"bad MQTT broker address {host}:{port}: {exc}; check sinks.mqtt.host/port") from None
        self._client.loop_start()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # -- paho callbacks (network thread)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            self.errors += 1
            self._warn("connect", logging.WARNING, "MQTT broker %s:%d refused the connection: %s",
                       self.host, self.port, reason)
            return
        with self._lock:
            self.connected = True
            waiting = len(self._buffer)
            self._drain()
        log.info("MQTT connected to %s:%d%s", self.host, self.port,
                 f"; sending {waiting} buffered event(s)" if waiting else "")

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self.errors += 1
        self._warn("connect", logging.WARNING, "MQTT broker %s:%d unreachable; buffering events (%d waiting) "
                   "and retrying", self.host, self.port, len(self._buffer))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected = False  # no lock: paho may call this while holding its own locks
        if not self._closed:
            self._warn("disconnect", logging.WARNING, "MQTT connection to %s:%d lost (%s); buffering events "
                       "and reconnecting", self.host, self.port, reason)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self.published += 1  # called with paho's message lock held: touch nothing else

    # -- sink API

    def write(self, verdict: Verdict, frame: Optional[Frame] = None) -> None:
        self._publish(to_json(verdict.to_dict()).encode("utf-8"))

    def append(self, event_id: str, record: dict[str, Any]) -> None:
        """Publish a later update to event `event_id` (the describer's text ...) on the same topic,
        as ``{**record, "event_id": event_id, "update": true}`` (thread-safe), like `JsonlSink.append`."""
        self._publish(to_json({**record, "event_id": str(event_id), "update": True}).encode("utf-8"))

    def _publish(self, payload: bytes) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("MqttSink is closed")
            if len(self._buffer) >= self.buffer_max:
                self._buffer.popleft()
                self.dropped += 1
                self._warn("drop", logging.ERROR, "MQTT buffer full (%d events) while %s:%d is unreachable; "
                           "dropping the oldest (they are still in the event log)", self.buffer_max,
                           self.host, self.port)
            self._buffer.append(payload)
            if self.connected:
                self._drain()

    def _drain(self) -> None:
        """Hand buffered payloads to paho, oldest first (lock held)."""
        while self._buffer and self.connected:
            payload = self._buffer[0]
            try:
                info = self._client.publish(self.topic, payload, qos=self.qos)
            except Exception as exc:  # noqa: BLE001 - a sink never stops the station
                self.errors += 1
                self._warn("publish", logging.ERROR, "MQTT publish failed: %s", exc)
                return
            if info.rc not in (self._ok, self._no_conn):  # NO_CONN: paho keeps it and resends
                self._warn("queue", logging.WARNING, "MQTT client queue full (rc %s); keeping events buffered",
                           info.rc)
                return
            self._buffer.popleft()
            self.handed += 1

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s until every event is acknowledged; True if all were."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.connected:
                    self._drain()
                done = not self._buffer and (self.qos == 0 or self.published >= self.handed)
            if done:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        if self._closed:
            return
        if not self.flush(self.close_timeout_s):
            left = len(self._buffer) + max(0, self.handed - self.published) * (self.qos > 0)
            log.error("MQTT: closing with %d event(s) not acknowledged by %s:%d; they are in the event log "
                      "only", left, self.host, self.port)
        self._closed = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()


def close_all(sinks: Iterable[Sink]) -> None:
    """Close every sink, logging (not raising) failures, so one broken sink cannot keep others open."""
    for sink in sinks:
        try:
            sink.close()
        except Exception:  # noqa: BLE001
            log.exception("closing sink %s failed", getattr(sink, "name", type(sink).__name__))
