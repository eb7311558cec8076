"""Wording: the facts sentence and prompts carry the facts; remarks that contradict them are dropped."""
from __future__ import annotations

import numpy as np
import pytest
from test_describer import _facts

from iadgpt.runtime.facts import compute_facts
from iadgpt.runtime.wording import (REMARK_WORDS, build_messages, complete_remark, compose, contradictions,
                                    dedupe_clauses, facts_sentence)


def test_facts_sentence_and_prompt_carry_the_facts():
    facts = _facts(defect_type="scratch")
    text = facts_sentence(facts, "flange")
    assert text.startswith("Scratch at the top left of the flange")
    assert "darker than its surroundings" in text
    msgs = build_messages(facts, "flange", "Why?")
    assert msgs[0]["role"] == "system" and msgs[-1]["content"].endswith("Why?")
    assert "top left" in msgs[1]["content"] and "Part: flange." in msgs[1]["content"]
    assert msgs[0]["content"] == build_messages(_facts(box=(60, 60, 80, 80)), "tile")[0]["content"]  # cacheable


@pytest.mark.parametrize("remark, bad", [
    ("It sits at the bottom right of the part.", True),
    ("This looks like a crack from stress.", True),
    ("The spot is lighter than the metal around it.", True),
    ("A scratch from handling at the top left; check the gripper.", False),
    ("Probably from handling; check the gripper.", False),
    ("The upper left corner was hit by the tool.", False),
    ("A scratch at the bottom of the part.", True),  # a row word of another row
    ("A scratch on the right side.", True),  # a column word of another column
    ("A scratch at the top; check the gripper.", False),  # the row word of the region's row
])
def test_contradictions_catch_wrong_position_type_and_tone(remark, bad):
    facts = _facts(defect_type="scratch")
    assert bool(contradictions(remark, facts)) is bad


def test_compose_drops_a_contradicting_remark_and_keeps_60_words():
    facts = _facts(defect_type="scratch")
    text, info = compose(facts, "flange", "A crack at the bottom right.")
    assert not info["remark_used"] and info["rejected"]
    assert "crack" not in text and "bottom right" not in text
    long_remark = " ".join(["handling"] * 100)
    text, info = compose(facts, "flange", long_remark)
    assert info["remark_used"] and len(text.split()) <= 60


@pytest.mark.parametrize("remark", [
    "The defect is 7.5mm long.",  # a physical unit, but the facts have no physical scale
    "A 12 mm deep gouge from the tool.",
    "It covers half of the part.",  # the facts say ~2.6 %
    "It covers 40% of the part.",
    "A bright white blister.",  # the region is darker and dark grey
    "A large burn mark.",
    "A red mark from the tool.",
])
def test_contradictions_catch_unsupported_units_sizes_and_colours(remark):
    facts = _facts(defect_type="scratch")
    assert contradictions(remark, facts), remark


@pytest.mark.parametrize("remark", ["A deep scratch from the tool.", "A shallow gouge; check the gripper."])
def test_depth_is_never_claimed_even_for_a_large_region(remark):
    facts = _facts(box=(0, 0, 60, 60), defect_type="scratch")
    assert facts.main.area_pct >= 10  # "large" is allowed here, depth is not
    assert contradictions("A large scratch from the tool.", facts) == []
    assert any(i.startswith("depth") for i in contradictions(remark, facts)), remark


@pytest.mark.parametrize("remark", ["It covers about 3% of the part.", "A black mark from the tool; check the gripper.",
                                    "A dark grey scratch; check the gripper.", "Reject 1 in 10 parts."])
def test_contradictions_accept_what_the_facts_support(remark):
    assert contradictions(remark, _facts(defect_type="scratch")) == []


def test_facts_sentence_words_the_size_with_its_precision():
    text = facts_sentence(_facts(defect_type="scratch"), "flange")
    assert "about 2.6% of the part (~240 px; the coarse anomaly map marks 2.6%)" in text


def _flat_frame_facts(grey, region, region_grey, tone):
    """Facts of one region (y0, y1, x0, x1) of a flat grey frame, the region painted `region_grey`."""
    img = np.full((96, 96, 3), grey, np.uint8)
    y0, y1, x0, x1 = region
    img[y0:y1, x0:x1] = region_grey
    amap = np.zeros((96, 96), np.float32)
    amap[y0:y1, x0:x1] = 1.0
    facts = compute_facts(img, amap, threshold=0.5)
    assert facts.main.tone == tone
    return facts


def _light_facts():
    return _flat_frame_facts(120, (10, 22, 10, 30), 230, "lighter")


def _similar_facts():
    return _flat_frame_facts(150, (40, 60, 40, 60), 150, "similar brightness")  # seen by texture, not brightness


@pytest.mark.parametrize("facts_of, remark, word", [
    (_light_facts, "A dark spot, probably oil from the press.", "dark"),
    (_similar_facts, "A bright mark from the press.", "bright"),
], ids=["dark-for-lighter", "bright-for-similar-brightness"])
def test_a_brightness_word_is_a_contradiction_for_a_defect_of_another_tone(facts_of, remark, word):
    assert any(i.startswith(f"'{word}'") for i in contradictions(remark, facts_of()))


@pytest.mark.parametrize("remark, word", [
    ("A large mark from the tool.", "large"),  # 'large' needs >= 10 %
    ("A tiny mark from handling.", "tiny"),  # 'tiny' only below 2 %
])
def test_a_size_word_must_fit_the_share_even_when_no_type_word_is_named(remark, word):
    facts = _facts(defect_type="scratch")  # ~2.6 % of the part
    assert any(i.startswith(f"size '{word}'") for i in contradictions(remark, facts))


def test_the_remark_is_clipped_to_remark_words():
    facts = _facts(defect_type="scratch")
    remark = "Likely cause: " + " ".join(f"word{i}" for i in range(40))
    base = facts_sentence(facts, "flange")
    assert 60 - len(base.split()) > REMARK_WORDS  # there is more room than a remark may take
    text, info = compose(facts, "flange", remark)
    assert info["remark_used"] and len(text.split()) - len(base.split()) <= REMARK_WORDS


def test_a_remark_that_only_restates_the_facts_is_dropped():
    facts = _facts(defect_type="scratch")
    remark = "Scratch at the top left of the flange, darker than its surroundings."
    assert contradictions(remark, facts) == []
    text, info = compose(facts, "flange", remark)
    assert not info["remark_used"] and info["rejected"] == ["the remark only restates the facts"]
    assert text == facts_sentence(facts, "flange")


def test_a_remark_cut_by_the_token_limit_ends_at_its_last_full_clause():
    cut = "Likely cause: worn gripper pads, a misaligned fixture, and the"
    assert complete_remark(cut, "max_tokens") == "Likely cause: worn gripper pads, a misaligned fixture."
    assert complete_remark("Likely cause: worn pads and", "deadline") == ""
    assert complete_remark("Likely cause: worn pads and", "eos") == "Likely cause: worn pads and"


def test_a_looping_remark_is_cut_where_it_repeats():
    assert dedupe_clauses("a lack of grease, a lack of grease on the pin, worn pads") == "a lack of grease."
    assert dedupe_clauses("worn pads, a loose fixture") == "worn pads, a loose fixture"


def test_upper_and_lower_are_read_as_rows():
    facts = _facts(box=(60, 70, 90, 80))  # bottom right
    assert contradictions("It is in the upper area of the part.", facts)
    assert not contradictions("It is in the lower area of the part.", facts)


def test_a_percentage_must_be_within_1_5x_of_the_measured_share():
    facts = _facts(defect_type="scratch")  # 2.6 %: up to 2.6 x 1.5 + 1 = 4.9 % fits
    assert not contradictions("It covers 4% of the part.", facts)
    assert contradictions("It covers 7% of the part.", facts)
