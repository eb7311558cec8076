"""`iadgpt demo` end to end on a fresh cache: the README's first command must work offline."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from iadgpt.cli import main

from conftest import rewrite_manifest


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


class _Stop(Exception):
    pass


SUMMARY = {"frames": 50, "judged": 50, "flagged": 11, "recall": 0.9, "false_alarm_rate": 0.025, "defective": 10,
           "good": 40, "dropped": 1, "errors": 2, "latency_ms": {"p50": 1.5, "p99": 9.0},
           "capture_to_verdict_ms": {"p50": 2.5, "p99": 12.0}, "fps": 19.5, "backend": "torch",
           "threshold": 1.0, "bundle": "b", "events": "e", "overlays": "o"}

def test_demo_command_forwards_flags_and_prints_the_summary(tmp_path, monkeypatch, capsys):
    import iadgpt.demo

    seen = {}

    def fake(out, **kwargs):
        seen.update(kwargs, out=out)
        return SUMMARY

    monkeypatch.setattr(iadgpt.demo, "run_demo", fake)
    assert main(["demo", "--out", str(tmp_path / "d"), "--frames", "50", "--fps", "0", "--backend", "torch",
                 "--threads", "2", "--rebuild"]) == 0
    assert {k: seen[k] for k in ("frames", "fps", "backend", "threads", "rebuild")} == \
        {"frames": 50, "fps": 0.0, "backend": "torch", "threads": 2, "rebuild": True}
    out = capsys.readouterr().out
    assert "recall 90.0% of 10 defective parts, false alarms 2.5% of 40 good parts" in out
    assert "inference p50 1.5 ms, p99 9.0 ms" in out and "dropped 1, errors 2" in out


def _verdict(anomalous, timings=None):
    return SimpleNamespace(anomalous=anomalous, regions=[], frame_id=0, score=1.0, threshold=0.5,
                           timings_ms=timings or {"encode": 2.0, "score": 1.0, "capture_wait": 50.0, "total": 53.0})

def test_ground_truth_sink_counts_and_latency():
    from iadgpt.demo import GroundTruthSink

    sink = GroundTruthSink()
    bad, good = SimpleNamespace(meta={"defect_type": "hole"}), SimpleNamespace(meta={"defect_type": None})
    for v, f in [(True, bad), (True, bad), (False, bad), (True, good), (False, good), (False, good), (False, good)]:
        sink.write(_verdict(v), f)
    sink.write(_verdict(None), bad)  # dropped or unreadable: not judged, not counted either way
    sink.write(_verdict(None), good)
    assert (sink.tp, sink.fn, sink.fp, sink.tn, sink.flagged) == (2, 1, 1, 3, 3)
    assert sink.judged_latency_ms == [3.0] * 7  # inference only: not the capture wait, not the total


@pytest.mark.parametrize("threshold, slow", [(None, False), (1.0, False), (None, True)])
def test_demo_summary_matches_its_events_and_the_ground_truth(tiny_bundle_path, tmp_path, monkeypatch, threshold,
                                                             slow):
    """recall = flagged defective / defective, false alarms = flagged good / good, from the stream's truth,
    dropped = the dropped frames' events. The tiny bundle's own threshold gives false alarms, 1.0 misses;
    a detector slower than the camera drops frames (not counted as good or defective). --fps 0 (unpaced)
    is accepted. The demo bundle is replaced by the tiny one: no build."""
    import time

    import iadgpt.demo as demo
    from iadgpt.bundle import Bundle
    from iadgpt.runtime.detector import Detector
    from iadgpt.runtime.synthetic import SyntheticProduct

    if slow:
        detect = Detector.detect
        monkeypatch.setattr(Detector, "detect", lambda self, frame: (time.sleep(0.1), detect(self, frame))[1])

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_path, bundle)
    if threshold is not None:
        rewrite_manifest(bundle, lambda m: m["thresholds"]["image"].update(value=threshold))
    monkeypatch.setattr(demo, "demo_bundle", lambda *a, **k: Bundle.load(bundle))
    s = demo.run_demo(tmp_path / "out", frames=30, fps=50 if slow else 0)
    truth = SyntheticProduct(kind=demo.DEMO_KIND, size=demo.DEMO_SIZE, seed=demo.STREAM_SEED, defect_rate=0.3)
    events = [json.loads(x) for x in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    judged = [(e["anomalous"], truth.defect_type(e["frame_id"]) is not None) for e in events
              if e["anomalous"] is not None]
    tp = sum(a and d for a, d in judged)
    fn = sum(not a and d for a, d in judged)
    fp = sum(a and not d for a, d in judged)
    tn = sum(not a and not d for a, d in judged)
    assert tp + fn > 0 and fp + tn > 0 and fp != fn, (tp, fn, fp, tn)  # the arithmetic is exercised
    assert (fn > 0) if threshold == 1.0 else (fp > 0), (tp, fn, fp, tn)  # 1.0 misses; the own threshold false-alarms
    assert (s["defective"], s["good"], s["flagged"]) == (tp + fn, fp + tn, tp + fp)
    assert s["recall"] == pytest.approx(tp / (tp + fn)) and s["false_alarm_rate"] == pytest.approx(fp / (fp + tn))
    dropped = sum(1 for e in events if (e["error"] or "").startswith("dropped"))
    assert s["dropped"] == dropped and (dropped > 0 or not slow)
    assert len(events) == 30 == len(judged) + dropped


@pytest.fixture()
def cached_demo(tiny_bundle_path, tmp_path, monkeypatch):
    """A calibrated bundle where the onnxruntime demo bundle is cached; building raises _Stop."""
    import iadgpt.demo as demo
    import iadgpt.export.bundle_export as bundle_export

    monkeypatch.setenv("IADGPT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cache" / f"demo-{demo.DEMO_KIND}-onnxruntime-v{demo.__version__}"
    shutil.copytree(tiny_bundle_path, path)

    def build(*a, **k):
        raise _Stop

    monkeypatch.setattr(bundle_export, "export_bundle", build)
    return demo, path

def test_demo_bundle_reuses_only_a_calibrated_bundle_of_this_backend_and_version(cached_demo, monkeypatch):
    demo, path = cached_demo
    assert demo.demo_bundle("onnxruntime").path == path  # cached: no build
    with pytest.raises(_Stop):  # thresholds fitted on onnxruntime do not serve torch
        demo.demo_bundle("torch")
    with pytest.raises(_Stop):
        demo.demo_bundle("onnxruntime", rebuild=True)
    monkeypatch.setattr(demo, "__version__", "0.0.0-other")
    with pytest.raises(_Stop):  # another version's bundle is not reused
        demo.demo_bundle("onnxruntime")


def test_demo_bundle_rebuilds_an_uncalibrated_cache(cached_demo):
    demo, path = cached_demo
    rewrite_manifest(path, lambda m: m.update(thresholds={}))
    with pytest.raises(_Stop):
        demo.demo_bundle("onnxruntime")
