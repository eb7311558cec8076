"""One call from a backbone name and a folder of normal images to a verified station bundle.

`export_bundle` builds the backbone, the scorer references (memory bank from the train images, or
CLIP text/defect embeddings from a prompt file), exports ENCODER and SCORER to ONNX with parity
checks, and writes everything with `BundleWriter` (nothing appears at `out` unless all of it
succeeded). The CLI `iadgpt export` and the station demo both call it.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..bundle import DECODER_ARRAY_PREFIX, Bundle, BundleWriter, check_bundle_target
from ..data import IMAGE_EXTENSIONS, image_files
from ..errors import BackboneError, ExportError
from ..staging import staging_dir
from ..models.backbones import Backbone, get_backbone
from ..models.references import encode, image_hashes, load_batch, memory_bank
from ..models.scorers import MemoryBankScorer, check_bank_options
from .onnx_export import OPSET, ParityReport, export_encoder, export_scorer, probe_images

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
SCORER_CHOICES = ("auto", "bank", "text")
GRID_STRIDE = 8
SIGMA = 4.0
LOGIT_SCALE = 100.0


@dataclass
class ExportReport:
    """What `export_bundle` did: parity of both graphs and the references it stored."""

    bundle: Path
    backbone: str
    scorer: str  # "memory_bank" | "text_prompts"
    encoder: ParityReport
    scorer_parity: ParityReport
    references: dict[str, list[int]] = field(default_factory=dict)  # name -> shape
    images: int = 0
    seconds: float = 0.0

    @property
    def parity(self) -> list[ParityReport]:
        return [self.encoder, self.scorer_parity]

    def lines(self) -> list[str]:
        out = [f"bundle {self.bundle}: {self.backbone}, {self.scorer} scorer, {self.seconds:.1f} s"]
        weights = [k for k in self.references if k.startswith(DECODER_ARRAY_PREFIX)]
        out += [f"  reference {k} {tuple(v)}" for k, v in self.references.items() if k not in weights]
        if weights:
            size = sum(int(np.prod(self.references[k])) for k in weights)
            out.append(f"  decoder weights: {len(weights)} arrays, {size} values ({DECODER_ARRAY_PREFIX}*)")
        if self.images:
            out.append(f"  from {self.images} reference images")
        for p in self.parity:
            out += p.lines()
        return out


def build_backbone(name: str, weights: Optional[PathLike] = None, resolution: Optional[int] = None) -> Backbone:
    """get_backbone with an optional square input size; fixed-size towers refuse a different one."""
    if resolution is None:
        return get_backbone(name, weights=weights)
    try:
        return get_backbone(name, weights=weights, size=int(resolution))
    except TypeError:
        bb = get_backbone(name, weights=weights)
        if tuple(bb.input_spec.size) == (int(resolution), int(resolution)):
            return bb
        raise BackboneError(f"backbone {name!r} has a fixed input size {bb.input_spec.size}; "
                            f"drop --resolution {resolution}") from None


def list_images(folder: PathLike) -> list[Path]:
    """Image files directly in `folder`, sorted by name (the order `mvtec_train` uses); hidden files
    are skipped, a broken link is a DataError."""
    root = Path(folder)
    if not root.is_dir():
        raise ExportError(f"train directory {root} does not exist; pass a folder of normal images")
    images = image_files(root)
    if not images:
        raise ExportError(f"{root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def pick_shots(paths: list[Path], shots: int, seed: int) -> list[Path]:
    """All images for shots=0, else a seeded choice of `shots` (the same draw `iadgpt eval` makes)."""
    if shots < 0:
        raise ExportError(f"shots must be >= 0 (0 = all images), got {shots}")
    if shots == 0:
        return list(paths)
    if shots > len(paths):
        raise ExportError(f"--shots {shots} but {paths[0].parent} has only {len(paths)} images")
    pick = np.random.default_rng(seed).choice(len(paths), size=shots, replace=False)
    return [paths[i] for i in np.sort(pick)]


def _resolve_scorer(scorer: str, backbone: Backbone, shots: Optional[int]) -> str:
    if scorer not in SCORER_CHOICES:
        raise ExportError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORER_CHOICES)}")
    if scorer == "auto":
        scorer = "text" if backbone.has_text and shots is None else "bank"
    if scorer == "text" and not backbone.has_text:
        raise ExportError(f"backbone {backbone.name!r} has no text tower, so it cannot score text prompts; "
                          "use --scorer bank (memory bank from --train-dir) or a CLIP backbone")
    return scorer


def _prompt_source(prompts: Optional[PathLike], train_dir: Optional[PathLike]) -> str:
    """The prompts argument, else the category of an MVTec-layout train dir (<category>/train/good)."""
    if prompts is not None:
        return str(prompts)
    if train_dir is not None:
        p = Path(train_dir).absolute()
        if p.name == "good" and p.parent.name == "train":
            log.info("text prompts for object %r (from %s)", p.parent.parent.name, p)
            return p.parent.parent.name
    raise ExportError("text scoring needs prompts: pass --prompts FILE.yaml or an object name "
                      "(e.g. --prompts bottle)")


def _progress(items: list, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="img", leave=False)


def _check_fusion_weight(fusion_weight, decoder, shots) -> None:
    """A weight given where nothing is fused would be recorded nowhere and silently ignored."""
    if fusion_weight is None:
        return
    if decoder is None or shots is None:
        raise ExportError(f"--fusion-weight {fusion_weight} weighs a decoder fused with a memory bank; it needs "
                          "--decoder CKPT and --shots K, or drop it")
    if str(fusion_weight).strip().lower() != "auto":
        from ..models.fusion import check_weight
        check_weight(fusion_weight)  # before the bank is built, not after


def export_bundle(backbone_name: str, train_dir: Optional[PathLike], out: PathLike, *,
                  weights: Optional[PathLike] = None, shots: Optional[int] = 0, coreset: Optional[float] = None,
                  seed: int = 0, augment: Optional[bool] = None, scorer: str = "auto",
                  prompts: Optional[PathLike] = None, resolution: Optional[int] = None,
                  opset: int = OPSET, progress: bool = True,
                  decoder: Optional[PathLike] = None, fusion_weight: Union[str, float, None] = None
                  ) -> tuple[Bundle, ExportReport]:
    """Export a station bundle; returns the written (loaded) bundle and the export report.

    scorer "bank": memory bank of `shots` images of `train_dir` (0 or None = all, sorted; k > 0 = a
    seeded choice, with the 8 rotations/flips added when k <= 8 unless augment=False), optional
    greedy `coreset` fraction. scorer "text" (CLIP only): embeddings of `prompts` (YAML path or
    object name). "auto" = text for a CLIP backbone when shots is None, else bank.
    decoder (a checkpoint of `iadgpt train`): with shots=None the trained decoder alone (scorer kind
    "decoder", weights inside the graph, no references); with shots k (0 = all) the decoder fused
    with the k-shot bank of `train_dir` (kind "decoder+memory_bank", see models/fusion.py), fused
    with `fusion_weight` (None or "auto": chosen on held-out normal images with painted defects).
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_bundle_target(out)  # before minutes of bank building and parity checks, not after
    check_bank_options(coreset, seed)
    _check_fusion_weight(fusion_weight, decoder, shots)
    backbone = build_backbone(backbone_name, weights, resolution)
    if decoder is not None and scorer != "auto":
        raise ExportError(f"--decoder sets the scorer (decoder, or decoder+memory_bank with --shots); drop --scorer {scorer}")
    kind = "decoder" if decoder is not None else _resolve_scorer(scorer, backbone, shots)
    spec = backbone.input_spec
    h, w = spec.size
    probe: Optional[np.ndarray] = None
    arrays: list[tuple[str, np.ndarray, dict[str, Any]]] = []
    n_images = 0

    if kind == "decoder":
        from ..models.fusion import decoder_scorer_for_bundle
        d = decoder_scorer_for_bundle(decoder, backbone, train_dir=train_dir, shots=shots, seed=seed, augment=augment,
                                      coreset=coreset, grid_stride=GRID_STRIDE, sigma=SIGMA,
                                      fusion_weight="auto" if fusion_weight is None else fusion_weight,
                                      progress=progress)
        module, reference, arrays, config, probe, n_images = (d["module"], d["bank"], d["arrays"], d["config"],
                                                              d["probe"], d["images"])
    elif kind == "bank":
        if train_dir is None:
            raise ExportError("the memory-bank scorer needs --train-dir (a folder of normal images)")
        k = int(shots or 0)
        paths = pick_shots(list_images(train_dir), k, seed)
        do_augment = (0 < k <= 8) if augment is None else bool(augment)
        batch = load_batch(_progress(paths, progress, "loading reference images"), backbone)
        module = MemoryBankScorer(backbone.strides, h, grid_stride=GRID_STRIDE, sigma=SIGMA)
        bank = memory_bank(backbone, module, batch, augment=do_augment, coreset=coreset, seed=seed,
                           progress=progress)
        log.info("memory bank: %d patches x %d from %d images", bank.shape[0], bank.shape[1], len(paths))
        arrays.append(("memory_bank", bank, {
            "images": image_hashes(paths), "files": [p.name for p in paths],
            "train_dir": str(Path(train_dir).absolute()), "shots": k, "seed": int(seed),
            "augment": do_augment, "coreset": coreset}))
        reference, ref_input = bank, "bank"
        config = {"kind": "memory_bank", "references": {"bank": "memory_bank"}, "shots": k, "coreset": coreset,
                  "augment": do_augment, "grid_stride": GRID_STRIDE, "sigma": SIGMA, "image_size": [h, w]}
        probe = batch[:2]
        n_images = len(paths)
    else:
        from ..models.prompts import defect_embeddings, load_prompts, text_embeddings
        from ..models.text_scorer import TextPromptScorer

        prompt_set = load_prompts(_prompt_source(prompts, train_dir))
        text = text_embeddings(backbone, prompt_set).float().numpy()
        types, defects = defect_embeddings(backbone, prompt_set)
        prov = prompt_set.provenance()
        arrays.append(("text_embeddings", text, {
            "prompts_sha256": prompt_set.sha256, "object": prompt_set.object_name, "source": prompt_set.source,
            "normal": prompt_set.normal, "abnormal": prompt_set.abnormal, **{k: prov[k] for k in ("n_normal", "n_abnormal")}}))
        arrays.append(("defect_embeddings", defects.float().numpy(), {
            "prompts_sha256": prompt_set.sha256, "object": prompt_set.object_name, "source": prompt_set.source,
            "defect_types": types,
            "sentences": prompt_set.defects}))
        module = TextPromptScorer.from_backbone(backbone, logit_scale=LOGIT_SCALE, sigma=SIGMA)
        reference, ref_input = text, "text_embeddings"
        config = {"kind": "text_prompts", "references": {"text_embeddings": "text_embeddings"}, "shots": 0,
                  "coreset": None, "augment": False, "grid_stride": int(backbone.strides[0]), "sigma": SIGMA,
                  "image_size": [h, w], "logit_scale": LOGIT_SCALE}
        if train_dir is not None:
            probe = load_batch(list_images(train_dir)[:2], backbone)

    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(out.parent, f".{out.name}.onnx-") as tmp:
        enc_path, sc_path = Path(tmp) / "encoder.onnx", Path(tmp) / "scorer.onnx"
        log.info("exporting the encoder of %s to ONNX (opset %d)", backbone.name, opset)
        enc_report = export_encoder(backbone, enc_path, opset, probe=probe, seed=seed)
        # scorer probe features: from seeded random images, never from bank images (distance ~0 there,
        # where sqrt turns float32 rounding into large relative noise)
        feats = encode(backbone, probe_images(spec.size, 2, seed + 1))
        log.info("exporting the %s scorer to ONNX", kind)
        if kind == "decoder":
            from ..models.fusion import export_decoder_scorer
            if d["scorer_probe"] is not None:  # NSA anomalies: where a trained decoder's map spans its range
                feats = [torch.cat([f, g]) for f, g in zip(feats, encode(backbone, d["scorer_probe"]))]
            sc_report = export_decoder_scorer(module, sc_path, feats, reference, opset=opset)
        else:
            sc_report = export_scorer(module, [tuple(f.shape[1:]) for f in feats], {ref_input: reference}, sc_path,
                                      opset, probe_features=feats, seed=seed)
        with BundleWriter(out, backbone=backbone.describe(), scorer=config) as writer:
            writer.add_graph("encoder", enc_path)
            writer.add_graph("scorer", sc_path)
            for name, arr, prov in arrays:
                writer.add_array(name, np.ascontiguousarray(arr, dtype=np.float32), provenance=prov)
            writer.set_extra({"export": {"opset": opset, "torch": torch.__version__, "seed": int(seed),
                                         "parity": {"encoder": enc_report.to_dict(),
                                                    "scorer": sc_report.to_dict()}}})
    bundle = writer.bundle
    if bundle is None:  # pragma: no cover - commit either sets it or raises
        raise ExportError(f"bundle {out} was not written")
    enc_report.path = bundle.graph_path("encoder")
    sc_report.path = bundle.graph_path("scorer")
    report = ExportReport(bundle.path, backbone.name, config["kind"], enc_report, sc_report,
                          {name: list(arr.shape) for name, arr, _ in arrays}, n_images,
                          time.perf_counter() - t0)
    log.info("exported %s in %.1f s", bundle.path, report.seconds)
    return bundle, report
