"""Text prompts per object (WinCLIP states x templates + APG defect sentences) and their embeddings.

Prompts live in YAML files (`iadgpt/models/prompts/<object>.yaml`, or any path) so quality
engineers can read and change them; a station only ever needs the resulting embeddings, and
`PromptSet.sha256` records which text produced them. Keys of a prompt file:

  object           the object name substituted for "{}"
  normal_states    e.g. "{}", "flawless {}", ... (each contains "{}")
  abnormal_states  e.g. "damaged {}", "{} with defect", ...
  templates        e.g. "a photo of a {}." (each contains "{}")
  defects          list of {type: str, sentences: [str, ...]}; "{}" in a sentence -> object name
  generation       (optional) how the defect sentences were written
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import torch
from torch.nn import functional as F

from ..errors import ConfigError, ScorerError

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("object", "normal_states", "abnormal_states", "templates", "defects")
GENERIC = "generic"


@dataclass
class PromptSet:
    """Expanded prompts of one object: every state in every template, plus defect sentences per type."""

    object_name: str
    normal: list[str]
    abnormal: list[str]
    defects: dict[str, list[str]]
    sha256: str = ""  # of the YAML text (plus the object override for the generic fallback)
    source: str = ""
    generation: str = field(default="", repr=False)

    def provenance(self) -> dict:
        """What a bundle manifest records about the prompts."""
        return {"object": self.object_name, "source": self.source, "sha256": self.sha256,
                "n_normal": len(self.normal), "n_abnormal": len(self.abnormal),
                "defect_types": list(self.defects)}


def available_prompts() -> list[str]:
    """Object names that have a packaged prompt file."""
    return sorted(p.name[:-5] for p in _packaged_dir().iterdir() if p.name.endswith(".yaml"))


def _packaged_dir() -> Any:
    return resources.files("iadgpt.models").joinpath("prompts")


def _key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def load_prompts(path_or_object_name: Union[str, Path]) -> PromptSet:
    """A YAML path, or an object name resolved to a packaged file (falling back to generic.yaml)."""
    ref = str(path_or_object_name)
    path = Path(ref).expanduser()
    if path.is_file():
        return _parse(path.read_text(encoding="utf-8"), str(path), override=None)
    if ref.endswith((".yaml", ".yml")) or "/" in ref or "\\" in ref:
        raise ConfigError(f"prompt file {ref!r} not found; pass an existing YAML file or an object name "
                          f"(packaged: {', '.join(available_prompts())})")
    packaged = _packaged_dir().joinpath(f"{_key(ref)}.yaml")
    if packaged.is_file():
        return _parse(packaged.read_text(encoding="utf-8"), f"iadgpt:prompts/{_key(ref)}.yaml", override=None)
    log.info("no prompt file for %r; using generic.yaml with the object name substituted", ref)
    generic = _packaged_dir().joinpath(f"{GENERIC}.yaml")
    return _parse(generic.read_text(encoding="utf-8"), f"iadgpt:prompts/{GENERIC}.yaml",
                  override=_key(ref).replace("_", " "))


def _str_list(data: dict, key: str, where: str, need_slot: bool) -> list[str]:
    value = data[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}: '{key}' must be a non-empty list of strings")
    if need_slot:
        bad = [v for v in value if "{}" not in v]
        if bad:
            raise ConfigError(f"{where}: every entry of '{key}' needs a '{{}}' slot; fix {bad[0]!r}")
    return list(value)


def _parse(text: str, where: str, override: str | None) -> PromptSet:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a prompt file must be a mapping with keys {', '.join(REQUIRED_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ConfigError(f"{where}: missing key '{key}' (required: {', '.join(REQUIRED_KEYS)})")
    obj = data["object"]
    if not isinstance(obj, str) or not obj.strip():
        raise ConfigError(f"{where}: 'object' must be a non-empty string (the object name)")
    obj = override or obj.strip()
    normal_states = _str_list(data, "normal_states", where, need_slot=True)
    abnormal_states = _str_list(data, "abnormal_states", where, need_slot=True)
    templates = _str_list(data, "templates", where, need_slot=True)
    defects = _parse_defects(data["defects"], where, obj)

    def expand(states: list[str]) -> list[str]:
        return [t.replace("{}", s.replace("{}", obj)) for s in states for t in templates]

    digest = hashlib.sha256(text.encode("utf-8"))
    if override:
        digest.update(f"\n# object override: {override}\n".encode("utf-8"))
    return PromptSet(object_name=obj, normal=expand(normal_states), abnormal=expand(abnormal_states),
                     defects=defects, sha256=digest.hexdigest(), source=where,
                     generation=str(data.get("generation", "")))


def _parse_defects(value: Any, where: str, obj: str) -> dict[str, list[str]]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: 'defects' must be a list of {{type: ..., sentences: [...]}} (may be empty: [])")
    out: dict[str, list[str]] = {}
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: defects[{i}] must be a mapping with 'type' and 'sentences'")
        for key in ("type", "sentences"):
            if key not in item:
                raise ConfigError(f"{where}: missing key 'defects[{i}].{key}'")
        kind = item["type"]
        if not isinstance(kind, str) or not kind.strip():
            raise ConfigError(f"{where}: 'defects[{i}].type' must be a non-empty string")
        if kind in out:
            raise ConfigError(f"{where}: defect type {kind!r} appears twice in 'defects'; merge its sentences")
        sentences = _str_list(item, "sentences", f"{where} defects[{i}]", need_slot=False)
        out[kind.strip()] = [s.replace("{}", obj) for s in sentences]
    return out


def _need_text(backbone: Any) -> None:
    if not getattr(backbone, "has_text", False):
        raise ScorerError(f"backbone {getattr(backbone, 'name', '?')!r} has no text tower; use a CLIP "
                          "backbone for text prompts, or the few-shot memory-bank scorer")


def _pooled(backbone: Any, texts: list[str]) -> torch.Tensor:
    """Mean of the L2-normalised embeddings, normalised again (WinCLIP prompt ensembling)."""
    emb = F.normalize(backbone.encode_text(texts).float(), dim=-1)
    return F.normalize(emb.mean(dim=0), dim=-1)


@torch.no_grad()
def text_embeddings(backbone: Any, prompts: PromptSet) -> torch.Tensor:
    """(2, D): row 0 normal, row 1 abnormal; the `text_embeddings` input of TextPromptScorer."""
    _need_text(backbone)
    return torch.stack([_pooled(backbone, prompts.normal), _pooled(backbone, prompts.abnormal)], dim=0)


@torch.no_grad()
def defect_embeddings(backbone: Any, prompts: PromptSet) -> tuple[list[str], torch.Tensor]:
    """(types, (K, D)): one pooled, normalised embedding per defect type, for defect-type retrieval."""
    _need_text(backbone)
    types = list(prompts.defects)
    if not types:
        return [], torch.zeros(0, int(getattr(backbone, "joint_dim", 0) or 0))
    return types, torch.stack([_pooled(backbone, prompts.defects[t]) for t in types], dim=0)
