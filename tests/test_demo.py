"""`iadgpt demo` end to end on a fresh cache: the README's first command must work offline."""
from __future__ import annotations

import json

import pytest

from iadgpt.cli import main


def test_demo_flags_defects_and_passes_good_parts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IADGPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--frames", "60"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"frames", "flagged", "recall", "false_alarm_rate", "latency_ms", "backend", "bundle"} <= set(summary)
    assert summary["frames"] == 60 and summary["backend"] == "onnxruntime"
    assert summary["defective"] > 5 and summary["recall"] >= 0.9
    assert summary["false_alarm_rate"] <= 0.05
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert len(events) == summary["frames"]  # one event per frame read, dropped ones included
    flagged = [e for e in events if e["anomalous"]]
    assert len(flagged) == summary["flagged"] and all(e["regions"] for e in flagged)
    assert len(list((out / "overlays").iterdir())) == summary["flagged"]
    assert "NG frame" in capsys.readouterr().out
    # second run reuses the cached, calibrated bundle
    assert main(["demo", "--out", str(tmp_path / "again"), "--frames", "5"]) == 0
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["bundle"] == summary["bundle"]


@pytest.mark.parametrize("frames", ["0", "-3"])
def test_demo_refuses_no_frames_before_building(tmp_path, monkeypatch, capsys, frames):
    import iadgpt.demo
    monkeypatch.setattr(iadgpt.demo, "demo_bundle", lambda *a, **k: pytest.fail("built the demo bundle"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--frames", frames]) == 2
    assert f"error: --frames {frames}: " in capsys.readouterr().err
    assert not out.exists()  # no summary.json with NaN latencies


def test_demo_refuses_a_file_as_out(tmp_path, monkeypatch, capsys):
    import iadgpt.demo
    monkeypatch.setattr(iadgpt.demo, "demo_bundle", lambda *a, **k: pytest.fail("built the demo bundle"))
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(["demo", "--out", str(afile), "--frames", "5"]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "keep me"
