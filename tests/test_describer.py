"""The describer: prompt/description composition, the contradiction guard, the worker process
(bounded queue, per-request timeout, restart after a kill) with a fake LLM, and one test with the
real int4 SmolLM2 on synthetic defects (skipped when its package is absent)."""
from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from iadgpt.cli import main
from iadgpt.runtime.describer import AsyncDescriber, Describer, DescribeRequest, FakeLLM
from iadgpt.runtime.facts import compute_facts, grid_position
from iadgpt.runtime.sinks import JsonlSink, read_events
from iadgpt.runtime.sources import Frame
from iadgpt.runtime.synthetic import SyntheticProduct
from iadgpt.runtime.verdict import Region, Verdict
from iadgpt.runtime.wording import contradictions

from conftest import skip_unless_the_default_llm_builds


def _flagged(frame_id: int, size: int = 96, box=(10, 10, 30, 22), value: float = 1.0):
    """A verdict + frame with one dark rectangular defect at `box` (frame px)."""
    img = np.full((size, size, 3), 170, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 60
    amap = np.zeros((size, size), np.float32)
    amap[y0:y1, x0:x1] = value
    region = Region(box=box, area_px=(x1 - x0) * (y1 - y0), peak=value, centroid=((x0 + x1) / 2, (y0 + y1) / 2))
    verdict = Verdict(frame_id=frame_id, timestamp=time.time(), score=value, threshold=0.5, anomalous=True,
                      regions=[region], source="test", frame_shape=img.shape, anomaly_map=amap)
    return verdict, Frame(image=img, frame_id=frame_id, timestamp=verdict.timestamp, source="test")


def _facts(box=(10, 10, 30, 22), size=96, defect_type="unknown"):
    verdict, frame = _flagged(0, size, box)
    facts = compute_facts(frame.image, verdict.anomaly_map, verdict.regions, threshold=0.5)
    for r in facts.regions:
        r.defect_type = defect_type
    return facts


def test_grid_rows_and_columns_are_not_swapped():
    box = (0, 0, 90, 60)
    assert grid_position(5, 5, box)[2] == "top left"
    assert grid_position(85, 5, box)[2] == "top right"
    assert grid_position(5, 55, box)[2] == "bottom left"
    assert grid_position(45, 30, box)[2] == "center"
    assert grid_position(45, 55, box)[2] == "bottom"
    assert grid_position(85, 30, box)[2] == "right"


def test_describer_with_fake_llm_is_deterministic():
    verdict, frame = _flagged(1, box=(60, 70, 90, 80))
    req = DescribeRequest.from_verdict(verdict, frame.image)
    d = Describer(FakeLLM(), "flange")
    a, b = d.describe(req), d.describe(req)
    assert a["description"] == b["description"] and a["status"] == "ok"
    assert "bottom right" in a["description"]
    assert a["facts"]["regions"][0]["position"] == "bottom right"
    assert len(a["description"].split()) <= 60


# ----------------------------------------------------------------------------- the worker process


@pytest.fixture
def events(tmp_path):
    sink = JsonlSink(tmp_path / "events.jsonl", fsync="never")
    yield sink
    sink.close()


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_async_describer_appends_to_the_event(events):
    d = AsyncDescriber({"kind": "fake", "delay_s": 0.01}, product="flange", sinks=[events], timeout_s=10)
    try:
        assert d.wait_ready(60)
        for i in range(3):
            verdict, frame = _flagged(i)
            events.write(verdict, frame)
            t0 = time.perf_counter()
            d.submit(verdict, frame)
            assert time.perf_counter() - t0 < 0.05  # submit returns at once
        assert _wait(lambda: d.stats.described == 3)
    finally:
        stats = d.close()
    assert stats.failed == 0
    evs = read_events(events.path)
    assert len(evs) == 3
    for ev in evs:
        (upd,) = ev["updates"]
        assert upd["status"] == "ok" and "top left" in upd["description"]


def test_queue_full_marks_the_part_failed(events):
    d = AsyncDescriber({"kind": "fake", "delay_s": 0.5}, sinks=[events], queue_size=1, timeout_s=10)
    try:
        assert d.wait_ready(60)
        for i in range(4):
            d.submit(*_flagged(i))
        assert _wait(lambda: d.stats.described + d.stats.failed == 4)
    finally:
        d.close()
    assert d.stats.rejected >= 1
    failed = [r for r in d.results.values() if r["status"] == "failed"]
    assert failed and "queue full" in failed[0]["error"]


def test_timeout_kills_and_restarts_the_worker(events):
    # idle=False: on a busy CI box a SCHED_IDLE worker could miss even a short deadline
    d = AsyncDescriber({"kind": "fake", "hang_on": "bottom right"}, sinks=[events], timeout_s=3.0, idle=False)
    try:
        assert d.wait_ready(60)
        first_pid = d.worker_pid
        hang, ok = _flagged(0, box=(60, 70, 90, 80)), _flagged(1)
        d.submit(*hang)  # hangs the fake LLM
        d.submit(*ok)
        assert _wait(lambda: d.stats.described + d.stats.failed == 2, 60)
    finally:
        d.close()
    assert d.stats.timeouts == 1 and d.stats.restarts == 1, (d.stats, dict(d.results))
    assert d.results[hang[0].event_id]["status"] == "failed" and "timeout" in d.results[hang[0].event_id]["error"]
    assert d.results[ok[0].event_id]["status"] == "ok"
    assert first_pid is not None


def test_what_the_describer_keeps_in_the_station_process_is_bounded():
    # a station describes for months: 10,000 kept records were ~85 MB, latencies a list that only grew
    from iadgpt.errors import ConfigError
    from iadgpt.runtime.describer import LATENCY_WINDOW, DescriberStats, _check_option_types
    stats = DescriberStats()
    stats.latencies_s.extend(range(LATENCY_WINDOW + 10))
    assert len(stats.latencies_s) == LATENCY_WINDOW and stats.to_dict()["latency_p50_s"] > 10
    d = AsyncDescriber({"kind": "fake"}, start=False)
    assert d.keep_results == 256
    for i in range(300):
        d._deliver(f"e{i}", {"status": "ok"})
    assert len(d.results) == 256 and "e299" in d.results and "e0" not in d.results
    with pytest.raises(ConfigError, match="describer.keep_results: expected an integer"):
        _check_option_types({"keep_results": "all"})


def test_ctrl_c_at_the_terminal_does_not_kill_the_worker(tmp_path):
    """Ctrl-C reaches the whole process group; the worker used to die of it (its queued parts lost, a
    new worker started during the shutdown). The station stops it after the drain instead."""
    # a worker inherits an ignored SIGINT (a test run in the background of a script): start it with Python's own
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        d = AsyncDescriber({"kind": "fake", "delay_s": 0.0}, product="flange", timeout_s=20)
    finally:
        signal.signal(signal.SIGINT, before)
    try:
        assert d.wait_ready(60)
        pid = d.worker_pid
        os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        assert d.worker_pid == pid and d.stats.restarts == 0
        verdict, frame = _flagged(1)
        d.submit(verdict, frame)
        assert _wait(lambda: d.stats.described == 1, 30)
    finally:
        stats = d.close()
    assert stats.worker_deaths == 0 and stats.restarts == 0  # the Ctrl-C killed nothing: no death, no restart


def test_killing_the_worker_mid_run_fails_that_part_and_the_loop_goes_on(tmp_path):
    """The station loop runs on; the killed request's event gets a failed record; the next is described."""
    from iadgpt.runtime.station import Station

    sink = JsonlSink(tmp_path / "events.jsonl", fsync="never")
    d = AsyncDescriber({"kind": "fake", "delay_s": 1.0}, product="flange", timeout_s=20)
    assert d.wait_ready(60)
    shared = d.share([sink])

    class Source:
        uri, reconnects, errors, ended = "list://", 0, 0, False

        def __init__(self):
            self.items = [_flagged(i)[1] for i in range(12)]

        def read(self, timeout=None):
            if not self.items:
                self.ended = True
                return None
            time.sleep(0.05)
            return self.items.pop(0)

        def __iter__(self):
            return iter(())

        def close(self):
            pass

    class Det:
        def detect(self, frame):
            v, _ = _flagged(frame.frame_id)
            return v

    killed = {}

    def killer():
        assert _wait(lambda: d._busy is not None and d.worker_pid is not None, 30)
        killed["event"] = d._busy.event_id
        killed["pid"] = d.worker_pid
        os.kill(killed["pid"], signal.SIGKILL)

    import threading
    t = threading.Thread(target=killer)
    t.start()
    stats = Station(Det(), Source(), shared, describer=d, stats_interval_s=60).run()
    t.join()
    assert stats.judged == 12  # the loop went on (describer_errors counts the killed part once it is recorded)
    d.close(drain_timeout_s=120)
    assert d.stats.worker_deaths == 1 and d.stats.restarts >= 1
    evs = {e["event_id"]: e for e in read_events(sink.path)}
    assert len(evs) == 12
    dead = evs[killed["event"]]["updates"][-1]
    assert dead["status"] == "failed" and "died" in dead["error"]
    others = [e["updates"][-1]["status"] for k, e in evs.items() if k != killed["event"]]
    assert "ok" in others  # the restarted worker described later parts
    assert d.worker_pid is None  # stopped at close


def test_a_crashing_llm_fails_each_part_with_its_exit_code_and_restarts_back_off():
    d = AsyncDescriber({"kind": "fake", "crash_on": "flange"}, product="flange", timeout_s=10, idle=False)
    try:
        parts = [_flagged(i) for i in range(3)]
        for verdict, frame in parts:
            d.submit(verdict, frame)
        assert _wait(lambda: d.stats.failed == 3, 60)
    finally:
        d.close(drain_timeout_s=0)
    errors = [d.results[v.event_id]["error"] for v, _ in parts]
    assert all("died (exit code 3)" in e for e in errors), errors  # the real code, not None
    assert d.stats.worker_deaths == 3 and d._restarts_in_row == 3  # next restart waits 2 s, then 4 s ...
    assert d._backoff(d._restarts_in_row - 1) == 2.0


def test_close_does_not_wait_for_a_worker_that_cannot_start():
    d = AsyncDescriber({"kind": "onnx", "dir": "/nonexistent-llm", "threads": 1}, start_timeout_s=120)
    parts = [_flagged(i) for i in range(2)]
    for verdict, frame in parts:
        d.submit(verdict, frame)
    assert _wait(lambda: d._start_failures >= 1, 60)
    t0 = time.monotonic()
    d.close()  # the default drain would allow (2 + 1) x timeout + 120 s
    assert time.monotonic() - t0 < 30
    assert all(d.results[v.event_id]["status"] == "failed" for v, _ in parts)


def _busy_describer(n_parts):
    """A describer whose worker is 30 s into the first of `n_parts` parts (the others queued)."""
    d = AsyncDescriber({"kind": "fake", "delay_s": 30.0}, timeout_s=60, idle=False)
    try:
        assert d.wait_ready(60)
        parts = [_flagged(i) for i in range(n_parts)]
        for verdict, frame in parts:
            d.submit(verdict, frame)
        assert _wait(lambda: d._busy is not None)
    except BaseException:
        d.close(drain_timeout_s=0)
        raise
    return d, parts


def test_abort_drain_fails_the_queued_parts_at_once():
    d, parts = _busy_describer(3)
    d.abort_drain()  # what a second SIGTERM does in `iadgpt run`
    t0 = time.monotonic()
    d.close()
    assert time.monotonic() - t0 < 20  # not the 30 s the part in the worker would take
    assert [d.results[v.event_id]["status"] for v, _ in parts] == ["failed"] * 3
    assert all("stopped before" in d.results[v.event_id]["error"] for v, _ in parts)


def test_the_part_in_the_worker_is_failed_when_the_drain_time_is_up():
    """`close(drain_timeout_s)` is a bound on the whole stop: the part being described then is
    failed with the queued ones, not waited for until its own `timeout_s`."""
    d, parts = _busy_describer(2)
    t0 = time.monotonic()
    d.close(drain_timeout_s=1.0)
    assert time.monotonic() - t0 < 15  # not the 30 s the part in the worker would take
    assert [d.results[v.event_id]["status"] for v, _ in parts] == ["failed"] * 2
    assert d.worker_pid is None


# ----------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    skip_unless_the_default_llm_builds()
    from iadgpt.export.llm import ensure_default_llm
    from iadgpt.runtime.llm_runtime import OnnxLLM

    return OnnxLLM(ensure_default_llm(4), threads=2)


def test_real_smollm2_descriptions_agree_with_the_facts(smollm2):
    product = SyntheticProduct(kind="part", size=256, seed=11, defect_rate=1.0)
    describer = Describer(smollm2, "metal flange", max_new_tokens=32)
    seen = 0
    for i in range(6):
        s = product.sample(i)
        ys, xs = np.nonzero(s.mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        verdict = Verdict(frame_id=i, timestamp=0.0, score=1.0, threshold=0.5, anomalous=True, source="syn",
                          regions=[Region(box=box, area_px=int(s.mask.sum()), peak=1.0, centroid=(xs.mean(), ys.mean()))],
                          anomaly_map=s.mask.astype(np.float32))
        req = DescribeRequest.from_verdict(verdict, s.image)
        describer.typer = SimpleNamespace(classify=lambda r, e, t=s.defect_type: (t, "test", 1.0))
        facts = describer.facts(req)
        record = describer.describe(req)
        text = record["description"]
        region = record["facts"]["regions"][0]
        # position of the exact mask on the part's 3x3 grid
        assert region["position"] == grid_position(xs.mean(), ys.mean(), record["facts"]["part_box"])[2]
        assert region["position"] in text and s.defect_type in text.lower()
        assert not contradictions(text, facts), (text, contradictions(text, facts))
        assert len(text.split()) <= 60
        assert record["llm"]["new_tokens"] >= 1
        seen += record["llm"]["remark_used"]
    assert seen >= 1  # the model's remark survived the guard at least once


def test_real_smollm2_kv_cache_matches_full_pass(smollm2):
    ids = smollm2.encode(smollm2.format_chat([{"role": "user", "content": "Describe a scratch."}], True))
    full = smollm2.logits(ids)
    last, past = smollm2._step(ids[:-3], smollm2._empty_past())
    for t in ids[-3:]:
        last, past = smollm2._step([t], past)
    # int8 activations (accuracy_level 4) are quantized per call, so one-token steps and the full
    # pass differ a little; the greedy choice must not
    assert np.abs(last - full[-1]).max() < 0.1 * np.abs(full[-1]).max()
    assert int(np.argmax(last)) == int(np.argmax(full[-1]))


# ----------------------------------------------------------------------------- CLI: chat and describe


def _described_event_log(path, frame_id):
    """An event log holding one flagged part and its description, as a station with the describer writes it."""
    sink = JsonlSink(path, fsync="never")
    verdict, frame = _flagged(frame_id)
    sink.write(verdict, frame)
    record = Describer(FakeLLM(), "flange").describe(DescribeRequest.from_verdict(verdict, frame.image))
    sink.append(verdict.event_id, record)
    sink.close()
    return verdict


def test_chat_answers_with_history_and_guards_the_facts(tmp_path, monkeypatch, capsys):
    """`iadgpt chat` on a described event: answers, records Q/A, replaces a contradicting answer."""
    from iadgpt.runtime import describer as mod

    verdict = _described_event_log(tmp_path / "events.jsonl", 3)
    seen = []

    class Scripted(FakeLLM):
        def generate(self, prompt, max_new_tokens=48, **kw):
            seen.append(prompt)
            text = "It is at the bottom right." if len(seen) == 2 else "It is at the top left, near the rim."
            return mod.Generation(text, [1, 2], 10, 0.01, 0.02, "eos")

    monkeypatch.setattr(mod, "make_llm", lambda spec: Scripted())
    rc = main(["chat", str(tmp_path / "events.jsonl"), "--event", verdict.event_id, "--llm", "fake", "--record",
               "-q", "Where is it?", "-q", "Are you sure?", "-q", "How big?"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "It is at the top left, near the rim." in out
    assert "By the measurements:" in out and "contradicted" in out  # the second answer said bottom right
    assert len(seen[1]) == 4 and seen[1][2]["role"] == "assistant"  # system, facts+q1, a1, q2 (history kept)
    # the replaced turn is not shown to the model again (a small model copies the replacement verbatim)
    assert [m["content"] for m in seen[2][2:]] == ["It is at the top left, near the rim.", "How big?"]
    updates = read_events(tmp_path / "events.jsonl")[0]["updates"]
    assert [u["kind"] for u in updates] == ["description", "chat", "chat", "chat"]


def test_chat_on_a_bad_event_log_says_what_is_wrong(tmp_path, capsys, caplog):
    def chat(path, event="a1"):
        rc = main(["chat", str(path), "--event", event, "--llm", "none", "-q", "hi"])
        return rc, capsys.readouterr().err

    rc, err = chat(tmp_path / "nonexistent.jsonl")
    assert rc == 2 and "no such event log" in err and "no event" not in err
    rc, err = chat(tmp_path)  # a folder
    assert rc == 2 and "is a folder, not an event log" in err
    log = tmp_path / "events.jsonl"
    log.write_text('{"event_id": "a1"}\n[1, 2]\n"text"\n{"event_id": "a2"}\n')
    with caplog.at_level("WARNING", logger="iadgpt.runtime.sinks"):
        assert [e["event_id"] for e in read_events(log)] == ["a1", "a2"]
    assert sum("not a JSON object" in r.getMessage() for r in caplog.records) == 2
    rc, err = chat(log)
    assert rc == 2 and "no description to talk about" in err
    log.write_text('{"event_id": "a3", "updates": [{"kind": "description", "status": "ok"}]}\n'
                   '{"event_id": "a4", "updates": "garbage"}\n')
    for event in ("a3", "a4"):  # an ok update without its text, updates that are not a list
        rc, err = chat(log, event)
        assert rc == 2 and "no description to talk about" in err


def test_runtime_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, iadgpt.runtime.describer, iadgpt.runtime.llm_runtime, iadgpt.runtime.facts; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_describe_command_on_a_tiny_bundle(tiny_bundle_path, tmp_path, capsys):
    import cv2

    product = SyntheticProduct(kind="part", size=128, seed=21, defect_rate=1.0)
    path = tmp_path / "part.png"
    cv2.imwrite(str(path), cv2.cvtColor(product.sample(0).image, cv2.COLOR_RGB2BGR))
    rc = main(["describe", str(path), "--bundle", str(tiny_bundle_path), "--llm", "fake", "--product", "flange",
               "--threshold", "0.0"])  # threshold 0: every part is NG, so there is something to describe
    out = capsys.readouterr().out
    assert rc == 0 and ": NG, score" in out
    assert "of the flange" in out and "facts:" in out


def test_from_options_checks_station_yaml_keys(tmp_path):
    from iadgpt.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        AsyncDescriber.from_options({"llm": "fake", "timeout": 3})
    d = AsyncDescriber.from_options({"llm": "fake", "product": "flange", "timeout_s": 5, "queue_size": 2},
                                    start=False)
    assert d.llm_spec == {"kind": "fake"} and d.product == "flange" and d.timeout_s == 5.0 and d.queue_size == 2
    d.close(0)
    for key, value, words in [("queue_size", "many", "an integer"), ("timeout_s", "soon", "a finite number"),
                              ("budget_s", float("nan"), "a finite number"), ("idle", "yes", "true or false"),
                              ("threads", 1.5, "an integer"), ("product", 3, "a non-empty string")]:
        with pytest.raises(ConfigError, match=f"describer.{key}: expected {words}"):
            AsyncDescriber.from_options({"llm": "fake", key: value}, start=False)
    from iadgpt.errors import DescriberError

    with pytest.raises(DescriberError, match="not a describer LLM folder"):  # at start, not in the worker
        AsyncDescriber.from_options({"llm": str(tmp_path / "no-llm")}, start=False)


# ----------------------------------------------------------------------------- pausing for the verdict loop


def test_gate_runs_the_prompt_in_chunks_and_waits_before_every_model_run():
    from iadgpt.runtime.llm_runtime import OnnxLLM

    llm = OnnxLLM.__new__(OnnxLLM)  # the stepping logic only; no model needed
    calls: list[tuple[str, object]] = []
    llm.gate = lambda: calls.append(("gate", None))
    llm.prefill_chunk = 4

    def run(ids, past):
        calls.append(("run", list(ids)))
        return np.asarray([len(past) + len(ids)], np.float32), past + list(ids)

    llm._run = run
    logits, past = llm._step(list(range(10)), [])
    assert past == list(range(10)) and float(logits[0]) == 10  # the cache threads through the chunks
    assert calls == [("gate", None), ("run", [0, 1, 2, 3]), ("gate", None), ("run", [4, 5, 6, 7]),
                     ("gate", None), ("run", [8, 9])]
    calls.clear()
    llm._step([5], past)  # a decode step: one gate, one run
    assert calls == [("gate", None), ("run", [5])]
    llm.gate = None
    calls.clear()
    llm._step(list(range(10)), [])  # without a gate: one pass
    assert calls == [("run", list(range(10)))]


def test_loop_busy_clears_the_workers_gate_while_held():
    d = AsyncDescriber({"kind": "fake"}, start=False)
    assert d._loop_idle.is_set()
    with d.loop_busy():
        assert not d._loop_idle.is_set()
    assert d._loop_idle.is_set()
    with pytest.raises(RuntimeError):
        with d.loop_busy():
            raise RuntimeError("detector bug")
    assert d._loop_idle.is_set()  # released even when judging fails


def test_real_smollm2_gated_generation_is_unchanged(smollm2):
    chat = [{"role": "user", "content": "Describe a scratch on a metal flange."}]
    ref = smollm2.generate(chat, 12)
    waits = []
    smollm2.gate, smollm2.prefill_chunk = (lambda: waits.append(1)), 8
    try:
        got = smollm2.generate(chat, 12)
    finally:
        smollm2.gate, smollm2.prefill_chunk = None, 64
    assert got.tokens == ref.tokens
    assert len(waits) >= len(got.tokens) + 1


# ----------------------------------------------------------------------------- region threshold, budget, chat limits


def _plateau_verdict(threshold=0.8):
    """A dark 10x10 core (map 1.0) inside a 30x30 plateau of map 0.5: the region's extent depends on the
    pixel threshold."""
    verdict, frame = _flagged(7, box=(40, 40, 50, 50))
    amap = np.zeros((96, 96), np.float32)
    amap[30:60, 30:60] = 0.5
    amap[40:50, 40:50] = 1.0
    verdict.anomaly_map, verdict.threshold = amap, threshold
    verdict.regions[0] = Region(box=(30, 30, 60, 60), area_px=900, peak=1.0, centroid=(45, 45))
    return verdict, frame


def test_station_describer_uses_the_detectors_pixel_threshold_like_describe():
    """The station path used the image threshold (0.8) for the region masks, `iadgpt describe` the pixel one:
    the Detector's verdict now carries the pixel threshold that drew its regions (test_detector checks it)."""
    d = AsyncDescriber({"kind": "fake"}, start=False)
    verdict, frame = _plateau_verdict()
    verdict.extra["pixel_threshold"] = 0.3  # as Detector.detect sets it on an NG verdict
    d.submit(verdict, frame)
    station = Describer(None).facts(d._pending[0])
    describe = Describer(None).facts(DescribeRequest.from_verdict(verdict, frame.image, pixel_threshold=0.3))
    assert station.to_dict() == describe.to_dict() and station.main.map_area_px == 900
    d.close(0)


def test_the_llm_is_not_started_when_the_budget_left_cannot_cover_its_prompt():
    verdict, frame = _flagged(8)
    req = DescribeRequest.from_verdict(verdict, frame.image)
    d = Describer(FakeLLM(delay_s=0.2), "flange", budget_s=None)
    first = d.describe(req)
    assert first["llm"]["remark_used"] and d.prefill_s >= 0.09  # the fake's ttft is half its delay
    d.budget_s = 0.06  # less than the prompt takes: the remark would be cut before its first word
    second = d.describe(req)
    assert "budget" in second["llm"]["skipped"] and "text" not in second["llm"]
    assert second["description"].startswith("Defect of unknown type")
    # a slow (cold) first prompt must not silence the LLM for good: the estimate decays on each skip
    d.prefill_s, d.budget_s = 0.8, 0.3
    skips = 0
    while "skipped" in d.describe(req)["llm"]:
        skips += 1
    assert skips == 2  # 0.8 and 0.4 skip, 0.2 fits in 0.3 s: the LLM runs again


class _ContextLLM(FakeLLM):
    """Raises ContextOverflow like OnnxLLM when the chat has more than `limit` words."""

    def __init__(self, limit=200):
        super().__init__(replies=["It is at the top left."])
        self.limit, self.seen = limit, []

    def generate(self, prompt, max_new_tokens=48, **kw):
        from iadgpt.runtime.llm_runtime import ContextOverflow

        n = sum(len(m["content"].split()) for m in prompt)
        if n + max_new_tokens > self.limit:
            raise ContextOverflow(f"prompt of {n} tokens + {max_new_tokens} new exceeds the model's context "
                                  f"({self.limit})", n, max_new_tokens, self.limit)
        self.seen.append(prompt)
        return super().generate(prompt, max_new_tokens, **kw)


def test_chat_trims_old_turns_and_refuses_only_an_overlong_question(tmp_path, monkeypatch, capsys, caplog):
    from iadgpt.runtime import describer as mod

    verdict = _described_event_log(tmp_path / "events.jsonl", 9)
    llm = _ContextLLM()
    monkeypatch.setattr(mod, "make_llm", lambda spec: llm)
    long_q = "Why " * 40
    with caplog.at_level("WARNING", logger="iadgpt.runtime.describer"):
        rc = main(["chat", str(tmp_path / "events.jsonl"), "--event", verdict.event_id, "--llm", "fake",
                   "-q", long_q, "-q", long_q, "-q", "Why " * 500, "-q", "Where is it?"])
    captured = capsys.readouterr()
    assert rc == 0 and "question is too long for the model" in captured.err and "ask a shorter question" in captured.err
    assert captured.out.count("It is at the top left.") == 3  # the session went on after the refused question
    assert any("chat history trimmed" in r.getMessage() for r in caplog.records)
    assert all(sum(len(m["content"].split()) for m in p) + 64 <= 200 for p in llm.seen)


def test_chat_keeps_its_trimmed_history_so_a_left_out_turn_stays_out(tmp_path, monkeypatch, caplog):
    """Once the oldest turns are left out to fit the context, later questions are asked without
    them (not with the whole history again, trimmed and warned about anew each time)."""
    from iadgpt.runtime import describer as mod

    verdict = _described_event_log(tmp_path / "events.jsonl", 9)
    llm = _ContextLLM()
    monkeypatch.setattr(mod, "make_llm", lambda spec: llm)
    questions = [f"Why {w} " * 12 for w in ("alpha", "beta", "gamma", "delta")]
    with caplog.at_level("WARNING", logger="iadgpt.runtime.describer"):
        assert main(["chat", str(tmp_path / "events.jsonl"), "--event", verdict.event_id, "--llm", "fake",
                     *[a for q in questions for a in ("-q", q)]]) == 0
    assert len(llm.seen) == len(questions)
    dropped_turns = 0
    for i, q in enumerate(questions):
        asked = [j for j, prompt in enumerate(llm.seen) if any(q.strip() in m["content"] for m in prompt)]
        assert asked == list(range(i, asked[-1] + 1)), (i, asked)  # present from its turn on, then gone for good
        dropped_turns += asked[-1] < len(questions) - 1
    trims = [r.getMessage() for r in caplog.records if "chat history trimmed" in r.getMessage()]
    left_out = sum(int(m.split("left out the ")[1].split()[0]) for m in trims)
    assert dropped_turns and left_out == 2 * dropped_turns, trims  # each turn left out (and warned about) once


def test_chat_says_why_an_event_has_no_description(tmp_path, capsys):
    log = tmp_path / "events.jsonl"
    log.write_text('{"event_id": "ok1", "anomalous": false}\n{"event_id": "ng1", "anomalous": true}\n')
    assert main(["chat", str(log), "--event", "ok1", "--llm", "none", "-q", "hi"]) == 2
    err = capsys.readouterr().err
    assert "judged OK" in err and "describer on" not in err
    assert main(["chat", str(log), "--event", "ng1", "--llm", "none", "-q", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no description yet" in err and "may still be queued" in err


def test_queue_holds_exactly_queue_size_parts():
    d = AsyncDescriber({"kind": "fake"}, queue_size=2, start=False)  # no dispatcher: nothing is popped
    parts = [_flagged(i) for i in range(3)]
    for verdict, frame in parts:
        d.submit(verdict, frame)
    assert len(d._pending) == 2 and d.stats.rejected == 1
    assert "queue full" in d.results[parts[2][0].event_id]["error"]
    d.close(0)


def test_a_restart_after_a_dead_worker_backs_off_first():
    d = AsyncDescriber({"kind": "fake"}, start=False)
    pauses, starts = [], []
    d._restarts_in_row = 2
    d._pause = lambda delay: pauses.append(delay) or True

    def start_worker():
        starts.append(1)
        d._stop = True  # "closed while loading": _dispatch returns
        return False

    d._start_worker = start_worker
    d._dispatch()
    assert pauses == [d._backoff(1)] == [1.0] and starts == [1]


class _Conn:
    """A worker pipe: answers `answer` at once, or never (poll sleeps its timeout)."""

    def __init__(self, answer=None):
        self.answer, self.sent = answer, []

    def send(self, msg):
        self.sent.append(msg)

    def poll(self, timeout=0.0):
        if self.answer is None:
            time.sleep(timeout)
            return False
        return True

    def recv(self):
        return self.answer


def _served(d, conn, request_id=7):
    verdict, frame = _flagged(1)
    req = DescribeRequest.from_verdict(verdict, frame.image)
    req.request_id = request_id
    d._conn, d._proc = conn, SimpleNamespace(is_alive=lambda: True, join=lambda t=None: None, exitcode=None)
    d._kill_worker = lambda: None
    t0 = time.monotonic()
    d._serve(req)
    return req, time.monotonic() - t0


def test_a_hung_request_fails_after_timeout_s_not_later():
    d = AsyncDescriber({"kind": "fake"}, timeout_s=1.0, start=False)
    req, took = _served(d, _Conn(None))
    assert d.stats.timeouts == 1 and d.results[req.event_id]["status"] == "failed"
    assert 0.95 <= took < 1.6, took  # not 2 x timeout_s


def test_a_described_part_resets_the_restart_backoff():
    d = AsyncDescriber({"kind": "fake"}, start=False)
    d._restarts_in_row = 3
    req, _ = _served(d, _Conn(("ok", 7, {"kind": "description", "status": "ok", "description": "x"})))
    assert d.stats.described == 1 and d.results[req.event_id]["status"] == "ok"
    assert d._restarts_in_row == 0  # else the next crash waits 4 s, 8 s, ... though the LLM recovered


def test_a_part_submitted_after_close_is_failed_at_once():
    d = AsyncDescriber({"kind": "fake"}, start=False)
    d.close(0)
    verdict, frame = _flagged(1)
    d.submit(verdict, frame)
    rec = d.results.get(verdict.event_id)
    assert rec is not None and rec["status"] == "failed" and "shutting down" in rec["error"]
    assert not d._pending and d.stats.rejected == 1


def test_close_describes_what_is_queued_by_default():
    d = AsyncDescriber({"kind": "fake", "delay_s": 0.2}, timeout_s=10, idle=False)
    try:
        assert d.wait_ready(60)
        parts = [_flagged(i) for i in range(3)]
        for verdict, frame in parts:
            d.submit(verdict, frame)
    finally:
        stats = d.close()  # no drain_timeout_s: (queued + 1) x timeout_s + start_timeout_s
    assert stats.described == 3 and stats.failed == 0
    assert [d.results[v.event_id]["status"] for v, _ in parts] == ["ok"] * 3


class _NoBridge:
    def ask(self, features, map_kind="decoder", deadline=None):
        from iadgpt.runtime.bridge_runtime import NO_ANSWER, BridgeAnswer
        return BridgeAnswer(NO_ANSWER, False, None, 0.0, {"map": map_kind})


def test_a_bridge_that_sees_no_anomaly_does_not_agree_with_a_flagged_part():
    verdict, frame = _flagged(1, box=(60, 70, 90, 80))
    req = DescribeRequest.from_verdict(verdict, frame.image)
    req.features = [np.zeros((1, 4, 2, 2), np.float32)]
    rec = Describer(FakeLLM(), "flange", bridge=_NoBridge()).describe(req)
    assert rec["bridge"]["anomalous"] is False and not rec["bridge"]["agrees_with_facts"]
    assert "no anomaly" not in rec["description"].lower()


def test_an_explicit_pixel_threshold_wins_over_the_verdicts():
    d = AsyncDescriber({"kind": "fake"}, pixel_threshold=0.3, start=False)
    verdict, frame = _plateau_verdict(threshold=0.8)  # no extra["pixel_threshold"]: would fall back to 0.8
    d.submit(verdict, frame)
    assert d._pending[0].threshold == 0.3
    assert Describer(None).facts(d._pending[0]).main.map_area_px == 900  # the 0.5 plateau, not the 1.0 core
    d.close(0)


def test_describe_uses_the_threshold_flag(tiny_bundle_path, tmp_path, capsys):
    import cv2

    path = tmp_path / "good.png"
    cv2.imwrite(str(path), cv2.cvtColor(SyntheticProduct("part", size=128, seed=21, defect_rate=0.0).sample(0).image,
                                        cv2.COLOR_RGB2BGR))
    assert main(["describe", str(path), "--bundle", str(tiny_bundle_path), "--llm", "none",
                 "--threshold", "1e9"]) == 0
    out = capsys.readouterr().out
    assert ": OK, score" in out and "(threshold 1000000000.0000)" in out and "nothing to describe" in out


def _chat_log(tmp_path):
    log = tmp_path / "events.jsonl"
    ups = [{"kind": "description", "status": "ok", "description": "first text"},
           {"kind": "description", "status": "ok", "description": "second text"},
           {"kind": "description", "status": "failed", "description": "failed text", "error": "x"},
           {"kind": "chat", "status": "ok", "description": "chat text"}]
    lines = [{"event_id": "e1", "anomalous": True}] + [{**u, "event_id": "e1", "update": True} for u in ups]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return log


def test_chat_talks_about_the_latest_ok_description_and_records_qa(tmp_path, capsys):
    log = _chat_log(tmp_path)
    assert main(["chat", str(log), "--event", "e1", "--llm", "fake", "--record", "-q", "Where?"]) == 0
    assert "event e1: second text" in capsys.readouterr().out
    chat = read_events(log)[0]["updates"][-1]
    assert chat["kind"] == "chat" and chat["question"] == "Where?" and isinstance(chat["answer"], str)
    assert "rejected" in chat


def test_chat_reads_the_latest_event_of_a_repeated_id(tmp_path, capsys):
    """Two logs joined (or a clock set back) can repeat an event id: updates go to the latest line
    with that id, so chat talks about that one."""
    log = tmp_path / "events.jsonl"
    lines = [{"event_id": "e1", "anomalous": True},
             {"event_id": "e1", "update": True, "kind": "description", "status": "ok", "description": "older part"},
             {"event_id": "e1", "anomalous": True},
             {"event_id": "e1", "update": True, "kind": "description", "status": "ok", "description": "newer part"}]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["chat", str(log), "--event", "e1", "--llm", "fake", "-q", "Where?"]) == 0
    out = capsys.readouterr().out
    assert "event e1: newer part" in out and "older part" not in out


def test_chat_skips_malformed_regions_and_still_guards_the_good_one(tmp_path, monkeypatch, capsys):
    """A hand-edited log's regions that are not objects are left out; the well-formed region still
    checks the answers (its position contradicts this one)."""
    from iadgpt.runtime import describer as mod

    class WrongPlace(FakeLLM):
        def generate(self, prompt, max_new_tokens=48, **kw):
            return mod.Generation("It is at the bottom right.", [1, 2], 10, 0.01, 0.02, "eos")

    monkeypatch.setattr(mod, "make_llm", lambda spec: WrongPlace())
    region = {"position": "top left", "defect_type": "scratch", "area_pct": 2.0}
    facts = {"regions": ["junk", 7, region, None]}
    log = tmp_path / "events.jsonl"
    lines = [{"event_id": "e1", "anomalous": True},
             {"event_id": "e1", "update": True, "kind": "description", "status": "ok", "description": "a scratch",
              "facts": facts, "facts_text": ["A scratch at the top left."]}]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["chat", str(log), "--event", "e1", "--llm", "fake", "-q", "Where is it?"]) == 0
    out = capsys.readouterr().out
    assert "By the measurements: A scratch at the top left." in out and "contradicted" in out


def test_chat_with_llm_does_not_load_the_bundle(tmp_path, capsys):
    log = _chat_log(tmp_path)
    assert main(["chat", str(log), "--event", "e1", "--llm", "fake", "--bundle", str(tmp_path / "nope"),
                 "-q", "Where?"]) == 0


def test_chat_stdin_ends_at_an_empty_line(tmp_path, monkeypatch, capsys):
    log = _chat_log(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first q\n\nsecond q\n"))
    assert main(["chat", str(log), "--event", "e1", "--llm", "fake"]) == 0
    out = capsys.readouterr().out
    assert "> first q" in out and "second q" not in out and out.count("\n> ") == 1
