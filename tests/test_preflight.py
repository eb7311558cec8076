"""`iadgpt run --check`: each part the station needs is opened and named ok / warn / fail; a real
frame is judged; nothing is written to the event log."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from iadgpt.cli import main
from iadgpt.errors import IadGptError
from iadgpt.runtime.config import load_station_config
from iadgpt.runtime.preflight import FAIL, OK, WARN, Preflight

from conftest import write_parts


def _yaml(tmp_path: Path, bundle: Path, source: str, extra: str = "") -> Path:
    path = tmp_path / "station.yaml"
    path.write_text(f"bundle: {bundle}\nsource: {source}\nthreads: 1\nsinks:\n  events:\n    path: ev/events.jsonl\n"
                    f"  overlays:\n    dir: ov\n{extra}")
    return path


def _status(checks) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def test_a_ready_station_passes_and_judges_a_real_frame_without_writing_an_event(tmp_path, tiny_bundle_path):
    folder = tmp_path / "parts"
    write_parts(folder, 2, seed=3)
    checks = Preflight(load_station_config(_yaml(tmp_path, tiny_bundle_path, str(folder)))).run()
    assert _status(checks) == {"detector": OK, "overlays": OK, "events": OK, "source": OK, "verdict": OK}
    verdict = next(c for c in checks if c.name == "verdict").detail
    assert "score" in verdict and "threshold" in verdict
    assert (tmp_path / "ev" / "events.jsonl").read_text() == "" and not list((tmp_path / "ov").iterdir())


def test_every_problem_is_named_in_one_go(tmp_path, tiny_bundle_path):
    """A bad bundle, a missing camera and an unreachable broker: all three reported, not the first only,
    and the station's own retries (reconnect, buffering) do not hide them."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle_path, broken)
    (broken / "manifest.json").unlink()
    cfg = load_station_config(_yaml(tmp_path, broken, "/dev/video9",
                                    "  mqtt:\n    host: 127.0.0.1\n    port: 9\n"))
    pytest.importorskip("paho.mqtt.client")
    checks = Preflight(cfg, broker_wait_s=0.5).run()
    status = _status(checks)
    assert status["bundle"] == FAIL and status["source"] == FAIL and status["mqtt"] == WARN
    assert "detector" not in status and "verdict" not in status  # nothing to judge with
    detail = {c.name: c.detail for c in checks}
    assert "iadgpt export" in detail["bundle"] and "/dev/video9" in detail["source"]


def test_the_cli_prints_the_checks_and_exits_1_on_a_failure(tmp_path, tiny_bundle_path, capsys):
    assert main(["run", "--station", str(_yaml(tmp_path, tiny_bundle_path, "synthetic://part?size=128&count=2")),
                 "--check"]) == 0
    out = capsys.readouterr().out
    assert "OK   verdict: that frame is" in out and out.rstrip().endswith("ready: every check passed")
    assert main(["run", str(tiny_bundle_path), "--source", str(tmp_path / "nothing-here.mp4"), "--check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL source:" in out and "1 check(s) failed (source)" in out


def test_a_camera_whose_read_blocks_fails_the_check_instead_of_hanging_it(tmp_path, tiny_bundle_path, monkeypatch):
    import threading

    from iadgpt.runtime import sources

    release = threading.Event()

    class Blocked:
        def read(self, timeout=None):
            release.wait(30)  # a driver that ignores the timeout
            return None

        def close(self):
            pass

    monkeypatch.setattr(sources, "open_source", lambda uri, **kw: Blocked())
    try:
        checks = Preflight(load_station_config(_yaml(tmp_path, tiny_bundle_path, "/dev/video0")),
                           source_timeout_s=0.3).run()
    finally:
        release.set()
    source = next(c for c in checks if c.name == "source")
    assert source.status == FAIL and "still blocks" in source.detail


def test_the_check_connects_to_mqtt_under_an_id_of_its_own(tmp_path, tiny_bundle_path):
    """A broker drops the older of two connections with one client id: the running station's."""
    from iadgpt.runtime.preflight import _without_station_identity
    cfg = load_station_config(_yaml(tmp_path, tiny_bundle_path, "synthetic://part",
                                    "  mqtt:\n    host: 127.0.0.1\n    client_id: line1\n"))
    assert _without_station_identity(cfg).sinks.mqtt.client_id == "line1-check"
    assert cfg.sinks.mqtt.client_id == "line1"


def test_a_bridge_the_int8_encoder_would_break_fails_the_check_as_the_station_refuses_it(tmp_path, tiny_bundle_path,
                                                                                        monkeypatch):
    """`--check` said "ready" for this pair, and the station then refused to start."""
    from iadgpt.runtime import describer as describer_mod

    class StubDescriber:
        wants_features, worker_info = True, {}

        def wait_ready(self, timeout=None):
            return True

        def close(self, drain_timeout_s=None):
            pass

    monkeypatch.setattr(describer_mod.AsyncDescriber, "from_options", classmethod(lambda cls, *a, **k: StubDescriber()))
    int8 = SimpleNamespace(precision="int8", bundle=SimpleNamespace(
        path=tiny_bundle_path, extra={"calibration": {"int8": {"cosine": {"f0": 0.9}}}}))
    pf = Preflight(load_station_config(_yaml(tmp_path, tiny_bundle_path, "synthetic://part",
                                             "describer:\n  enabled: true\n  llm: none\n")))
    pf._describer(None, int8)
    assert [(c.name, c.status) for c in pf.checks] == [("describer", FAIL)] and "cosine 0.900" in pf.checks[0].detail


def test_low_disk_space_is_a_warning(tmp_path, monkeypatch):
    from iadgpt.runtime import preflight as pre
    monkeypatch.setattr(pre.shutil, "disk_usage", lambda p: SimpleNamespace(free=100 << 20, total=1 << 40, used=0))
    pf = pre.Preflight(SimpleNamespace())
    pf._check_sinks([SimpleNamespace(directory=tmp_path, name="overlays")])
    assert [(c.name, c.status) for c in pf.checks] == [("overlays", pre.WARN)] and "free space" in pf.checks[0].detail


def test_a_describer_that_failed_loading_is_reported_without_waiting(monkeypatch):
    from iadgpt.runtime import describer as describer_mod
    from iadgpt.runtime import preflight as pre

    class Failing:
        wants_features, worker_info = False, {"error": "DescriberError: no llm.json"}

        def wait_ready(self, timeout=None):
            time.sleep(timeout or 0)
            return False

    monkeypatch.setattr(describer_mod.AsyncDescriber, "from_options", classmethod(lambda cls, *a, **k: Failing()))
    pf = pre.Preflight(SimpleNamespace(describer=SimpleNamespace(options={})), describer_wait_s=8.0)
    t0 = time.monotonic()
    pf._describer(None, None)
    assert time.monotonic() - t0 < 3.0
    assert pf.checks[0].status == pre.FAIL and "no llm.json" in pf.checks[0].detail


def test_a_detector_that_fails_its_self_check_judges_no_frame(monkeypatch):
    import iadgpt.bundle
    from iadgpt.runtime import config as config_mod
    from iadgpt.runtime import detector as detector_mod
    from iadgpt.runtime import preflight as pre

    judged = []

    class BadDetector:
        threshold = 0.5

        def __init__(self, *a, **k):
            pass

        def self_check(self):
            raise IadGptError("self-check: outputs differ from the bundle's reference")

        def detect(self, frame):
            judged.append(frame)
            return SimpleNamespace(anomalous=False, score=0.1, threshold=0.5, regions=[])

        def close(self):
            pass

    monkeypatch.setattr(iadgpt.bundle.Bundle, "load", staticmethod(lambda p: object()))
    monkeypatch.setattr(detector_mod, "Detector", BadDetector)
    monkeypatch.setattr(config_mod, "build_sinks", lambda cfg: [])
    cfg = SimpleNamespace(bundle="b", backend="onnxruntime", threads=1, threshold=None, weights=None,
                          sinks=SimpleNamespace(mqtt=None), describer=SimpleNamespace(enabled=False))
    pf = pre.Preflight(cfg)
    pf._first_frame = lambda: SimpleNamespace(image=np.zeros((8, 8, 3), np.uint8))
    checks = pf.run()
    assert [(c.name, c.status) for c in checks] == [("detector", pre.FAIL)] and not judged


def test_preflight_failed_means_a_fail_not_a_warn():
    from iadgpt.runtime import preflight as pre
    pf = pre.Preflight(SimpleNamespace())
    pf._add("mqtt", pre.WARN, "no broker")
    assert not pf.failed
    pf._add("source", pre.FAIL, "no camera")
    assert pf.failed
