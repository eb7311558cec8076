"""The IAD-GPT bridge on the station: ONNX heads (TGE, MMF, per-layer masks) + the int4 LLM reading
input embeddings. No torch, no transformers: numpy, onnxruntime and `tokenizers` only.

A bridge folder (`iadgpt.models.bridge_export.export_bridge`) holds ``bridge.json`` and the graphs

* ``masks_decoder.onnx``   feat0..featL-1 -> masks (B, n, g, g): the decoder's per-layer log-odds, z-normalised
* ``masks_bank.onnx``      feat0..featL-1, bank -> masks: the k-shot bank's per-layer distances, z-normalised
* ``tge.onnx``             feature of the last tapped layer -> image_token (B, 1, hidden)
* ``mmf.onnx``             masks -> mask_tokens (B, L1 + L3, hidden)

plus ``memory_bank.npy``. The LLM folder is an inputs_embeds build of `quantize-llm`
(``ensure_default_llm(4, embeds=True)``: model.onnx reading ``inputs_embeds`` + ``embed_tokens.npy``).

Prompt, as in training: ``<|im_start|>user\\n`` [image token] [mask tokens] ``Is there any anomaly in
the image?<|im_end|>\\n<|im_start|>assistant\\n``, then greedy decoding (never sampling).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from iadgpt.errors import DescriberError
from iadgpt.runtime.facts import POSITION_WORDS
from iadgpt.runtime.llm_runtime import read_json_config

log = logging.getLogger(__name__)

QUESTION = "Is there any anomaly in the image?"
NO_ANSWER = "No, there is no anomaly in the image."
YES_ANSWER = "Yes, there is an anomaly in the image, at the {position}."
PROMPT_HEAD = "<|im_start|>user\n"
END_OF_TURN = "<|im_end|>"
PROMPT_TAIL = QUESTION + END_OF_TURN + "\n<|im_start|>assistant\n"
BRIDGE_CONFIG = "bridge.json"
# "greedy": free greedy text, parsed; "choice": the most likely of `answer_choices()` (closed set)
DECODINGS = ("greedy", "choice")
# longest first, so "top left" is found before "top"
_POSITIONS = sorted(POSITION_WORDS, key=len, reverse=True)
_POS_RE = re.compile(r"\bat the (" + "|".join(re.escape(p) for p in _POSITIONS) + r")\b")


def answer_text(anomalous: bool, position: Optional[str] = None) -> str:
    """The training answer: "No, ..." or "Yes, ... at the {position}." (3x3 grid words of facts.py)."""
    if not anomalous:
        return NO_ANSWER
    if position not in POSITION_WORDS:
        raise DescriberError(f"position {position!r} is not a 3x3 grid word ({', '.join(POSITION_WORDS)})")
    return YES_ANSWER.format(position=position)


def answer_choices() -> list[str]:
    """The closed set of answers (DECODINGS "choice"): the No answer, then a Yes answer per 3x3 cell."""
    return [NO_ANSWER] + [YES_ANSWER.format(position=p) for p in POSITION_WORDS]


@dataclass
class BridgeAnswer:
    """What the bridge LLM said, and what was read out of it."""

    text: str
    anomalous: Optional[bool]  # None when the text starts with neither Yes nor No
    position: Optional[str]  # a POSITION_WORDS entry, None when absent
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "anomalous": self.anomalous, "position": self.position,
                "seconds": round(self.seconds, 4), **self.extra}


def parse_answer(text: str) -> tuple[Optional[bool], Optional[str]]:
    """(anomalous, position) read from a generated answer; None for what it does not say."""
    t = text.strip().lower()
    anomalous: Optional[bool] = None
    if re.match(r"^yes\b", t):
        anomalous = True
    elif re.match(r"^no\b", t):
        anomalous = False
    m = _POS_RE.search(t)
    return anomalous, (m.group(1) if m else None)


def read_bridge_config(bridge_dir: Union[str, Path]) -> dict[str, Any]:
    return read_json_config(bridge_dir, BRIDGE_CONFIG, "a bridge folder",
                            "export one with `iadgpt export-bridge CKPT --out DIR`")


class OnnxBridge:
    """Runs the exported bridge heads and the inputs_embeds LLM (`OnnxLLM`) on numpy arrays.

    `ask(features, map_kind)` takes the encoder's per-layer features of ONE image (list of
    (1, C, h, w) float32) and returns a `BridgeAnswer`.
    """

    def __init__(self, bridge_dir: Union[str, Path], llm: Any = None, *, llm_dir: Optional[Union[str, Path]] = None,
                 threads: Optional[int] = 1, max_new_tokens: int = 24, decoding: str = "greedy") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise DescriberError("the bridge needs onnxruntime: pip install iadgpt[cpu]") from None
        from iadgpt.runtime.llm_runtime import OnnxLLM

        self.dir = Path(bridge_dir)
        self.config = read_bridge_config(self.dir)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.sessions: dict[str, Any] = {}
        for name, rel in self.config["graphs"].items():
            try:
                self.sessions[name] = ort.InferenceSession(str(self.dir / rel), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - ORT raises its own types
                raise DescriberError(f"cannot load bridge graph {self.dir / rel}: {exc}; re-export the bridge") from None
        bank = self.config.get("bank")
        self.bank = np.load(self.dir / bank, allow_pickle=False).astype(np.float32) if bank else None
        if llm is None:
            if llm_dir is None:
                raise DescriberError("OnnxBridge needs an LLM: pass llm=OnnxLLM(...) or llm_dir (an inputs_embeds "
                                     "build: `iadgpt quantize-llm --embeds --out DIR`)")
            llm = OnnxLLM(llm_dir, threads=threads)
        if not getattr(llm, "takes_embeds", False):
            raise DescriberError(f"the bridge LLM {getattr(llm, 'dir', llm)} reads input_ids, not inputs_embeds; "
                                 "build one with `iadgpt quantize-llm --embeds`")
        if int(llm.hidden_size) != int(self.config["hidden_size"]):
            raise DescriberError(f"the bridge was trained for an LLM of width {self.config['hidden_size']}, "
                                 f"{llm.dir} has {llm.hidden_size}; use the LLM it was trained with")
        if decoding not in DECODINGS:
            raise DescriberError(f"bridge decoding {decoding!r}: use one of {', '.join(DECODINGS)}")
        self.decoding = decoding
        self.llm = llm
        self.max_new_tokens = int(max_new_tokens)
        self.choices = answer_choices()
        end_of_turn = llm.encode(END_OF_TURN)  # the training answers end with it (BridgeLM.loss)
        self.choice_ids = [llm.encode(a) + end_of_turn for a in self.choices]
        self.head_ids = llm.encode(PROMPT_HEAD)
        self.tail_ids = llm.encode(PROMPT_TAIL)
        self.tge_layer = int(self.config["tge_layer"])

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        sess = self.sessions[name]
        wanted = {i.name for i in sess.get_inputs()}
        return sess.run(None, {k: v for k, v in feeds.items() if k in wanted})[0]

    def masks(self, features: Sequence[np.ndarray], map_kind: str = "decoder") -> np.ndarray:
        feeds = {f"feat{i}": np.ascontiguousarray(f, np.float32) for i, f in enumerate(features)}
        if map_kind == "decoder":
            return self._run("masks_decoder", feeds)
        if map_kind == "memory_bank":
            if self.bank is None or "masks_bank" not in self.sessions:
                raise DescriberError(f"{self.dir} has no memory-bank mask graph; re-export the bridge with a bank")
            feeds["bank"] = self.bank
            return self._run("masks_bank", feeds)
        raise DescriberError(f"unknown map kind {map_kind!r}; use 'decoder' or 'memory_bank'")

    def prompt_embeds(self, features: Sequence[np.ndarray], map_kind: str = "decoder") -> np.ndarray:
        """(T, hidden) float32 prompt: head text, image token, mask tokens, question."""
        image = self._run("tge", {"feature": np.ascontiguousarray(features[self.tge_layer], np.float32)})
        masks = self._run("mmf", {"masks": self.masks(features, map_kind)})
        return np.concatenate([self.llm.embed(self.head_ids), image[0], masks[0], self.llm.embed(self.tail_ids)])

    def ask(self, features: Sequence[np.ndarray], map_kind: str = "decoder", *,
            deadline: Optional[float] = None) -> BridgeAnswer:
        """The LLM's answer about one frame's features; past `deadline` (time.monotonic()) it raises
        DescriberError rather than return a cut text or a ranking of some of the answers."""
        t0 = time.perf_counter()
        prompt = self.prompt_embeds(features, map_kind)
        if self.decoding == "choice":
            scores = self.llm.score_embeds(prompt, self.choice_ids, deadline=deadline)
            text = self.choices[int(np.argmax(scores))]
            extra = {"log_prob": round(float(scores.max()), 4)}
        else:
            gen = self.llm.generate_embeds(prompt, self.max_new_tokens, deadline=deadline)
            if gen.stop == "deadline":  # a cut answer ("Yes, there is an anomaly in") must not be read as one
                raise DescriberError(f"deadline passed after {len(gen.tokens)} answer tokens; give the describer "
                                     "a longer timeout_s")
            text, extra = gen.text, {"llm": gen.to_dict()}
        anomalous, position = parse_answer(text)
        return BridgeAnswer(text, anomalous, position, time.perf_counter() - t0,
                            {"map": map_kind, "decoding": self.decoding, "prompt_vectors": len(prompt), **extra})
