"""`iadgpt eval`: image and pixel metrics of a scorer on an MVTec-layout category.

Maps are evaluated at the backbone's input resolution (masks resized with nearest neighbour),
which is what a station produces before upscaling for display.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import cv2
import numpy as np

from . import metrics
from .data import Sample, load_split, read_image, read_mask
from .errors import IadGptError

if TYPE_CHECKING:
    from .bundle import Bundle

log = logging.getLogger(__name__)

ScoreFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # batch -> (maps, scores)


@dataclass
class EvalResult:
    """Metrics as fractions in [0, 1], mean (and std) over seeds."""

    backbone: str
    shots: int
    resolution: int
    coreset: Optional[float]
    seeds: int
    image_auroc: float
    pixel_auroc: float
    aupro: float
    f1_max: float
    image_auroc_std: float = 0.0
    pixel_auroc_std: float = 0.0
    aupro_std: float = 0.0
    seconds_per_image: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return data


@dataclass
class TestSet:
    samples: list[Sample]
    batch: np.ndarray  # (N, 3, H, W) float32 0..255 encoder input
    masks: np.ndarray  # (N, H, W) bool at the input resolution
    labels: np.ndarray

    @classmethod
    def load(cls, root, category: str, spec, progress: bool = True) -> "TestSet":
        from .runtime.preprocess import resize_frame
        samples = load_split(root, category, "test")
        h, w = spec.size
        images, masks = [], []
        for s in _progress(samples, progress, "loading test images"):
            img = read_image(s.path)
            images.append(resize_frame(img, spec))
            m = read_mask(s, img.shape[:2]).astype(np.uint8)
            masks.append(cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool))
        batch = np.ascontiguousarray(np.stack(images).astype(np.float32).transpose(0, 3, 1, 2))
        return cls(samples, batch, np.stack(masks), np.array([s.label for s in samples]))


@dataclass
class RunMetrics:
    image_auroc: float
    pixel_auroc: float
    aupro: float
    f1_max: float
    maps: np.ndarray = field(repr=False)
    scores: np.ndarray = field(repr=False)


def score_test_set(test: TestSet, score_fn: ScoreFn, batch_size: int = 8,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Run a scorer over the test set: maps, scores and inference seconds per image."""
    maps, scores = [], []
    t0 = time.perf_counter()
    for i in _progress(range(0, len(test.batch), batch_size), progress, "scoring"):
        m, s = score_fn(test.batch[i:i + batch_size])
        maps.append(np.asarray(m, dtype=np.float32))
        scores.append(np.asarray(s, dtype=np.float32))
    seconds = (time.perf_counter() - t0) / max(len(test.batch), 1)
    return np.concatenate(maps), np.concatenate(scores), seconds


def compute_metrics(test: TestSet, maps: np.ndarray, scores: np.ndarray) -> RunMetrics:
    if maps.shape[1:] != test.masks.shape[1:]:
        maps = np.stack([cv2.resize(m, test.masks.shape[2:0:-1], interpolation=cv2.INTER_LINEAR) for m in maps])
    return RunMetrics(
        image_auroc=metrics.image_auroc(test.labels, scores),
        pixel_auroc=metrics.pixel_auroc(test.masks, maps),
        aupro=metrics.aupro(test.masks, maps, num_thresholds=1000),
        f1_max=metrics.f1_max(test.labels, scores),
        maps=maps, scores=scores)


def summarise(runs: Sequence[RunMetrics], **fields) -> EvalResult:
    def stat(name: str) -> tuple[float, float]:
        vals = np.array([getattr(r, name) for r in runs])
        return float(vals.mean()), float(vals.std())

    i_mean, i_std = stat("image_auroc")
    p_mean, p_std = stat("pixel_auroc")
    a_mean, a_std = stat("aupro")
    return EvalResult(image_auroc=i_mean, pixel_auroc=p_mean, aupro=a_mean, f1_max=stat("f1_max")[0],
                      image_auroc_std=i_std, pixel_auroc_std=p_std, aupro_std=a_std, seeds=len(runs), **fields)


def evaluate_torch(data, category: str, backbone_name: str = "efficientnet-lite0", *, shots: int = 0,
                   seeds: int = 1, coreset: Optional[float] = None, resolution: Optional[int] = None,
                   weights: Optional[str] = None, scorer: str = "bank", augment: Optional[bool] = None,
                   progress: bool = True, plots: Optional[Path] = None) -> EvalResult:
    """Evaluate the torch reference model: memory bank from `shots` train images (0 = all) or text prompts."""
    import torch

    from .models.backbones import get_backbone
    from .models.references import encode, load_batch, memory_bank
    from .models.scorers import MemoryBankScorer, check_bank_options

    # Fail fast: these errors used to surface only after the whole test set was loaded and encoded.
    if scorer not in ("bank", "text"):
        raise IadGptError(f"unknown scorer {scorer!r}; use 'bank' (memory bank) or 'text' (CLIP prompts)")
    if shots < 0 or seeds < 1:
        raise IadGptError(f"--shots must be >= 0 (0 = all train images) and --seeds >= 1; got {shots} and {seeds}")
    check_bank_options(coreset, 0)
    kwargs = {"size": resolution} if resolution is not None else {}
    backbone = get_backbone(backbone_name, weights=weights, **kwargs)
    spec = backbone.input_spec
    if scorer == "text":
        from .models.text_scorer import TextPromptScorer
        text_scorer = TextPromptScorer.from_backbone(backbone)  # raises for backbones without a text tower
    else:
        train = load_split(data, category, "train")
        if shots > len(train):
            raise IadGptError(f"--shots {shots} but {category} has only {len(train)} train images")
    if seeds > 1 and coreset is None and (scorer == "text" or shots in (0, len(train))):
        # every seed would build the same bank (or none): N identical runs and a spread of 0 that means nothing
        what = "the text scorer has no shots to draw" if scorer == "text" else \
            f"--shots {shots or 'all'} takes every one of the {len(train)} train images"
        raise IadGptError(f"--seeds {seeds} would repeat one evaluation: {what}; use --seeds 1, or fewer --shots "
                          "(a seed draws them) or a --coreset (a seed starts it)")
    test = TestSet.load(data, category, spec, progress)
    t0 = time.perf_counter()
    test_feats = encode(backbone, test.batch)
    encode_seconds = (time.perf_counter() - t0) / len(test.batch)

    def run(score_module, reference: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
        maps, scores = [], []
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(test.batch), 8):
                m, s = score_module(*[f[i:i + 8] for f in test_feats], reference)
                maps.append(m.numpy())
                scores.append(s.numpy())
        return np.concatenate(maps), np.concatenate(scores), (time.perf_counter() - t) / len(test.batch)

    runs, per_image = [], []
    if scorer == "text":
        from .models.prompts import load_prompts, text_embeddings
        reference = text_embeddings(backbone, load_prompts(category))

        def text_module(*inputs):
            return text_scorer(list(inputs[:-1]), inputs[-1])

        maps, scores, sec = run(text_module, reference)
        runs.append(compute_metrics(test, maps, scores))
        per_image.append(sec)
        shots = 0
    elif scorer == "bank":
        bank_scorer = MemoryBankScorer(backbone.strides, spec.size[0])
        picks = [np.sort(np.random.default_rng(seed).choice(len(train), size=shots, replace=False))
                 if shots > 0 else np.arange(len(train)) for seed in range(seeds)]
        # decode only the train images some seed uses: 1-shot on a 400-image category reads a few files
        needed = sorted(set(np.concatenate(picks).tolist()))
        row = {i: r for r, i in enumerate(needed)}
        train_batch = load_batch([train[i].path for i in _progress(needed, progress, "loading train images")],
                                 backbone)
        do_augment = (0 < shots <= 8) if augment is None else augment
        for seed in range(seeds):
            shot_batch = train_batch[[row[i] for i in picks[seed]]]
            bank = memory_bank(backbone, bank_scorer, shot_batch, augment=do_augment, coreset=coreset, seed=seed,
                               progress=progress)
            log.info("seed %d: bank of %d patches", seed, len(bank))
            maps, scores, sec = run(bank_scorer, torch.from_numpy(bank))
            runs.append(compute_metrics(test, maps, scores))
            per_image.append(sec)

    result = summarise(runs, backbone=backbone_name, shots=shots, resolution=spec.size[0], coreset=coreset,
                       seconds_per_image=encode_seconds + float(np.mean(per_image)))
    if plots:
        write_plots(Path(plots), test, runs[0])
    return result


def write_plots(out: Path, test: TestSet, run: RunMetrics, n_hardest: int = 6) -> list[Path]:
    """ROC curve PNG and overlays of the hardest cases (highest normal, lowest defective scores)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [_roc_png(out / "roc.png", test.labels, run.scores)]
    normal = [i for i in np.argsort(-run.scores) if test.labels[i] == 0][:n_hardest // 2]
    defect = [i for i in np.argsort(run.scores) if test.labels[i] == 1][:n_hardest - len(normal)]
    hi = float(np.percentile(run.maps, 99.9))
    lo = float(run.maps.min())
    for i in list(normal) + list(defect):
        image = test.batch[i].transpose(1, 2, 0).astype(np.uint8)
        heat = cv2.applyColorMap(np.clip((run.maps[i] - lo) / (hi - lo + 1e-12) * 255, 0, 255).astype(np.uint8),
                                 cv2.COLORMAP_JET)
        blend = cv2.addWeighted(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), 0.55, heat, 0.45, 0)
        contours, _ = cv2.findContours(test.masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(blend, contours, -1, (255, 255, 255), 1)
        sample = test.samples[i]
        name = f"{'normal' if sample.label == 0 else 'defect'}_{sample.defect_type}_{sample.path.stem}_{run.scores[i]:.3f}.png"
        path = out / name
        cv2.imwrite(str(path), blend)
        written.append(path)
    return written


def _roc_png(path: Path, labels: np.ndarray, scores: np.ndarray) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {metrics.image_auroc(labels, scores):.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def format_table(result: EvalResult) -> str:
    rows = [("I-AUROC", result.image_auroc, result.image_auroc_std), ("P-AUROC", result.pixel_auroc, result.pixel_auroc_std),
            ("AUPRO", result.aupro, result.aupro_std), ("F1-max", result.f1_max, None)]
    lines = [f"backbone {result.backbone}  shots {result.shots or 'all'}  resolution {result.resolution}  "
             f"coreset {result.coreset}  seeds {result.seeds}", f"{'metric':<10}{'%':>8}{'std':>8}"]
    for name, mean, std in rows:
        lines.append(f"{name:<10}{100 * mean:8.2f}{'' if std is None else f'{100 * std:8.2f}'}")
    lines.append(f"{'ms/image':<10}{1000 * result.seconds_per_image:8.1f}")
    return "\n".join(lines)


def write_json(result: EvalResult, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, leave=False)


# --------------------------------------------------------------------------- exported bundles

def evaluate_bundle(data, category: str, bundle_path, backend: str = "onnxruntime", threads: Optional[int] = None,
                    plots: Optional[Path] = None, progress: bool = True, *, weights: Optional[str] = None,
                    precision: Optional[str] = None, batch_size: int = 8) -> EvalResult:
    """Metrics of an exported bundle run through an engine, i.e. what a station would score.

    backend "onnxruntime" (CPU, `threads` intra-op threads), "torch" (the reference modules rebuilt
    from the manifest's backbone name and the bundle's reference arrays; CLIP needs `weights`) or
    "tensorrt" (engines built into the bundle by `iadgpt build`; `precision` picks one when several).
    """
    run = run_bundle(data, category, bundle_path, backend, threads, progress, weights=weights, precision=precision,
                     batch_size=batch_size)
    cfg = run.bundle.scorer
    result = summarise([run.metrics], backbone=str(run.bundle.backbone.get("name", "?")),
                       shots=int(cfg.get("shots") or 0), resolution=int(run.bundle.input_spec.size[0]),
                       coreset=cfg.get("coreset"), seconds_per_image=run.seconds,
                       extra={"backend": backend, "precision": run.precision, "bundle": str(run.bundle.path),
                              "scorer": cfg["kind"]})
    if plots:
        write_plots(Path(plots), run.test, run.metrics)
    return result


@dataclass
class BundleRun:
    """A bundle scored on a test set, maps kept: what comparisons of two bundles need (benchmarks/fusion.py)."""

    bundle: Bundle
    test: TestSet
    metrics: RunMetrics
    seconds: float  # inference per image
    precision: str


def run_bundle(data, category: str, bundle_path, backend: str = "onnxruntime", threads: Optional[int] = None,
               progress: bool = True, *, weights: Optional[str] = None, precision: Optional[str] = None,
               batch_size: int = 8) -> BundleRun:
    """Score the test set of `category` with the bundle as a station would (`evaluate_bundle`'s work)."""
    from .bundle import Bundle
    from .errors import BundleError

    bundle = Bundle.load(bundle_path, verify=True)
    cfg = bundle.scorer
    if not cfg.get("kind") or not isinstance(cfg.get("references"), dict):
        raise BundleError(f"bundle {bundle.path} has no scorer section (kind, references) in its manifest; "
                          "re-export it with `iadgpt export`")
    from .runtime.detector import Detector

    with Detector(bundle, backend, threads=threads, threshold=float("inf"), weights=weights,
                  precision=precision) as detector:
        test = TestSet.load(data, category, bundle.input_spec, progress)
        maps, scores, seconds = score_test_set(test, lambda b: detector.score_batch(b)[:2], batch_size, progress)
        engine_precision = detector.precision
    return BundleRun(bundle, test, compute_metrics(test, maps, scores), seconds, engine_precision)

