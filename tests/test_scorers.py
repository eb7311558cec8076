"""Memory-bank scorer: it finds planted defects on synthetic textures, its coreset covers the data,
its chunked nearest-neighbour search is exact, and frames of any layout become the same batch."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from iadgpt.bundle import InputSpec
from iadgpt.errors import ScorerError, SourceError
from iadgpt.models.backbones import get_backbone
from iadgpt.models.references import encode, memory_bank
from iadgpt.models.scorers import (MIN_CORESET_PATCHES, MemoryBankScorer, PatchEmbedder, augment_shots,
                                   build_bank, greedy_coreset)
from iadgpt.runtime.preprocess import resize_frame, to_batch, to_rgb

SIZE = 224


# ------------------------------------------------------------------------------ synthetic textures


def texture(seed: int, size: int = SIZE) -> np.ndarray:
    """A brushed, striped surface: oblique stripes with a random phase plus fine seeded noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    stripes = np.sin(2 * np.pi * (xx + 0.3 * yy) / 14.0 + rng.uniform(0, 2 * np.pi))
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.5) * 3
    grey = 150 + 40 * stripes + 12 * noise
    return np.clip(np.stack([grey, 0.9 * grey + 10, 0.8 * grey + 20], axis=-1), 0, 255).astype(np.uint8)


def dark_blob(image: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cy, cx = (int(v) for v in rng.integers(60, SIZE - 60, 2))
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.circle(mask, (cx, cy), 14, 1, -1)
    out = image.copy()
    out[mask > 0] = (out[mask > 0] * 0.25).astype(np.uint8)
    return out, mask.astype(bool)


def scratch(image: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p0 = tuple(int(v) for v in rng.integers(40, 90, 2))
    p1 = tuple(int(v) for v in rng.integers(130, 185, 2))
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.line(mask, p0, p1, 1, 5)
    out = image.copy()
    out[mask > 0] = 235
    return out, mask.astype(bool)


def _batch(images: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.stack(images).astype(np.float32).transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def backbone():
    return get_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def scorer(backbone):
    return MemoryBankScorer(backbone.strides, SIZE)


@pytest.fixture(scope="module")
def bank(backbone, scorer) -> torch.Tensor:
    """Memory bank of 3 normal textures (no augmentation: stripes are not rotation invariant)."""
    shots = _batch([texture(s) for s in (1, 2, 3)])
    return torch.from_numpy(memory_bank(backbone, scorer, shots, augment=False, coreset=None))


@pytest.fixture(scope="module")
def normal_scores(backbone, scorer, bank) -> np.ndarray:
    with torch.inference_mode():
        _, scores = scorer(*encode(backbone, _batch([texture(s) for s in (10, 11, 12)])), bank)
    return scores.numpy()


@pytest.mark.parametrize("plant, seed", [(dark_blob, 20), (scratch, 30)], ids=["dark_blob", "scratch"])
def test_bank_flags_planted_defect(backbone, scorer, bank, normal_scores, plant, seed):
    """The meaning test: a defect on an unseen texture scores above every unseen normal texture,
    and the anomaly map peaks inside the planted defect."""
    defective, mask = plant(texture(seed), seed)
    with torch.inference_mode():
        amap, score = scorer(*encode(backbone, _batch([defective])), bank)
    assert amap.shape == (1, SIZE, SIZE) and score.shape == (1,)
    assert float(score[0]) > float(normal_scores.max()), (float(score[0]), normal_scores)
    # the score is the map's maximum, so the gap is a margin, not a tie
    assert float(score[0]) == pytest.approx(float(amap.max()))
    y, x = np.unravel_index(int(amap[0].argmax()), (SIZE, SIZE))
    assert mask[y, x], f"map peaks at {(y, x)}, outside the planted defect"


def test_bank_size_and_width(backbone, scorer, bank):
    grid = SIZE // 8
    assert bank.shape == (3 * grid * grid, sum(backbone.dims))
    # each layer's part of a patch vector is L2-normalised: 3 layers -> squared norm 3
    assert torch.allclose((bank * bank).sum(dim=1), torch.full((len(bank),), 3.0), atol=1e-4)


def test_scorer_rejects_wrong_feature_count(scorer, bank):
    feats = [torch.zeros(1, 24, 56, 56), torch.zeros(1, 40, 28, 28)]
    with pytest.raises(ScorerError, match="3 feature maps"):
        scorer(*feats, bank)


# ------------------------------------------------------------------------------ nearest neighbour


def _random_features(seed: int, batch: int = 2, size: int = 64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, size // s, size // s, generator=gen) for c, s in ((24, 4), (40, 8), (112, 16))]


def test_chunked_nn_equals_brute_force():
    size = 64
    feats = _random_features(0, size=size)
    ref = MemoryBankScorer((4, 8, 16), size, query_chunk=256)
    gen = torch.Generator().manual_seed(1)
    bank = ref.embedder.patches(_random_features(2, batch=3, size=size)).reshape(-1, 176)
    bank = bank + 0.01 * torch.randn(bank.shape, generator=gen)

    query = ref.embedder.patches(feats)  # (B, N, D)
    brute = torch.cdist(query.reshape(-1, 176).double(), bank.double()).min(dim=1).values
    dist = ref.patch_distances(feats, bank)
    assert dist.shape == (2, size // 8, size // 8)
    assert torch.allclose(dist.reshape(-1).double(), brute, atol=1e-4, rtol=1e-5)

    ref_map, ref_score = ref(*feats, bank)
    for chunk in (1, 7, 64, 100_000):
        amap, score = MemoryBankScorer((4, 8, 16), size, query_chunk=chunk)(*feats, bank)
        assert torch.allclose(amap, ref_map, atol=1e-5, rtol=1e-5), chunk
        assert torch.allclose(score, ref_score, atol=1e-5, rtol=1e-5), chunk


def test_distance_zero_for_bank_members():
    """A patch that is in the bank is at distance ~0 from it (no cancellation blow-up)."""
    size = 64
    feats = _random_features(3, batch=1, size=size)
    sc = MemoryBankScorer((4, 8, 16), size)
    bank = sc.embedder.patches(feats).reshape(-1, 176)
    assert float(sc.patch_distances(feats, bank).max()) < 1e-2


def test_embedder_grid_and_normalisation():
    emb = PatchEmbedder((4, 8, 16), 128)
    feats = _random_features(4, batch=2, size=128)
    e = emb(feats)
    assert e.shape == (2, 176, 16, 16)
    for part in torch.split(e, [24, 40, 112], dim=1):
        assert torch.allclose(part.norm(dim=1), torch.ones(2, 16, 16), atol=1e-5)
    assert emb.patches(feats).shape == (2, 256, 176)


# ------------------------------------------------------------------------------ coreset


def _clustered(n: int = 6000, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Three dense clusters plus 40 rare, far-away patterns a random subset tends to miss."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, dim)) * 5
    dense = centres[rng.integers(3, size=n - 40)] + rng.standard_normal((n - 40, dim)) * 0.5
    rare = rng.standard_normal((40, dim)) * 12
    return np.concatenate([dense, rare]).astype(np.float32)


def _coverage_radius(x: np.ndarray, idx: np.ndarray) -> float:
    """Largest distance from any point to its nearest selected point."""
    d = torch.cdist(torch.from_numpy(x).double(), torch.from_numpy(x[idx]).double())
    return float(d.min(dim=1).values.max())


@pytest.mark.parametrize("n, fraction, min_patches, expected", [
    (20_000, 0.1, MIN_CORESET_PATCHES, 2000),                # ceil(fraction * N) above the floor
    (5_000, 0.1, MIN_CORESET_PATCHES, MIN_CORESET_PATCHES),  # raised to the floor
    (1_000, 0.1, MIN_CORESET_PATCHES, 1_000),                # fewer than the floor: all of them
    (1_001, 0.333, 10, 334),                                 # ceil, not round/floor
])
def test_coreset_size(n, fraction, min_patches, expected):
    x = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    idx = greedy_coreset(x, fraction, min_patches=min_patches)
    assert len(idx) == expected == math.ceil(expected)
    assert len(np.unique(idx)) == len(idx)
    assert idx.min() >= 0 and idx.max() < n


def test_coreset_rejects_bad_fraction():
    x = np.zeros((10, 4), np.float32)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ScorerError, match="fraction"):
            greedy_coreset(x, bad)


def test_coreset_deterministic_per_seed():
    x = _clustered(3000)
    a = greedy_coreset(x, 0.05, seed=3, min_patches=50)
    b = greedy_coreset(x, 0.05, seed=3, min_patches=50)
    c = greedy_coreset(x, 0.05, seed=4, min_patches=50)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_coreset_covers_better_than_random():
    """k-center greedy keeps the rare patterns: its covering radius beats random subsets'."""
    x = _clustered()
    idx = greedy_coreset(x, 0.02, seed=0, min_patches=0)
    assert len(idx) == 120
    greedy_radius = _coverage_radius(x, idx)
    rng = np.random.default_rng(1)
    random_radii = [_coverage_radius(x, rng.choice(len(x), len(idx), replace=False)) for _ in range(5)]
    assert greedy_radius < min(random_radii), (greedy_radius, random_radii)
    # every rare pattern is picked or near a pick: random subsets leave some of them far away
    assert greedy_radius < 0.5 * min(random_radii)


def test_build_bank_with_and_without_coreset():
    x = torch.from_numpy(_clustered(4000)).reshape(2, 2000, 64)
    full = build_bank(x, None)
    assert full.shape == (4000, 64) and full.dtype == np.float32
    assert build_bank(x, 1.0).shape == (4000, 64)
    sub = build_bank(x, 0.5, seed=0)
    assert sub.shape == (2000, 64)
    # rows are rows of the input, not averages
    full_rows = {row.tobytes() for row in full}
    assert all(row.tobytes() in full_rows for row in sub)
    assert len({row.tobytes() for row in sub}) == len(sub)


# ------------------------------------------------------------------------------ augmentation


def test_augment_shots_gives_the_eight_symmetries():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=gen)
    out = augment_shots(images)
    assert out.shape == (16, 3, 16, 16)
    assert torch.equal(out[:2], images)  # the original first
    expected = [images, images.flip(3), images.flip(2), images.transpose(2, 3),
                images.transpose(2, 3).flip(2, 3), torch.rot90(images, 1, (2, 3)),
                torch.rot90(images, 2, (2, 3)), torch.rot90(images, 3, (2, 3))]
    views = [out[i:i + 2] for i in range(0, 16, 2)]
    for e in expected:
        assert sum(torch.equal(v, e) for v in views) == 1
    # 8 distinct views of each image
    flat = out.reshape(8, 2, -1)
    for k in range(2):
        assert len({tuple(v.tolist()) for v in flat[:, k]}) == 8


# ------------------------------------------------------------------------------ preprocess


SPEC = InputSpec(size=(32, 32), mean=(127.0,) * 3, std=(128.0,) * 3, resize="area")


def test_grey_and_rgba_frames_match_rgb():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    rgb_of_grey = np.repeat(grey[..., None], 3, axis=2)
    ref = to_batch([rgb_of_grey], SPEC)
    assert ref.shape == (1, 3, 32, 32) and ref.dtype == np.float32
    assert np.array_equal(to_batch([grey], SPEC), ref)
    assert np.array_equal(to_batch([grey[..., None]], SPEC), ref)

    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (48, 64, 1), dtype=np.uint8)], axis=2)
    assert np.array_equal(to_batch([rgba], SPEC), to_batch([rgb], SPEC))
    # 16-bit cameras: the high byte
    assert np.array_equal(to_batch([rgb.astype(np.uint16) << 8], SPEC), to_batch([rgb], SPEC))


def test_batch_layout_and_channel_order():
    frame = np.zeros((32, 32, 3), np.uint8)
    frame[..., 0] = 200  # red
    frame[..., 2] = 10
    batch = to_batch([frame, frame], SPEC)
    assert batch.shape == (2, 3, 32, 32) and batch.flags["C_CONTIGUOUS"]
    assert np.all(batch[:, 0] == 200) and np.all(batch[:, 1] == 0) and np.all(batch[:, 2] == 10)


def test_resize_frame_uses_spec():
    big = np.random.default_rng(1).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    out = resize_frame(big, SPEC)
    assert out.shape == (32, 32, 3)
    assert np.array_equal(out, cv2.resize(big, (32, 32), interpolation=cv2.INTER_AREA))
    small = big[:16, :16]
    assert resize_frame(small, SPEC).shape == (32, 32, 3)  # upscaling falls back from "area"
    with pytest.raises(SourceError, match="resize"):
        resize_frame(big, InputSpec(size=(32, 32), mean=(0.0,) * 3, std=(1.0,) * 3, resize="magic"))


@pytest.mark.parametrize("frame", [
    np.zeros((8, 8, 3), np.float32),   # wrong dtype
    np.zeros((8, 8, 3), np.int64),     # wrong dtype
    np.zeros((8, 8, 2), np.uint8),     # two channels
    np.zeros((2, 8, 8, 3), np.uint8),  # a batch, not a frame
    np.zeros((0, 8, 3), np.uint8),     # empty
    None,
    [[0, 1], [2, 3]],                  # not an array
], ids=["float32", "int64", "2ch", "4d", "empty", "none", "list"])
def test_bad_frames_raise_source_error(frame):
    with pytest.raises(SourceError):
        to_rgb(frame)
    with pytest.raises(SourceError):
        to_batch([frame], SPEC)
