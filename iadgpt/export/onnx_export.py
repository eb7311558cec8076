"""torch -> ONNX for the two graphs a station runs (ENCODER, SCORER), checked against torch at once.

Each export is followed right away by an ONNX Runtime run of the written file on probe inputs (a
seeded random batch of 2, and batch 1; the scorer also gets a second bank size) and compared with
the torch module: a graph that traced wrongly (a Python branch baked in, a batch size frozen into
a Reshape) fails here with `ExportError`, not on the line weeks later.

Tolerances (see `ParityReport`):
- encoder features: 1e-4 absolute, or 2e-5 of the output's largest |value| when that is larger.
  EfficientNet-Lite0 features on real images reach |x| ~ 30-60; there the torch fp32 reference
  itself is ~1.1e-4 away from an fp64 run and ONNX Runtime ~1.4e-4, and the two differ by up to
  2.5e-4 (6e-6 of max |feature|, worst of the 83 MVTec bottle test images): a flat 1e-4 would
  reject float32 rounding, not a wrong graph (those differ by 1e-2 and more).
- scorer map and score: 1e-4 of the map's range (max - min) over the probe.

Graphs larger than `EXTERNAL_DATA_THRESHOLD` (CLIP-H towers) are saved with their weights in one
`<name>.onnx.data` file next to the graph (protobuf cannot hold more than 2 GB).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..models.scorers import MemoryBankScorer
from ..models.text_scorer import TextPromptScorer
from .graph_passes import fold_pads_into_convs

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
ArrayLike = Union[np.ndarray, torch.Tensor]

OPSET = 17
EXTERNAL_DATA_THRESHOLD = int(1.5 * (1 << 30))  # bytes of graph + weights
FEATURE_ATOL = 1e-4
FEATURE_RTOL = 2e-5  # of max |feature|, see the module docstring
SCORER_RTOL = 1e-4  # of the map's range
IMAGE_INPUT = "image"
SCORER_OUTPUTS = ("anomaly_map", "score")


def feature_names(n_layers: int) -> list[str]:
    return [f"feat{i}" for i in range(n_layers)]


# --------------------------------------------------------------------------- report


@dataclass
class ParityReport:
    """ONNX Runtime vs torch on the probes, per output: max |diff| and the tolerance it had to meet."""

    role: str
    path: Path
    diffs: dict[str, float]
    tolerances: dict[str, float]
    scales: dict[str, float]  # encoder: max |torch value|; scorer: the map's range
    probes: list[str]
    size_bytes: int = 0
    external_data: bool = False
    seconds: float = 0.0
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(np.isfinite(d) and d <= self.tolerances[k] for k, d in self.diffs.items())

    def lines(self) -> list[str]:
        """Human-readable parity lines (the CLI prints them)."""
        head = (f"{self.role}: {self.path.name} {self.size_bytes / 1e6:.1f} MB"
                f"{' + external data' if self.external_data else ''}, onnxruntime vs torch on "
                f"{'; '.join(self.probes)} ({'OK' if self.ok else 'FAILED'})")
        rows = [f"  {k:<12} max|diff| {d:.2e}  tol {self.tolerances[k]:.2e}  (scale {self.scales[k]:.3g})"
                for k, d in self.diffs.items()]
        return [head] + rows

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "diffs": dict(self.diffs), "tolerances": dict(self.tolerances),
                "probes": list(self.probes), "size_bytes": int(self.size_bytes),
                "external_data": bool(self.external_data), "ok": self.ok}


# --------------------------------------------------------------------------- tracing wrappers


class EncoderGraph(nn.Module):
    """Backbone with one named output per tapped layer (a list output has no stable names)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.backbone(image))


class BankScorerGraph(nn.Module):
    """MemoryBankScorer with flat inputs (feat0.., bank) for tracing; its chunked search is
    batch-agnostic already (`scorers.nearest_distances`)."""

    def __init__(self, scorer: MemoryBankScorer):
        super().__init__()
        self.scorer = scorer

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scorer(*inputs)


class TextScorerGraph(nn.Module):
    """TextPromptScorer with flat inputs (feat0.., text_embeddings) for tracing."""

    def __init__(self, scorer: TextPromptScorer):
        super().__init__()
        self.scorer = scorer

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *features, text = inputs
        return self.scorer(list(features), text)


def scorer_graph(scorer: nn.Module) -> tuple[nn.Module, str]:
    """(flat-input wrapper, name of its reference input) for a known scorer module."""
    if isinstance(scorer, MemoryBankScorer):
        return BankScorerGraph(scorer), "bank"
    if isinstance(scorer, TextPromptScorer):
        return TextScorerGraph(scorer), "text_embeddings"
    if isinstance(scorer, (BankScorerGraph, TextScorerGraph)):
        return scorer, "bank" if isinstance(scorer, BankScorerGraph) else "text_embeddings"
    raise ExportError(f"cannot export scorer {type(scorer).__name__}: export_scorer knows MemoryBankScorer "
                      "and TextPromptScorer; wrap other scorers in a module taking (feat0.., reference)")


# --------------------------------------------------------------------------- helpers


def probe_images(size: Sequence[int], batch: int = 2, seed: int = 0) -> np.ndarray:
    """Seeded random RGB images, float32 (batch, 3, H, W) in 0..255."""
    h, w = int(size[0]), int(size[1])
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 255.0, size=(batch, 3, h, w)).astype(np.float32)


def _np(x: ArrayLike) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _files_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _set_output_shapes(model: Any, shapes: Mapping[str, tuple[int, ...]],
                       dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    """Declare the traced output shapes (symbolic on dynamic axes): the tracer's own shape
    inference mislabels them after TF-"SAME" padding arithmetic (e.g. (batch, 24, batch, ...))."""
    for out in model.graph.output:
        if out.name not in shapes:
            continue
        dims = out.type.tensor_type.shape.dim
        del dims[:]
        for axis, size in enumerate(shapes[out.name]):
            dim = dims.add()
            symbol = dynamic_axes.get(out.name, {}).get(axis)
            if symbol:
                dim.dim_param = symbol
            else:
                dim.dim_value = int(size)


def _trace_to_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                   output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int,
                   external_data_threshold: int) -> tuple[int, bool]:
    """TorchScript-trace `module` to `path`; weights go to `<name>.data` when the graph is large.

    Exports into a temp dir first (torch itself writes one file per tensor above 2 GB), then either
    moves the single file into place or re-saves with all weights in one external-data file.
    Returns (bytes on disk, external data used).
    """
    import onnx

    if opset < 17:
        raise ExportError(f"opset {opset} is too old: the scorers' Pad(reflect)/Resize need opset >= 17")
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    (path.parent / data_name).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.export-", dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TracerWarnings on static shapes are expected
                output_shapes = {n: tuple(t.shape) for n, t in zip(output_names, module.eval()(*args))}
                torch.onnx.export(module.eval(), args, str(tmp_path), opset_version=opset, dynamo=False,
                                  input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, do_constant_folding=True)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export of {path.name} failed ({type(exc).__name__}: {exc}); "
                              f"the module must be traceable with opset {opset}") from exc
        size = _files_size(Path(tmp))
        external = size > external_data_threshold or any(p != tmp_path for p in Path(tmp).iterdir())
        model = onnx.load(str(tmp_path), load_external_data=external)
        _set_output_shapes(model, output_shapes, dynamic_axes)
        fold_pads_into_convs(model)
        if external:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            log.info("%s is %.2f GB: weights saved as external data %s", path.name, size / 1e9, data_name)
        else:
            onnx.save_model(model, str(tmp_path))
            shutil.move(str(tmp_path), str(path))
        del model
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"exported graph {path} fails onnx.checker ({exc}); re-export with another opset") from exc
    size = path.stat().st_size + ((path.parent / data_name).stat().st_size if external else 0)
    return size, external


def _compare(path: Path, reference: Callable[[Mapping[str, np.ndarray]], Sequence[ArrayLike]],
             probes: Sequence[tuple[str, dict[str, np.ndarray]]], output_names: Sequence[str],
             threads: Optional[int]) -> tuple[dict[str, float], list[dict[str, np.ndarray]]]:
    """Max |ORT - torch| per output over all probes; also the torch outputs per probe."""
    from ..runtime.engines import OrtEngine

    diffs = {name: 0.0 for name in output_names}
    refs = []
    with OrtEngine(path, "cpu", threads) as engine:
        for _label, feeds in probes:
            got = engine.run(feeds)
            with torch.inference_mode():
                ref = dict(zip(output_names, (_np(r) for r in reference(feeds))))
            refs.append(ref)
            for name in output_names:
                if got[name].shape != ref[name].shape:
                    raise ExportError(f"{path.name}: output {name!r} has shape {got[name].shape} in onnxruntime "
                                      f"but {ref[name].shape} in torch; a shape was frozen at trace time")
                d = float(np.max(np.abs(got[name].astype(np.float64) - ref[name]))) if got[name].size else 0.0
                diffs[name] = max(diffs[name], d) if np.isfinite(d) else float("nan")
    return diffs, refs


def _check(report: ParityReport) -> ParityReport:
    log.info("%s parity (onnxruntime vs torch, %s): %s", report.role, "OK" if report.ok else "FAILED",
             ", ".join(f"{k} {d:.2e} (tol {report.tolerances[k]:.1e})" for k, d in report.diffs.items()))
    if not report.ok:
        bad = [f"{k} {d:.2e} > {report.tolerances[k]:.2e}" for k, d in report.diffs.items()
               if not (np.isfinite(d) and d <= report.tolerances[k])]
        raise ExportError(f"exported {report.role} graph {report.path} disagrees with torch ({', '.join(bad)}); "
                          "look for data-dependent Python control flow or shapes frozen at trace time in the "
                          "module, or try another opset")
    return report


# --------------------------------------------------------------------------- public API


def export_encoder(backbone: nn.Module, path: PathLike, opset: int = OPSET, *,
                   probe: Optional[np.ndarray] = None, seed: int = 0, atol: float = FEATURE_ATOL,
                   rtol: float = FEATURE_RTOL, threads: Optional[int] = None,
                   external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> ParityReport:
    """Export the ENCODER graph (`image` -> `feat0..`) and check it on ORT; raises ExportError on mismatch.

    Probes: a seeded random batch of 2, its first image alone, and `probe` (real images, float32
    (N, 3, H, W) 0..255) when given: random pixels do not reach real feature magnitudes.
    """
    path = Path(path)
    t0 = time.perf_counter()
    spec = backbone.input_spec
    names = feature_names(len(backbone.layers))
    random_batch = probe_images(spec.size, 2, seed)
    dynamic = {n: {0: "batch"} for n in [IMAGE_INPUT] + names}
    size, external = _trace_to_onnx(EncoderGraph(backbone), (torch.from_numpy(random_batch),), path, [IMAGE_INPUT],
                                    names, dynamic, opset, external_data_threshold)
    probes = [("random batch 2", {IMAGE_INPUT: random_batch}), ("random batch 1", {IMAGE_INPUT: random_batch[:1]})]
    if probe is not None:
        probe = np.ascontiguousarray(probe, dtype=np.float32)
        if probe.ndim != 4 or probe.shape[1:] != (3, *spec.size):
            raise ExportError(f"probe images must be (N, 3, {spec.size[0]}, {spec.size[1]}), got {probe.shape}")
        probes.append((f"{len(probe)} real images", {IMAGE_INPUT: probe}))
    diffs, refs = _compare(path, lambda f: backbone(torch.from_numpy(f[IMAGE_INPUT])), probes, names, threads)
    scales = {n: max(float(np.abs(r[n]).max()) for r in refs) for n in names}
    tols = {n: max(atol, rtol * scales[n]) for n in names}
    report = ParityReport("encoder", path, diffs, tols, scales, [p[0] for p in probes], size, external,
                          time.perf_counter() - t0, [IMAGE_INPUT], names)
    return _check(report)


def export_scorer(scorer_module: nn.Module, feature_shapes: Sequence[Sequence[int]],
                  reference_example: Union[ArrayLike, Mapping[str, ArrayLike]], path: PathLike,
                  opset: int = OPSET, *, probe_features: Optional[Sequence[ArrayLike]] = None, seed: int = 0,
                  rtol: float = SCORER_RTOL, threads: Optional[int] = None,
                  external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> ParityReport:
    """Export the SCORER graph (`feat0..` + reference -> `anomaly_map`, `score`) and check it on ORT.

    `feature_shapes`: (C, h, w) per layer (a leading batch dim is ignored). `reference_example`:
    the bank (M, D) or text embeddings (2, D), bare or as {input name: array}. The bank's rows are a
    dynamic axis "bank_size", probed with a second size. Probe features are seeded random unless
    `probe_features` (per-layer (B, C, h, w)) is given.
    """
    path = Path(path)
    t0 = time.perf_counter()
    graph, ref_name = scorer_graph(scorer_module)
    if isinstance(reference_example, Mapping):
        if list(reference_example) != [ref_name]:
            raise ExportError(f"{type(scorer_module).__name__} takes one reference input {ref_name!r}, "
                              f"got {list(reference_example)}")
        reference_example = reference_example[ref_name]
    ref = _np(reference_example)
    if ref.ndim != 2 or len(ref) == 0:
        raise ExportError(f"reference {ref_name!r} must be a non-empty (rows, D) array, got shape {ref.shape}")
    shapes = [tuple(int(d) for d in s)[-3:] for s in feature_shapes]
    names = feature_names(len(shapes))
    if probe_features is None:
        rng = np.random.default_rng(seed)
        feats = [np.maximum(rng.standard_normal((2, *s)), 0).astype(np.float32) for s in shapes]
    else:
        feats = [_np(f) for f in probe_features]
        if [f.shape[1:] for f in feats] != shapes:
            raise ExportError(f"probe features have shapes {[f.shape for f in feats]}, expected (B, *{shapes})")
    dynamic = {n: {0: "batch"} for n in names + list(SCORER_OUTPUTS)}
    if ref_name == "bank":
        dynamic[ref_name] = {0: "bank_size"}
    args = tuple(torch.from_numpy(f) for f in feats) + (torch.from_numpy(ref),)
    size, external = _trace_to_onnx(graph, args, path, names + [ref_name], list(SCORER_OUTPUTS), dynamic,
                                    opset, external_data_threshold)

    def feeds(batch: slice, reference: np.ndarray) -> dict[str, np.ndarray]:
        out = {n: np.ascontiguousarray(f[batch]) for n, f in zip(names, feats)}
        out[ref_name] = reference
        return out

    n = len(feats[0])
    probes = [(f"batch {n}", feeds(slice(None), ref)), ("batch 1", feeds(slice(0, 1), ref))]
    if ref_name == "bank" and len(ref) > 1:
        half = ref[: (len(ref) + 1) // 2]
        probes.append((f"batch 1 with a bank of {len(half)} rows (exported with {len(ref)})",
                       feeds(slice(0, 1), half)))
    def run_torch(f: Mapping[str, np.ndarray]) -> Sequence[torch.Tensor]:
        return graph(*(torch.from_numpy(f[k]) for k in names + [ref_name]))

    diffs, refs = _compare(path, run_torch, probes, SCORER_OUTPUTS, threads)
    span = max(float(r["anomaly_map"].max() - r["anomaly_map"].min()) for r in refs)
    span = max(span, 1e-6 * max(float(np.abs(r["anomaly_map"]).max()) for r in refs), 1e-12)
    scales = {k: span for k in SCORER_OUTPUTS}
    tols = {k: rtol * span for k in SCORER_OUTPUTS}
    report = ParityReport("scorer", path, diffs, tols, scales, [p[0] for p in probes], size, external,
                          time.perf_counter() - t0, names + [ref_name], list(SCORER_OUTPUTS))
    return _check(report)
