"""CLIP backbones: clip-tiny offline, tap shapes, determinism, offline loading and its errors."""
from __future__ import annotations

import json
import time

import pytest
import torch

from iadgpt.errors import BackboneError
from iadgpt.models.backbones import available_backbones, get_backbone
from iadgpt.models.clip import PRESETS, joint_features, tiny_clip_config


@pytest.fixture(scope="module")
def tiny():
    return get_backbone("clip-tiny")


def test_presets_registered():
    names = available_backbones()
    for name in ("clip-vit-h14", "clip-vit-l14-336", "clip-vit-b16", "clip-tiny", "clip"):
        assert name in names
    assert PRESETS["clip-vit-h14"].taps == (8, 16, 24, 32)
    assert PRESETS["clip-vit-h14"].hub_id == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def test_tiny_shapes_and_description(tiny):
    desc = tiny.describe()
    assert desc["has_text"] is True and desc["layers"] == ["block1", "block2", "block3", "block4"]
    assert desc["dims"] == [64] * 4 and desc["strides"] == [8] * 4 and desc["joint_dim"] == 32
    assert desc["input_spec"]["size"] == [64, 64] and desc["input_spec"]["mean"][0] == pytest.approx(122.77, abs=0.01)
    images = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        feats = tiny(images)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 8, 8)] * 4
    assert all(p.requires_grad is False for p in tiny.parameters())


def test_taps_equal_hf_hidden_states(tiny):
    images = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        feats = tiny(images)
        ref = tiny.clip.vision_model(pixel_values=tiny.normalise(images), output_hidden_states=True)
    for block, feat in zip(tiny.taps, feats):
        tokens = ref.hidden_states[block][:, 1:, :]
        assert torch.allclose(feat.flatten(2).transpose(1, 2), tokens, atol=1e-6)


def test_joint_space_helpers(tiny):
    images = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        emb = tiny.image_embedding(images)
        ref = torch.nn.functional.normalize(
            joint_features(tiny.clip.get_image_features(pixel_values=tiny.normalise(images))), dim=-1)
        feats = tiny(images)
        joint = tiny.project_patches(feats[-1])
        proj = tiny.projection_module()(feats[-1].flatten(2).transpose(1, 2))
    assert emb.shape == (2, 32) and torch.allclose(emb, ref, atol=1e-5)
    assert joint.shape == (2, 32, 8, 8)
    assert torch.allclose(joint.flatten(2).transpose(1, 2), proj, atol=1e-6)
    text = tiny.encode_text(["a photo of a bottle.", "a photo of a damaged bottle.", "x"])
    assert text.shape == (3, 32) and torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_tiny_is_deterministic_per_seed():
    state = torch.random.get_rng_state()
    a, b, c = get_backbone("clip-tiny", seed=3), get_backbone("clip-tiny", seed=3), get_backbone("clip-tiny", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(a.encode_text(["crack"]), b.encode_text(["crack"]))


def _isolate_hub(monkeypatch, tmp_path):
    """No network, and an empty cache, whatever the machine has."""
    import huggingface_hub.constants as hc
    import transformers.utils.hub as th

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"), raising=False)
    monkeypatch.setattr(th, "TRANSFORMERS_CACHE", str(tmp_path / "hf" / "hub"), raising=False)


def test_real_preset_without_weights_names_both_fixes(monkeypatch, tmp_path):
    _isolate_hub(monkeypatch, tmp_path)
    start = time.monotonic()
    with pytest.raises(BackboneError) as err:
        get_backbone("clip-vit-b16")
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert "huggingface-cli download openai/clip-vit-base-patch16 --local-dir DIR" in msg
    assert "--weights DIR" in msg and "HF_HOME" in msg
    with pytest.raises(BackboneError, match="does not exist"):
        get_backbone("clip-vit-h14", weights=str(tmp_path / "nope"))


def _byte_symbols():
    """The 256 symbols of the byte-level BPE alphabet (GPT-2 / CLIP): printable bytes stand for
    themselves, the others for 256, 257, ...; printable ones first (the tokenizer's vocab order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _write_clip_dir(path, image_size=64):
    """A tiny random CLIPModel + a real CLIPTokenizer (byte-level vocab, no merges) + image processor."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    chars = list(_byte_symbols())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    cfg = tiny_clip_config(image_size=image_size, vocab_size=len(vocab))
    assert tokenizer.eos_token_id == cfg.text_config.eos_token_id
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return model, tokenizer


def test_load_local_directory(monkeypatch, tmp_path):
    _isolate_hub(monkeypatch, tmp_path)
    model, tokenizer = _write_clip_dir(tmp_path / "clip")
    bb = get_backbone("clip", weights=tmp_path / "clip")
    assert bb.taps == (1, 2, 3, 4) and bb.input_spec.size == (64, 64) and bb.has_text
    assert bb.input_spec.std[0] == pytest.approx(0.26862954 * 255)
    texts = ["a photo of a bottle.", "broken bottle"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = torch.nn.functional.normalize(joint_features(model.get_text_features(**enc)), dim=-1)
    assert torch.allclose(bb.encode_text(texts), ref, atol=1e-5)
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        feats = bb(images)
    assert [tuple(f.shape) for f in feats] == [(1, 64, 8, 8)] * 4
    # a directory of another architecture is refused by a named preset, with the reason
    with pytest.raises(BackboneError, match="preset 'clip-vit-b16'"):
        get_backbone("clip-vit-b16", weights=tmp_path / "clip")


def test_bad_taps_and_weights_for_tiny():
    with pytest.raises(BackboneError, match="taps"):
        get_backbone("clip-tiny", taps=(2, 9))
    with pytest.raises(BackboneError, match="seed"):
        get_backbone("clip-tiny", weights="somewhere")


def test_encode_text_chunks_cover_every_text(tiny, monkeypatch):
    """chunking by text_batch embeds every text, as one batch would."""
    texts = ["a photo of a bottle.", "a broken bottle", "crack", "a scratch on a bottle", "x"]
    whole = tiny.encode_text(texts)
    real, sizes = type(tiny.clip).get_text_features, []

    def spy(self, *a, **kw):
        sizes.append(len(kw["input_ids"]))
        return real(self, *a, **kw)

    monkeypatch.setattr(type(tiny.clip), "get_text_features", spy)
    monkeypatch.setattr(tiny, "text_batch", 2)
    torch.testing.assert_close(tiny.encode_text(texts), whole, atol=1e-5, rtol=1e-5)
    assert sizes == [2, 2, 1]  # it really ran in chunks of text_batch
