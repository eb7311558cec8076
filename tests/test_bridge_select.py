"""Choosing among bridge seeds on painted defects: the defects and their cells, the shares counted
from the answers, the choice, and `iadgpt train --stage bridge --seeds`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from iadgpt.cli import main
from iadgpt.models import bridge_select as bs
from iadgpt.models.bridge_train import largest_region_position
from iadgpt.runtime.bridge_runtime import answer_text
from iadgpt.runtime.synthetic import SyntheticProduct

from conftest import TINY_SIZE


def _parts(n: int) -> list[np.ndarray]:
    product = SyntheticProduct(kind="part", size=TINY_SIZE, seed=5, defect_rate=0.0)
    return [product.sample(i).image for i in range(n)]


def test_painted_defects_are_seeded_skip_the_shot_and_name_their_cells():
    images = _parts(8)
    painted, cells = bs.painted_defects(images, "object", n=5, exclude=[3])
    again, cells_again = bs.painted_defects(images, "object", n=5, exclude=[3])
    assert len(painted) == 5 and cells == cells_again
    assert all(np.array_equal(a, b) for a, b in zip(painted, again))
    changed = [int(np.argmin([np.abs(p.astype(int) - im.astype(int)).sum() for im in images])) for p in painted]
    assert 3 not in changed and len(set(changed)) == 5  # each painted on its own image, never on the shot
    for p, cell, i in zip(painted, cells, changed):
        diff = np.abs(p.astype(int) - images[i].astype(int)).sum(axis=2) > 0
        assert cell == largest_region_position(diff)
    other, _ = bs.painted_defects(images, "object", n=5, seed=7, exclude=[3])
    assert any(not np.array_equal(a, b) for a, b in zip(painted, other))


class _Mmf(torch.nn.Module):
    """A locator that picks cell `cells[i]` for image i (presence always on)."""
    summary = "words"

    def __init__(self, cells):
        super().__init__()
        self.cells = cells

    def where_logits(self, masks):
        logits = torch.zeros(len(masks), 9)
        logits[torch.arange(len(masks)), torch.tensor(self.cells[:len(masks)])] = 1.0
        return logits

    def presence_logits(self, masks):
        return torch.ones(len(masks))


class _Bridge:
    """Answers per image as told: a position word, or None for "No"."""

    def __init__(self, said, cells):
        self.said, self.mmf, self.i = said, _Mmf(cells), 0

    def choose(self, feature, masks):
        out = [answer_text(p is not None, p) for p in self.said[self.i:self.i + len(feature)]]
        self.i = (self.i + len(feature)) % len(self.said)
        return out


def test_answers_on_counts_right_cells_locator_and_following():
    from iadgpt.runtime.facts import POSITION_WORDS as W
    truth = [W[0], W[4], W[8], W[2]]
    said = [W[0], W[4], W[7], None]  # 2 right, one wrong cell, one "No"
    locator = [0, 3, 7, 2]  # right on images 0 and 3; the answers name its cell on images 0 and 2
    masks = {k: torch.zeros(4, 2, 6, 6) for k in ("decoder", "memory_bank")}
    shares = bs.answers_on(_Bridge(said, locator), torch.zeros(4, 3), masks, truth, batch=3)
    for kind in ("decoder", "memory_bank"):
        assert shares[kind] == {"yes": 0.75, "position": 0.5, "locator": 0.5, "follow": 0.5}


def test_choose_takes_the_worse_map_and_keeps_the_earlier_of_a_tie():
    def check(name, dec, bank):
        return bs.PaintedCheck(name, 80, {"decoder": {"position": dec}, "memory_bank": {"position": bank}})
    a, b, c = check("a", 0.95, 0.70), check("b", 0.80, 0.82), check("c", 0.82, 0.80)
    assert a.score == 0.70 and bs.choose([a, b, c]) is b  # b and c tie at 0.80: the earlier one
    assert bs.choose([c, b]) is c
    assert c.to_dict()["score"] == 0.80
    with pytest.raises(Exception, match="no bridge trainings"):
        bs.choose([])


@pytest.fixture
def fake_training(monkeypatch):
    """train_bridge writes a file named after its seed; the painted check scores seeds 7 > 3 > 1."""
    import iadgpt.models.bridge_train as bt
    trained, scores = [], {1: 0.6, 3: 0.7, 7: 0.9}

    def train_bridge(data, category, out, decoder, *, seed, resume, **kw):
        trained.append((seed, resume))
        out.write_text(f"seed {seed}")
        return {"pool_seconds": 1.0, "train_seconds": 2.0}

    def check_on_painted(runs, data, category, **kw):
        return [bs.PaintedCheck(str(r), 80, {"decoder": {"position": scores[int(r.name.split(".seed")[1][0])]},
                                             "memory_bank": {"position": 0.95}}) for r in runs]
    monkeypatch.setattr(bt, "train_bridge", train_bridge)
    monkeypatch.setattr(bt, "is_finished_bridge", lambda path: True)
    monkeypatch.setattr(bs, "check_on_painted", check_on_painted)
    return trained


def test_cli_seeds_trains_each_and_keeps_the_best_as_out(tmp_path, capsys, fake_training):
    out = tmp_path / "b.safetensors"
    args = ["train", "--stage", "bridge", "--data", str(tmp_path), "--category", "x", "--decoder",
            str(tmp_path / "d.safetensors"), "--out", str(out), "--seeds", "3,7,1"]
    assert main(args) == 0
    assert fake_training == [(3, False), (7, False), (1, False)]
    assert out.read_text() == "seed 7"
    assert (tmp_path / "b.seed3.safetensors").read_text() == "seed 3"
    report = json.loads((tmp_path / "b.selection.json").read_text())
    assert report["chosen"].endswith("b.seed7.safetensors") and [c["score"] for c in report["checks"]] == [0.7, 0.9, 0.6]
    assert "seed 7: painted defects placed right 90.0% / 95.0%" in capsys.readouterr().out
    assert main(args) == 2  # a finished selection is not overwritten
    assert "exists: a finished selection" in capsys.readouterr().err
    out.unlink()
    fake_training.clear()
    assert main(args + ["--resume"]) == 0  # finished seeds are kept, not trained again
    assert fake_training == [] and out.read_text() == "seed 7"


@pytest.mark.parametrize("flags,message", [
    (["--seeds", "1,1"], "distinct integers >= 0"),
    (["--seeds", "a"], "distinct integers >= 0"),
    (["--seeds", "0,1", "--seed", "2"], "--seed and --seeds: give one"),
])
def test_cli_seeds_refusals(tmp_path, capsys, fake_training, flags, message):
    args = ["train", "--stage", "bridge", "--data", str(tmp_path), "--category", "x", "--decoder",
            str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "b.safetensors")]
    assert main(args + flags) == 2
    assert message in capsys.readouterr().err and fake_training == []


def test_cli_seeds_is_a_bridge_flag(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--category", "x", "--out", str(tmp_path / "d"),
                 "--seeds", "0,1"]) == 2
    assert "--seeds: bridge-stage flag(s)" in capsys.readouterr().err
