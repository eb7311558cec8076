"""The torch backend of a bundle: the reference modules rebuilt from the manifest.

ONNX stays the source of truth; this rebuilds the same modules from the bundle's backbone name,
input spec and reference arrays (CLIP needs its weights directory), behind the graphs' I/O names,
so `--backend torch` compares the exported graphs with the model they came from.
"""
from __future__ import annotations

from typing import Optional


def torch_engines(bundle, threads: Optional[int] = None, weights: Optional[str] = None) -> tuple:
    """The torch reference modules rebuilt from the manifest, behind the graphs' I/O names."""
    import torch

    from ..errors import BundleError
    from ..runtime.engines import TorchEngine
    from .bundle_export import build_backbone
    from .onnx_export import IMAGE_INPUT, SCORER_OUTPUTS, EncoderGraph, feature_names, scorer_graph
    from ..models.rebuild import is_flat, scorer_module

    if threads:
        torch.set_num_threads(int(threads))
    desc, cfg, spec = bundle.backbone, bundle.scorer, bundle.input_spec
    backbone = build_backbone(desc.get("name", "?"), weights, spec.size[0])
    rebuilt = backbone.describe()
    for key in ("layers", "dims", "strides", "input_spec"):
        if rebuilt.get(key) != desc.get(key):
            raise BundleError(f"backbone {desc.get('name')!r} rebuilt here has {key} {rebuilt.get(key)}, the bundle "
                              f"{bundle.path} says {desc.get(key)}; pass the weights it was exported with")
    module = scorer_module(bundle, backbone)
    names = feature_names(len(backbone.layers))
    if is_flat(bundle):  # (feat0.., [bank]) -> (map, score) as it is
        return (TorchEngine(EncoderGraph(backbone), [IMAGE_INPUT], names),
                TorchEngine(module, names + list(cfg["references"]), list(SCORER_OUTPUTS)))
    graph, ref_name = scorer_graph(module)
    if list(cfg["references"]) != [ref_name]:
        raise BundleError(f"bundle {bundle.path}: scorer references {list(cfg['references'])} do not match the "
                          f"{cfg['kind']} scorer's input {ref_name!r}; re-export it with `iadgpt export`")
    return (TorchEngine(EncoderGraph(backbone), [IMAGE_INPUT], names),
            TorchEngine(graph, names + [ref_name], list(SCORER_OUTPUTS)))
