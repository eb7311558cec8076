"""`iadgpt inspect`: what a bundle holds, whether its files are intact, and whether it runs here.

Exit status 0 when every listed file matches its sha256 and the graphs load in ONNX Runtime on
this host; 2 otherwise (the printed problem names the bad file). TensorRT engines that do not
match this host are reported but do not fail the check: the ONNX graphs still run.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from ..bundle import DECODER_ARRAY_PREFIX


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summary, integrity and 'can it run here' of a bundle")
    p.add_argument("bundle", type=Path)
    p.set_defaults(run=run)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _shape(shape: Any) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _nums(values: Any) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in values or []) + "]"


def _file_size(bundle: Any, rel: str) -> Optional[int]:
    path = bundle.path / rel
    return path.stat().st_size if path.is_file() else None


def _provenance(prov: dict) -> str:
    """One line: where a reference array came from."""
    parts = []
    if "images" in prov:
        parts.append(f"{len(prov['images'])} images" + (f" of {prov['train_dir']}" if prov.get("train_dir") else ""))
    for key in ("shots", "seed", "coreset", "augment", "object"):
        if key in prov:
            parts.append(f"{key} {prov[key]}")
    if prov.get("prompts_sha256"):
        parts.append(f"prompts {str(prov.get('source', ''))} sha256 {prov['prompts_sha256'][:12]}")
    if prov.get("defect_types") is not None:
        parts.append(f"defect types {', '.join(prov['defect_types']) or 'none'}")
    return "; ".join(parts) or "no provenance"


def _host_tensorrt() -> tuple[Optional[str], Optional[tuple[int, int]], str]:
    """(TensorRT version, GPU compute capability, why not) of this host."""
    try:
        import tensorrt as trt
    except ImportError:
        return None, None, "TensorRT is not installed here"
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return trt.__version__, (int(major), int(minor)), ""
    except ImportError:
        pass
    return trt.__version__, None, "no CUDA GPU visible to torch"


def _engine_lines(bundle: Any) -> list[str]:
    from ..runtime.tensorrt_engine import EngineInfo, engine_compat_problems, parse_compute_capability

    engines = bundle.engines
    if not engines:
        return [f"engines     none (TensorRT: `iadgpt build {bundle.path} --precision fp16` on the station)"]
    version, cc, why = _host_tensorrt()
    lines = ["engines"]
    for key, e in sorted(engines.items()):
        size = _file_size(bundle, e["file"])
        head = (f"  {key}  {e['file']}  {_mb(size) if size is not None else 'MISSING'}  {e.get('precision')}  "
                f"TensorRT {e.get('trt_version')}  sm {e.get('compute_capability')}")
        if version is None or cc is None:
            verdict = f"cannot run here: {why}"
        else:
            info = EngineInfo(key, str(e.get("precision")), str(e.get("trt_version")),
                              parse_compute_capability(str(e.get("compute_capability"))))
            problems = engine_compat_problems(info, version, cc)
            verdict = "compatible with this host" if not problems else "cannot run here: " + "; ".join(problems)
        lines += [head, f"    {verdict}"]
    return lines


def _summary(bundle: Any) -> list[str]:
    m = bundle.manifest
    bb = m.get("backbone") or {}
    spec = bb.get("input_spec") or {}
    size = spec.get("size") or ["?", "?"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted((m.get("versions") or {}).items()))
    lines = [f"bundle      {bundle.path} (schema {m.get('schema_version')}, created {m.get('created') or '?'})",
             f"versions    {versions or 'unknown'}",
             f"backbone    {bb.get('name', '?')}  input {size[0]}x{size[1]} {spec.get('color', 'rgb')}, resize "
             f"{spec.get('resize', '?')}, mean {_nums(spec.get('mean'))}, std {_nums(spec.get('std'))} (in the graph)",
             f"            layers {', '.join(map(str, bb.get('layers', [])))}  dims {bb.get('dims')}  "
             f"strides {bb.get('strides')}"]
    sc = m.get("scorer") or {}
    if sc:
        shots = sc.get("shots")
        lines.append(f"scorer      {sc.get('kind', '?')}  references {sc.get('references')}  shots "
                     f"{'all' if shots == 0 and sc.get('kind') == 'memory_bank' else shots}  coreset "
                     f"{sc.get('coreset')}  augment {sc.get('augment')}  sigma {sc.get('sigma')}  "
                     f"image {sc.get('image_size')}")
    else:
        lines.append("scorer      none")
    lines.append("graphs")
    width = max((len(r) for r in m["graphs"]), default=0) + 2
    for role, g in sorted(m["graphs"].items()):
        size_b = _file_size(bundle, g["file"])
        ext = sum(_file_size(bundle, e["file"]) or 0 for e in g.get("external_data", []))
        lines.append(f"  {role:<{width}}{g['file']}  {_mb(size_b) if size_b is not None else 'MISSING'}"
                     f"{f' + {_mb(ext)} external data' if ext else ''}  {g.get('precision', 'fp32')}")
        for t in g.get("inputs", []):
            lines.append(f"    in   {t['name']} {t['dtype']} {_shape(t['shape'])}")
        for t in g.get("outputs", []):
            lines.append(f"    out  {t['name']} {t['dtype']} {_shape(t['shape'])}")
    lines.append("references" if m["references"] else "references  none")
    weights = {n: r for n, r in m["references"].items() if n.startswith(DECODER_ARRAY_PREFIX)}
    for name, r in sorted(m["references"].items()):
        if name in weights:
            continue
        size_b = _file_size(bundle, r["file"])
        lines.append(f"  {name:<18} {r.get('dtype')} {tuple(r.get('shape', []))}  "
                     f"{_mb(size_b) if size_b is not None else 'MISSING'}  {_provenance(r.get('provenance') or {})}")
    if weights:  # the trained decoder's tensors: one line, not one per tensor
        sizes = [_file_size(bundle, r["file"]) for r in weights.values()]
        total = _mb(sum(sizes)) if None not in sizes else "MISSING FILES"
        source = {str((r.get("provenance") or {}).get("checkpoint", "?")) for r in weights.values()}
        lines.append(f"  {DECODER_ARRAY_PREFIX + '*':<18} {len(weights)} decoder tensors  {total}  from "
                     f"{', '.join(sorted(source))}")
    lines += _threshold_lines(m.get("thresholds") or {}, bundle.path)
    lines += _engine_lines(bundle)
    return lines


def _threshold_lines(th: dict, path: Path) -> list[str]:
    """One line per fitted threshold: the value and how, on what, for which backend it was fitted
    (the images' hashes stay in the manifest)."""
    if not th:
        return [f"thresholds  none (fit them with `iadgpt calibrate {path}`)"]
    lines = ["thresholds"]
    for kind, t in sorted(th.items()):
        t = t if isinstance(t, dict) else {"value": t}
        value = t.get("value")
        parts = [f"{float(value):.5g}" if isinstance(value, (int, float)) else str(value), str(t.get("method", "?"))]
        params = t.get("params") or {}
        parts += [f"{key} {params[key]:g}" for key in ("target_frr", "quantile", "target_recall")
                  if isinstance(params.get(key), (int, float))]
        if t.get("n_images") is not None:
            parts.append(f"{t['n_images']} normal images")
        if t.get("n_defects"):
            parts.append(f"{t['n_defects']} defective images")
        ci = t.get("frr_ci")
        if isinstance(t.get("frr_estimate"), (int, float)):
            parts.append(f"expected FRR {100 * t['frr_estimate']:.2f}%"
                         + (f" (CI {100 * ci[0]:.2f}-{100 * ci[1]:.2f}%)" if ci and len(ci) == 2 else ""))
        if t.get("backend"):
            parts.append(f"fitted on {t['backend']}/{t.get('precision', '?')}")
        lines.append(f"  {kind:<7}{', '.join(parts)}")
    return lines


def _runs_here(bundle: Any) -> list[str]:
    """Problems loading each graph in an ONNX Runtime CPU session, then judging one frame the way
    `iadgpt run` checks it at start (`Detector.self_check`); empty: it runs."""
    from ..errors import BundleError, IadGptError
    from ..runtime.detector import Detector
    from ..runtime.engines import OrtEngine

    problems = []
    for role, g in sorted(bundle.graphs.items()):
        try:
            with OrtEngine(bundle.graph_path(role), "cpu", 1, precision=g.get("precision", "fp32")):
                pass
        except IadGptError as exc:
            problems.append(f"{role}: {exc}")
    if problems:
        return problems
    try:  # the graphs load one by one; do they fit each other, the references and the input spec?
        with Detector(bundle, "onnxruntime", threads=1, threshold=float("inf")) as det:
            det.self_check()
    except BundleError as exc:  # self_check's (or the references'): it names the bundle and the problem
        problems.append(str(exc))
    except IadGptError as exc:
        problems.append(f"scoring a frame: {exc}")
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors: the graphs do not fit together
        problems.append(f"scoring a frame: {type(exc).__name__}: {exc}; re-export the bundle")
    return problems


def run(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..errors import BundleError

    bundle = Bundle.load(args.bundle, verify=False)  # a bad manifest raises BundleError -> exit 2
    failed = False
    try:
        print("\n".join(_summary(bundle)))
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:  # a hand-edited field
        failed = True
        print(f"manifest    MALFORMED ({type(exc).__name__}: {exc}): a field has the wrong type; re-export the bundle")
    try:
        bundle.verify()
        print(f"integrity   OK: {len(bundle.listed_files())} files match their sha256")
    except BundleError as exc:
        failed = True
        print(f"integrity   FAILED: {exc}")
    try:
        import onnxruntime
    except ImportError:
        print("runs here   NO: onnxruntime is not installed (`pip install iadgpt[cpu]`)")
        return 2
    problems = _runs_here(bundle)
    if problems:
        failed = True
        print(f"runs here   NO (onnxruntime {onnxruntime.__version__}): " + " | ".join(problems))
    else:
        print(f"runs here   yes: onnxruntime {onnxruntime.__version__} loads {', '.join(sorted(bundle.graphs))} "
              "on CPU and scores a frame with them")
    return 2 if failed else 0
