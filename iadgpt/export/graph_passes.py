"""ONNX graph clean-ups applied at export, before parity is checked.

`fold_pads_into_convs`: TensorFlow-style "SAME" convolutions (EfficientNet-Lite0 and other TF ports)
trace to an explicit zero ``Pad`` before each ``Conv``, with the pad amounts computed by a chain of
shape ops. ONNX Runtime does not fuse them (the pads are not an initializer when it looks), so
every such conv costs a padded copy of its input; in a Q/DQ INT8 graph it also costs a
dequantize/quantize pair around each float Pad. Measured on the bottle encoder (224 px, 2 threads):
Pad was 18% of the fp32 encoder's time and Pad + its Q/DQ pairs 30% of the INT8 one. ONNX ``Conv``
takes asymmetric ``pads`` itself, so the Pad folds into it exactly.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["fold_pads_into_convs", "drop_dead_nodes"]


def _constant_value(name: str, graph: Any, producers: dict[str, Any], inits: dict[str, Any],
                    opsets: list) -> Optional[np.ndarray]:
    """The value of tensor `name` when it depends on constants only (evaluated with onnx's reference runtime)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    if name in inits:
        return numpy_helper.to_array(inits[name])
    nodes, used_inits, stack, seen = [], set(), [name], set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in inits:
            used_inits.add(t)
            continue
        node = producers.get(t)
        if node is None:  # a graph input: not a constant
            return None
        if node not in nodes:
            nodes.append(node)
            stack.extend(node.input)
    order = [n for n in graph.node if n in nodes]  # graph order is topological
    out = helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
    sub = helper.make_graph(order, "const", [], [out], [inits[i] for i in used_inits])
    model = helper.make_model(sub, opset_imports=opsets)
    try:
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    except Exception as exc:  # noqa: BLE001 - anything unevaluable simply stays unfolded
        log.debug("cannot evaluate %s as a constant: %s", name, exc)
        return None


def fold_pads_into_convs(model: Any) -> int:
    """Fold zero constant ``Pad -> Conv`` pairs into the Conv's ``pads``; returns how many were folded.

    Only exact rewrites: constant mode, zero fill, no padding of batch/channel axes, a Pad whose
    output feeds Convs only (and is not a graph output), Convs without ``auto_pad``.
    """
    from onnx import helper

    opsets = list(model.opset_import)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    folded = []
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        mode = attrs.get("mode", b"constant")
        if mode not in (b"constant", "constant") or len(pad.input) < 2 or pad.output[0] in outputs:
            continue
        if len(pad.input) > 3 and pad.input[3]:  # explicit axes (opset 18): keep it simple, leave it
            continue
        users = consumers.get(pad.output[0], [])
        if not users or any(u.op_type != "Conv" or u.input[0] != pad.output[0] for u in users):
            continue
        if len(pad.input) > 2 and pad.input[2]:
            fill = _constant_value(pad.input[2], graph, producers, inits, opsets)
            if fill is None or np.any(fill != 0):
                continue
        pads = _constant_value(pad.input[1], graph, producers, inits, opsets)
        if pads is None or pads.ndim != 1 or pads.size % 2 or np.any(pads < 0):
            continue
        rank = pads.size // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or np.any(begin[:2]) or np.any(end[:2]):
            continue
        extra = [int(v) for v in begin[2:]] + [int(v) for v in end[2:]]
        if any(helper.get_attribute_value(a) not in (b"NOTSET", "NOTSET")
               for conv in users for a in conv.attribute if a.name == "auto_pad"):
            continue
        for conv in users:
            old = next((a for a in conv.attribute if a.name == "pads"), None)
            current = list(helper.get_attribute_value(old)) if old is not None else [0] * len(extra)
            if old is not None:
                conv.attribute.remove(old)
            conv.attribute.append(helper.make_attribute("pads", [a + b for a, b in zip(current, extra)]))
            conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    if folded:
        drop_dead_nodes(graph)
        log.info("folded %d zero Pad nodes into their Convs", len(folded))
    return len(folded)


def drop_dead_nodes(graph: Any) -> None:
    """Remove nodes whose outputs nothing reads any more (after a rewrite), then the initializers
    and value infos they leave unused."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)
    live = read | outputs | {o for n in graph.node for o in n.output}
    for info in [v for v in graph.value_info if v.name not in live]:
        graph.value_info.remove(info)