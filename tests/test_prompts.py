"""Prompt files: packaged YAML, validation messages, provenance hash, embedding shapes."""
from __future__ import annotations

import pytest
import torch

from iadgpt.errors import ConfigError, ScorerError
from iadgpt.models.backbones import get_backbone
from iadgpt.models.prompts import (available_prompts, defect_embeddings, load_prompts,
                                   text_embeddings)

NORMAL = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
          "{} without damage"]
ABNORMAL = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]

GOOD = """object: widget
normal_states: ["{}", "perfect {}"]
abnormal_states: ["broken {}"]
templates: ["a photo of a {}."]
defects:
  - type: crack
    sentences: ["a {} with a crack."]
"""


@pytest.fixture(scope="module")
def tiny():
    return get_backbone("clip-tiny")


def test_packaged_files_follow_winclip():
    assert {"bottle", "metal_plate", "generic"} <= set(available_prompts())
    for name, obj in (("bottle", "bottle"), ("metal_plate", "metal plate")):
        p = load_prompts(name)
        assert p.object_name == obj
        assert p.normal == [t.format(s.format(obj)) for s in NORMAL for t in ("a photo of a {}.", "a photo of the {}.")]
        assert p.abnormal == [t.format(s.format(obj)) for s in ABNORMAL for t in ("a photo of a {}.", "a photo of the {}.")]
        assert len(p.defects) >= 3 and all(p.defects.values())
        assert "APG" in p.generation and len(p.sha256) == 64
    assert {"crack", "contamination"} <= set(load_prompts("bottle").defects)
    assert "rust" in load_prompts("metal plate").defects


def test_generic_fallback_substitutes_object():
    p = load_prompts("metal_nut")
    assert p.object_name == "metal nut" and p.source.endswith("generic.yaml")
    assert "a photo of a damaged metal nut." in p.abnormal
    assert all("{}" not in s and "metal nut" in s for s in p.defects["crack"])
    assert p.sha256 != load_prompts("screw").sha256  # the override is part of the provenance


def test_file_and_hash(tmp_path):
    path = tmp_path / "widget.yaml"
    path.write_text(GOOD, encoding="utf-8")
    p = load_prompts(path)
    assert p.normal == ["a photo of a widget.", "a photo of a perfect widget."]
    assert p.abnormal == ["a photo of a broken widget."] and p.defects == {"crack": ["a widget with a crack."]}
    path.write_text(GOOD.replace("perfect", "flawless"), encoding="utf-8")
    assert load_prompts(path).sha256 != p.sha256
    assert p.provenance()["defect_types"] == ["crack"]


@pytest.mark.parametrize("broken, needle", [
    (GOOD.replace("templates:", "tmpl:"), "missing key 'templates'"),
    (GOOD.replace("object: widget\n", ""), "missing key 'object'"),
    (GOOD.replace('    sentences: ["a {} with a crack."]\n', ""), "missing key 'defects[0].sentences'"),
    (GOOD.replace('"perfect {}"', '"perfect"'), "'{}' slot"),
    (GOOD.replace('abnormal_states: ["broken {}"]', "abnormal_states: []"), "'abnormal_states' must be"),
    ("object: [unclosed", "not valid YAML"),
])
def test_validation_names_key_and_file(tmp_path, broken, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(broken, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_prompts(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_prompts("/no/such/prompts.yaml")


def test_embeddings(tiny):
    p = load_prompts("bottle")
    t = text_embeddings(tiny, p)
    assert t.shape == (2, 32) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    manual = torch.nn.functional.normalize(tiny.encode_text(p.normal).mean(0), dim=-1)
    assert torch.allclose(t[0], manual, atol=1e-6)
    types, d = defect_embeddings(tiny, p)
    assert types == list(p.defects) and d.shape == (len(types), 32)
    assert torch.allclose(d.norm(dim=-1), torch.ones(len(types)), atol=1e-5)


def test_embeddings_need_text_tower():
    class NoText:
        name, has_text = "efficientnet-lite0", False
    with pytest.raises(ScorerError, match="CLIP"):
        text_embeddings(NoText(), load_prompts("bottle"))


def test_a_defect_type_listed_twice_is_refused(tmp_path):
    """a prompt file naming one defect type twice is an error (it was silently overwritten)."""
    path = tmp_path / "dup.yaml"
    path.write_text(GOOD + "  - type: crack\n    sentences: [\"another crack.\"]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="appears twice"):
        load_prompts(path)
