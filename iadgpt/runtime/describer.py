"""The describer: a short, fact-checked description of every flagged part, off the verdict loop.

Two layers:

* `Describer` (synchronous, one process): frame + verdict -> `DefectFacts` (facts.py) -> prompt ->
  greedy LLM completion -> description record. The description is *composed*: a sentence built
  from the measured facts (type, position, size, shape, brightness, colour) followed by the LLM's
  one-sentence remark (likely cause / what to check). A 135M model cannot be trusted to restate
  facts (SmolLM2 in float32 already says "lighter" for a darker spot), so the facts are never
  left to it, and a remark that names a position, a defect type or a brightness the facts
  contradict is dropped (`wording.contradictions`). Output <= `MAX_WORDS` words.
* `AsyncDescriber` (what the station gets): ``submit(verdict, frame)`` copies what the worker
  needs into a bounded queue and returns at once. A dispatcher thread sends one request at a
  time over a pipe to a worker *process* (multiprocessing "spawn": the LLM's memory, threads and
  the GIL stay out of the verdict loop; the worker runs with SCHED_IDLE, on CPU time the loop
  leaves) and waits at most
  `timeout_s` for the answer. A worker that hangs is killed; a worker that dies (killed, OOM,
  crash) is restarted; either way that request's event gets a ``"status": "failed"`` record and
  the next request goes to the new worker. Every record is appended to the same event id through
  the sinks' ``append(event_id, record)`` (`JsonlSink`, `MqttSink`) and kept in `results`.

The station closes its sinks when its run ends, while descriptions may still be on their way:
pass the sinks through `AsyncDescriber.share(sinks)` and give the station the returned proxies;
their real ``close`` happens in `AsyncDescriber.close`, after the queue is drained.

LLM specs (picklable, so the worker can build the model itself):
``{"kind": "onnx", "dir": PATH, "threads": 1}``, ``{"kind": "none"}`` (facts only),
``{"kind": "fake", ...}`` (`FakeLLM`: deterministic, for tests and dry runs).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from iadgpt.errors import ConfigError, DescriberError
from iadgpt.runtime.facts import (UNKNOWN, DefectFacts, ExampleTypeClassifier, PromptTypeRetriever,
                                  TypeResolver, compute_facts)
from iadgpt.runtime.llm_runtime import ContextOverflow, Generation, Message, chatml, read_llm_config
from iadgpt.runtime.sinks import ThrottledLog
from iadgpt.runtime.wording import (CHAT_SYSTEM_PROMPT, MAX_WORDS, REMARK_PREFIX, SENTENCE_END, SYSTEM_PROMPT,
                                    build_messages, clip_words, complete_remark, compose, contradictions,
                                    dedupe_clauses)

log = logging.getLogger(__name__)

BRIDGE_BUDGET_SHARE = 0.8  # of timeout_s: a slow bridge answer is dropped, the facts description kept
GATE_MAX_WAIT_S = 1.0  # the worker waits at most this long for the verdict loop to finish a frame
RECORD_KIND = "description"
LLMSpec = dict[str, Any]


# ----------------------------------------------------------------------------- LLMs


class FakeLLM:
    """Deterministic stand-in for `OnnxLLM` (tests, dry runs): same `generate` signature.

    The reply is picked from `replies` by a stable hash of the prompt. `delay_s` sleeps per
    request; `hang_on` / `crash_on`: a substring of the prompt that makes it sleep for an hour
    or kill its own process (to test timeouts and restarts).
    """

    def __init__(self, delay_s: float = 0.0, replies: Sequence[str] = (), hang_on: Optional[str] = None,
                 crash_on: Optional[str] = None, load_s: float = 0.0) -> None:
        time.sleep(load_s)
        self.delay_s, self.hang_on, self.crash_on = float(delay_s), hang_on, crash_on
        self.replies = list(replies) or ["handling or tooling; check the fixture and the previous station."]
        self.load_s = load_s
        self.config = {"quantization": {"scheme": "fake"}}

    @staticmethod
    def format_chat(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return chatml(messages, add_generation_prompt)

    def generate(self, prompt: Union[str, Sequence[Message]], max_new_tokens: int = 48, *,
                 stop_texts: Sequence[str] = (), deadline: Optional[float] = None, min_new_tokens: int = 1) -> Generation:
        t0 = time.perf_counter()
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        if self.crash_on and self.crash_on in text:
            os._exit(3)
        if self.hang_on and self.hang_on in text:
            time.sleep(3600)
        if self.delay_s:
            time.sleep(self.delay_s)
        h = sum(text.encode("utf-8")) % len(self.replies)
        reply = " ".join(self.replies[h].split()[:max_new_tokens])
        dt = time.perf_counter() - t0
        return Generation(reply, list(range(len(reply.split()))), len(text.split()), dt / 2, dt, "eos")


def make_llm(spec: Optional[LLMSpec]) -> Any:
    """The LLM a spec names (None / kind "none": no LLM, facts only)."""
    spec = dict(spec or {"kind": "none"})
    kind = spec.pop("kind", "onnx")
    if kind == "none":
        return None
    if kind == "fake":
        return FakeLLM(**spec)
    if kind == "onnx":
        from iadgpt.runtime.llm_runtime import OnnxLLM

        if not spec.get("dir"):
            raise DescriberError("the describer's LLM spec needs a `dir`: build one with `iadgpt quantize-llm --out DIR`")
        return OnnxLLM(spec.pop("dir"), system_prompt=spec.pop("system_prompt", SYSTEM_PROMPT), **spec)
    raise DescriberError(f"unknown describer LLM kind {kind!r}: use onnx, fake or none")


def llm_spec_for(llm: Union[None, str, os.PathLike, LLMSpec], bundle: Any = None, threads: int = 1) -> LLMSpec:
    """An LLM spec from a folder path, a spec dict, or the bundle manifest's ``extra.llm``."""
    if isinstance(llm, dict):
        return dict(llm)
    if llm is not None:
        if str(llm) in ("none", "fake"):
            return {"kind": str(llm)}
        path = Path(llm).absolute()
        # checked here, in the station's process: a wrong folder is a start-up error, not a worker
        # that fails to start again and again
        missing = [rel for rel in read_llm_config(path).get("files", {}) if not (path / rel).is_file()]
        if missing:
            raise DescriberError(f"describer LLM {path} is incomplete: {missing[0]} is missing; rebuild it with "
                                 "`iadgpt quantize-llm --out DIR`")
        return {"kind": "onnx", "dir": str(path), "threads": threads}
    entry = (bundle.extra if bundle is not None else {}).get("llm")
    if entry:
        path = Path(entry["path"])
        if not path.is_absolute():
            path = Path(bundle.path) / path
        from iadgpt.runtime.llm_runtime import verify_llm_dir

        verify_llm_dir(path, entry.get("files"))
        return {"kind": "onnx", "dir": str(path), "threads": threads}
    raise DescriberError("no describer LLM: pass --llm DIR (made by `iadgpt quantize-llm --out DIR`) or record one "
                         "in the bundle (iadgpt.export.llm.record_in_bundle), or use --llm none for facts only")


# ----------------------------------------------------------------------------- synchronous describer


@dataclass
class ChatAnswer:
    """A follow-up answer, and the conversation to send with the next question: the turns that
    still fit the model's context plus this question and answer (so a trim is made, and logged, once)."""

    text: str
    generation: Optional[Generation]
    rejected: list[str]
    history: list[Message]


@dataclass
class DescribeRequest:
    """What the worker needs about one flagged frame (picklable, no Verdict/Frame objects)."""

    event_id: str
    image: np.ndarray
    anomaly_map: Optional[np.ndarray]
    regions: list[dict[str, Any]]
    score: Optional[float]
    threshold: Optional[float]
    region_embeddings: Optional[np.ndarray] = None
    question: Optional[str] = None
    submitted: float = 0.0  # time.time()
    request_id: int = 0
    features: Optional[list[np.ndarray]] = None  # encoder features (1, C, h, w) per layer, for the bridge

    @classmethod
    def from_verdict(cls, verdict: Any, image: np.ndarray, pixel_threshold: Optional[float] = None,
                     question: Optional[str] = None) -> "DescribeRequest":
        extra = verdict.extra or {}
        emb = extra.get("region_embeddings")
        thr = pixel_threshold if pixel_threshold is not None else extra.get("pixel_threshold", verdict.threshold)
        return cls(event_id=verdict.event_id, image=image, anomaly_map=verdict.anomaly_map,
                   regions=[r.to_dict() for r in verdict.regions], score=verdict.score, threshold=thr,
                   region_embeddings=None if emb is None else np.asarray(emb, np.float32), question=question,
                   submitted=time.time(), features=getattr(verdict, "features", None))


class _Box:
    """Region-like view of a region dict (box, peak) for compute_facts."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.box, self.peak = tuple(d["box"]), float(d.get("peak", float("nan")))


class Describer:
    """Facts + LLM remark for one frame, in the calling process (`iadgpt describe`, the worker)."""

    def __init__(self, llm: Any = None, product: str = "part", typer: Optional[TypeResolver] = None, *,
                 max_new_tokens: int = 32, budget_s: Optional[float] = None, max_words: int = MAX_WORDS,
                 bridge: Any = None, bridge_map: str = "decoder", bridge_budget_s: Optional[float] = None) -> None:
        self.llm, self.product, self.typer = llm, product, typer or TypeResolver()
        # bridge: an `OnnxBridge` (IAD-GPT's TGE + MMF + LLM reading the masks); used when a request
        # carries encoder features. Its answer joins the record and, checked, the description.
        # bridge_budget_s: from the start of describe(), after which the bridge gives up (its answer
        # is then recorded as an error) so the facts description is returned, never lost with it.
        self.bridge, self.bridge_map, self.bridge_budget_s = bridge, bridge_map, bridge_budget_s
        self.max_new_tokens, self.budget_s, self.max_words = int(max_new_tokens), budget_s, int(max_words)
        # the LLM's recent time to first token (prefill), to skip it when the budget left cannot cover it
        self.prefill_s: Optional[float] = None

    def facts(self, req: DescribeRequest) -> DefectFacts:
        return compute_facts(req.image, req.anomaly_map, [_Box(r) for r in req.regions], threshold=req.threshold,
                             score=req.score, typer=self.typer, region_embeddings=req.region_embeddings)

    def describe(self, req: DescribeRequest) -> dict[str, Any]:
        """The description record (``status`` "ok") for one request; raises DescriberError on bad input."""
        t0, started = time.perf_counter(), time.monotonic()
        facts = self.facts(req)
        t1 = time.perf_counter()
        gen: Optional[Generation] = None
        remark = ""
        skipped = None
        if self.llm is not None:
            left = None if self.budget_s is None else self.budget_s - (t1 - t0)
            if left is not None and (left <= 0.05 or (self.prefill_s is not None and left < self.prefill_s)):
                # the remark would be cut before its first word: do not spend the CPU on it
                skipped = (f"budget: {max(0.0, left):.2f} s of budget_s {self.budget_s:.2f} s left after the facts "
                           f"({t1 - t0:.2f} s); the LLM's prompt takes ~{self.prefill_s or 0.0:.2f} s")
                log.info("no LLM remark for %s: %s", req.event_id, skipped)
                if self.prefill_s is not None:  # one slow (cold) prompt must not silence the LLM for good:
                    self.prefill_s *= 0.5       # the estimate decays on each skip until it is tried again
            else:
                deadline = None if left is None else time.monotonic() + left
                prefix = "" if req.question else REMARK_PREFIX
                prompt = self.llm.format_chat(build_messages(facts, self.product, req.question), True) + prefix
                gen = self.llm.generate(prompt, self.max_new_tokens, stop_texts=SENTENCE_END, deadline=deadline)
                ttft = float(getattr(gen, "ttft_s", 0.0) or 0.0)
                self.prefill_s = ttft if self.prefill_s is None else 0.5 * (self.prefill_s + ttft)
                remark = complete_remark(f"{prefix} {gen.text}".strip() if prefix else gen.text, gen.stop)
        description, info = compose(facts, self.product, remark, self.max_words)
        if skipped:
            info["skipped"] = skipped
        bridge = self._bridge(req, facts, None if self.bridge_budget_s is None else started + self.bridge_budget_s)
        if bridge is not None and bridge["agrees_with_facts"]:
            description = f"{description} {bridge['text']}".strip()
        t2 = time.perf_counter()
        return {"kind": RECORD_KIND, "status": "ok", "description": description, "facts": facts.to_dict(),
                **({} if bridge is None else {"bridge": bridge}),
                "facts_text": facts.lines(), "product": self.product, "llm": {
                    **({} if gen is None else gen.to_dict()), **info,
                    "model": None if self.llm is None else self.llm.config.get("quantization", {}).get("scheme")},
                "timings_s": {"facts": round(t1 - t0, 4), "llm": round(t2 - t1, 4), "total": round(t2 - t0, 4)}}

    def _bridge(self, req: DescribeRequest, facts: DefectFacts, deadline: Optional[float]) -> Optional[dict[str, Any]]:
        """The bridge's answer for a request with features, and whether it agrees with the facts
        (anomalous, and the same grid position as the main region when both name one)."""
        if self.bridge is None or req.features is None:
            return None
        try:
            ans = self.bridge.ask(req.features, self.bridge_map, deadline=deadline).to_dict()
        except Exception as exc:  # noqa: BLE001 - the facts description must not be lost with it
            log.warning("bridge failed on %s: %s: %s", req.event_id, type(exc).__name__, exc)
            return {"error": f"{type(exc).__name__}: {exc}", "agrees_with_facts": False}
        main = facts.main
        where = getattr(main, "position", None) if main is not None else None
        ans["agrees_with_facts"] = bool(ans["anomalous"]) and (ans["position"] is None or where in (None, ans["position"]))
        return ans

    def answer(self, facts: dict[str, Any], facts_lines: Sequence[str], question: str,
               history: Sequence[Message] = (), max_new_tokens: int = 64) -> ChatAnswer:
        """A follow-up answer in a conversation about a described part (``iadgpt chat``).

        `facts` is the record's ``facts`` dict; an answer that contradicts it (position, type,
        brightness, colour, size or units) is replaced by the measured facts. When the conversation
        outgrows the model's context the oldest question/answer turns are left out (logged); a
        question that does not fit even alone raises `ContextOverflow`, before any compute."""
        if self.llm is None:
            text = "No LLM is loaded; the measured facts are: " + " ".join(facts_lines)
            return ChatAnswer(text, None, [], [*map(dict, history), *_turn(question, text)])
        first = f"Part: {self.product}.\n" + "\n".join(facts_lines)
        past = [dict(m) for m in history]
        dropped = 0
        while True:
            turns = past + [{"role": "user", "content": question}]
            turns[0] = {"role": "user", "content": f"{first}\n{turns[0]['content']}"}
            messages: list[Message] = [{"role": "system", "content": CHAT_SYSTEM_PROMPT}, *turns]
            try:
                gen = self.llm.generate(messages, max_new_tokens, stop_texts=("\n\n",))
                break
            except ContextOverflow as exc:
                if not past:
                    raise ContextOverflow(f"the question is too long for the model: {exc.prompt_tokens} tokens with "
                                          f"the facts, + {exc.new_tokens} for the answer, but the context holds "
                                          f"{exc.context}; ask a shorter question", exc.prompt_tokens, exc.new_tokens,
                                          exc.context) from None
                cut = 2 if len(past) >= 2 and past[1].get("role") == "assistant" else 1
                past, dropped = past[cut:], dropped + cut
        if dropped:
            log.warning("chat history trimmed: left out the %d oldest message(s) of %d to fit the model's context",
                        dropped, len(history))
        text = clip_words(dedupe_clauses(gen.text.strip()), self.max_words)
        issues = contradictions(text, facts_view(facts))
        if issues or not text:
            # the replacement stays out of the model's history: a 135M model shown it once copies it
            # word for word as its answer to every later question
            text = clip_words("By the measurements: " + " ".join(facts_lines), self.max_words)
            return ChatAnswer(text, gen, issues, past)
        return ChatAnswer(text, gen, issues, [*past, *_turn(question, text)])


def _turn(question: str, answer: str) -> list[Message]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def facts_view(facts: dict[str, Any]) -> DefectFacts:
    """A `DefectFacts` rebuilt from a record's ``facts`` dict (enough for `contradictions`)."""
    from types import SimpleNamespace

    regions = [SimpleNamespace(position=r.get("position"), defect_type=r.get("defect_type", UNKNOWN),
                               tone=r.get("tone"), colour=r.get("colour"), surround_colour=r.get("surround_colour"),
                               area_pct=_number(r.get("area_pct")), map_area_pct=_number(r.get("map_area_pct")))
               for r in facts.get("regions", [])]
    return SimpleNamespace(regions=regions, mm_per_px=facts.get("mm_per_px"))  # type: ignore[return-value]


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ----------------------------------------------------------------------------- the worker process


def _worker_main(conn: Any, llm_spec: Optional[LLMSpec], options: dict[str, Any], loop_idle: Any = None) -> None:
    """Worker process: build the LLM once, then answer requests one at a time until told to stop.

    `loop_idle` (a multiprocessing Event, clear while the station judges a frame) gates every
    model run of the LLM, so generation pauses at the next short step while a frame is judged."""
    logging.basicConfig(level=options.get("log_level", logging.WARNING),
                        format="%(asctime)s %(levelname)s describer-worker %(name)s: %(message)s")
    # Ctrl-C in a terminal reaches the whole process group: the station stops this worker itself,
    # after the parts still queued (dying here lost them and started a new worker during shutdown)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _lower_priority(options.get("nice"), bool(options.get("idle")))
    try:
        t0 = time.perf_counter()
        llm = _gated(make_llm(llm_spec), loop_idle)
        typer = TypeResolver(
            PromptTypeRetriever(*options["prompt_types"]) if options.get("prompt_types") else None,
            ExampleTypeClassifier(*options["examples"]) if options.get("examples") else None)
        bridge = make_bridge(options.get("bridge"), loop_idle, shared_llm=llm)
        describer = Describer(llm, options.get("product", "part"), typer,
                              max_new_tokens=options.get("max_new_tokens", 32), budget_s=options.get("budget_s"),
                              bridge=bridge, bridge_map=(options.get("bridge") or {}).get("map", "decoder"),
                              bridge_budget_s=options.get("bridge_budget_s"))
        conn.send(("ready", {"load_s": time.perf_counter() - t0, "pid": os.getpid(), "rss_mb": _rss_mb()}))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which logs it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if msg is None:
            return
        req: DescribeRequest = msg
        try:
            record = describer.describe(req)
            record["worker_rss_mb"] = _rss_mb()
            conn.send(("ok", req.request_id, record))
        except Exception as exc:  # noqa: BLE001 - one bad request must not kill the worker
            conn.send(("failed", req.request_id, f"{type(exc).__name__}: {exc}"))


def bridge_options(bridge: Optional[Union[str, os.PathLike]], llm: Optional[Union[str, os.PathLike]],
                   map_kind: str = "decoder", threads: int = 1, decoding: str = "choice") -> Optional[dict[str, Any]]:
    """The worker's bridge settings, checked in the station's process (config errors surface at start)."""
    if bridge is None:
        if llm is not None:
            raise ConfigError("describer: bridge_llm is set but bridge is not; give the exported bridge folder too")
        return None
    from iadgpt.runtime.bridge_runtime import DECODINGS, read_bridge_config

    if map_kind not in ("decoder", "memory_bank"):
        raise ConfigError(f"describer: bridge_map {map_kind!r}: use decoder or memory_bank")
    if decoding not in DECODINGS:
        raise ConfigError(f"describer: bridge_decoding {decoding!r}: use {' or '.join(DECODINGS)}")
    if llm is None:
        raise ConfigError("describer: the bridge needs bridge_llm, an inputs_embeds LLM folder "
                          "(`iadgpt quantize-llm --embeds --out DIR`)")
    read_bridge_config(bridge)  # a folder that is not a bridge fails here, with its fix
    return {"dir": str(Path(bridge).absolute()), "llm": str(Path(llm).absolute()), "map": map_kind,
            "threads": int(threads), "decoding": decoding}


def make_bridge(options: Optional[dict[str, Any]], loop_idle: Any = None, shared_llm: Any = None) -> Any:
    """The worker's `OnnxBridge` (None without bridge options); its LLM pauses with the loop like the describer's.

    `shared_llm`: the describer's LLM; when it is the bridge_llm folder (an inputs_embeds build also
    writes text) the bridge uses it instead of loading a second copy (~300 MB on SmolLM2-135M)."""
    if not options:
        return None
    from iadgpt.runtime.bridge_runtime import OnnxBridge
    from iadgpt.runtime.llm_runtime import OnnxLLM

    if shared_llm is not None and Path(str(getattr(shared_llm, "dir", ""))).resolve() == Path(options["llm"]).resolve():
        llm = shared_llm  # already gated by the worker
    else:
        llm = _gated(OnnxLLM(options["llm"], threads=options["threads"]), loop_idle)
    return OnnxBridge(options["dir"], llm, threads=options["threads"], decoding=options["decoding"])


def _gated(llm: Any, loop_idle: Any) -> Any:
    """`llm` with its model runs waiting while the station judges a frame (`loop_idle` clear)."""
    if loop_idle is not None and hasattr(llm, "gate"):
        llm.gate = functools.partial(loop_idle.wait, GATE_MAX_WAIT_S)
    return llm


def _lower_priority(nice: Optional[int], idle: bool, pid: int = 0) -> None:
    """Let the verdict loop win every contended core: SCHED_IDLE (Linux) runs the worker only on
    otherwise idle CPU time; else (or as well) a higher nice value. `pid` 0 is this process; the
    station also applies it to a new worker right away, before the worker's imports cost CPU."""
    if idle and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
        except (OSError, AttributeError) as exc:
            log.debug("SCHED_IDLE not available: %s", exc)
    if nice:
        try:  # `nice` above the station's own niceness; the same target from either side, so applied once
            station = os.getpid() if pid else os.getppid()
            target = min(19, os.getpriority(os.PRIO_PROCESS, station) + int(nice))
            worker = pid or os.getpid()
            os.setpriority(os.PRIO_PROCESS, worker, max(target, os.getpriority(os.PRIO_PROCESS, worker)))
        except (OSError, AttributeError):
            pass


def _rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------- the async describer

_INT_OPTIONS = ("threads", "queue_size", "max_new_tokens", "nice", "keep_results")
_NUMBER_OPTIONS = ("timeout_s", "budget_s", "pixel_threshold")
_TEXT_OPTIONS = ("llm", "product", "examples", "bridge", "bridge_llm", "bridge_map", "bridge_decoding")


def _check_option_types(options: dict[str, Any]) -> None:
    """Wrong types in station.yaml's ``describer:`` are a ConfigError naming the key, at start."""
    for key, value in options.items():
        if value is None:
            continue
        if key == "llm" and isinstance(value, dict):  # a spec such as {kind: fake}: llm_spec_for reads it
            continue
        if key in _INT_OPTIONS:
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif key in _NUMBER_OPTIONS:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
            want = "a finite number"
        elif key in _TEXT_OPTIONS:
            ok, want = isinstance(value, str) and bool(value.strip()), "a non-empty string"
        elif key == "idle":
            ok, want = isinstance(value, bool), "true or false"
        else:
            continue
        if not ok:
            raise ConfigError(f"describer.{key}: expected {want}, got {value!r} ({type(value).__name__})")


class _SharedSink:
    """A station-facing proxy of a sink whose real `close` waits for the describer (see `share`)."""

    def __init__(self, sink: Any, owner: "AsyncDescriber") -> None:
        self._sink, self._owner = sink, owner
        self.name = getattr(sink, "name", type(sink).__name__)

    @property
    def errors(self) -> int:
        return int(getattr(self._sink, "errors", 0) or 0)

    def write(self, verdict: Any, frame: Any) -> None:
        self._sink.write(verdict, frame)

    def close(self) -> None:
        self._owner._station_closed.add(id(self._sink))

    def __getattr__(self, item: str) -> Any:
        return getattr(self._sink, item)


LATENCY_WINDOW = 4096  # described parts the latency percentiles cover


@dataclass
class DescriberStats:
    submitted: int = 0
    described: int = 0
    failed: int = 0  # timeouts, worker deaths, errors, queue full, stopped
    timeouts: int = 0
    worker_deaths: int = 0
    rejected: int = 0  # queue full
    restarts: int = 0
    # submit -> record of the recent described parts (bounded: a station describes for months)
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def to_dict(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_s or [np.nan])
        return {"submitted": self.submitted, "described": self.described, "failed": self.failed,
                "timeouts": self.timeouts, "worker_deaths": self.worker_deaths, "rejected": self.rejected,
                "restarts": self.restarts, "latency_p50_s": float(np.nanpercentile(lat, 50)) if self.latencies_s else None,
                "latency_p95_s": float(np.nanpercentile(lat, 95)) if self.latencies_s else None}


class AsyncDescriber:
    """Describes flagged parts in a worker process; ``submit`` never blocks (see module doc).

    `sinks`: objects with ``append(event_id, record)`` that receive every record (others are
    skipped). `queue_size` bounds the requests waiting for the worker (a request beyond it is
    failed at once with "queue full"); `timeout_s` bounds one request's time in the worker (then
    the worker is killed and restarted); `budget_s` is the LLM's soft deadline inside the worker
    (the remark is cut short rather than the request failed); the bridge, when set, gives up at
    `BRIDGE_BUDGET_SHARE` of `timeout_s` (its answer recorded as an error, the description kept).
    `pixel_threshold`: the map value above which a pixel is anomalous, for the region masks (an
    explicit setting); else the verdict's ``extra["pixel_threshold"]`` (the Detector's, which drew its
    regions, as `iadgpt describe` uses), else its image threshold.
    `keep_results`: the latest records kept in `results` for callers that read them (every record
    goes to the sinks; ~9 kB each, so the station keeps few).
    """

    def __init__(self, llm: Union[None, str, os.PathLike, LLMSpec] = None, *, product: str = "part",
                 sinks: Sequence[Any] = (), queue_size: int = 16, timeout_s: float = 10.0,
                 budget_s: Optional[float] = 1.0, max_new_tokens: int = 24,
                 examples: Optional[ExampleTypeClassifier] = None,
                 prompt_types: Optional[PromptTypeRetriever] = None, pixel_threshold: Optional[float] = None,
                 nice: int = 19, idle: bool = True, start_timeout_s: float = 120.0, max_restart_delay_s: float = 30.0,
                 keep_results: int = 256, on_result: Optional[Callable[[str, dict[str, Any]], None]] = None,
                 bridge: Optional[Union[str, os.PathLike]] = None, bridge_llm: Optional[Union[str, os.PathLike]] = None,
                 bridge_map: str = "decoder", bridge_decoding: str = "choice", threads: int = 1,
                 start: bool = True) -> None:
        if int(queue_size) < 1 or float(timeout_s) <= 0:
            raise ConfigError(f"describer queue_size={queue_size} must be >= 1 and timeout_s={timeout_s} > 0")
        self.llm_spec = llm_spec_for(llm) if llm is not None else {"kind": "none"}
        self.product, self.queue_size, self.timeout_s = product, int(queue_size), float(timeout_s)
        self.pixel_threshold = pixel_threshold
        self.start_timeout_s, self.max_restart_delay_s = float(start_timeout_s), float(max_restart_delay_s)
        self.options: dict[str, Any] = {
            "product": product, "max_new_tokens": int(max_new_tokens), "budget_s": budget_s, "nice": int(nice),
            "idle": bool(idle),
            "examples": None if examples is None else (examples.features, examples.labels, examples.k),
            "prompt_types": None if prompt_types is None else (prompt_types.embeddings, prompt_types.types),
            "log_level": logging.getLogger().getEffectiveLevel(),
            "bridge": bridge_options(bridge, bridge_llm, bridge_map, threads, bridge_decoding),
            # the bridge stops at this share of timeout_s, so the worker answers before it is killed
            "bridge_budget_s": BRIDGE_BUDGET_SHARE * float(timeout_s)}
        self.sinks = list(sinks)
        self.on_result = on_result
        self.stats = DescriberStats()
        self.results: "OrderedDict[str, dict[str, Any]]" = OrderedDict()
        self.keep_results = int(keep_results)
        self.worker_info: dict[str, Any] = {}
        self._ctx = mp.get_context("spawn")
        self._loop_idle = self._ctx.Event()
        self._loop_idle.set()
        self._pending: deque[DescribeRequest] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closing = False
        self._stop = False
        self._ready = threading.Event()
        self._proc: Optional[Any] = None
        self._conn: Optional[Any] = None
        self._busy: Optional[DescribeRequest] = None
        self._station_closed: set[int] = set()
        self._warn = ThrottledLog(log)
        self._thread: Optional[threading.Thread] = None
        self._start_failures = 0  # worker starts that failed in a row
        self._restarts_in_row = 0  # workers killed or dead since the last description
        self._abort_drain = False  # set by `abort_drain` (e.g. a second signal): `close` stops waiting
        if start:
            self.start()

    OPTIONS = ("llm", "product", "threads", "queue_size", "timeout_s", "budget_s", "max_new_tokens", "examples",
               "pixel_threshold", "idle", "nice", "bridge", "bridge_llm", "bridge_map", "bridge_decoding")

    @property
    def wants_features(self) -> bool:
        """True when the worker runs the bridge: the station then keeps flagged frames' features."""
        return self.options.get("bridge") is not None

    @classmethod
    def from_options(cls, options: dict[str, Any], bundle: Any = None, **kwargs: Any) -> "AsyncDescriber":
        """From station.yaml's ``describer:`` keys (`DescriberConfig.options`): llm (folder, or "none";
        default the bundle's extra.llm), product, threads, queue_size, timeout_s, budget_s,
        max_new_tokens, examples (a folder saved by ExampleTypeClassifier.save), pixel_threshold,
        idle, nice, bridge (an exported bridge folder: `iadgpt export-bridge`), bridge_llm (its
        inputs_embeds LLM: `iadgpt quantize-llm --embeds`), bridge_map (decoder | memory_bank),
        bridge_decoding (choice: the likeliest of the ten template answers | greedy text).
        Unknown keys are a ConfigError. The bundle's defect-prompt embeddings are used
        for the type when present."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ConfigError(f"describer: unknown key(s) {', '.join(unknown)}; known: {', '.join(cls.OPTIONS)}")
        _check_option_types(options)
        opts = dict(options)
        threads = int(opts.get("threads", 1))
        spec = llm_spec_for(opts.pop("llm", None), bundle, threads=threads)
        examples = opts.pop("examples", None)
        product = opts.pop("product", None) or (bundle.scorer.get("object") if bundle is not None else None) or "part"
        return cls(spec, product=product,
                   examples=ExampleTypeClassifier.load(examples) if examples else None,
                   prompt_types=PromptTypeRetriever.from_bundle(bundle) if bundle is not None else None,
                   **opts, **kwargs)

    # -- lifecycle

    def start(self) -> "AsyncDescriber":
        if self._thread is None:
            self._thread = threading.Thread(target=self._dispatch, name="iadgpt-describer", daemon=True)
            self._thread.start()
        return self

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Wait until a worker has loaded its LLM (True) or `timeout` passed (False)."""
        return self._ready.wait(timeout)

    @property
    def worker_pid(self) -> Optional[int]:
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    @contextlib.contextmanager
    def loop_busy(self):
        """Held by the station while it judges a frame: the worker's LLM pauses at its next step."""
        self._loop_idle.clear()
        try:
            yield
        finally:
            self._loop_idle.set()

    def share(self, sinks: Iterable[Any]) -> list[Any]:
        """Proxies of `sinks` for the station: writes go through, ``close`` is deferred to ours.

        Sinks with ``append`` also receive the describer's records."""
        out = []
        for sink in sinks:
            if hasattr(sink, "append") and sink not in self.sinks:
                self.sinks.append(sink)
            out.append(_SharedSink(sink, self))
        return out

    def abort_drain(self) -> None:
        """Make a running (or the next) `close` stop describing at once and fail what is left.
        Only sets a flag, so a signal handler may call it."""
        self._abort_drain = True

    def close(self, drain_timeout_s: Optional[float] = None) -> DescriberStats:
        """Stop accepting, describe what is queued (at most `drain_timeout_s`, default
        queue length x timeout; not at all while no worker can start, or after `abort_drain`),
        fail what is left, stop the worker, close the shared sinks."""
        with self._cond:
            if self._closing and self._thread is None:
                return self.stats
            self._closing = True
            waiting = len(self._pending) + (self._busy is not None)
            self._cond.notify_all()
        limit = drain_timeout_s if drain_timeout_s is not None else (waiting + 1) * self.timeout_s + self.start_timeout_s
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not self._abort_drain:
            with self._cond:
                if not self._pending and self._busy is None:
                    break
                if self._start_failures and not self._ready.is_set():
                    log.warning("describer: no worker could start (%s); not waiting for the %d queued part(s)",
                                self.worker_info.get("error", "?"), len(self._pending))
                    break
            time.sleep(0.02)
        with self._cond:
            self._stop = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for req in left:
            self._fail(req, "describer stopped before this part was described")
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5.0)
            self._thread = None
        self._stop_worker()
        for sink in self.sinks:
            if id(sink) in self._station_closed:
                try:
                    sink.close()
                except Exception:  # noqa: BLE001
                    log.exception("closing sink %s failed", getattr(sink, "name", type(sink).__name__))
        return self.stats

    def __enter__(self) -> "AsyncDescriber":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- station side

    def submit(self, verdict: Any, frame: Any, question: Optional[str] = None) -> None:
        """Queue a flagged frame for description; returns at once (never blocks on the worker)."""
        image = getattr(frame, "image", None)
        if image is None:
            return
        req = DescribeRequest.from_verdict(verdict, image, self.pixel_threshold, question)
        req.request_id = next(self._ids)
        with self._cond:
            self.stats.submitted += 1
            if self._closing:
                rejected = "describer is shutting down"
            elif len(self._pending) >= self.queue_size:
                rejected = f"describer queue full ({self.queue_size} parts waiting): flagged parts arrive faster " \
                           "than they are described"
            else:
                self._pending.append(req)
                self._cond.notify()
                return
        with self._cond:
            self.stats.rejected += 1
        self._warn("rejected", logging.WARNING, "event %s not described: %s", req.event_id, rejected)
        self._fail(req, rejected)

    # -- dispatcher thread

    def _pause(self, delay: float) -> bool:
        """Wait `delay` s (submits do not cut it short); False when stopped meanwhile."""
        deadline = time.monotonic() + delay
        with self._cond:
            while not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                self._cond.wait(left)
        return False

    def _backoff(self, failures: int) -> float:
        return min(self.max_restart_delay_s, 0.5 * 2 ** min(failures, 8))

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
            if self._proc is None or not self._proc.is_alive():
                if self._restarts_in_row:  # an LLM that crashes on every part: each new worker's start-up
                    # costs CPU the verdict loop needs, so restarts back off like failed starts
                    if not self._pause(self._backoff(self._restarts_in_row - 1)):
                        return
                if not self._start_worker():
                    with self._cond:
                        if self._stop:  # closed while a worker was loading: not a failure
                            return
                    self._start_failures += 1
                    delay = self._backoff(self._start_failures)
                    self._warn("start", logging.ERROR, "describer worker failed to start (%s); retrying in %.1f s",
                               self.worker_info.get("error", "?"), delay)
                    self._pause(delay)
                    continue
                self._start_failures = 0
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait(0.5)
                    if self._proc is not None and not self._proc.is_alive():
                        break
                if self._stop:
                    return
                if not self._pending:
                    continue
                req = self._pending.popleft()
                self._busy = req
            try:
                self._serve(req)
            finally:
                with self._cond:
                    self._busy = None

    def _serve(self, req: DescribeRequest) -> None:
        conn = self._conn
        t_sent = time.monotonic()
        try:
            conn.send(req)
        except (OSError, EOFError, ValueError) as exc:
            self._on_worker_death(req, f"could not send the request to the worker ({exc})")
            return
        deadline = t_sent + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if self._abort_drain or self._stop:  # a second signal, or `close`'s drain time is up
                self._kill_worker()
                self._fail(req, "describer stopped before this part was described")
                return
            if left <= 0:
                self.stats.timeouts += 1
                self._restarts_in_row += 1
                self._kill_worker()
                self._fail(req, f"timeout: no description within {self.timeout_s:.1f} s; the describer worker "
                                "was restarted")
                return
            try:
                if conn.poll(min(left, 0.25)):
                    msg = conn.recv()
                    break
            except (EOFError, OSError):
                self._on_worker_death(req, "the describer worker died")
                return
            if not self._proc.is_alive() and not conn.poll(0):
                self._on_worker_death(req, "the describer worker died")
                return
        status = msg[0]
        if status == "ok" and msg[1] == req.request_id:
            record = msg[2]
            latency = time.time() - req.submitted
            record["latency_s"] = round(latency, 4)
            record["worker_s"] = round(time.monotonic() - t_sent, 4)
            self._restarts_in_row = 0
            self.stats.described += 1
            self.stats.latencies_s.append(latency)
            self._deliver(req.event_id, record)
        elif status == "failed":
            self._fail(req, f"describer error: {msg[2]}")
        else:
            self._fail(req, f"unexpected answer from the describer worker: {status!r}")

    def _on_worker_death(self, req: DescribeRequest, why: str) -> None:
        proc = self._proc
        if proc is not None:
            proc.join(1.0)  # the pipe closes before the process is reaped: wait for its exit code
        code = proc.exitcode if proc is not None else None
        self.stats.worker_deaths += 1
        self._restarts_in_row += 1
        self._kill_worker()
        self._warn("death", logging.ERROR, "%s (exit code %s) while describing event %s; restarting it", why, code,
                   req.event_id)
        self._fail(req, f"{why} (exit code {code}); it was restarted")

    # -- worker management

    def _start_worker(self) -> bool:
        if self._proc is not None:
            self.stats.restarts += 1
        self._ready.clear()
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.llm_spec, self.options, self._loop_idle),
                                 name="iadgpt-describer-worker", daemon=True)
        proc.start()
        _lower_priority(self.options.get("nice"), bool(self.options.get("idle")), pid=proc.pid)
        child.close()
        self._proc, self._conn = proc, parent
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                if self._stop:
                    return False
            try:
                if parent.poll(0.25):
                    msg = parent.recv()
                    if msg[0] == "ready":
                        self.worker_info = dict(msg[1])
                        self._ready.set()
                        log.info("describer worker %s ready in %.1f s (%s MB)", proc.pid, msg[1]["load_s"],
                                 msg[1].get("rss_mb"))
                        return True
                    self.worker_info = {"error": msg[1]}
                    break
            except (EOFError, OSError):
                self.worker_info = {"error": f"worker exited with code {proc.exitcode} while loading"}
                break
            if not proc.is_alive():
                self.worker_info = {"error": f"worker exited with code {proc.exitcode} while loading"}
                break
        else:
            self.worker_info = {"error": f"worker not ready after {self.start_timeout_s:.0f} s"}
        self._kill_worker()
        return False

    def _kill_worker(self) -> None:
        proc, conn = self._proc, self._conn
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(5.0)
        self._ready.clear()

    def _stop_worker(self) -> None:
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        if proc.is_alive() and conn is not None:
            try:
                conn.send(None)
                proc.join(3.0)
            except (OSError, EOFError, ValueError):
                pass
        self._kill_worker()
        self._proc = None

    # -- records

    def _fail(self, req: DescribeRequest, error: str) -> None:
        with self._cond:
            self.stats.failed += 1
        self._deliver(req.event_id, {"kind": RECORD_KIND, "status": "failed", "error": error,
                                     "description": None, "latency_s": round(time.time() - req.submitted, 4)})

    def _deliver(self, event_id: str, record: dict[str, Any]) -> None:
        self.results[event_id] = record
        while len(self.results) > self.keep_results:
            self.results.popitem(last=False)
        for sink in self.sinks:
            append = getattr(sink, "append", None)
            if append is None:
                continue
            try:
                append(event_id, record)
            except Exception as exc:  # noqa: BLE001 - a sink never stops the describer
                self._warn(f"sink:{getattr(sink, 'name', '?')}", logging.ERROR, "describer could not append to %s: %s",
                           getattr(sink, "name", type(sink).__name__), exc)
        if self.on_result is not None:
            try:
                self.on_result(event_id, record)
            except Exception:  # noqa: BLE001
                log.exception("describer on_result callback failed")


__all__ = ["AsyncDescriber", "ChatAnswer", "Describer", "DescribeRequest", "FakeLLM", "make_llm", "llm_spec_for", "DescriberStats"]
