#!/usr/bin/env python3
"""The describer on the demo stream, in one run: verdict-loop latency with the describer off and
on, and how fast every flagged part gets its description.

    python benchmarks/describe.py --json describe.json
    python benchmarks/describe.py --llm DIR --frames 200 --fps 4 --json F

Every run reads the same synthetic stream (the demo's product, seed and defect rate; paced at
`--fps` parts per second) through the same cached demo bundle. Describer-off and describer-on
runs alternate (`--rounds` pairs) so a change in background load biases neither side; the loop
p99 is taken over all frames of each side. The describer uses the int4 SmolLM2 (built once into
the cache by `iadgpt.export.llm.ensure_default_llm` unless --llm is given) in its worker process,
and defect types from labelled synthetic examples (another seed) run through the same detector.
Keys: describe_p95_s (submit -> record appended, described parts), loop_p99_ms_off /
loop_p99_ms_on (capture-to-verdict p99 of the station loop), described, flagged, failed; plus
the describer's own timings and, against the stream's ground truth, how often the description's
position and type match.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iadgpt.cli import run_reporting_errors, writable_output  # noqa: E402

from iadgpt.demo import DEMO_KIND, DEMO_SIZE, STREAM_SEED, demo_bundle  # noqa: E402
from iadgpt.runtime.describer import AsyncDescriber, llm_spec_for  # noqa: E402
from iadgpt.runtime.detector import Detector  # noqa: E402
from iadgpt.runtime.facts import ExampleTypeClassifier, compute_facts, grid_position  # noqa: E402
from iadgpt.runtime.sinks import JsonlSink, read_events  # noqa: E402
from iadgpt.runtime.sources import Frame, open_source  # noqa: E402
from iadgpt.runtime.station import Station  # noqa: E402
from iadgpt.runtime.synthetic import SyntheticProduct  # noqa: E402

EXAMPLES_SEED = 404
PRODUCT = "metal flange"


def environment() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from latency import environment as env  # the same environment block as the latency benchmark

    out = env()
    try:
        out["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return out


def labelled_examples(detector: Detector, n: int, seed: int = EXAMPLES_SEED) -> Optional[ExampleTypeClassifier]:
    """Defect-type examples as the station will see them: detector maps of labelled synthetic defects."""
    product = SyntheticProduct(kind=DEMO_KIND, size=DEMO_SIZE, seed=seed, defect_rate=1.0)
    feats, labels = [], []
    for i in range(n):
        s = product.sample(i)
        v = detector.detect(Frame(image=s.image, frame_id=i, timestamp=time.time(), source="examples"))
        if not v.anomalous or not v.regions:
            continue
        facts = compute_facts(s.image, v.anomaly_map, v.regions[:1], threshold=detector.pixel_threshold)
        if facts.main is not None:
            feats.append(facts.main.features)
            labels.append(s.defect_type)
    return ExampleTypeClassifier(np.asarray(feats, np.float32), labels) if feats else None


class LatencySink:
    """Capture-to-verdict latency of every judged frame (what the station's p50/p99 are made of)."""

    errors = 0

    def __init__(self) -> None:
        self.ms: list[float] = []

    def write(self, verdict: Any, frame: Any) -> None:
        if verdict.error is None:
            self.ms.append(float(verdict.timings_ms["total"]))

    def close(self) -> None:
        pass


def run_station(bundle: Any, uri: str, events: Path, threads: Optional[int], describer: Optional[AsyncDescriber]):
    lat = LatencySink()
    sinks: list[Any] = [JsonlSink(events, fsync="never"), lat]
    if describer is not None:
        sinks = describer.share(sinks)
    with Detector(bundle, "onnxruntime", threads=threads) as det, open_source(uri) as source:
        stats = Station(det, source, sinks, stats_interval_s=3600, describer=describer).run()
    return stats, lat.ms


def score_against_truth(event_files: list[Path], seed: int) -> dict[str, Any]:
    """Position/type of each description vs the synthetic stream's exact defect masks."""
    product = SyntheticProduct(kind=DEMO_KIND, size=DEMO_SIZE, seed=seed, defect_rate=0.3)
    pos_ok = pos_n = type_ok = type_n = 0
    words = []
    events = [ev for f in event_files for ev in read_events(f)]
    for ev in events:
        rec = next((u for u in ev.get("updates", []) if u.get("kind") == "description"), None)
        if rec is None or rec.get("status") != "ok" or ev.get("frame_id") is None:
            continue
        words.append(len(rec["description"].split()))
        truth = product.sample(int(ev["frame_id"]))
        regions = rec["facts"]["regions"]
        if truth.defect_type is None or not regions:
            continue
        ys, xs = np.nonzero(truth.mask)
        pos_n += 1
        pos_ok += regions[0]["position"] == grid_position(xs.mean(), ys.mean(), rec["facts"]["part_box"])[2]
        type_n += 1
        type_ok += regions[0]["defect_type"] == truth.defect_type
    return {"position_accuracy": pos_ok / pos_n if pos_n else None, "type_accuracy": type_ok / type_n if type_n else None,
            "scored_defective": pos_n, "description_words_max": max(words) if words else None}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--frames", type=int, default=60, help="frames per run (each round runs off and on)")
    ap.add_argument("--fps", type=float, default=1.0,
                    help="parts per second on the line (the demo stream's content, paced like a station: ~0.3 NG/s)")
    ap.add_argument("--defect-rate", type=float, default=0.3)
    ap.add_argument("--llm", default=None, help="quantized LLM folder (default: cached int4 SmolLM2); 'none' = facts only")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4, help="default LLM's bits when --llm is not given")
    ap.add_argument("--llm-threads", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="detector threads (default: ONNX Runtime's)")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in the worker (s)")
    ap.add_argument("--budget", type=float, default=1.0, help="LLM time budget per description (s)")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--examples", type=int, default=40, help="labelled synthetic defects for the type (0: none)")
    ap.add_argument("--rounds", type=int, default=2, help="off/on pairs, alternated (default 2)")
    ap.add_argument("--worker-priority", choices=("idle", "nice"), default="idle",
                    help="describer worker on SCHED_IDLE (default) or only at nice 19")
    ap.add_argument("--out", type=Path, default=None, help="keep the event logs here")
    args = ap.parse_args(argv)
    writable_output(args.json)

    t_start = time.perf_counter()
    if args.llm is None:
        from iadgpt.export.llm import ensure_default_llm
        llm: Any = {"kind": "onnx", "dir": str(ensure_default_llm(args.bits)), "threads": args.llm_threads}
    else:  # a wrong folder fails here, at once, not as a worker that never starts
        llm = llm_spec_for(args.llm, threads=args.llm_threads)
    bundle = demo_bundle("onnxruntime", args.threads, progress=False)
    with Detector(bundle, "onnxruntime", threads=args.threads) as det:
        pixel_threshold = det.pixel_threshold
        examples = labelled_examples(det, args.examples) if args.examples else None
    uri = (f"synthetic://{DEMO_KIND}?seed={STREAM_SEED}&size={DEMO_SIZE}&defect_rate={args.defect_rate}"
           f"&count={args.frames}&fps={args.fps}")
    out = args.out or Path(tempfile.mkdtemp(prefix="iadgpt-describe-bench-"))
    out.mkdir(parents=True, exist_ok=True)

    # Describer off and on alternate (off, on, off, on ...) so that a change in the machine's
    # background load biases neither side; each "on" round starts a fresh worker before its stream.
    lat_off: list[float] = []
    lat_on: list[float] = []
    flagged = judged_on = dropped_on = 0
    latencies: list[float] = []
    totals = {"described": 0, "failed": 0, "timeouts": 0, "worker_deaths": 0, "rejected": 0, "restarts": 0}
    records: list[dict] = []
    worker: dict = {}
    on_files: list[Path] = []
    drain_s = 0.0
    for r in range(args.rounds):
        _stats, ms = run_station(bundle, uri, out / f"events_off_{r}.jsonl", args.threads, None)
        lat_off += ms
        describer = AsyncDescriber(llm, product=PRODUCT, timeout_s=args.timeout, budget_s=args.budget,
                                   max_new_tokens=args.max_new_tokens, examples=examples,
                                   pixel_threshold=pixel_threshold, queue_size=max(16, args.frames),
                                   idle=args.worker_priority == "idle")
        if not describer.wait_ready(300):
            describer.close(0)
            raise SystemExit(f"the describer worker did not start: {describer.worker_info}")
        worker = dict(describer.worker_info)
        on_files.append(out / f"events_on_{r}.jsonl")
        on, ms = run_station(bundle, uri, on_files[-1], args.threads, describer)
        lat_on += ms
        flagged, judged_on, dropped_on = flagged + on.flagged, judged_on + on.judged, dropped_on + on.dropped
        t_drain = time.perf_counter()
        dstats = describer.close()
        drain_s = max(drain_s, time.perf_counter() - t_drain)
        latencies += dstats.latencies_s
        for k in totals:
            totals[k] += getattr(dstats, k)
        records += [rec for rec in describer.results.values() if rec.get("status") == "ok"]
    lat = np.asarray(latencies or [np.nan])
    llm_info = [rec.get("llm", {}) for rec in records]
    p99_off = float(np.percentile(lat_off, 99)) if lat_off else None
    p99_on = float(np.percentile(lat_on, 99)) if lat_on else None

    def pct(values: list, q: float) -> Optional[float]:
        vals = [v for v in values if v is not None]
        return round(float(np.percentile(vals, q)), 4) if vals else None

    result = {
        "describe_p95_s": round(float(np.nanpercentile(lat, 95)), 4) if latencies else None,
        "loop_p99_ms_off": round(p99_off, 2) if p99_off is not None else None,
        "loop_p99_ms_on": round(p99_on, 2) if p99_on is not None else None,
        "described": totals["described"], "flagged": flagged, "failed": totals["failed"],
        "loop_p99_ratio_on_off": round(p99_on / p99_off, 3) if p99_off and p99_on else None,
        "loop_p50_ms_off": round(float(np.percentile(lat_off, 50)), 2) if lat_off else None,
        "loop_p50_ms_on": round(float(np.percentile(lat_on, 50)), 2) if lat_on else None,
        "describe_p50_s": round(float(np.nanpercentile(lat, 50)), 4) if latencies else None,
        "describe_max_s": round(float(np.nanmax(lat)), 4) if latencies else None,
        "describer": {**totals, "drain_after_stream_s_max": round(drain_s, 2), "worker": worker,
                      "llm_ttft_p50_s": pct([i.get("ttft_s") for i in llm_info], 50),
                      "llm_tokens_per_s_p50": pct([i.get("tokens_per_s") for i in llm_info], 50),
                      "llm_new_tokens_p50": pct([i.get("new_tokens") for i in llm_info], 50),
                      "remark_used": sum(bool(i.get("remark_used")) for i in llm_info),
                      "worker_rss_mb_max": max((rec.get("worker_rss_mb") or 0 for rec in records), default=None),
                      "example_descriptions": [rec["description"] for rec in records[:3]]},
        "truth": score_against_truth(on_files, STREAM_SEED),
        "settings": {"frames": args.frames, "fps": args.fps, "defect_rate": args.defect_rate, "rounds": args.rounds,
                     "llm": llm, "budget_s": args.budget, "timeout_s": args.timeout,
                     "max_new_tokens": args.max_new_tokens, "worker_priority": args.worker_priority,
                     "detector_threads": args.threads, "examples": None if examples is None else len(examples.labels),
                     "judged_off": len(lat_off), "judged_on": judged_on, "dropped_on": dropped_on, "events": str(out)},
        "environment": environment(), "wall_s": round(time.perf_counter() - t_start, 1),
    }
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
