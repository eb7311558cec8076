"""The greedy decoding loop and the model folder check, on a stub model: prefix cache, context
limit, max tokens, stop texts, deadline and end of sequence (the real-model tests never reach
these edges)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from iadgpt.errors import DescriberError
from iadgpt.runtime.llm_runtime import ContextOverflow, OnnxLLM, chatml, verify_llm_dir


def _stub_llm(script, vocab=None, *, prefix=None, max_context=1000):
    """An OnnxLLM without a model: a char tokenizer (or `vocab` id -> text), and `_step` answering
    with the next id of `script`; records what each step was fed."""
    llm = OnnxLLM.__new__(OnnxLLM)
    llm.gate, llm.prefill_chunk, llm.eos_ids, llm.max_context = None, 64, {0}, max_context
    llm.format_chat, llm._prefix = chatml, prefix
    llm.encode = lambda text: [ord(c) for c in text]
    llm.decode = (lambda ids: "".join(vocab[i] for i in ids)) if vocab else (lambda ids: "".join(map(chr, ids)))
    llm._empty_past = lambda: "EMPTY"
    llm.fed = []

    def step(ids, past):
        llm.fed.append((list(ids), past))
        logits = np.zeros(512, np.float32)
        logits[script[min(len(llm.fed) - 1, len(script) - 1)]] = 1.0
        return logits, past

    llm._step = step
    return llm


def test_the_prefix_cache_is_used_only_for_prompts_that_start_with_it():
    llm = _stub_llm([0], prefix=([ord(c) for c in "SYS"], "CACHED"))
    g = llm.generate("SYSabc", 4)
    assert llm.fed[0] == ([ord(c) for c in "abc"], "CACHED") and g.cached_prefix_tokens == 3
    llm.fed.clear()
    g = llm.generate("XYZabc", 4)  # another system prompt (iadgpt chat's): the cache does not apply
    assert llm.fed[0] == ([ord(c) for c in "XYZabc"], "EMPTY") and g.cached_prefix_tokens == 0


def test_context_overflow_counts_the_new_tokens():
    llm = _stub_llm([0], max_context=10)
    with pytest.raises(ContextOverflow) as info:
        llm.generate("12345678", 5)
    assert (info.value.prompt_tokens, info.value.new_tokens, info.value.context) == (8, 5, 10)
    assert not llm.fed  # raised before any compute


def test_generation_stops_at_exactly_max_new_tokens():
    g = _stub_llm([ord("a")]).generate("p", 4)
    assert len(g.tokens) == 4 and g.stop == "max_tokens"


def test_the_text_is_cut_just_after_a_stop_text_inside_a_token():
    vocab = {1: "worn pads", 2: ". Check", 3: " the", 0: ""}
    g = _stub_llm([1, 2, 3], vocab).generate("p", 10, stop_texts=(". ",))
    assert g.stop == "stop_text" and g.text == "worn pads."


def test_a_passed_deadline_stops_generation():
    g = _stub_llm([ord("a")]).generate("p", 10, deadline=time.monotonic() - 1.0)
    assert g.stop == "deadline" and len(g.tokens) == 1


def test_a_missing_llm_file_is_named_with_its_fix(tmp_path):
    fix = "incomplete: model.onnx is missing; rebuild it with `iadgpt quantize-llm`"
    with pytest.raises(DescriberError, match=fix):
        verify_llm_dir(tmp_path, {"model.onnx": "0" * 64})


def test_generation_stops_at_an_eos_after_the_first_token():
    g = _stub_llm([ord("a"), 0, ord("b")]).generate("p", 10)
    assert g.stop == "eos" and g.tokens == [ord("a")] and g.text == "a"


def _bare_llm():
    llm = OnnxLLM.__new__(OnnxLLM)
    llm.dir, llm.takes_embeds, llm.has_position_ids, llm.gate = "fake", False, True, None
    llm.past_names, llm.output_names = [("pk", "pv")], ["logits", "k", "v"]
    llm.format_chat, llm.max_context = chatml, 10_000
    return llm


def test_position_ids_continue_after_the_cache():
    """with a KV cache of 3 tokens, the next 2 tokens are at positions 3 and 4 (optimum-route
    graphs read position_ids; the genai graphs of the other tests have none)."""
    llm = _bare_llm()
    seen = {}

    class Session:
        def run(self, names, feeds):
            seen.update(feeds)
            return [np.zeros((1, 2, 5), np.float32), feeds["pk"], feeds["pv"]]

    llm.session = Session()
    past = [np.zeros((1, 1, 3, 4), np.float32)] * 2
    llm._run([7, 8], past)
    assert seen["position_ids"].tolist() == [[3, 4]] and seen["attention_mask"].shape == (1, 5)
