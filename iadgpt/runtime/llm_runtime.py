"""Run a quantized decoder-only LLM with ONNX Runtime and `tokenizers`: no torch, no transformers.

The model folder is what `iadgpt quantize-llm` writes (see `iadgpt.export.llm`): ``model.onnx``
(+ ``.data``) with ``input_ids``, ``attention_mask`` (and optionally ``position_ids``),
``past_key_values.N.key/value`` in and ``logits``, ``present.N.key/value`` out; ``tokenizer.json``;
and ``llm.json`` describing both. Why our own loop rather than onnxruntime-genai's: the station
then needs only onnxruntime, and genai's tokenizer mis-encodes the tokenizer transformers writes
for a GGUF model (it returns -1 ids for SmolLM2's), while the `tokenizers` package reads it exactly.

Greedy decoding only (deterministic). The KV cache of a fixed prompt prefix (the system prompt)
is computed once and reused by every request (`prefix_cache`), which cuts the time to first token.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from iadgpt.errors import DescriberError

log = logging.getLogger(__name__)

LLM_CONFIG = "llm.json"
PREFILL_CHUNK = 64  # prompt tokens per model run while a gate is set (each run streams all weights once)
PathLike = Union[str, "os.PathLike[str]"]
Message = dict[str, str]


class ContextOverflow(DescriberError):
    """A prompt (plus its new tokens) longer than the model's context; raised before any compute,
    so a caller can shorten the prompt (drop old turns) and try again."""

    def __init__(self, message: str, prompt_tokens: int = 0, new_tokens: int = 0, context: int = 0) -> None:
        super().__init__(message)
        self.prompt_tokens, self.new_tokens, self.context = int(prompt_tokens), int(new_tokens), int(context)


@dataclass
class Generation:
    """One completion: text, token ids and timings."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    ttft_s: float  # prompt processing (prefill) until the first new token
    total_s: float
    stop: str  # "eos" | "max_tokens" | "stop_text" | "deadline"
    cached_prefix_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        dt = self.total_s - self.ttft_s
        return n / dt if n > 0 and dt > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "new_tokens": len(self.tokens), "prompt_tokens": self.prompt_tokens,
                "cached_prefix_tokens": self.cached_prefix_tokens, "ttft_s": round(self.ttft_s, 4),
                "total_s": round(self.total_s, 4), "tokens_per_s": round(self.tokens_per_s, 2), "stop": self.stop}


def chatml(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The ChatML text SmolLM2 (and Qwen, ...) are trained on."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


CHAT_FORMATS: dict[str, Callable[[Sequence[Message], bool], str]] = {"chatml": chatml}


def read_json_config(folder: PathLike, name: str, what: str, fix: str) -> dict[str, Any]:
    """`folder/name` as JSON; a DescriberError naming `fix` when it is missing or unreadable."""
    path = Path(folder) / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DescriberError(f"{folder} is not {what} ({name} is missing); {fix}") from None
    except (OSError, ValueError) as exc:
        raise DescriberError(f"{path} cannot be read ({exc}); {fix}") from None


def read_llm_config(model_dir: PathLike) -> dict[str, Any]:
    return read_json_config(model_dir, LLM_CONFIG, "a describer LLM folder",
                            "build one with `iadgpt quantize-llm --out DIR`")


def verify_llm_dir(model_dir: PathLike, files: Optional[dict[str, str]] = None) -> None:
    """Check every file's sha256 against `files` (default: the list in llm.json)."""
    from iadgpt.bundle import sha256_file

    root = Path(model_dir)
    files = files if files is not None else read_llm_config(root).get("files", {})
    for rel, sha in files.items():
        path = root / rel
        if not path.is_file():
            raise DescriberError(f"describer LLM {root} is incomplete: {rel} is missing; rebuild it with "
                                 "`iadgpt quantize-llm`")
        actual = sha256_file(path)
        if actual != sha:
            raise DescriberError(f"describer LLM {root}: {rel} is corrupt or was modified (sha256 {actual[:12]}... "
                                 f"!= {sha[:12]}...); rebuild it with `iadgpt quantize-llm`")


class OnnxLLM:
    """A quantized decoder (a `quantize-llm` folder) with greedy generation over a KV cache.

    `threads` sets ONNX Runtime's intra-op threads (default 1: the describer shares the station's
    cores with the verdict loop). Thread spinning is off so an idle describer costs no CPU.
    """

    def __init__(self, model_dir: PathLike, *, threads: Optional[int] = 1, verify: bool = False,
                 system_prompt: Optional[str] = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise DescriberError("the describer needs onnxruntime: pip install iadgpt[cpu]") from None
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DescriberError("the describer needs the tokenizers package: pip install iadgpt[llm]") from None
        t0 = time.perf_counter()
        self.gate: Optional[Callable[[], Any]] = None  # called before each model run (see _step)
        self.prefill_chunk = PREFILL_CHUNK
        self.dir = Path(model_dir)
        self.config = read_llm_config(self.dir)
        if verify:
            verify_llm_dir(self.dir, self.config.get("files"))
        fmt = self.config.get("chat_format", "chatml")
        if fmt not in CHAT_FORMATS:
            raise DescriberError(f"{self.dir}/{LLM_CONFIG}: chat format {fmt!r} is not supported (known: "
                                 f"{', '.join(CHAT_FORMATS)})")
        self.format_chat = CHAT_FORMATS[fmt]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.dir / self.config.get("model", "model.onnx")), opts,
                                                providers=["CPUExecutionProvider"])
            self.tokenizer = Tokenizer.from_file(str(self.dir / self.config.get("tokenizer", "tokenizer.json")))
        except Exception as exc:  # noqa: BLE001 - ORT/tokenizers raise their own types
            raise DescriberError(f"cannot load the describer LLM from {self.dir}: {exc}; rebuild it with "
                                 "`iadgpt quantize-llm`") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.layers = int(self.config["num_layers"])
        self.kv_heads = int(self.config["num_kv_heads"])
        self.head_dim = int(self.config["head_dim"])
        self.past_names = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(self.layers)]
        missing = [n for pair in self.past_names for n in pair if n not in inputs]
        # An inputs_embeds build (`quantize-llm --embeds`) embeds tokens here with embed_tokens.npy, so
        # callers can splice in vectors of their own (the IAD-GPT bridge's image and mask tokens).
        self.takes_embeds = "inputs_embeds" in inputs
        self.hidden_size = int(self.config.get("hidden_size", 0))
        self.embeddings: Optional[np.ndarray] = None
        if self.takes_embeds:
            table = self.dir / self.config.get("embeddings", "embed_tokens.npy")
            try:
                self.embeddings = np.load(table, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DescriberError(f"{self.dir}: the inputs_embeds model needs its token table {table.name} "
                                     f"({exc}); rebuild it with `iadgpt quantize-llm --embeds`") from None
            self.hidden_size = int(self.embeddings.shape[1])
        if missing or not (self.takes_embeds or "input_ids" in inputs):
            raise DescriberError(f"{self.dir}: model inputs do not match {LLM_CONFIG} (missing {missing[:2]}); "
                                 "rebuild it with `iadgpt quantize-llm`")
        self.has_position_ids = "position_ids" in inputs
        self.output_names = ["logits"] + [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        self.eos_ids = set(int(i) for i in self.config.get("eos_token_ids", []))
        self.max_context = int(self.config.get("context_length", 2048))
        self._prefix: Optional[tuple[list[int], list[np.ndarray]]] = None
        self.load_s = time.perf_counter() - t0
        if system_prompt is not None:
            self.cache_prefix(self.format_chat([{"role": "system", "content": system_prompt}], False))
        log.info("describer LLM %s loaded in %.2f s (%s)", self.dir.name, self.load_s,
                 self.config.get("quantization", {}).get("scheme", "?"))

    # -- tokens

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- model

    def _empty_past(self) -> list[np.ndarray]:
        z = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return [z] * (2 * self.layers)

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), hidden) float32 token embeddings (inputs_embeds models only)."""
        if self.embeddings is None:
            raise DescriberError(f"{self.dir} reads input_ids; embeddings need an inputs_embeds build "
                                 "(`iadgpt quantize-llm --embeds`)")
        return self.embeddings[np.asarray(list(ids), np.int64)].astype(np.float32)

    def _step(self, ids: Union[Sequence[int], np.ndarray], past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of the last position and the new cache, after feeding `ids` (token ids, or a
        (T, hidden) float array of input embeddings) on top of `past`.

        With a `gate` set (the describer worker's "verdict loop is idle" wait), the gate is passed
        before every model run and a long prompt runs in `prefill_chunk` pieces, so the LLM stops
        at the next short step whenever the station is judging a frame instead of competing with it
        for the cores, caches and memory bandwidth for a whole prompt."""
        if self.gate is None or len(ids) <= self.prefill_chunk:
            if self.gate is not None:
                self.gate()
            return self._run(ids, past)
        logits = None
        for i in range(0, len(ids), self.prefill_chunk):
            self.gate()
            logits, past = self._run(ids[i:i + self.prefill_chunk], past)
        return logits, past

    def _run(self, ids: Union[Sequence[int], np.ndarray], past: list[np.ndarray],
             every_position: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        done = past[0].shape[2]
        vectors = isinstance(ids, np.ndarray) and ids.ndim == 2 and ids.dtype.kind == "f"
        total = done + len(ids)
        feeds: dict[str, np.ndarray] = {"attention_mask": np.ones((1, total), np.int64)}
        if self.takes_embeds:
            feeds["inputs_embeds"] = np.ascontiguousarray((ids if vectors else self.embed(ids))[None], np.float32)
        elif vectors:
            raise DescriberError(f"{self.dir} reads input_ids, not embeddings; use an inputs_embeds build")
        else:
            feeds["input_ids"] = np.asarray([ids], np.int64)
        if self.has_position_ids:
            feeds["position_ids"] = np.arange(done, total, dtype=np.int64)[None]
        for i, (k, v) in enumerate(self.past_names):
            feeds[k], feeds[v] = past[2 * i], past[2 * i + 1]
        out = self.session.run(self.output_names, feeds)
        return (out[0][0] if every_position else out[0][0, -1]), out[1:]

    def cache_prefix(self, text: str) -> int:
        """Precompute the KV cache of `text`; prompts that start with these tokens reuse it."""
        ids = self.encode(text)
        _, past = self._step(ids, self._empty_past()) if ids else (None, self._empty_past())
        self._prefix = (ids, past)
        return len(ids)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), vocab) logits of a whole sequence in one pass (for tests and parity checks)."""
        return self.session.run(["logits"], self._full_feeds(ids))[0][0]

    def _full_feeds(self, ids: Union[Sequence[int], np.ndarray]) -> dict[str, np.ndarray]:
        vectors = isinstance(ids, np.ndarray) and ids.ndim == 2 and ids.dtype.kind == "f"
        feeds: dict[str, np.ndarray] = {"attention_mask": np.ones((1, len(ids)), np.int64)}
        if self.takes_embeds:
            feeds["inputs_embeds"] = np.ascontiguousarray((ids if vectors else self.embed(ids))[None], np.float32)
        else:
            feeds["input_ids"] = np.asarray([ids], np.int64)
        if self.has_position_ids:
            feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        for i, (k, v) in enumerate(self.past_names):
            feeds[k] = feeds[v] = self._empty_past()[0]
        return feeds

    def generate_embeds(self, embeds: np.ndarray, max_new_tokens: int = 24, *, stop_texts: Sequence[str] = (),
                        deadline: Optional[float] = None, min_new_tokens: int = 1) -> Generation:
        """Greedy completion of a prompt given as (T, hidden) input embeddings (inputs_embeds models)."""
        embeds = self._check_embeds(embeds, max_new_tokens)
        t0 = time.perf_counter()
        logits, past = self._step(embeds, self._empty_past())
        return self._greedy(logits, past, t0, len(embeds), 0, max_new_tokens, stop_texts, deadline, min_new_tokens)

    def score_embeds(self, embeds: np.ndarray, continuations: Sequence[Sequence[int]], *,
                     deadline: Optional[float] = None) -> np.ndarray:
        """Summed log-probability of each token-id continuation after a (T, hidden) embeddings prompt,
        teacher-forced over one shared prompt cache (closed-set answers; inputs_embeds models).

        A closed-set answer needs every score, so a `deadline` (time.monotonic()) that passes before
        the last one raises DescriberError instead of returning a partial ranking.

        Each continuation runs whole (one pass of its tokens but the last). Sharing the nine "Yes, ...,
        at the" prefixes was tried: on the int4 SmolLM2 the short 1-3 token runs moved a score by 0.19
        nats against one full pass (int4 results depend on how tokens are split into runs), enough to
        flip close answers, so it was dropped."""
        if not continuations:
            raise DescriberError("score_embeds needs the closed set of answers to score; got none")
        embeds = self._check_embeds(embeds, max(len(c) for c in continuations))
        if any(len(c) == 0 for c in continuations):
            raise DescriberError("every continuation needs at least one token")
        logits, past = self._step(embeds, self._empty_past())
        first = _log_softmax(logits)
        scores = np.empty(len(continuations), np.float64)
        for j, cont in enumerate(continuations):
            if deadline is not None and time.monotonic() >= deadline:
                raise DescriberError(f"deadline passed after scoring {j} of {len(continuations)} answers; give the "
                                     "describer a longer timeout_s or use bridge_decoding: greedy")
            total = float(first[cont[0]])
            if len(cont) > 1:
                if self.gate is not None:
                    self.gate()
                rest, _ = self._run(list(cont[:-1]), past, every_position=True)
                total += float(_log_softmax(rest)[np.arange(len(cont) - 1), list(cont[1:])].sum())
            scores[j] = total
        return scores

    def _check_embeds(self, embeds: np.ndarray, new_tokens: int) -> np.ndarray:
        if not self.takes_embeds:
            raise DescriberError(f"{self.dir} reads input_ids; prompts of embeddings need an inputs_embeds build "
                                 "(`iadgpt quantize-llm --embeds`)")
        embeds = np.asarray(embeds, np.float32)
        if embeds.ndim != 2 or embeds.shape[1] != self.hidden_size:
            raise DescriberError(f"prompt embeddings must be (T, {self.hidden_size}), got {embeds.shape}")
        if len(embeds) + new_tokens > self.max_context:
            raise DescriberError(f"prompt of {len(embeds)} vectors + {new_tokens} new exceeds the model's context "
                                 f"({self.max_context})")
        return embeds

    def generate(self, prompt: Union[str, Sequence[Message]], max_new_tokens: int = 48, *,
                 stop_texts: Sequence[str] = (), deadline: Optional[float] = None,
                 min_new_tokens: int = 1) -> Generation:
        """Greedy completion of a chat (list of messages, formatted with the model's chat format)
        or a raw prompt string. Stops at an end-of-sequence token, after `max_new_tokens`, when
        the decoded text contains one of `stop_texts` (cut just after it), or at `deadline`
        (time.monotonic()); never raises on a stop."""
        text = prompt if isinstance(prompt, str) else self.format_chat(prompt, True)
        t0 = time.perf_counter()
        ids = self.encode(text)
        if len(ids) + max_new_tokens > self.max_context:
            raise ContextOverflow(f"prompt of {len(ids)} tokens + {max_new_tokens} new exceeds the model's context "
                                  f"({self.max_context}); shorten the conversation", len(ids), max_new_tokens,
                                  self.max_context)
        past, todo, cached = self._empty_past(), ids, 0
        if self._prefix is not None:
            pre_ids, pre_past = self._prefix
            if len(pre_ids) < len(ids) and ids[:len(pre_ids)] == pre_ids:
                past, todo, cached = pre_past, ids[len(pre_ids):], len(pre_ids)
        logits, past = self._step(todo, past)
        return self._greedy(logits, past, t0, len(ids), cached, max_new_tokens, stop_texts, deadline, min_new_tokens)

    def _greedy(self, logits: np.ndarray, past: list[np.ndarray], t0: float, prompt_tokens: int, cached: int,
                max_new_tokens: int, stop_texts: Sequence[str], deadline: Optional[float],
                min_new_tokens: int) -> Generation:
        """The greedy loop over the KV cache, from the logits of the prompt's last position."""
        ttft = time.perf_counter() - t0
        out: list[int] = []
        stop = "max_tokens"
        result = ""
        while True:
            nxt = int(np.argmax(logits))
            if nxt in self.eos_ids and len(out) >= min_new_tokens:
                stop = "eos"
                break
            out.append(nxt)
            if stop_texts:
                result = self.decode(out)
                hit = [result.index(s) + len(s) for s in stop_texts if s in result]
                if hit and len(out) >= min_new_tokens:
                    result = result[:min(hit)]
                    stop = "stop_text"
                    break
            if len(out) >= max_new_tokens:
                break
            if deadline is not None and time.monotonic() >= deadline:
                stop = "deadline"
                break
            logits, past = self._step([nxt], past)
        if stop != "stop_text":
            result = self.decode(out)
        return Generation(result.strip(), out, prompt_tokens, ttft, time.perf_counter() - t0, stop, cached)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
