"""NSA synthesis: determinism, placement on the part, soft labels/masks, the `iadgpt synth` grid."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from iadgpt.cli import main
from iadgpt.errors import DataError
from iadgpt.models.synth import (MASK_THRESHOLD, NSASynthesizer, config_for, foreground_mask, guess_kind,
                                 intensity_label, synth_grid)
from iadgpt.runtime.synthetic import SyntheticProduct

SIZE = 96


def _images(kind: str = "part", n: int = 4, seed: int = 3) -> list[np.ndarray]:
    product = SyntheticProduct(kind=kind, size=SIZE, seed=seed, defect_rate=0.0)
    return [product.sample(i).image for i in range(n)]


@pytest.fixture(scope="module")
def parts() -> NSASynthesizer:
    return NSASynthesizer(_images(), kind="object")


def test_foreground_is_the_part_not_the_table() -> None:
    product = SyntheticProduct(kind="part", size=SIZE, seed=3, defect_rate=0.0)
    img = product.sample(0).image
    fg = foreground_mask(img, "object")
    assert fg.dtype == bool and fg.shape == (SIZE, SIZE)
    c = SIZE // 2
    assert not fg[:3].any() and not fg[-3:].any()  # the table along the frame border
    assert fg[c, c + int(0.3 * SIZE)]  # on the flange, between bore and rim
    assert not fg[c, c]  # the bore shows the table
    assert foreground_mask(img, "texture").all()


def test_kind_is_guessed() -> None:
    assert guess_kind(_images("part", 2)) == "object"
    assert guess_kind(_images("tile", 2)) == "texture"


def test_deterministic_per_seed_and_index(parts: NSASynthesizer) -> None:
    a, b = parts.sample(5, seed=1), parts.sample(5, seed=1)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.boxes == b.boxes and a.sources == b.sources
    again = NSASynthesizer(_images(), kind="object").sample(5, seed=1)  # a fresh instance agrees
    assert np.array_equal(a.image, again.image)
    assert not np.array_equal(a.image, parts.sample(5, seed=2).image)
    assert not np.array_equal(a.image, parts.sample(6, seed=1).image)


def test_patches_labels_and_placement(parts: NSASynthesizer) -> None:
    cfg = parts.config
    for i in range(12):
        s = parts.sample(i, seed=0)
        base = parts.images[s.target]
        assert s.image.dtype == np.uint8 and s.image.shape == base.shape
        assert 1 <= len(s.boxes) <= 2 and len(s.sources) == len(s.boxes)
        assert all(src != s.target for src in s.sources)  # cut from ANOTHER normal image
        inside = np.zeros(base.shape[:2], bool)
        for x, y, w, h in s.boxes:
            inside[y:y + h, x:x + w] = True
            assert parts.foregrounds[s.target][y:y + h, x:x + w].mean() >= cfg.min_overlap  # on the part
            assert cfg.width[0] * SIZE - 1 <= w <= 1.5 * cfg.width[1] * SIZE + 1
        assert np.array_equal(s.image[~inside], base[~inside])  # nothing changes outside the patches
        assert s.label.dtype == np.float32 and 0.0 <= s.label.min() and s.label.max() <= 1.0
        assert not s.label[~inside].any()
        assert np.array_equal(s.mask, s.label > MASK_THRESHOLD)
    assert any(parts.sample(i, seed=0).mask.any() for i in range(12))


def test_colour_changes_move_the_colour_not_the_texture() -> None:
    """colour=1: every patch is a recoloured blob of the part itself, in place: the mean colour in
    the box moves (what Poisson pastes never do), the labelled pixels are where it moved, nothing
    outside the boxes changes. Off by default (the paper's NSA)."""
    assert config_for("object").colour == 0.0 and config_for("texture").colour == 0.0
    colour = NSASynthesizer(_images(), config=config_for("object", colour=1.0))
    shifts = []
    for i in range(8):
        s = colour.sample(i, seed=0)
        base = colour.images[s.target]
        assert s.sources == [s.target] * len(s.boxes)  # recoloured in place, nothing pasted
        inside = np.zeros(base.shape[:2], bool)
        for x, y, w, h in s.boxes:
            inside[y:y + h, x:x + w] = True
        assert np.array_equal(s.image[~inside], base[~inside]) and not s.label[~inside].any()
        if s.mask.any():
            shifts.append(np.abs(s.image[s.mask].astype(float).mean(0) - base[s.mask].astype(float).mean(0)).max())
    assert len(shifts) >= 4 and min(shifts) > 10  # grey levels of mean colour change under the mask
    with pytest.raises(DataError, match="colour probability"):
        config_for("object", colour=1.5)


def test_logistic_intensity_label() -> None:
    before = np.full((20, 20, 3), 100, np.uint8)
    after = before.copy()
    after[5:15, 5:15] = 200  # a 100-grey-level change
    region = np.zeros((20, 20), bool)
    region[5:15, 5:15] = True
    label = intensity_label(before, after, region, (1 / 12, 24.0))
    assert label[10, 10] > 0.99 and label[0, 0] == 0.0
    faint = before.copy()
    faint[5:15, 5:15] = 103  # 3 grey levels: pasted but invisible -> not a defect
    assert intensity_label(before, faint, region, (1 / 12, 24.0)).max() < MASK_THRESHOLD


def test_texture_kind_pastes_anywhere() -> None:
    synth = NSASynthesizer(_images("tile", 3), kind="texture")
    assert synth.config == config_for("texture") and synth.foregrounds[0].all()
    s = synth.sample(0, seed=0)
    assert s.boxes


def test_errors_name_the_fix() -> None:
    with pytest.raises(DataError, match="at least one normal image"):
        NSASynthesizer([])
    with pytest.raises(DataError, match="one common size"):
        NSASynthesizer([np.zeros((32, 32, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)])
    with pytest.raises(DataError, match="unknown NSA kind"):
        config_for("liquid")


def test_grid_and_cli(tmp_path, parts: NSASynthesizer) -> None:
    grid = synth_grid(parts, n=3, seed=0, cols=2)
    assert grid.dtype == np.uint8 and grid.shape[0] == 2 * (SIZE + 2) and grid.shape[1] == 2 * (2 * SIZE + 2)
    train = tmp_path / "good"
    train.mkdir()
    for i, img in enumerate(_images(n=3)):
        cv2.imwrite(str(train / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    out = tmp_path / "grid.png"
    assert main(["synth", "--train-dir", str(train), "--n", "4", "--size", "64", "--out", str(out)]) == 0
    img = cv2.imread(str(out))
    assert img is not None and img.shape == (66, 4 * 130, 3)  # one row of 4 cells, image + label each


@pytest.mark.parametrize("flags,match", [(["--n", "0"], "--n 0"), (["--cols", "0"], "--cols 0"),
                                         (["--size", "0"], "--size 0"), (["--size", "-3"], "--size -3"),
                                         (["--out", "grid_without_extension"], "end the name in one of"),
                                         (["--out", "grid.txt"], "end the name in one of"),
                                         (["--out", "folder.png"], "is a folder")])
def test_cli_refuses_nonsense_flags_before_synthesis(tmp_path, monkeypatch, capsys, flags, match) -> None:
    from iadgpt.models import synth as synth_module
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(synth_module, "synth_grid", lambda *a, **k: pytest.fail("synthesized"))
    train = tmp_path / "good"
    train.mkdir()
    cv2.imwrite(str(train / "0.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "folder.png").mkdir()  # a folder named like a grid image
    args = ["synth", "--train-dir", str(train), "--n", "2", "--out", "grid.png"]
    assert main(args + flags) == 2  # the later --out wins
    assert match in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png", "good"]  # nothing written


def test_poisson_paste_takes_the_patchs_gradients_not_the_targets():
    """NORMAL_CLONE: a flat patch pasted on a strong texture is flat inside (MIXED_CLONE would keep
    the texture's stronger gradients, and NSA's anomalies would look like the background)."""
    from iadgpt.models.synth import _poisson_paste
    dst = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    patch = np.full((24, 24, 3), 128, np.uint8)
    out = _poisson_paste(dst, patch, 20, 20)
    inner = out[26:38, 26:38].astype(np.float32)
    assert np.abs(np.diff(inner, axis=1)).mean() < 10  # the texture's own is ~85


@pytest.fixture
def good(tmp_path):
    d = tmp_path / "good"
    d.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(d / "0.PNG"), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    return d


def test_synth_passes_flags_and_reads_upper_case_suffixes(tmp_path, monkeypatch, good):
    from iadgpt.models import synth
    seen = {}

    class S:
        def __init__(self, images, kind):
            seen.update(n_images=len(images), shape=images[0].shape, kind=kind)
            self.config = type("C", (), {"kind": kind})()

    def grid(s, n, seed, cols):
        seen.update(n=n, seed=seed, cols=cols)
        return np.zeros((4, 4, 3), np.uint8)
    monkeypatch.setattr(synth, "NSASynthesizer", S)
    monkeypatch.setattr(synth, "synth_grid", grid)
    out = tmp_path / "a" / "b" / "grid.PNG"  # nested parent, upper-case suffix
    assert main(["synth", "--train-dir", str(good), "--n", "3", "--out", str(out), "--kind", "texture",
                 "--seed", "7", "--cols", "2", "--size", "16"]) == 0
    # good's 32 px image reaches the synthesizer at --size 16
    assert seen == {"n_images": 1, "shape": (16, 16, 3), "kind": "texture", "n": 3, "seed": 7, "cols": 2}
    assert out.exists()
