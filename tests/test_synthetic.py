"""The synthetic product generator: reproducible pixels and exact ground truth."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from iadgpt.errors import SourceError
from iadgpt.runtime.synthetic import DEFECT_KINDS, SyntheticFrame, SyntheticProduct, parse_synthetic_uri


@pytest.mark.parametrize("defect", DEFECT_KINDS)
def test_paint_defect_on_a_photo_like_image(defect: str) -> None:
    """The painters on a plain RGB array with a foreground mask (as `models.synth.foreground_mask`
    gives for a photo): a non-empty mask inside the foreground, exactly the changed pixels, per seed."""
    from iadgpt.models.synth import foreground_mask
    from iadgpt.runtime.synthetic import paint_defect
    import cv2
    rng = np.random.default_rng(0)  # a photo-like object: a mottled disc with a rim on a darker table
    image = (45 + 6 * rng.standard_normal((128, 128, 3))).clip(0, 255).astype(np.uint8)
    disc = cv2.GaussianBlur(rng.uniform(120, 190, (128, 128, 3)).astype(np.float32), (0, 0), 3)
    inside = np.zeros((128, 128), np.uint8)
    cv2.circle(inside, (66, 62), 46, 1, -1)
    image[inside > 0] = disc[inside > 0].astype(np.uint8)
    cv2.circle(image, (66, 62), 40, (90, 90, 100), 2)
    fg = foreground_mask(image, "object")
    assert 0.2 < fg.mean() < 0.9
    before = image.copy()
    out, mask = paint_defect(image, fg, defect, np.random.default_rng([7, 1]))
    assert np.array_equal(image, before), "the input image was modified"
    assert out.shape == image.shape and out.dtype == np.uint8 and mask.dtype == bool
    assert mask.sum() >= 0.003 * 128 ** 2 and not np.any(mask & ~fg)
    changed = np.any(out != image, axis=-1)
    assert not np.any(changed & ~mask) and changed[mask].mean() > 0.98
    again, mask2 = paint_defect(image, fg, defect, np.random.default_rng([7, 1]))
    assert np.array_equal(again, out) and np.array_equal(mask2, mask)
    other, _ = paint_defect(image, fg, defect, np.random.default_rng([8, 1]))
    assert not np.array_equal(other, out)
    with pytest.raises(SourceError, match="square"):
        paint_defect(image[:, :100], fg[:, :100], defect, np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["part", "tile"])
def test_same_seed_and_index_give_same_pixels(kind: str) -> None:
    a, b = SyntheticProduct(kind, seed=5), SyntheticProduct(kind, seed=5)
    for i in (0, 3, 17):
        fa, fb = a.sample(i), b.sample(i)
        assert np.array_equal(fa.image, fb.image)
        assert np.array_equal(fa.mask, fb.mask)
        assert fa.defect_type == fb.defect_type and fa.index == i
    assert np.array_equal(a.sample(3).image, a.sample(3).image)  # order of calls does not matter
    assert not np.array_equal(a.sample(0).image, a.sample(1).image)
    assert not np.array_equal(a.sample(0).image, SyntheticProduct(kind, seed=6).sample(0).image)


@pytest.mark.parametrize("kind", ["part", "tile"])
def test_frame_format(kind: str) -> None:
    f = SyntheticProduct(kind, size=128, seed=1).sample(0)
    assert isinstance(f, SyntheticFrame)
    assert f.image.shape == (128, 128, 3) and f.image.dtype == np.uint8
    assert f.mask.shape == (128, 128) and f.mask.dtype == bool


@pytest.mark.parametrize("kind", ["part", "tile"])
def test_mask_is_exactly_the_changed_pixels(kind: str) -> None:
    p = SyntheticProduct(kind, seed=2, defect_rate=0.5)
    seen_good = seen_bad = 0
    for i in range(16):
        f, clean = p.sample(i), p.clean(i)
        assert clean.defect_type is None and not clean.mask.any()
        changed = np.any(f.image != clean.image, axis=-1)
        if f.defect_type is None:
            seen_good += 1
            assert not f.mask.any()
            assert np.array_equal(f.image, clean.image)
        else:
            seen_bad += 1
            assert f.mask.any()
            assert not np.any(changed & ~f.mask), "a pixel outside the mask changed"
            assert changed[f.mask].mean() > 0.98, "mask covers pixels the defect did not change"
            diff = np.abs(f.image.astype(int) - clean.image.astype(int)).max(-1)
            assert np.median(diff[f.mask]) >= 20, "defect is too faint to see"
    assert seen_good and seen_bad


@pytest.mark.parametrize("kind", ["part", "tile"])
@pytest.mark.parametrize("defect", DEFECT_KINDS)
def test_every_defect_kind_is_drawn_visibly(kind: str, defect: str) -> None:
    p = SyntheticProduct(kind, seed=3, defect_rate=1.0, defect_kinds=(defect,))
    for i in range(2):
        f = p.sample(i)
        assert f.defect_type == defect and f.is_defective
        assert f.mask.mean() >= 0.005, f"{defect} covers only {f.mask.mean():.4f} of the frame"


def test_part_defects_sit_on_the_part() -> None:
    p = SyntheticProduct("part", seed=4, defect_rate=1.0)
    for i in range(10):
        f = p.sample(i)
        ys, xs = np.nonzero(f.mask)
        r = np.hypot(xs - 128, ys - 128)
        assert np.percentile(r, 90) < 0.45 * 256, f"{f.defect_type} drawn off the part"


def test_defect_rate_and_uniform_kinds() -> None:
    p = SyntheticProduct("part", seed=0, defect_rate=0.3)
    plans = [p.defect_type(i) for i in range(400)]
    rate = sum(d is not None for d in plans) / len(plans)
    assert 0.22 < rate < 0.38
    assert {d for d in plans if d} == set(DEFECT_KINDS)
    assert all(SyntheticProduct("part", defect_rate=0.0).defect_type(i) is None for i in range(50))
    assert all(SyntheticProduct("part", defect_rate=1.0).defect_type(i) for i in range(50))
    assert [p.sample(i).defect_type for i in range(6)] == plans[:6]


@pytest.mark.parametrize("kind", ["part", "tile"])
def test_normal_variation_is_modest(kind: str) -> None:
    p = SyntheticProduct(kind, seed=9, defect_rate=0.0)
    imgs = np.stack([p.sample(i).image.astype(np.float32) for i in range(8)])
    means = imgs.mean(axis=(1, 2, 3))
    assert means.std() < 6.0  # lighting varies, but not wildly
    if kind == "part":  # the part stays near the centre: the centre (bore) is dark, the rim bright
        assert (imgs[:, 128, 128].mean(-1) < 60).all()
        assert (imgs[:, 128, 128 + int(0.15 * 256)].mean(-1) > 110).all()  # hub face


def test_parse_synthetic_uri() -> None:
    kw = parse_synthetic_uri("synthetic://part?seed=3&size=256&defect_rate=0.3&fps=20&count=100")
    assert kw == {"kind": "part", "seed": 3, "size": 256, "defect_rate": 0.3, "fps": 20.0, "count": 100}
    assert parse_synthetic_uri("synthetic://") == {"kind": "part"}
    assert parse_synthetic_uri("synthetic://tile?defect_kinds=hole,stain")["defect_kinds"] == ("hole", "stain")
    for bad in ("synthetic://part?sede=1", "synthetic://part?seed=x", "synthetic://gear", "file://x",
                "synthetic://part?count=-1"):
        with pytest.raises(SourceError):
            parse_synthetic_uri(bad)


def test_bad_arguments_name_the_fix() -> None:
    with pytest.raises(SourceError, match="part, tile"):
        SyntheticProduct("gear")
    with pytest.raises(SourceError, match="scratch"):
        SyntheticProduct(defect_kinds=("dent",))
    with pytest.raises(SourceError):
        SyntheticProduct(defect_rate=1.5)
    with pytest.raises(SourceError):
        SyntheticProduct(size=8)
    with pytest.raises(SourceError):
        SyntheticProduct().sample(-1)


def test_runtime_does_not_import_torch() -> None:
    code = "import sys, iadgpt.runtime.sources, iadgpt.runtime.synthetic; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("uri", ["synthetic://part?fps=-1", "synthetic://part?count=-1"])
def test_negative_rates_in_a_synthetic_uri_are_refused(uri):
    with pytest.raises(SourceError, match="must be >= 0"):
        parse_synthetic_uri(uri)


@pytest.mark.parametrize("kw, words", [({"seed": -1}, "negative"), ({"defect_rate": -0.1}, "out of range"),
                                       ({"defect_kinds": ()}, "none given")])
def test_bad_product_arguments_are_source_errors(kw, words):
    with pytest.raises(SourceError, match=words):
        SyntheticProduct(**kw)
