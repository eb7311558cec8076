"""Defect facts: grid positions the right way round, sizes, shape, tone, colour, part finding,
and the defect-type rule (prompt retrieval > labelled examples > unknown)."""
from __future__ import annotations

import numpy as np
import pytest

from iadgpt.runtime.facts import (POSITION_WORDS, ExampleTypeClassifier, PromptTypeRetriever, TypeResolver,
                                  colour_name, compute_facts, grid_position, largest_component, part_mask)
from iadgpt.runtime.synthetic import SyntheticProduct
from iadgpt.runtime.verdict import Region

CELL = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
        (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}


@pytest.mark.parametrize("row, col", sorted(CELL))
def test_each_grid_cell_is_named_with_rows_first(row, col):
    """A blob drawn in cell (row, col) of a 3x3 grid of a plain frame is named by that cell."""
    size = 90
    img = np.full((size, size, 3), 150, np.uint8)
    y, x = 15 + 30 * row, 15 + 30 * col
    img[y - 4:y + 4, x - 4:x + 4] = 40
    amap = np.zeros((size, size), np.float32)
    amap[y - 4:y + 4, x - 4:x + 4] = 1.0
    facts = compute_facts(img, amap, threshold=0.5)
    assert facts.n_regions == 1
    r = facts.main
    assert (r.position, r.grid) == (CELL[(row, col)], (row, col))
    assert r.area_px == 64 and r.tone == "darker" and r.shape == "blob-like"


def test_non_square_box_keeps_x_as_columns():
    assert grid_position(290, 10, (0, 0, 300, 100))[2] == "top right"
    assert grid_position(10, 95, (0, 0, 300, 100))[2] == "bottom left"
    assert set(POSITION_WORDS) == set(CELL.values())


def test_elongated_region_is_scratch_like_with_orientation():
    img = np.full((100, 100, 3), 120, np.uint8)
    amap = np.zeros((100, 100), np.float32)
    amap[48:52, 10:90] = 1.0
    img[48:52, 10:90] = 220
    r = compute_facts(img, amap, threshold=0.5).main
    assert r.shape == "scratch-like" and r.orientation == "horizontal" and r.elongation > 10
    assert r.tone == "lighter" and r.contrast > 50
    amap2 = np.zeros((100, 100), np.float32)
    amap2[10:90, 48:52] = 1.0
    assert compute_facts(img, amap2, threshold=0.5).main.orientation == "vertical"


def test_regions_from_verdict_boxes_and_counts():
    img = np.full((120, 120, 3), 160, np.uint8)
    amap = np.zeros((120, 120), np.float32)
    amap[5:15, 5:15] = 0.9
    amap[80:110, 80:110] = 0.8
    regions = [Region(box=(80, 80, 110, 110), area_px=900, peak=0.8, centroid=(95, 95)),
               Region(box=(5, 5, 15, 15), area_px=100, peak=0.9, centroid=(10, 10))]
    facts = compute_facts(img, amap, regions, threshold=0.5)
    assert facts.n_regions == 2
    assert [r.position for r in facts.regions] == ["bottom right", "top left"]  # largest first
    assert facts.main.area_px == 900 and abs(facts.main.area_pct - 100 * 900 / 120 ** 2) < 1e-6
    assert facts.to_dict()["regions"][0]["box"] == [80, 80, 110, 110]
    assert facts.lines()[0] == "2 defects."


@pytest.mark.parametrize("rgb, name", [((200, 30, 30), "red"), ((30, 160, 40), "green"), ((40, 60, 200), "blue"),
                                       ((128, 128, 128), "grey"), ((10, 10, 10), "black"), ((250, 250, 250), "white"),
                                       ((120, 70, 30), "brown"), ((230, 210, 40), "yellow"),
                                       ((140, 125, 20), "brown")])  # a dark yellow is brown
def test_colour_names(rgb, name):
    assert colour_name(rgb) == name


def test_part_is_found_on_a_table_and_a_tile_is_taken_whole():
    part = SyntheticProduct(kind="part", size=128, seed=1, defect_rate=0.0).sample(0)
    mask, found = part_mask(part.image)
    assert found and 0.2 < mask.mean() < 0.8
    tile = SyntheticProduct(kind="tile", size=128, seed=1, defect_rate=0.0).sample(0)
    mask, found = part_mask(tile.image)
    assert not found and mask.all()


def _disc_on_a_table(size: int = 160) -> np.ndarray:
    """A bright disc (the part) centred on a dark table, radius 40 px."""
    img = np.full((size, size, 3), 30, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    img[(yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= 40 ** 2] = 200
    return img


def test_a_region_beside_the_part_is_worded_off_the_part():
    """Dirt on the table left of the part is not 'at the left of the part'; a spot on the part
    is, and a region covering the whole part (and some table) is on the part."""
    from iadgpt.runtime.wording import facts_sentence

    img = _disc_on_a_table()
    img[75:85, 12:22] = 120  # on the table, left of the disc
    amap = np.zeros(img.shape[:2], np.float32)
    amap[75:85, 12:22] = 1.0
    facts = compute_facts(img, amap, threshold=0.5)
    assert facts.part_found and not facts.main.on_part and facts.main.position == "left"
    sentence = facts_sentence(facts, "flange")
    assert "off the flange, beside its left" in sentence and "of the flange" not in sentence
    assert "off the part" in facts.lines()[0] and facts.to_dict()["regions"][0]["on_part"] is False

    img2 = _disc_on_a_table()
    img2[75:85, 50:60] = 90  # on the disc, its left side
    amap2 = np.zeros(img2.shape[:2], np.float32)
    amap2[75:85, 50:60] = 1.0
    on = compute_facts(img2, amap2, threshold=0.5).main
    assert on.on_part and on.position == "left"
    assert "at the left of the flange" in facts_sentence(compute_facts(img2, amap2, threshold=0.5), "flange")

    whole = np.zeros(img2.shape[:2], np.float32)
    whole[30:130, 30:130] = 1.0  # the disc and the table's corners around it
    assert compute_facts(img2, whole, threshold=0.5).main.on_part


def test_synthetic_defects_positions_follow_the_exact_mask():
    product = SyntheticProduct(kind="part", size=128, seed=7, defect_rate=1.0)
    for i in range(5):
        s = product.sample(i)
        facts = compute_facts(s.image, s.mask.astype(np.float32), threshold=0.5)
        ys, xs = np.nonzero(s.mask)
        assert facts.part_found
        assert facts.main.position == grid_position(xs.mean(), ys.mean(), facts.part_box)[2]
        if s.defect_type in ("scratch", "crack"):
            assert facts.main.shape == "scratch-like"


def test_type_rule_prompt_retrieval_then_examples_then_unknown():
    product = SyntheticProduct(kind="part", size=128, seed=3, defect_rate=1.0)
    samples = [product.sample(i) for i in range(40)]
    train, test = samples[:30], samples[30:]
    examples = ExampleTypeClassifier.from_examples([(s.image, s.mask, s.defect_type) for s in train], k=3)
    # examples only
    resolver = TypeResolver(examples=examples)
    hits = 0
    for s in test:
        r = compute_facts(s.image, s.mask.astype(np.float32), threshold=0.5, typer=resolver).main
        assert r.type_source == "labelled examples"
        hits += r.defect_type == s.defect_type
    assert hits >= 6, f"{hits}/10 types right from labelled examples"
    # prompt retrieval wins when a region embedding exists
    emb = np.eye(3, 8, dtype=np.float32)
    retr = PromptTypeRetriever(emb, ["dent", "rust", "chip"])
    resolver = TypeResolver(retr, examples)
    s = test[0]
    r = compute_facts(s.image, s.mask.astype(np.float32), threshold=0.5, typer=resolver,
                      region_embeddings=np.array([[0, 0.1, 1, 0, 0, 0, 0, 0]], np.float32)).main
    assert (r.defect_type, r.type_source) == ("chip", "prompt retrieval") and r.type_score > 0.9
    # nothing: unknown
    r = compute_facts(s.image, s.mask.astype(np.float32), threshold=0.5, typer=TypeResolver()).main
    assert (r.defect_type, r.type_source) == ("unknown", "none")


def test_examples_round_trip(tmp_path):
    feats = np.random.default_rng(0).normal(size=(6, 7)).astype(np.float32)
    clf = ExampleTypeClassifier(feats, ["a", "a", "b", "b", "c", "c"], k=1)
    back = ExampleTypeClassifier.load(clf.save(tmp_path / "ex"))
    assert back.labels == clf.labels and back.predict(feats[3])[0] == "b"


def _dark_spot_under_a_coarse_map(size=96, spot=(40, 40, 50, 50), blob=(33, 33, 57, 57)):
    """A 10x10 dark spot; the anomaly map marks the 24x24 square around it (as an upsampled coarse map does)."""
    img = np.full((size, size, 3), 170, np.uint8)
    x0, y0, x1, y1 = spot
    img[y0:y1, x0:x1] = 60
    amap = np.zeros((size, size), np.float32)
    bx0, by0, bx1, by1 = blob
    amap[by0:by1, bx0:bx1] = 1.0
    return img, amap


def test_region_size_counts_the_pixels_that_stand_out_not_the_coarse_map():
    img, amap = _dark_spot_under_a_coarse_map()
    r = compute_facts(img, amap, threshold=0.5).main
    assert r.map_area_px == 576 and r.area_px == 100 and r.area_source == "image"  # was 576: 5.8x the spot
    assert r.tone == "darker" and r.colour == "dark grey"
    assert "about 1.1% of the part (~100 px; the coarse anomaly map marks 6.2%)" in r.size_text()


def test_a_defect_the_image_does_not_show_keeps_the_maps_size_worded_as_coarse():
    img = np.full((96, 96, 3), 170, np.uint8)
    amap = np.zeros((96, 96), np.float32)
    amap[30:60, 30:60] = 1.0
    r = compute_facts(img, amap, threshold=0.5).main
    assert r.area_source == "map" and r.area_px == 900 and r.tone == "similar brightness"
    assert r.size_text() == "roughly 9.8% of the part (coarse anomaly-map estimate)"


def test_tone_and_size_of_a_thin_dark_crack_in_a_mostly_normal_map_region():
    """The old tone compared the whole (mostly normal) map region with its ring: "similar brightness"."""
    img = np.full((96, 96, 3), 150, np.uint8)
    img[47, 26:70] = 40  # a one-pixel dark crack
    amap = np.zeros((96, 96), np.float32)
    amap[24:72, 24:72] = 1.0
    r = compute_facts(img, amap, threshold=0.5).main
    assert r.tone == "darker" and r.contrast < -100  # the crack's own pixels
    assert r.area_source == "map" and r.area_px == 48 * 48  # too thin a share to count: the map's, worded as coarse


def test_facts_on_a_large_frame_use_a_bounded_ring():
    """A 300x300 region on a 900 px frame (the ring used to grow with sqrt(area): a 363 px kernel)."""
    img, amap = _dark_spot_under_a_coarse_map(900, (300, 300, 500, 500), (250, 250, 550, 550))
    r = compute_facts(img, amap, threshold=0.5).main
    assert r.area_px == 200 * 200 and r.map_area_px == 300 * 300 and r.tone == "darker"


def test_a_20x12_region_is_blob_like():
    from test_describer import _facts
    r = _facts().main  # box 20 x 12: elongation ~1.7
    assert 1.5 < r.elongation < 2.5 and r.shape == "blob-like"


def _noisy_spot(seed=0):
    img, amap = _dark_spot_under_a_coarse_map()
    noise = np.random.default_rng(seed).normal(0, 5, (96, 96, 1))  # grey sensor noise, sigma 5
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    return compute_facts(img, amap, threshold=0.5).main


def test_sensor_noise_is_not_counted_as_defect_area():
    r = _noisy_spot()
    assert r.area_source == "image" and 95 <= r.area_px <= 115, r.area_px


def test_a_faint_ten_level_stain_is_darker_not_similar():
    img = np.full((96, 96, 3), 170, np.uint8)
    img[40:50, 40:50] = 160
    amap = np.zeros((96, 96), np.float32)
    amap[40:50, 40:50] = 1.0
    r = compute_facts(img, amap, threshold=0.5).main
    assert abs(r.contrast + 10) < 1 and r.tone == "darker"


def test_area_pct_is_a_share_of_the_found_part_not_of_the_frame():
    img = np.full((120, 120, 3), 30, np.uint8)  # dark table
    img[20:100, 20:100] = 200  # a bright 80 x 80 part
    img[50:60, 50:60] = 90  # a dark spot on it
    amap = np.zeros((120, 120), np.float32)
    amap[50:60, 50:60] = 1.0
    facts = compute_facts(img, amap, threshold=0.5)
    assert facts.part_found and abs(facts.part_area_px - 80 * 80) < 100  # corners blurred
    assert facts.main.area_pct == pytest.approx(100.0 * facts.main.area_px / facts.part_area_px)


def test_largest_component_keeps_the_bigger_blob():
    mask = np.zeros((40, 40), bool)
    mask[2:5, 2:5] = True  # 9 px
    mask[20:30, 25:35] = True  # 100 px
    big = largest_component(mask)
    assert big.dtype == bool and big.sum() == 100 and big[25, 30] and not big[3, 3]
    assert largest_component(np.zeros((8, 8), bool)) is None
