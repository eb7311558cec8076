"""`iadgpt run --check`: each part the station needs is opened and named ok / warn / fail; a real
frame is judged; nothing is written to the event log."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from iadgpt.cli import main
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
