"""`iadgpt run` as a process: events for every frame read, clean exit on SIGTERM."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from iadgpt.cli import main

from conftest import write_parts


def _run(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "iadgpt.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_loses_no_event(tiny_bundle_path, tmp_path):
    events = tmp_path / "events.jsonl"
    proc = _run(["run", str(tiny_bundle_path), "--source", "synthetic://part?size=128&seed=5&fps=10",
                 "--events", str(events)])
    deadline = time.time() + 120
    while time.time() < deadline and (not events.exists() or len(events.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    frames_read = int(out.split("frames ")[-1].split(",")[0])
    assert len(lines) == frames_read >= 5
    assert [e["frame_id"] for e in lines] == list(range(frames_read))


def test_corrupt_image_in_a_folder_is_an_error_event(tiny_bundle_path, tmp_path):
    folder = tmp_path / "imgs"
    write_parts(folder, 3, seed=21)
    (folder / "good_001.png").write_bytes(b"\x89PNG not really")
    events = tmp_path / "events.jsonl"
    proc = _run(["run", str(tiny_bundle_path), "--source", str(folder), "--events", str(events)])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    assert len(lines) == 3
    assert lines[1]["error"] and "good_001.png" in lines[1]["error"]
    assert lines[0]["error"] is None and lines[2]["error"] is None


def test_a_source_that_gives_up_ends_the_run_with_a_failure_status(tiny_bundle_path, tmp_path):
    """Status 0 read as a finished job to a service manager, which then never restarted the station."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG not really")
    proc = _run(["run", str(tiny_bundle_path), "--source", str(folder), "--loop"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "the source gave up" in out, out


def test_config_errors_exit_non_zero_naming_the_key(tmp_path, tiny_bundle_path):
    cfg = tmp_path / "station.yaml"
    cfg.write_text(f"bundle: {tiny_bundle_path}\nsource: synthetic://part\nbackend: onnxruntime\nsinkz: {{}}\n")
    proc = _run(["run", "--station", str(cfg)])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "sinkz" in out


def test_a_nan_threshold_is_refused_not_a_station_that_passes_every_part(tiny_bundle_path):
    proc = _run(["run", str(tiny_bundle_path), "--source", "synthetic://part?count=3", "--threshold", "nan"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--threshold nan is not a finite number" in out


def test_a_bundle_that_cannot_judge_a_frame_stops_the_run_at_start(tiny_bundle_path, tmp_path):
    """Not an error event for every part and exit 0 (forever, on a camera): one `error:` line, status 2."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle_path, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    graphs = manifest["graphs"]
    graphs["encoder"], graphs["scorer"] = graphs["scorer"], graphs["encoder"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    events = tmp_path / "events.jsonl"
    proc = _run(["run", str(broken), "--source", "synthetic://part?size=128&count=3", "--events", str(events)])
    out, _ = proc.communicate(timeout=120)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, out
    assert "cannot judge a frame" in errors[0] and "missing input" in errors[0] and "re-export" in errors[0]
    assert not events.exists() or not events.read_text().strip()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_frames_below_one_is_refused_before_anything_opens(value, capsys):
    from iadgpt.cli import main

    assert main(["run", "/nonexistent/bundle", "--source", "/nonexistent/folder", "--max-frames", value]) == 2
    err = capsys.readouterr().err
    assert f"--max-frames {value} must be at least 1" in err and "nonexistent" not in err


def test_max_overlays_bounds_the_overlay_folder(tiny_bundle_path, tmp_path):
    # `--overlays DIR` kept every NG picture: ~8 GB a day at 10 fps and 60 % NG
    ng = tmp_path / "ng"
    proc = _run(["run", str(tiny_bundle_path), "--source", "synthetic://part?size=128&seed=7&count=8&fps=5",
                 "--overlays", str(ng), "--max-overlays", "2", "--threshold", "0"])  # every judged part NG
    out, _ = proc.communicate(timeout=120)
    flagged = int(out.split(" NG ")[-1].split(",")[0])  # a live source may drop a frame on a busy machine
    assert proc.returncode == 0 and flagged >= 3, out
    assert len(list(ng.iterdir())) == 2
    proc = _run(["run", str(tiny_bundle_path), "--source", "synthetic://part", "--overlays", str(ng),
                 "--max-overlays", "0"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--max-overlays 0 must be at least 1" in out


def test_run_forwards_every_flag_to_the_station_config(tmp_path, monkeypatch, capsys):
    from iadgpt.runtime import preflight

    seen = {}

    class FakePreflight:
        def __init__(self, cfg, *a, **k):
            seen["cfg"] = cfg

        def run(self):
            return []

    monkeypatch.setattr(preflight, "Preflight", FakePreflight)
    ev, ov = tmp_path / "e.jsonl", tmp_path / "ng"
    assert main(["run", str(tmp_path / "b"), "--source", "synthetic://part?count=1", "--backend", "torch",
                 "--threads", "3", "--threshold", "0.25", "--weights", str(tmp_path / "w"), "--events", str(ev),
                 "--overlays", str(ov), "--max-overlays", "4", "--check"]) == 0
    cfg = seen["cfg"]
    assert (cfg.bundle, cfg.source) == (tmp_path / "b", "synthetic://part?count=1")
    assert (cfg.backend, cfg.threads, cfg.threshold, cfg.weights) == ("torch", 3, 0.25, tmp_path / "w")
    assert cfg.sinks.events.path == ev and cfg.sinks.overlays.dir == ov and cfg.sinks.overlays.max_files == 4
    assert "backend torch" in capsys.readouterr().out


def test_run_stops_after_max_frames(tiny_bundle_path, tmp_path, capsys):
    events = tmp_path / "events.jsonl"
    assert main(["run", str(tiny_bundle_path), "--source", "synthetic://part?size=128&seed=3&count=8",
                 "--max-frames", "3", "--events", str(events)]) == 0
    assert len(events.read_text().splitlines()) == 3
