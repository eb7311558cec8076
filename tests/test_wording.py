"""Wording: the facts sentence and prompts carry the facts; remarks that contradict them are dropped."""
from __future__ import annotations

import pytest
from test_describer import _facts

from iadgpt.runtime.wording import build_messages, compose, contradictions, facts_sentence


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
