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
    printed = capsys.readouterr().out
    assert "NG frame" in printed and "capture to verdict p50" in printed  # not only inference: queueing too
    # second run reuses the cached, calibrated bundle
    assert main(["demo", "--out", str(tmp_path / "again"), "--frames", "5"]) == 0
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["bundle"] == summary["bundle"]
    assert not list((tmp_path / "cache").glob(".demo-build-*"))  # built in a staging folder, then swapped in
    # the same --out again: this run's output only (events were appended to the last run's)
    assert main(["demo", "--out", str(out), "--frames", "1"]) == 0
    one = json.loads((out / "summary.json").read_text())
    assert len((out / "events.jsonl").read_text().splitlines()) == 1
    assert len(list((out / "overlays").iterdir())) == one["flagged"]
    assert one["good"] == 0 and one["false_alarm_rate"] is None  # no rate over zero good parts
    assert "false alarms n/a of 0 good parts" in capsys.readouterr().out


def test_an_interrupted_build_leaves_nothing_and_old_leftovers_are_swept(tmp_path, monkeypatch):
    import os
    import time

    import iadgpt.demo as demo
    cache = tmp_path / "cache"
    monkeypatch.setenv("IADGPT_CACHE", str(cache))
    stale = cache / f"{demo.BUILD_PREFIX}killed"  # a SIGKILLed build's staging folder, two hours old
    stale.mkdir(parents=True)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = cache / f"{demo.BUILD_PREFIX}running"  # another demo building right now: left alone
    fresh.mkdir()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM (turned into the same) during the export

    import iadgpt.export.bundle_export as bundle_export
    monkeypatch.setattr(bundle_export, "export_bundle", killed)
    with pytest.raises(KeyboardInterrupt):
        demo.demo_bundle()
    assert sorted(p.name for p in cache.iterdir()) == [fresh.name]


def test_sigterm_during_the_build_unwinds_like_ctrl_c():
    # SIGTERM used to end the process at once, leaving the staging folders behind
    import os
    import signal
    import time

    from iadgpt.signals import sigterm_as_interrupt
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here at once
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("flags, words", [
    (["--backend", "../../x"], "the demo runs on onnxruntime, torch, cuda-graph"),
    (["--backend", "tensorrt"], "iadgpt build"),
    (["--fps", "nan"], "--fps nan"),
    (["--fps", "1e-300"], "(>= 0.1)"),
    (["--out", ""], "--out needs a folder name"),
])
def test_demo_refuses_bad_flags_before_building(tmp_path, monkeypatch, capsys, flags, words):
    import iadgpt.demo
    monkeypatch.setattr(iadgpt.demo, "demo_bundle", lambda *a, **k: pytest.fail("built the demo bundle"))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "d", "--frames", "5", *flags]) == 2
    assert words in capsys.readouterr().err


def test_demo_refuses_an_out_folder_holding_other_files(tmp_path, monkeypatch, capsys):
    import iadgpt.demo
    monkeypatch.setattr(iadgpt.demo, "demo_bundle", lambda *a, **k: pytest.fail("built the demo bundle"))
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--frames", "5"]) == 2
    assert "already holds files the demo did not write (mine.txt)" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"


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
