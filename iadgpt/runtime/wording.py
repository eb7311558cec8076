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
                      "given; if they do not answer the question, say so. Sizes are known only in % of the part "
                      "and in pixels, never in millimetres. Answer in at most two short sentences.")
REMARK_PREFIX = "Likely cause:"  # starts the assistant's turn: no preamble tokens, straight to the point
SENTENCE_END = (". ", ".\n", "!", "?", "\n")
DEFECT_WORDS = ("scratch", "crack", "hole", "stain", "missing", "dent", "rust", "chip", "contamination", "burr",
                "tear", "deformation", "burn", "gouge", "blister", "bubble", "pit", "scorch", "corrosion")
# physical units: a frame has no physical scale unless the facts carry one (``mm_per_px``)
_UNIT = (r"(?:mm|cm|µm|μm|um|nm|inch(?:es)?|millimet(?:er|re)s?|centimet(?:er|re)s?|micro(?:n|met(?:er|re))s?"
         r"|met(?:er|re)s?)")
_NUMBER_UNIT = re.compile(rf"\d+(?:[.,]\d+)?\s*{_UNIT}\b|\b(?:millimet|centimet|micron|micromet|inch)\w*")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*(?:%|percent|per cent)")
_FRACTIONS = {"half": 50.0, "a third": 33.0, "one third": 33.0, "a quarter": 25.0, "one quarter": 25.0,
              "two thirds": 67.0, "three quarters": 75.0, "most of": 60.0, "the whole": 100.0, "the entire": 100.0,
              "all of the part": 100.0, "all over": 100.0}
# size adjectives: 'large' needs the main region to cover >= LARGE_PCT of the part, 'small' < SMALL_PCT
LARGE_PCT, SMALL_PCT = 10.0, 2.0
_LARGE = re.compile(r"\b(?:large|big|huge|massive|extensive|major|severe)\b")
# depth: one camera image has none to measure, so no region, however large, is "deep" or "shallow"
_DEPTH = re.compile(r"\b(?:deep|deeply|shallow)\b")
_SMALL = re.compile(r"\b(?:small|tiny|minor|minute|pinhole|speck|slight)\b")
_LIGHT = re.compile(r"\b(?:lighter|brighter|bright|pale|shiny|glossy)\b")
_DARK = re.compile(r"\b(?:darker|dark|darkened|blackened)\b")
COLOUR_WORDS = ("white", "black", "grey", "gray", "red", "orange", "yellow", "green", "cyan", "blue", "purple",
                "pink", "brown")
# measured colour word -> words also allowed for it (colour names are coarse: dark grey ~ black)
_NEAR_COLOURS = {"dark": {"black"}, "black": {"dark", "grey", "gray"}, "grey": {"gray"},
                 "brown": {"orange", "red", "yellow"}, "orange": {"brown"}, "red": {"brown"}, "yellow": {"brown"}}


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
    """What in `text` conflicts with `facts`: positions, defect types, brightness, colours or sizes
    not measured.

    A position word is allowed only if some region is there (the whole 3x3 cell name or its row/
    column word: "top" fits "top left"); a defect word only if it is a region's type (a region of
    unknown type allows none); "darker"/"dark" or "lighter"/"bright"/"pale" only if a region has that
    tone; a colour word only if it is a region's or its surroundings' measured colour (or a near
    one: black ~ dark grey); a physical unit (mm, cm, inch, µm) only when the facts carry a physical
    scale; a percentage or fraction ("half of the part") only within 1.5x of a region's measured
    share (between its visible area and the map's extent); "large" only from `LARGE_PCT`,
    "small"/"tiny" only below `SMALL_PCT`; "deep"/"shallow" never (depth is not measured).
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
    colours = {w for r in facts.regions for c in (getattr(r, "colour", None), getattr(r, "surround_colour", None))
               if c for w in str(c).split()}
    if _LIGHT.search(low) and "lighter" not in tones:
        issues.append(f"'{_LIGHT.search(low).group(0)}' (measured: {', '.join(sorted(tones))})")
    dark = _DARK.search(re.sub(r"\bdark (?=grey|gray)", " ", low) if "dark" in colours else low)
    if dark and "darker" not in tones:
        issues.append(f"'{dark.group(0)}' (measured: {', '.join(sorted(tones))})")
    issues += _colour_issues(low, colours)
    issues += _size_issues(low, facts)
    return issues


def _colour_issues(low: str, colours: set[str]) -> list[str]:
    """Colour words that are neither the region's nor its surroundings' measured colour (nor a near one)."""
    if not colours:  # facts without colours (an old record): nothing to check against
        return []
    allowed = set(colours) | {n for c in colours for n in _NEAR_COLOURS.get(c, ())}
    return [f"colour '{c}' (measured: {' / '.join(sorted(colours))})" for c in COLOUR_WORDS
            if c not in allowed and re.search(rf"\b{c}(?:ish)?\b", low)]


def _size_issues(low: str, facts: DefectFacts) -> list[str]:
    """Physical units without a physical scale, and sizes that disagree with the measured share of the part."""
    issues = []
    if getattr(facts, "mm_per_px", None) is None:
        unit = _NUMBER_UNIT.search(low)
        if unit:
            issues.append(f"size '{unit.group(0).strip()}' (measured only in % of the part and px: no physical scale)")
    # a region's share of the part lies between its visible area and the coarse map's extent
    spans = [(min(a, b), max(a, b)) for r in facts.regions
             for a, b in [(float(getattr(r, "area_pct", 0.0) or 0.0),
                           float(getattr(r, "map_area_pct", 0.0) or getattr(r, "area_pct", 0.0) or 0.0))]]
    if not spans:
        return issues

    def fits(pct: float, among: Sequence[tuple[float, float]] = spans) -> bool:
        """Within a factor 1.5 (or 1 point) of one of the measured spans."""
        return any(lo / 1.5 - 1.0 <= pct <= hi * 1.5 + 1.0 for lo, hi in among)

    total = (sum(lo for lo, _ in spans), sum(hi for _, hi in spans))  # a percentage may sum the regions
    for m in _PERCENT.finditer(low):
        pct = float(m.group(1))
        if not fits(pct, [*spans, total]):
            issues.append(f"size '{m.group(0)}' (measured: {_spans_text(spans)} of the part)")
    for phrase, pct in _FRACTIONS.items():
        if re.search(rf"\b{phrase}\b", low) and not fits(pct):
            issues.append(f"size '{phrase}' (~{pct:.0f}%; measured: {_spans_text(spans)} of the part)")
    main_hi = spans[0][1]
    large, small = _LARGE.search(low), _SMALL.search(low)
    if large and main_hi < LARGE_PCT:
        issues.append(f"size '{large.group(0)}' (measured: {_spans_text(spans[:1])} of the part; "
                      f"'large' needs >= {LARGE_PCT:.0f}%)")
    if small and spans[0][0] >= SMALL_PCT:
        issues.append(f"size '{small.group(0)}' (measured: {_spans_text(spans[:1])} of the part)")
    depth = _DEPTH.search(low)
    if depth:
        issues.append(f"depth '{depth.group(0)}' (not measured: a camera image shows no depth)")
    return issues


def _spans_text(spans: Sequence[tuple[float, float]]) -> str:
    return ", ".join(f"{lo:.1f}%" if abs(hi - lo) < 0.05 else f"{lo:.1f}-{hi:.1f}%" for lo, hi in spans)


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
    tone = "similar in brightness to its surroundings" if r.tone == "similar brightness" else \
        f"{r.tone} than its surroundings"
    orient = "" if r.orientation == "none" else f" {r.orientation}"
    text = (f"{what} {r.where(product)}: {r.size_text()}, "
            f"{r.shape}{orient}, {tone}, {r.colour}.")
    if facts.n_regions > 1:
        others = ", ".join(o.position + ("" if o.on_part else f" (off the {product})") for o in facts.regions[1:4])
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
