"""Sinks: JSON lines (rotation, fsync, disk full), overlays, and MQTT against a real mosquitto."""
from __future__ import annotations

import errno
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import pytest

from iadgpt.errors import ConfigError
from iadgpt.runtime import sinks as sinks_mod
from iadgpt.runtime.sinks import JsonlSink, MqttSink, OverlaySink, Sink, ThrottledLog, read_events, render_overlay
from iadgpt.runtime.sources import Frame
from iadgpt.runtime.verdict import Region, Verdict


def _verdict(i: int, anomalous: Optional[bool] = False, *, with_map: bool = False) -> Verdict:
    v = Verdict(frame_id=i, timestamp=1_700_000_000.0 + i, score=np.float32(0.25 + i / 100), threshold=0.5,
                anomalous=anomalous, source="cam", frame_shape=(48, 64, 3),
                timings_ms={"preprocess": 1.0, "encoder": 2.0})
    if anomalous:
        v.regions = [Region(box=(10, 8, 30, 20), area_px=150, peak=0.9, centroid=(20.0, 14.0))]
    if with_map:
        amap = np.zeros((48, 64), np.float32)
        amap[8:20, 10:30] = 1.0
        v.anomaly_map = amap
    return v


def _frame(i: int) -> Frame:
    img = np.full((48, 64, 3), 120, np.uint8)
    return Frame(image=img, frame_id=i, timestamp=1_700_000_000.0 + i, source="cam")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- JSON lines


def test_jsonl_one_parseable_line_per_verdict(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "ev" / "events.jsonl", fsync="never")
    assert isinstance(sink, Sink)
    nan = _verdict(3)
    nan.score = float("nan")  # strict JSON: becomes null instead of NaN
    for v in [_verdict(0), _verdict(1, True, with_map=True), _verdict(2, None), nan]:
        sink.write(v, None)
    sink.close()
    events = _lines(tmp_path / "ev" / "events.jsonl")
    assert [e["event_id"] for e in events] == [_verdict(i).event_id for i in range(4)]
    assert len({e["event_id"] for e in events}) == 4
    assert events[1]["anomalous"] is True and events[1]["regions"][0]["box"] == [10, 8, 30, 20]
    assert "anomaly_map" not in events[1] and abs(events[0]["score"] - 0.25) < 1e-6
    assert events[3]["score"] is None
    assert sink.written == 4 and sink.errors == 0


def test_jsonl_append_updates_are_merged_by_readers(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    sink.write(_verdict(0, True), None)
    sink.write(_verdict(1), None)
    eid = _verdict(0).event_id
    sink.append(eid, {"kind": "description", "text": "scratch near the bore"})
    sink.close()
    raw = _lines(path)
    assert raw[2] == {"kind": "description", "text": "scratch near the bore", "event_id": eid, "update": True}
    events = read_events(path)
    assert len(events) == 2
    assert events[0]["updates"] == [{"kind": "description", "text": "scratch near the bore", "event_id": eid}]
    assert "updates" not in events[1]


def test_jsonl_rotates_at_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    def v(i: int) -> Verdict:
        out = _verdict(i)
        out.score = 0.5  # every line the same length
        return out

    one = len(json.dumps(v(10).to_dict(), separators=(",", ":"))) + 1
    sink = JsonlSink(path, max_bytes=3 * one + 10, backups=2)
    for i in range(10, 30):
        sink.write(v(i), None)
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 3 * one + 10
        assert len(_lines(p)) == 3 or p.name == "events.jsonl"
    kept = [e["frame_id"] for e in read_events(path)]
    assert kept == list(range(30 - len(kept), 30)) and len(kept) >= 7  # oldest files deleted, order kept
    assert sink.rotations == 6


def test_jsonl_fsync_policies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))

    def count(**kw: object) -> int:
        calls.clear()
        sink = JsonlSink(tmp_path / f"{uuid.uuid4().hex}.jsonl", **kw)  # type: ignore[arg-type]
        for i in range(5):
            sink.write(_verdict(i), None)
        sink.close()
        return len(calls)

    assert count(fsync="always") == 5
    assert count(fsync="never") == 0
    assert count(fsync="interval", fsync_interval_s=3600) == 1  # only at close
    assert count(fsync="interval", fsync_interval_s=0.0) == 5
    with pytest.raises(ConfigError, match="fsync"):
        JsonlSink(tmp_path / "x.jsonl", fsync="sometimes")


class _DiskFull:
    """Makes os.write on one fd fail with ENOSPC while `full`, after a partial first write."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, sink: JsonlSink) -> None:
        self.sink, self.full, self.partial_done = sink, False, False
        self.real = os.write
        monkeypatch.setattr(os, "write", self)

    def __call__(self, fd: int, data: bytes) -> int:
        if self.full and fd == self.sink._fd:
            if not self.partial_done:  # like the kernel: what fits is written, then ENOSPC
                self.partial_done = True
                return self.real(fd, bytes(data)[:7])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, data)


def test_jsonl_disk_full_keeps_a_backlog_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path, fsync="never")
    disk = _DiskFull(monkeypatch, sink)
    sink.write(_verdict(0), None)
    disk.full = True
    for i in range(1, 11):
        sink.write(_verdict(i), None)  # never raises
    assert sink.errors >= 10 and sink.backlog == 10 and sink.written == 1
    disk.full = False
    sink.write(_verdict(11), None)
    sink.close()
    assert [e["frame_id"] for e in _lines(path)] == list(range(12))  # partial line resumed, not duplicated
    assert sink.backlog == 0 and sink.dropped == 0


def test_jsonl_backlog_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path, backlog_max=3)
    disk = _DiskFull(monkeypatch, sink)
    disk.full = disk.partial_done = True
    for i in range(5):
        sink.write(_verdict(i), None)
    assert sink.backlog == 3 and sink.dropped == 2
    disk.full = False
    sink.close()
    assert [e["frame_id"] for e in _lines(path)] == [2, 3, 4]


def test_jsonl_mends_a_line_an_earlier_run_left_half_written(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(sinks_mod.to_json(_verdict(0).to_dict()) + "\n" + '{"frame_id": 1, "scor')  # disk full mid-line
    sink = JsonlSink(path, fsync="never")
    sink.write(_verdict(2), None)
    sink.close()
    assert [e["frame_id"] for e in read_events(path)] == [0, 2]  # the new event is not glued onto the stump


def test_jsonl_starts_a_new_file_when_its_log_is_deleted_or_moved_under_it(tmp_path: Path) -> None:
    # The open descriptor kept writing into the unlinked file: every later line lost, no error counted.
    import shutil
    path = tmp_path / "out" / "events.jsonl"
    sink = JsonlSink(path, fsync="never")
    sink.write(_verdict(0), None)
    shutil.rmtree(tmp_path / "out")  # an operator's rm -rf of the output folder
    sink.write(_verdict(1), None)
    path.rename(tmp_path / "out" / "moved.jsonl")  # an outside log rotation
    sink.write(_verdict(2), None)
    sink.close()
    assert [e["frame_id"] for e in read_events(path)] == [2]
    assert [e["frame_id"] for e in _lines(tmp_path / "out" / "moved.jsonl")] == [1]
    assert sink.reopened == 2 and sink.errors == 0 and sink.written == 3


def test_jsonl_to_a_device_is_neither_synced_nor_rotated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --events /dev/null counted an fsync error per second, and at max_bytes would have renamed /dev/null
    renamed = []
    monkeypatch.setattr(sinks_mod.os, "replace", lambda *a: renamed.append(a))
    sink = JsonlSink("/dev/null", fsync="always", max_bytes=100, backups=1)
    for i in range(5):
        sink.write(_verdict(i), None)
    sink.close()
    assert sink.written == 5 and sink.errors == 0 and sink.rotations == 0 and not renamed


def test_jsonl_unwritable_folder_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="sinks.events.path"):
        JsonlSink(blocker / "events.jsonl")


def test_throttled_log_limits_repeats() -> None:
    now = [0.0]
    logged: list[str] = []

    class _L:
        def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
            logged.append(msg % args)

    t = ThrottledLog(_L(), interval_s=10, clock=lambda: now[0])  # type: ignore[arg-type]
    assert t("k", 40, "boom %d", 1) and not t("k", 40, "boom %d", 2) and not t("k", 40, "boom %d", 3)
    now[0] = 11.0
    assert t("k", 40, "boom %d", 4)
    assert logged == ["boom 1", "boom 4 (2 similar message(s) suppressed)"]


# ----------------------------------------------------------------------------- overlays


def test_overlay_for_ng_frames_only(tmp_path: Path) -> None:
    sink = OverlaySink(tmp_path / "ov", only_anomalous=True)
    ok, ng, err = _verdict(0), _verdict(1, True, with_map=True), _verdict(2, None)
    for v in (ok, ng, err):
        sink.write(v, _frame(v.frame_id))
    sink.write(_verdict(3, True), Frame(image=None, frame_id=3, timestamp=0.0, source="cam"))  # dropped frame
    files = list((tmp_path / "ov").iterdir())
    assert len(files) == 1 and files[0].stem == _verdict(1).event_id and files[0].suffix == ".jpg"
    assert ng.extra["overlay"] == str(files[0]) and "overlay" not in ok.extra
    img = cv2.imread(str(files[0]))
    assert img.shape == (48, 64, 3)
    assert img[14, 20, 2] > img[14, 20, 0]  # inside the region: hot (red) heat map over the grey part


def test_overlay_folder_deleted_mid_run_is_made_again(tmp_path: Path) -> None:
    import shutil
    sink = OverlaySink(tmp_path / "ov")
    sink.write(_verdict(1, True), _frame(1))
    shutil.rmtree(tmp_path / "ov")
    v = _verdict(2, True)
    sink.write(v, _frame(2))
    assert sink.errors == 0 and Path(v.extra["overlay"]).is_file()


def test_overlay_all_frames_png_and_max_files(tmp_path: Path) -> None:
    sink = OverlaySink(tmp_path, only_anomalous=False, max_files=2, ext="png")
    for i in range(4):
        sink.write(_verdict(i, bool(i % 2)), _frame(i))
    names = sorted(p.stem for p in tmp_path.iterdir())
    assert names == [_verdict(2).event_id, _verdict(3).event_id] and sink.written == 4


def test_overlay_of_a_one_pixel_frame(tmp_path: Path) -> None:
    v = _verdict(1, True)
    v.anomaly_map = np.ones((1, 1), np.float32)
    picture = render_overlay(v, np.zeros((1, 1, 3), np.uint8))
    assert picture.shape == (1, 1, 3)


def test_overlay_folder_that_cannot_be_written_is_a_config_error(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)  # an existing folder on a read-only mount
    with pytest.raises(ConfigError, match="Read-only file system.*writable folder"):
        OverlaySink(tmp_path)


def test_overlay_write_failure_is_counted_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = OverlaySink(tmp_path)

    def full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    v = _verdict(1, True)
    sink.write(v, _frame(1))
    assert sink.errors == 1 and "overlay" not in v.extra and not list(tmp_path.iterdir())


def test_on_a_full_disk_overlays_wait_until_the_event_log_has_caught_up(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Space an operator frees goes to the records of every part first, not to a 300 kB picture
    that fills the disk again (overlays used to take it before the event log's backlog could)."""
    from iadgpt.runtime.config import build_sinks, load_station_config
    (tmp_path / "station.yaml").write_text("bundle: b\nsource: synthetic://part\nsinks:\n  events:\n"
                                           "    path: ev/events.jsonl\n    fsync: never\n  overlays:\n    dir: ov\n")
    overlays, events = build_sinks(load_station_config(tmp_path / "station.yaml"))
    disk = _DiskFull(monkeypatch, events)
    disk.partial_done = True

    def part(i: int) -> Verdict:
        v = _verdict(i, True)
        for sink in (overlays, events):  # the station's order: overlays first
            sink.write(v, _frame(i))
        return v

    assert "overlay" in part(0).extra
    disk.full = True
    part(1)  # this event line fails: the next overlay waits
    assert events.waiting_for_space and "overlay" not in part(2).extra and overlays.dropped == 1
    disk.full = False
    assert "overlay" not in part(3).extra  # the backlog is written with this event ...
    assert not events.waiting_for_space and "overlay" in part(4).extra  # ... and pictures come back
    events.close()
    assert [e["frame_id"] for e in _lines(tmp_path / "ev" / "events.jsonl")] == [0, 1, 2, 3, 4]
    assert overlays.dropped == 2 and len(list((tmp_path / "ov").iterdir())) == 3


def test_a_later_failure_that_is_not_about_space_ends_the_overlay_pause(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    events = JsonlSink(tmp_path / "ev" / "events.jsonl", fsync="never")
    disk = _DiskFull(monkeypatch, events)
    disk.full = disk.partial_done = True
    events.write(_verdict(0), None)
    assert events.waiting_for_space
    (tmp_path / "ev" / "events.jsonl").unlink()  # then the log cannot even be made again: not a matter of space
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path).endswith("events.jsonl"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    events.write(_verdict(1), None)
    assert events.backlog == 2 and not events.waiting_for_space


def test_overlays_do_not_wait_for_a_log_that_fails_for_another_reason(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    events = JsonlSink(tmp_path / "events.jsonl", fsync="never")

    def broken(fd: int, data: bytes) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "write", broken)
    events.write(_verdict(0), None)
    assert events.backlog == 1 and not events.waiting_for_space


# ----------------------------------------------------------------------------- MQTT

try:
    import paho.mqtt.client as mqtt
except ImportError:  # pragma: no cover - paho is in the dev extra
    mqtt = None

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
needs_broker = pytest.mark.skipif(MOSQUITTO is None or mqtt is None, reason=(
    "mosquitto not installed: apt-get install -y mosquitto (the tests start their own broker)" if MOSQUITTO is None
    else "paho-mqtt not installed: pip install iadgpt[mqtt]"))
needs_paho = pytest.mark.skipif(mqtt is None, reason="paho-mqtt not installed: pip install iadgpt[mqtt]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class Broker:
    """A private mosquitto on 127.0.0.1 with persistence, so a restart keeps subscribers' sessions."""

    def __init__(self, folder: Path) -> None:
        self.port = _free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence true",
                 f"persistence_location {folder}/", f"log_dest file {folder}/mosquitto.log"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append(f"user {getpass.getuser()}")  # stay root: do not drop to 'mosquitto' (no access here)
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}); see {self.folder}/mosquitto.log")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        assert _wait(up, 5.0), f"mosquitto did not listen on 127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture()
def broker(tmp_path: Path):
    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed: apt-get install -y mosquitto")
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


class Subscriber:
    """A persistent-session subscriber: the broker queues QoS 1 messages for it while it is away."""

    def __init__(self, port: int, topic: str) -> None:
        self.ids: list[int] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{uuid.uuid4().hex[:6]}",
                                  clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self._subscribed.wait(5), "test subscriber could not subscribe"

    def _on_message(self, client: object, userdata: object, msg: object) -> None:
        with self._lock:
            self.ids.append(json.loads(msg.payload)["frame_id"])  # type: ignore[attr-defined]

    def got(self) -> set[int]:
        with self._lock:
            return set(self.ids)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _sink(port: int, **kw: object) -> MqttSink:
    return MqttSink("127.0.0.1", port, topic="iadgpt/{station}/events", station_id="t1", reconnect_min_s=0.1,
                    reconnect_max_s=0.5, close_timeout_s=3.0, **kw)  # type: ignore[arg-type]


@needs_broker
def test_mqtt_delivers_and_survives_a_broker_restart(broker: Broker) -> None:
    sub = Subscriber(broker.port, "iadgpt/t1/events")
    sink = _sink(broker.port)
    try:
        assert _wait(lambda: sink.connected), "sink did not connect"
        for i in range(5):
            sink.write(_verdict(i), None)
        assert _wait(lambda: sub.got() >= set(range(5))), sub.got()

        broker.stop()
        assert _wait(lambda: not sink.connected), "sink did not notice the broker going away"
        for i in range(5, 10):
            sink.write(_verdict(i), None)  # outage: buffered, never raises
        assert sink.buffered == 5

        broker.start()  # same port, same persistence file
        assert _wait(lambda: sub.got() >= set(range(10)), 10.0), f"got {sorted(sub.got())}"
        assert sink.buffered == 0 and sink.dropped == 0
    finally:
        sink.close()
        sub.close()
    assert sink.published >= 10


@needs_broker
def test_mqtt_broker_down_at_startup_is_fine(broker: Broker) -> None:
    sub = Subscriber(broker.port, "iadgpt/t1/events")  # registers a persistent session
    broker.stop()
    sink = _sink(broker.port)
    try:
        for i in range(3):
            sink.write(_verdict(i), None)
        assert not sink.connected and sink.buffered == 3
        broker.start()
        assert _wait(lambda: sub.got() >= {0, 1, 2}, 10.0), f"got {sorted(sub.got())}"
    finally:
        sink.close()
        sub.close()


@needs_paho
def test_mqtt_buffer_is_bounded_and_drops_are_counted() -> None:
    sink = _sink(_free_port(), buffer_max=3)  # nothing listens there
    sink.close_timeout_s = 0.2
    for i in range(5):
        sink.write(_verdict(i), None)
    assert (sink.buffered, sink.dropped, sink.connected) == (3, 2, False)
    assert [json.loads(p)["frame_id"] for p in sink._buffer] == [2, 3, 4]  # the oldest were dropped
    t0 = time.monotonic()
    sink.close()
    assert time.monotonic() - t0 < 3


def test_mqtt_without_paho_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "paho.mqtt.client", None)
    with pytest.raises(ConfigError, match=r"pip install iadgpt\[mqtt\]"):
        MqttSink("127.0.0.1")


@needs_paho
def test_mqtt_rejects_wildcard_topics() -> None:
    with pytest.raises(ConfigError, match="wildcards"):
        MqttSink("127.0.0.1", topic="iadgpt/#")


def test_sinks_module_does_not_import_torch() -> None:
    code = ("import sys, iadgpt.runtime.sinks, iadgpt.runtime.station, iadgpt.runtime.config; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert sinks_mod.log.name == "iadgpt.runtime.sinks"


def test_rotation_with_three_backups_keeps_the_newest_lines_in_order(tmp_path):
    """Every line rotates (max_bytes=1): with 3 backups the last 4 lines are kept, none overwritten."""
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path, max_bytes=1, backups=3, fsync="never")
    for i in range(8):
        sink.write(Verdict(frame_id=i, timestamp=1_800_000_000.0 + i))
    sink.close()
    assert [e["frame_id"] for e in read_events(path)] == [4, 5, 6, 7]


def test_overlays_are_written_in_opencvs_bgr_order():
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 255  # RGB red
    out = render_overlay(Verdict(frame_id=0, timestamp=0.0, anomalous=False), red)
    assert tuple(out[-1, -1]) == (0, 0, 255)


def test_read_events_edge_files(tmp_path):
    log = tmp_path / "events.jsonl"
    assert read_events(log) == []  # missing: no events
    (tmp_path / "events.jsonl.1").write_text('{"event_id": "old"}\n')
    (tmp_path / "events.jsonl.bak").write_text('{"event_id": "bak"}\n')  # not a rotation: ignored
    assert [e["event_id"] for e in read_events(log)] == ["old"]  # only rotated files, live one missing
    assert read_events(log, include_rotated=False) == []
    log.write_bytes(b'{"event_id": "a"}\n\xff\xfe garbage\n{"event_id": "b"}\n')
    sink = JsonlSink(log, fsync="never")
    sink.append("gone", {"kind": "description"})  # its event was rotated away
    sink.close()
    evs = read_events(log, include_rotated=False)
    assert [e["event_id"] for e in evs] == ["a", "b", "gone"] and evs[-1]["updates"][0]["kind"] == "description"


def test_read_events_updates_go_to_the_latest_line_of_an_id(tmp_path):
    log = tmp_path / "events.jsonl"
    log.write_text('{"event_id": "e", "n": 1}\n{"event_id": "e", "n": 2}\n'
                   '{"event_id": "e", "update": true, "kind": "x"}\n')
    evs = read_events(log)
    assert "updates" not in evs[0] and evs[1]["updates"][0]["kind"] == "x"
