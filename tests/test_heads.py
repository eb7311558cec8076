"""Visual-guided decoder (Eq. 1), its losses, the fused scorer, and their ONNX graphs (parity with torch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from iadgpt.errors import ScorerError
from iadgpt.models.fusion import (WEIGHT_GRID, DecoderScorer, FusedScorer, choose_fusion_weight, export_decoder_scorer,
                                  fit_fusion, pick_weight)
from iadgpt.models.heads import VisualGuidedDecoder, decoder_loss, dice_loss, focal_loss

DIMS, STRIDES, SIZE = (4, 6, 8), (4, 8, 16), 32




def _feats(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.relu(torch.randn(batch, c, SIZE // s, SIZE // s, generator=g)) for c, s in zip(DIMS, STRIDES)]


def _decoder(**kw) -> VisualGuidedDecoder:
    torch.manual_seed(0)
    return VisualGuidedDecoder(DIMS, SIZE, embed_dim=8, **kw).eval()


def test_shapes_range_and_score() -> None:
    dec = _decoder()
    with torch.no_grad():
        amap, score = dec(*_feats())
    assert amap.shape == (2, SIZE, SIZE) and score.shape == (2,)
    assert 0.0 <= float(amap.min()) and float(amap.max()) <= 1.0
    assert torch.allclose(score, amap.flatten(1).amax(1))


def test_matches_eq1_by_hand() -> None:
    """sigma 0, pool 1: the map is mean_l softmax(upsample(100 * norm(W_l f) . norm(T)))[abnormal]."""
    dec = _decoder(sigma=0.0, pool=1)
    feats = _feats()
    with torch.no_grad():
        amap, _ = dec(*feats)
        maps = []
        for i, f in enumerate(feats):
            p = F.normalize(F.conv2d(f, dec.projections[i].weight, dec.projections[i].bias), dim=1)
            logits = 100.0 * torch.einsum("bdhw,kd->bkhw", p, F.normalize(dec.references, dim=-1))
            maps.append(torch.softmax(F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=False), 1)[:, 1])
    assert torch.allclose(amap, torch.stack(maps).mean(0), atol=1e-6)


def test_references_learnable_or_fixed_text() -> None:
    learn = _decoder()
    assert isinstance(learn.references, torch.nn.Parameter) and learn.references.shape == (2, 8)
    text = torch.randn(2, 12)
    fixed = VisualGuidedDecoder(DIMS, SIZE, references=text)
    assert fixed.embed_dim == 12 and not fixed.references.requires_grad
    assert "references" not in dict(fixed.named_parameters()) and torch.equal(fixed.references, text)
    with pytest.raises(ScorerError, match=r"\(2, D\)"):
        VisualGuidedDecoder(DIMS, SIZE, references=torch.randn(3, 12))
    with pytest.raises(ScorerError, match="trained for 3 layers"):
        learn(*_feats()[:2])


@pytest.mark.parametrize("key,value", [("sigma", float("nan")), ("sigma", float("inf")), ("pool", -3),
                                       ("image_size", True), ("layers", "01"), ("dims", []), ("logit_scale", 0.0),
                                       ("hidden", 1.5), ("learn_references", "yes")])
def test_from_state_refuses_a_config_that_would_build_another_model(key, value) -> None:
    """A stored config is a file's contents: a NaN blur would be no blur, a boolean size 1 px, "01" layers (0, 1)."""
    decoder = _decoder()
    config, state = decoder.config(), decoder.state_dict()
    assert VisualGuidedDecoder.from_state(config, state).config() == config  # the stored config round-trips
    with pytest.raises(ValueError, match=key):
        VisualGuidedDecoder.from_state({**config, key: value}, state)


def test_layer_subset() -> None:
    dec = _decoder(layers=[2, 1])
    assert dec.layers == (1, 2) and isinstance(dec.projections[0], torch.nn.Identity)
    feats = _feats()
    with torch.no_grad():
        assert len(dec.layer_logits(feats)) == 2
        a, _ = dec(*feats)
        b, _ = dec(torch.full_like(feats[0], 1e3), *feats[1:])  # layer 0 is not read
    assert torch.equal(a, b)
    with pytest.raises(ScorerError, match="indices of the 3 tapped layers"):
        _decoder(layers=[3])


def test_feature_stats_standardise_inputs() -> None:
    dec = _decoder(pool=1)
    feats = [f * 10 + 3 for f in _feats(4)]
    dec.set_feature_stats(feats)
    for i, f in enumerate(feats):
        z = (f - dec.get_buffer(f"feat_mean{i}").view(1, -1, 1, 1)) / dec.get_buffer(f"feat_std{i}").view(1, -1, 1, 1)
        assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1.0) < 0.05


def test_losses() -> None:
    target = torch.zeros(2, 8, 8)
    target[1, 2:5, 2:5] = 1.0
    logits = torch.randn(2, 2, 8, 8)
    ce = F.cross_entropy(logits, target.long())
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), ce, atol=1e-6)  # gamma 0 = cross-entropy
    assert float(focal_loss(logits, target, gamma=2.0)) < float(ce)
    assert float(dice_loss(target, target)) < 1e-6
    perfect = torch.stack([1 - target, target], 1) * 40 - 20
    assert float(decoder_loss([perfect] * 3, target)) < 0.05
    assert float(decoder_loss([logits] * 3, target)) > float(decoder_loss([perfect] * 3, target))


def test_fused_scorer_normalised_mean() -> None:
    dec = _decoder()
    fused = FusedScorer(dec, STRIDES, sigma=0.0).eval()
    normal, bank_src = _feats(3, seed=1), _feats(1, seed=2)
    bank = fused.embedder.patches(bank_src).reshape(-1, sum(DIMS))
    stats = fit_fusion(fused, normal, bank)
    assert stats[1] > 0 and stats[3] > 0
    with torch.no_grad():
        dmap, bmap = fused.raw_maps(normal, bank)
        amap, score = fused(*normal, bank)
        # normal images: both normalised maps have mean 0 and unit std, so the fused map has mean 0
        assert abs(float(amap.mean())) < 1e-4
        w = float(fused.weight)
        expect = w * (dmap - stats[0]) / stats[1] + (1 - w) * (bmap - stats[2]) / stats[3]
        assert torch.allclose(amap, expect, atol=1e-5) and torch.allclose(score, amap.flatten(1).amax(1))
        # the bank map is the memory-bank scorer's distance map
        from iadgpt.models.scorers import MemoryBankScorer
        ref, _ = MemoryBankScorer(STRIDES, SIZE, sigma=0.0)(*normal, bank)
        assert torch.allclose(bmap, ref, atol=1e-4)
        # the decoder part is its log-odds: logit(mean prob) for one layer, monotone in the probability
        one = VisualGuidedDecoder(DIMS, SIZE, embed_dim=8, layers=[2]).eval()
        p = one.raw_map(normal)
        assert torch.allclose(one.log_odds_map(normal), torch.log(p) - torch.log1p(-p), atol=1e-3)
    with pytest.raises(ScorerError, match=r"\[0, 1\]"):
        FusedScorer(dec, STRIDES, weight=1.5)


def test_pick_weight_maximises_pixel_auroc_without_resampling() -> None:
    """Two maps that see the same defects through independent noise: a mix beats either alone, and
    with no standard error (resamples=0) the pick is the grid weight with the best pixel AUROC."""
    from iadgpt.metrics import pixel_auroc
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 24, 24), bool)
    masks[:, 8:14, 6:12] = True
    zd = masks + 1.2 * rng.standard_normal(masks.shape)  # noisier decoder
    zb = masks + 0.8 * rng.standard_normal(masks.shape)
    best, table = pick_weight(zd, zb, masks, resamples=0)
    assert [row[0] for row in table] == list(WEIGHT_GRID) and all(row[2] == 0.0 for row in table)
    brute = [pixel_auroc(masks, w * zd + (1 - w) * zb) for w in WEIGHT_GRID]
    assert [row[1] for row in table] == pytest.approx(brute)
    assert best == WEIGHT_GRID[int(np.argmax(brute))] and 0.0 < best < 1.0
    assert max(brute) > max(brute[0], brute[-1])
    assert pick_weight(zb, zb, masks, resamples=0)[0] == 0.0  # a tie goes to the smallest weight


def test_pick_weight_one_standard_error_rule() -> None:
    """The pick is the smallest weight within one bootstrap standard error of the best: on a few
    noisy images a slightly better decoder mix does not displace the bank; on many images a clearly
    better one does. Seeded: the same inputs give the same pick."""
    rng = np.random.default_rng(1)

    def case(n: int, decoder_noise: float):
        masks = np.zeros((n, 32, 32), bool)
        for i in range(n):  # one defect per image, somewhere else each time
            y, x = rng.integers(2, 20, 2)
            masks[i, y:y + 8, x:x + 8] = True
        strength = rng.uniform(0.3, 2.0, (n, 1, 1))  # defects from faint to stark: image-to-image spread
        zb = strength * masks + rng.standard_normal(masks.shape)
        zd = strength * masks + decoder_noise * rng.standard_normal(masks.shape)
        return zd, zb, masks

    for n, noise in ((4, 0.97), (60, 0.6)):
        zd, zb, masks = case(n, noise)
        pick, table = pick_weight(zd, zb, masks, resamples=60, seed=3)
        w, auroc, se = (np.array(col) for col in zip(*table))
        best = int(np.argmax(auroc))
        assert (se > 0).all()
        assert auroc[w == pick][0] >= auroc[best] - se[best]  # within one SE of the best ...
        assert (auroc[w < pick] < auroc[best] - se[best]).all()  # ... and the smallest weight that is
        assert pick_weight(zd, zb, masks, resamples=60, seed=3)[0] == pick
        if n == 4:
            assert best > 0 and pick < w[best]  # the argmax would have mixed in the decoder; noise says no
        else:
            assert pick >= 0.3  # a decoder that is clearly better on 60 images gets a real share


def _fitted_fusion():
    """(fused scorer with its statistics fitted, bank, validation features, their masks)."""
    fused = FusedScorer(_decoder(), STRIDES, sigma=1.0).eval()
    bank = fused.embedder.patches(_feats(1, seed=2)).reshape(-1, sum(DIMS))
    fit_fusion(fused, _feats(3, seed=1), bank)
    masks = np.zeros((3, SIZE, SIZE), bool)
    masks[:, 4:12, 10:20] = True
    return fused, bank, _feats(3, seed=9), masks


def test_choose_fusion_weight_sets_the_graph_weight() -> None:
    fused, bank, val, masks = _fitted_fusion()
    best, table = choose_fusion_weight(fused, val, masks, bank, grid=(0.0, 0.5, 1.0), batch_size=2, resamples=0)
    assert float(fused.weight) == best == table[int(np.argmax([row[1] for row in table]))][0]
    with torch.no_grad():  # the graph's fused map is the chooser's mix
        amap, _ = fused(*val, bank)
    from iadgpt.metrics import pixel_auroc
    assert pixel_auroc(masks, amap.numpy()) == pytest.approx(max(row[1] for row in table), abs=1e-6)


@pytest.mark.parametrize("fused,layers", [(False, None), (True, None), (True, [1, 2])],
                         ids=["decoder", "decoder+bank", "decoder(layers 1,2)+bank"])
def test_onnx_parity(tmp_path, fused: bool, layers) -> None:
    dec = _decoder(layers=layers)
    dec.set_feature_stats(_feats(4, seed=3))
    feats = _feats(2, seed=4)
    if fused:
        module = FusedScorer(dec, STRIDES)
        bank = module.embedder.patches(_feats(2, seed=5)).reshape(-1, sum(DIMS))
        fit_fusion(module, _feats(2, seed=6), bank)
        report = export_decoder_scorer(module, tmp_path / "scorer.onnx", feats, bank.numpy())
        assert report.inputs == ["feat0", "feat1", "feat2", "bank"]
        import onnx  # an unused feat0 (layers 1, 2) is still a graph input: the station feeds it
        assert [i.name for i in onnx.load(str(tmp_path / "scorer.onnx")).graph.input] == report.inputs
        assert any("bank of" in p for p in report.probes)  # a second bank size was checked
    else:
        report = export_decoder_scorer(DecoderScorer(dec), tmp_path / "scorer.onnx", feats)
        assert report.inputs == ["feat0", "feat1", "feat2"]
    assert report.ok and report.outputs == ["anomaly_map", "score"]
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "scorer.onnx"), providers=["CPUExecutionProvider"])
    feeds = {f"feat{i}": f[:1].numpy() for i, f in enumerate(_feats(3, seed=7))}
    if fused:
        feeds["bank"] = bank.numpy()
    amap, score = sess.run(["anomaly_map", "score"], feeds)
    with torch.no_grad():
        ref_map, ref_score = module(*[torch.from_numpy(feeds[k]) for k in feeds]) if fused else dec(
            *[torch.from_numpy(v) for v in feeds.values()])
    assert amap.shape == (1, SIZE, SIZE) and np.allclose(amap, ref_map.numpy(), atol=1e-4 * (np.ptp(amap) + 1e-6))
    assert np.allclose(score, ref_score.numpy(), atol=1e-4 * (np.ptp(amap) + 1e-6))


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_one_thread):
    """Keep these tests at seconds on a shared 2-core box (see conftest)."""


def test_fusion_statistics_are_each_maps_mean_and_standard_deviation():
    fused = FusedScorer(_decoder(), STRIDES, sigma=0.0).eval()
    normal = _feats(3, seed=1)
    bank = fused.embedder.patches(_feats(1, seed=2)).reshape(-1, sum(DIMS))
    stats = fit_fusion(fused, normal, bank)
    with torch.no_grad():
        d, b = fused.raw_maps(normal, bank)
    assert stats == pytest.approx([float(d.double().mean()), float(d.double().std(unbiased=False)),
                                   float(b.double().mean()), float(b.double().std(unbiased=False))], rel=1e-4)


def test_every_weight_in_the_choice_table_is_the_graphs_auroc_at_that_weight():
    """The validation table must measure the exported graph's own maps: each row's AUROC equals the
    fused scorer's pixel AUROC with its weight set to that row's (not only the best row)."""
    from iadgpt.metrics import pixel_auroc
    fused, bank, val, masks = _fitted_fusion()
    _, table = choose_fusion_weight(fused, val, masks, bank, grid=(0.0, 0.3, 0.5, 0.7, 1.0), batch_size=2, resamples=0)
    for w, auroc, _ in table:
        fused.weight.fill_(w)
        with torch.no_grad():
            amap, _ = fused(*val, bank)
        assert pixel_auroc(masks, amap.numpy()) == pytest.approx(auroc, abs=1e-4), w


def test_decoder_scorer_parity_tolerance_is_relative_to_the_map_range(tmp_path):
    """The scale is the torch map's own max - min over the probes (the batch-1 probe is a subset of
    the batch-2 one), measured here independently, and the tolerance is 1e-4 of it."""
    dec, feats = _decoder(), _feats(2)
    with torch.no_grad():
        amap, _ = dec(*feats)
    span = float(amap.max() - amap.min())
    assert span > 1e-3  # a real range, not the floor
    report = export_decoder_scorer(dec, tmp_path / "d.onnx", feats)
    assert report.scales["anomaly_map"] == pytest.approx(span, rel=1e-5)
    assert report.tolerances["anomaly_map"] == pytest.approx(1e-4 * span, rel=1e-5)
