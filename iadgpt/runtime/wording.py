"""What the describer says: the facts sentence, the LLM's prompts, and the checks a remark must
pass before it joins a description.

A 135M LLM cannot be trusted to restate facts, so the description is composed: the measured facts
as a plain sentence (`facts_sentence`), then the LLM's one-sentence remark only if it names no
position, defect type or brightness the facts contradict (`contradictions`), says something the
facts do not (`_restates`), and fits within `MAX_WORDS`.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from iadgpt.runtime.facts import POSITION_WORDS, UNKNOWN, DefectFacts
from iadgpt.runtime.llm_runtime import Message

MAX_WORDS = 60
REMARK_WORDS = 22
# The standing question and a little domain knowledge live in the system prompt: its KV cache is
# computed once per worker, so they cost no time per part.
SYSTEM_PROMPT = ("You are an experienced quality engineer. Typical causes: scratches come from handling or tool "
                 "contact; cracks from fatigue, overload or heat; holes from porosity or a drilling error; stains "
                 "from oil, coolant or corrosion; missing material from chipping or a machining error. Given the "
                 "facts about a defect, answer with the likely cause and one thing to check, in one short sentence, "
                 "without repeating the facts.")
CHAT_SYSTEM_PROMPT = ("You assist a quality inspector on a production line. Use only the measured facts you are "
                      "given; if they do not answer the question, say so. Answer in at most two short sentences.")
REMARK_PREFIX = "Likely cause:"  # starts the assistant's turn: no preamble tokens, straight to the point
SENTENCE_END = (". ", ".\n", "!", "?", "\n")
DEFECT_WORDS = ("scratch", "crack", "hole", "stain", "missing", "dent", "rust", "chip", "contamination", "burr",
                "tear", "deformation")


def _word_forms(word: str) -> str:
    """A regex matching a defect word and its common forms (scratch/scratches/scratched)."""
    stem = re.escape(word[:-1]) if word.endswith("e") else re.escape(word)
    return rf"\b{stem}(?:e|es|s|ed|ing|y)?\b"


def _position_mentions(text: str) -> list[str]:
    """Grid position names in `text`, longest first so "top left" is not also read as "top" and "left"."""
    t = " " + re.sub(r"[^a-z]+", " ", text.lower()) + " "
    t = t.replace(" upper ", " top ").replace(" lower ", " bottom ").replace(" middle ", " center ") \
        .replace(" centre ", " center ").replace(" top-left ", " top left ")
    found = []
    for name in sorted(POSITION_WORDS, key=len, reverse=True):
        pattern = rf"\b{name}\b"
        if re.search(pattern, t):
            found.append(name)
            t = re.sub(pattern, " ", t)
    return found


def contradictions(text: str, facts: DefectFacts, vocabulary: Sequence[str] = DEFECT_WORDS) -> list[str]:
    """What in `text` conflicts with `facts`: positions, defect types or brightness not measured.

    A position word is allowed only if some region is there (the whole 3x3 cell name or its row/
    column word: "top" fits "top left"); a defect word only if it is a region's type (a region of
    unknown type allows none); "darker"/"lighter" only if a region has that tone.
    """
    issues = []
    positions = {r.position for r in facts.regions}
    allowed_words = set(positions) | {w for p in positions for w in p.split()}
    for name in _position_mentions(text):
        if name not in positions and not (name in allowed_words and name != "center"):
            issues.append(f"position '{name}' (measured: {', '.join(sorted(positions)) or 'none'})")
    types = {r.defect_type for r in facts.regions if r.defect_type != UNKNOWN}
    low = re.sub(r"\b[a-z]+-like\b", " ", text.lower())  # "scratch-like" is a shape, not a type
    for word in dict.fromkeys([*vocabulary, *types]):
        if word in types or not word:
            continue
        if any(word != t and (word in t.split() or t.startswith(word)) for t in types):
            continue
        if re.search(_word_forms(word), low):
            issues.append(f"type '{word}' (measured: {', '.join(sorted(types)) or 'unknown'})")
    tones = {r.tone for r in facts.regions}
    if re.search(r"\b(darker|dark spot)\b", low) and "darker" not in tones:
        issues.append(f"'darker' (measured: {', '.join(sorted(tones))})")
    if re.search(r"\b(lighter|brighter)\b", low) and "lighter" not in tones:
        issues.append(f"'lighter' (measured: {', '.join(sorted(tones))})")
    return issues


_STOP_WORDS = frozenset("a an the of and or to in on at by is it its this that with from for be was as likely "
                        "cause caused check".split())


def _content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z-]+", text.lower()) if w not in _STOP_WORDS]


def dedupe_clauses(text: str) -> str:
    """Cut a remark where it starts repeating itself (small models loop: "a lack of x, a lack of y, a lack of x")."""
    clauses = re.split(r"(?<=[,;])\s+", text)
    kept: list[str] = []
    seen: list[set[str]] = []
    for clause in clauses:
        words = set(_content_words(clause))
        if words and any(len(words & old) >= 0.6 * len(words) for old in seen):
            break
        kept.append(clause)
        seen.append(words)
    out = " ".join(kept).strip()
    return out if out == text else out.rstrip(",;") + "."


def _restates(remark: str, base: str) -> list[str]:
    """Reject a remark that only repeats the facts sentence (most of its content words are in it)."""
    words = _content_words(remark.split(":", 1)[-1])
    known = set(_content_words(base)) | {w for w in _content_words(base) for w in w.split("-")}
    new = [w for w in words if w not in known and not re.fullmatch(r"[0-9.%]+", w)]
    if len(words) < 2 or len(new) < max(2, 0.5 * len(words)):
        return ["the remark only restates the facts"]
    return []


def complete_remark(text: str, stop: str) -> str:
    """A remark cut by the token limit or the deadline, trimmed back to its last full clause
    (nothing if none is left beyond the remark prefix)."""
    text = text.strip()
    if stop in ("eos", "stop_text") or text.endswith((".", "!", "?")):
        return text
    cut = max(text.rfind(". "), text.rfind("; "), text.rfind(", "))
    if cut <= len(REMARK_PREFIX) + 8:
        return ""
    return text[:cut].rstrip(",;") + "."


def _words(text: str) -> list[str]:
    return text.split()


def clip_words(text: str, limit: int) -> str:
    words = _words(text)
    if len(words) <= limit:
        return text.strip()
    cut = " ".join(words[:limit]).rstrip(",;:")
    return cut + ("" if cut.endswith((".", "!", "?")) else "...")


def facts_sentence(facts: DefectFacts, product: str = "part") -> str:
    """The measured facts as one or two plain sentences (the part of a description never left to the LLM)."""
    r = facts.main
    if r is None:
        return f"Anomaly on the {product} (score {facts.score:.3f}); no region could be located." \
            if facts.score is not None else f"Anomaly on the {product}; no region could be located."
    what = r.defect_type.capitalize() if r.defect_type != UNKNOWN else "Defect of unknown type"
    where = "in the center" if r.position == "center" else f"at the {r.position}"
    tone = "similar in brightness to its surroundings" if r.tone == "similar brightness" else \
        f"{r.tone} than its surroundings"
    orient = "" if r.orientation == "none" else f" {r.orientation}"
    text = (f"{what} {where} of the {product}: {r.area_pct:.1f}% of the part ({r.area_px} px), "
            f"{r.shape}{orient}, {tone}, {r.colour}.")
    if facts.n_regions > 1:
        others = ", ".join(o.position for o in facts.regions[1:4])
        text += f" {facts.n_regions} regions in all (also: {others})."
    return text


def build_messages(facts: DefectFacts, product: str = "part", question: Optional[str] = None,
                   history: Sequence[Message] = (), system: str = SYSTEM_PROMPT) -> list[Message]:
    """The chat for the LLM: the system prompt (which holds the standing question, so its KV cache
    is computed once per worker), the product and facts in the first user turn, then `history`
    (earlier question/answer turns) and `question`."""
    first = f"Part: {product}.\n" + "\n".join(facts.lines())
    messages = [{"role": "system", "content": system}]
    if history:
        messages.append({"role": "user", "content": first + f"\n{history[0]['content']}"})
        messages.extend(dict(m) for m in history[1:])
        if question:
            messages.append({"role": "user", "content": question})
    else:
        messages.append({"role": "user", "content": first + (f"\n{question}" if question else "")})
    return messages


def compose(facts: DefectFacts, product: str, remark: str, max_words: int = MAX_WORDS) -> tuple[str, dict[str, Any]]:
    """(description, info): the facts sentence plus the LLM's remark when it is safe and fits."""
    base = facts_sentence(facts, product)
    info: dict[str, Any] = {"remark": remark, "remark_used": False, "rejected": []}
    remark = dedupe_clauses(re.sub(r"\s+", " ", remark or "").strip())
    if remark:
        issues = contradictions(remark, facts) or _restates(remark, base)
        if issues:
            info["rejected"] = issues
        else:
            room = max_words - len(_words(base))
            if room >= 6:
                info["remark_used"] = True
                return f"{base} {clip_words(remark, min(room, REMARK_WORDS))}", info
            info["rejected"] = ["no room left within the word limit"]
    return clip_words(base, max_words), info


__all__ = ["MAX_WORDS", "SYSTEM_PROMPT", "CHAT_SYSTEM_PROMPT", "build_messages", "clip_words", "complete_remark",
           "compose", "contradictions", "dedupe_clauses", "facts_sentence"]
