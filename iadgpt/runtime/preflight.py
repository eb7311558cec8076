"""`iadgpt run --check`: commission a station before the line starts.

A station that starts anyway keeps running through a missing camera, a broker that is down or a
describer that cannot load its LLM (it retries, buffers and counts: the verdict loop must not
stop). That is right at 3 a.m. and wrong on the day it is installed, when the engineer wants each
of those named at once. This opens everything the station would, judges one real frame from the
source, and reports each part as ok / warn / fail; it writes no event.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import IadGptError

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "fail"
FAILED = object()  # what a step that failed returns (None is a fine result of some)
LOW_DISK_BYTES = 1 << 30  # under 1 GiB free: hours of overlays at line rate


def _without_station_identity(cfg: Any) -> Any:
    """The config with an MQTT client id of its own: a broker drops the older of two connections with
    one id, so checking with the station's would disconnect the station while it runs."""
    mqtt = cfg.sinks.mqtt
    if mqtt is None or mqtt.client_id is None:  # None: the sink picks a random one
        return cfg
    return replace(cfg, sinks=replace(cfg.sinks, mqtt=replace(mqtt, client_id=f"{mqtt.client_id}-check")))


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


class Preflight:
    """Runs the checks in the order the station starts; a failed step skips the ones that need it."""

    def __init__(self, config: Any, source_timeout_s: float = 10.0, broker_wait_s: float = 5.0,
                 describer_wait_s: float = 180.0) -> None:
        self.config = config
        self.source_timeout_s, self.broker_wait_s, self.describer_wait_s = source_timeout_s, broker_wait_s, describer_wait_s
        self.checks: list[Check] = []

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def _add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))
        log.debug("preflight %s: %s %s", name, status, detail)

    def _step(self, name: str, action: Callable[[], Any]) -> Any:
        """`action()`, or FAILED with a failed check naming the package's error (the fix is in its message)."""
        try:
            return action()
        except IadGptError as exc:
            self._add(name, FAIL, str(exc))
        except OSError as exc:
            self._add(name, FAIL, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        return FAILED

    def run(self) -> list[Check]:
        from ..bundle import Bundle
        from .config import build_sinks
        from .detector import Detector

        cfg = self.config
        bundle = self._step("bundle", lambda: Bundle.load(cfg.bundle))
        detector = FAILED
        if bundle is not FAILED:
            t0 = time.perf_counter()
            detector = self._step("detector", lambda: Detector(bundle, cfg.backend, threads=cfg.threads,
                                                               threshold=cfg.threshold,
                                                               weights=str(cfg.weights) if cfg.weights else None))
        sinks, describer = [], None
        try:
            if detector is not FAILED and self._step("detector", detector.self_check) is not FAILED:
                self._add("detector", OK, f"{Path(cfg.bundle).name} on {cfg.backend}, threshold "
                                          f"{detector.threshold:.4g}; opened and self-checked in "
                                          f"{time.perf_counter() - t0:.1f} s")
            sinks = self._step("sinks", lambda: build_sinks(_without_station_identity(cfg)))
            if sinks is not FAILED:
                self._check_sinks(sinks)
            frame = self._first_frame()
            if frame is not None and detector is not FAILED and not self._failed("detector"):
                self._judge(detector, frame)
            if cfg.describer.enabled:
                describer = self._describer(None if bundle is FAILED else bundle,
                                            None if detector is FAILED else detector)
        finally:
            if describer is not None:
                describer.close(drain_timeout_s=0)
            for sink in sinks if sinks is not FAILED else []:
                try:
                    sink.close()
                except Exception as exc:  # noqa: BLE001 - a check must still report
                    log.warning("closing %s: %s", getattr(sink, "name", sink), exc)
            if detector is not FAILED:
                detector.close()
        return self.checks

    def _failed(self, name: str) -> bool:
        return any(c.name == name and c.status == FAIL for c in self.checks)

    def _check_sinks(self, sinks: list) -> None:
        for sink in sinks:
            folder = getattr(sink, "directory", None) or (getattr(sink, "path", None) and Path(sink.path).parent)
            if folder is not None:
                free = shutil.disk_usage(folder).free
                status = OK if free >= LOW_DISK_BYTES else WARN
                self._add(sink.name.split(":")[0], status, f"{folder} writable, {free / (1 << 30):.1f} GiB free"
                          + ("" if status == OK else "; free space or lower max_bytes / max_files"))
            elif hasattr(sink, "connected"):
                deadline = time.monotonic() + self.broker_wait_s
                while not sink.connected and time.monotonic() < deadline:
                    time.sleep(0.05)
                where = f"{sink.host}:{sink.port}"
                self._add(sink.name, OK if sink.connected else WARN,
                          f"connected to {where}" if sink.connected else
                          f"no broker answered at {where} within {self.broker_wait_s:g} s (the station buffers "
                          "events until one does): start the broker or fix sinks.mqtt")

    def _first_frame(self) -> Any:
        from .sources import open_source

        source = self._step("source", lambda: open_source(self.config.source, reconnect=False))
        if source is FAILED:
            return None
        t0 = time.perf_counter()
        got: list = []
        # a driver whose read blocks (a camera waiting on a trigger, a hung USB link) would hang the check
        reader = threading.Thread(target=lambda: got.append(self._step("source", lambda: source.read(
            timeout=self.source_timeout_s))), name="preflight-read", daemon=True)
        reader.start()
        reader.join(self.source_timeout_s + 2.0)
        if reader.is_alive():
            self._add("source", FAIL, f"{self.config.source}: its read still blocks after {self.source_timeout_s:g} s "
                                      "(camera connected and streaming? trigger mode waiting for a part?)")
            return None  # not closed: closing under a blocked read can crash a driver; the process ends soon
        try:
            frame = got[0] if got else FAILED
            if frame is FAILED:
                return None
            if frame is None:
                self._add("source", FAIL, f"{self.config.source}: no frame within {self.source_timeout_s:g} s "
                                          "(camera connected and streaming? trigger mode waiting for a part?)")
                return None
            if frame.image is None:
                self._add("source", WARN, f"{self.config.source}: the first frame could not be decoded "
                                          f"({frame.meta.get('error', '?')}); the station gives such frames an error "
                                          "event and reads on")
                return None
            h, w = frame.image.shape[:2]
            self._add("source", OK, f"{self.config.source}: first frame {w}x{h} in {time.perf_counter() - t0:.2f} s")
            return frame
        finally:
            source.close()

    def _judge(self, detector: Any, frame: Any) -> None:
        t0 = time.perf_counter()
        verdict = self._step("verdict", lambda: detector.detect(frame))
        if verdict is FAILED:
            return
        self._add("verdict", OK, f"that frame is {'NG' if verdict.anomalous else 'OK'}: score {verdict.score:.4g}, "
                                 f"threshold {verdict.threshold:.4g}, {len(verdict.regions)} region(s), "
                                 f"{1000 * (time.perf_counter() - t0):.0f} ms (the first call; "
                                 "benchmarks/latency.py measures the rate)")

    def _describer(self, bundle: Any, detector: Any) -> Optional[Any]:
        from .describer import AsyncDescriber
        from .station import check_features_fit_the_bridge

        t0 = time.perf_counter()
        describer = self._step("describer", lambda: AsyncDescriber.from_options(self.config.describer.options, bundle))
        if describer is FAILED:
            return None
        if describer.wants_features and detector is not None \
                and self._step("describer", lambda: check_features_fit_the_bridge(detector)) is FAILED:
            return describer  # the station refuses to start with this pair: no need to wait for the worker
        deadline = time.monotonic() + self.describer_wait_s
        while not describer.wait_ready(0.2) and time.monotonic() < deadline:
            if describer.worker_info.get("error"):  # it failed loading: waiting on would only watch it retry
                break
        if describer.wait_ready(0):
            self._add("describer", OK, f"worker ready in {time.perf_counter() - t0:.1f} s")
        else:
            error = describer.worker_info.get("error")
            self._add("describer", FAIL, f"worker not ready after {time.perf_counter() - t0:.0f} s"
                                         + (f": {error}" if error else "") + " (the station would run without "
                                         "descriptions and retry): check describer.llm")
        return describer
