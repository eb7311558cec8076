"""`iadgpt chat EVENTS.jsonl --event ID`: follow-up questions about a described part, with history."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="ask follow-up questions about a flagged, described part of an event log")
    p.add_argument("events", type=Path, help="the station's JSONL event log")
    p.add_argument("--event", required=True, help="event id (see the log's event_id field)")
    p.add_argument("--llm", default=None, help="quantized LLM folder (default: the one that described the event's "
                                               "bundle, from --bundle)")
    p.add_argument("--bundle", type=Path, default=None, help="bundle whose extra.llm names the LLM")
    p.add_argument("-q", "--question", action="append", default=None,
                   help="ask this (repeatable; without it, questions are read from standard input)")
    p.add_argument("--record", action="store_true", help="append each question and answer to the event log")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..runtime.describer import Describer, llm_spec_for, make_llm
    from ..runtime.llm_runtime import ContextOverflow
    from ..runtime.sinks import JsonlSink, read_events

    if not args.events.exists():  # read_events reads a missing log as empty: say so instead of "no event"
        raise ConfigError(f"{args.events}: no such event log; give the JSONL file the station writes "
                          "(sinks.events.path in station.yaml)")
    events = [e for e in read_events(args.events) if str(e.get("event_id")) == args.event]
    if not events:
        raise ConfigError(f"no event {args.event!r} in {args.events}; list ids with: grep -o '\"event_id\":\"[^\"]*\"' "
                          f"{args.events}")
    event = events[-1]
    # Hand-edited or foreign logs: keep only well-formed updates, and descriptions that carry their text.
    updates = event.get("updates")
    updates = [u for u in updates if isinstance(u, dict)] if isinstance(updates, list) else []
    described = [u for u in updates if u.get("kind") == "description" and u.get("status") == "ok"
                 and isinstance(u.get("description"), str)]
    if not described:
        raise ConfigError(_no_description(args.event, event, updates))
    desc = described[-1]
    bundle = None
    if args.llm is None and args.bundle is not None:
        from ..bundle import Bundle
        bundle = Bundle.load(args.bundle)
    product = desc.get("product") if isinstance(desc.get("product"), str) else "part"
    facts = desc.get("facts") if isinstance(desc.get("facts"), dict) else {}
    regions = facts.get("regions")
    facts = {**facts, "regions": [r for r in regions if isinstance(r, dict)] if isinstance(regions, list) else []}
    lines = desc.get("facts_text")
    lines = [str(x) for x in lines] if isinstance(lines, list) else []
    describer = Describer(make_llm(llm_spec_for(args.llm, bundle, threads=args.threads)), product)
    print(f"event {args.event}: {desc['description']}")
    history: list[dict[str, str]] = []
    sink = JsonlSink(args.events) if args.record else None
    questions = iter(args.question) if args.question else _stdin_questions()
    try:
        for question in questions:
            try:
                reply = describer.answer(facts, lines, question, history)
            except ContextOverflow as exc:  # that one question is refused; the session goes on
                print(f"> {question[:80]}{'...' if len(question) > 80 else ''}\nnot asked: {exc}", file=sys.stderr)
                continue
            print(f"> {question}\n{reply.text}")
            if reply.rejected:
                print(f"  (the model's answer contradicted the measurements: {'; '.join(reply.rejected)})")
            history = reply.history
            if sink is not None:
                gen = reply.generation
                sink.append(args.event, {"kind": "chat", "question": question, "answer": reply.text,
                                         "rejected": reply.rejected, "llm": None if gen is None else gen.to_dict()})
    finally:
        if sink is not None:
            sink.close()
    return 0


def _no_description(event_id: str, event: dict, updates: list) -> str:
    """Why an event has no description to talk about, and what to do."""
    failed = [u.get("error") for u in updates if u.get("kind") == "description" and u.get("status") == "failed"]
    if failed:
        return (f"event {event_id} has no description to talk about (the describer failed: {failed[-1]}); "
                "describe its image with `iadgpt describe IMAGE --bundle B`")
    if event.get("anomalous") is False:
        return f"event {event_id} was judged OK: there is no defect to describe or talk about"
    if event.get("anomalous") is True:
        return (f"event {event_id} has no description yet: the describer writes it after the verdict (it may still "
                "be queued); try again shortly. If the station ran without the describer, use "
                "`iadgpt describe IMAGE --bundle B`")
    return (f"event {event_id} has no description to talk about; run the station with the describer on, or "
            "`iadgpt describe IMAGE --bundle B`")


def _stdin_questions():
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("question (empty line to end): ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return
        yield line.strip()
