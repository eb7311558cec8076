"""Product onboarding: K normal shots -> memory bank, the other normals -> thresholds, in seconds.

`calibrate` turns a bundle plus a folder of normal images of a (new) product into a bundle that
judges that product:

1. K shots (the same seeded draw as `iadgpt export`/`eval`) become the memory bank. Their
   features come from the bundle's own encoder graph run on ONNX Runtime, i.e. the encoder (fp32
   or INT8) that will run on the line, so bank and queries share its quantization error and no
   backbone weights are needed. `shots=0` keeps the bundle's bank (its images, known by sha256,
   are left out of the hold-out set).
2. Optionally (`int8=True`) the encoder is quantized to a static INT8 Q/DQ graph calibrated on
   the real normal images; on ONNX Runtime it becomes the bundle's "encoder" (precision int8, the
   fp32 graph is kept as "encoder_fp32"); for TensorRT it is stored as "encoder_int8" and
   compiled here (the engines `iadgpt build --precision int8` makes), so that step 3 scores with it.
3. The held-out normals (never in the bank) are scored by `Detector.score_batch` on the
   production backend and precision; image and region thresholds are fitted on those scores
   (`thresholds.py`) and written to the manifest with their provenance.

The bundle is rewritten atomically with `BundleWriter` (to `out`, or in place), engines built for
unchanged graphs are carried over, and a score histogram PNG is written next to it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from ..bundle import Bundle, BundleWriter, check_bundle_target, sha256_file, swap_into_place
from ..data import IMAGE_EXTENSIONS, check_link, image_files, is_image_name, read_mask, read_reference_image
from ..errors import CalibrationError
from ..staging import staging_dir
from . import thresholds as th

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
BATCH = 8
INT8_CALIBRATION_IMAGES = 32  # shots (with their rotations) first, then held-out normals
INT8_CHECK_IMAGES = 16  # held-out normals the INT8 cosine is reported on
GOOD = "good"


@dataclass
class CalibrationReport:
    """What `calibrate` did and what the line should expect from the fitted thresholds."""

    bundle: Path
    seconds: float  # wall time until the calibrated bundle was written (the histogram is drawn after)
    threshold: float
    pixel_threshold: float
    method: str
    target_frr: float
    frr_estimate: float
    frr_ci: tuple[float, float]
    backend: str
    precision: str
    shots: int
    holdout: int
    defects: int = 0
    pixel_method: str = "quantile"  # "f1" when fitted on masked defects: the summary says which
    miss_estimate: Optional[float] = None
    miss_ci: Optional[tuple[float, float]] = None
    confidence: float = th.CONFIDENCE
    histogram: Optional[Path] = None
    int8: Optional[dict[str, Any]] = None
    timings: dict[str, float] = field(default_factory=dict)
    normal_scores: list[float] = field(default_factory=list, repr=False)
    defect_scores: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = {"seconds": self.seconds, "threshold": self.threshold, "pixel_threshold": self.pixel_threshold,
             "frr_estimate": self.frr_estimate, "frr_ci": list(self.frr_ci), "backend": self.backend,
             "precision": self.precision, "shots": self.shots, "holdout": self.holdout, "method": self.method,
             "target_frr": self.target_frr, "confidence": self.confidence, "defects": self.defects,
             "pixel_method": self.pixel_method,
             "miss_estimate": self.miss_estimate, "miss_ci": None if self.miss_ci is None else list(self.miss_ci),
             "bundle": str(self.bundle), "histogram": None if self.histogram is None else str(self.histogram),
             "timings_s": dict(self.timings), "int8": self.int8}
        return d

    def lines(self) -> list[str]:
        pct = 100 * self.confidence
        out = [f"bundle {self.bundle}: {self.backend}/{self.precision}, bank from {self.shots or 'the bundle'}"
               f"{' shots' if self.shots else ''}, thresholds from {self.holdout} held-out normal images "
               f"({self.method}, target false-reject rate {100 * self.target_frr:g}%)",
               f"  image threshold {self.threshold:.5g}   region threshold {self.pixel_threshold:.5g} "
               f"({self.pixel_method})",
               f"  expected false-reject rate {100 * self.frr_estimate:.2f}% "
               f"({pct:g}% CI {100 * self.frr_ci[0]:.2f}-{100 * self.frr_ci[1]:.2f}%)"]
        if self.miss_estimate is not None and self.miss_ci is not None:
            out.append(f"  expected miss rate {100 * self.miss_estimate:.2f}% ({pct:g}% CI "
                       f"{100 * self.miss_ci[0]:.2f}-{100 * self.miss_ci[1]:.2f}%) on {self.defects} defective images")
        else:
            out.append("  miss rate: unknown (pass --defects DIR with labelled defective images to estimate it)")
        if self.int8:
            cos = ", ".join(f"{k} {v:.4f}" for k, v in self.int8["cosine"].items())
            kept = len(self.int8["excluded_nodes"])
            stem = self.int8.get("stem", "?")
            when = " (kept from its calibration)" if self.int8.get("carried") else ""
            out.append(f"  INT8 encoder{when}: feature cosine vs fp32 {cos}; stem {stem}; {kept} nodes kept in float")
        if self.histogram:
            out.append(f"  score histogram {self.histogram}")
        elif "histogram" in self.timings:
            out.append("  score histogram not drawn (matplotlib is not installed here)")
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items() if k != "histogram")
        out.append(f"  calibrated in {self.seconds:.1f} s ({steps})"
                   + (f"; histogram drawn in {self.timings['histogram']:.1f} s" if self.histogram else ""))
        return out


# --------------------------------------------------------------------------- images


def list_normal_images(folder: PathLike) -> list[Path]:
    """Image files directly in `folder`, sorted by name (the order export and eval use); hidden files
    are skipped, a broken link is a DataError."""
    root = Path(folder)
    if not root.is_dir():
        raise CalibrationError(f"normal image folder {root} does not exist; pass --normal DIR with images of "
                               "good parts")
    images = image_files(root)
    if not images:
        raise CalibrationError(f"{root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); pass --normal DIR "
                               "with images of good parts")
    return images


def list_defect_images(folder: PathLike) -> list[tuple[Path, Optional[Path]]]:
    """(image, mask or None) under `folder`, recursively; a `good` subfolder is skipped.

    Masks are looked up MVTec-style: <ancestor>/ground_truth/<defect folder>/<stem>_mask.*.
    """
    root = Path(folder)
    if not root.is_dir():
        raise CalibrationError(f"defect image folder {root} does not exist; pass --defects DIR with images of "
                               "defective parts (e.g. an MVTec test folder)")
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if (not is_image_name(p.name) or any(s.startswith(".") for s in rel)
                or GOOD in rel[:-1] or "ground_truth" in rel[:-1] or p.stem.endswith("_mask")):
            continue
        check_link(p)
        if p.is_file():  # not a folder named x.png
            out.append((p, _find_mask(p, root)))
    if not out:
        raise CalibrationError(f"{root} holds no defect images (a 'good' subfolder is skipped)")
    return out


def _find_mask(image: Path, root: Path) -> Optional[Path]:
    for ancestor in list(image.parents)[1:4]:
        gt = ancestor / "ground_truth" / image.parent.name
        for ext in (".png", *sorted(IMAGE_EXTENSIONS - {".png"})):
            for cand in (gt / f"{image.stem}_mask{ext}", gt / f"{image.stem}_mask{ext.upper()}"):
                if cand.is_file():
                    return cand
    return None


def pick_shots(paths: Sequence[Path], shots: int, seed: int) -> list[Path]:
    """A seeded choice of `shots` images, in name order: the draw `iadgpt export --shots` makes."""
    if shots > len(paths):
        raise CalibrationError(f"--shots {shots} but {paths[0].parent} has only {len(paths)} images")
    pick = np.random.default_rng(seed).choice(len(paths), size=shots, replace=False)
    return [paths[i] for i in np.sort(pick)]


def _progress(items: Iterable, enabled: bool, desc: str, total: Optional[int] = None) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, total=total, unit="batch", leave=False)


def _batches(paths: Sequence[Path], spec: Any, prefetch: bool = True) -> Iterator[np.ndarray]:
    """Encoder-input batches of the images; the next batch is decoded (OpenCV releases the GIL)
    while the caller scores the current one."""
    from concurrent.futures import ThreadPoolExecutor

    from ..runtime.preprocess import to_batch

    def load(i: int) -> np.ndarray:
        return to_batch([read_reference_image(p) for p in paths[i:i + BATCH]], spec)

    starts = list(range(0, len(paths), BATCH))
    if not prefetch or len(starts) < 2:
        for i in starts:
            yield load(i)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, starts[0])
        for j in range(len(starts)):
            batch = nxt.result()
            if j + 1 < len(starts):
                nxt = pool.submit(load, starts[j + 1])
            yield batch


@dataclass
class Split:
    """Normal images split into bank shots and held-out images, with their sha256."""

    shots: list[Path]
    shot_hashes: list[str]
    holdout: list[Path]
    holdout_hashes: list[str]
    total: int
    available: int = 0  # held-out candidates before the --holdout cap


def split_images(src: Bundle, paths: list[Path], shots: int, holdout: Optional[int], seed: int) -> Split:
    """K seeded shots for the bank; the held-out set is every other image (capped at `holdout`).

    Pictures already in the bank are recognised by sha256 and never held out: a bank image
    scores ~0 and would drag the threshold down.
    """
    hashes = [sha256_file(p) for p in paths]
    if shots:
        shot_paths = pick_shots(paths, shots, seed)
        in_bank = {h for p, h in zip(paths, hashes) if p in set(shot_paths)}
    else:
        shot_paths = []
        bank_name = (src.scorer.get("references") or {}).get("bank")
        in_bank = set(src.references.get(bank_name, {}).get("provenance", {}).get("images", [])) if bank_name else set()
    taken = set(shot_paths)
    pool = [(p, h) for p, h in zip(paths, hashes) if p not in taken and h not in in_bank]
    if not shots and len(pool) < len(paths):
        log.info("left out %d images that are in the bundle's memory bank", len(paths) - len(pool))
    available = len(pool)
    if holdout is not None:
        if holdout < 1:
            raise CalibrationError(f"--holdout must be >= 1, got {holdout}")
        if holdout < len(pool):
            keep = np.sort(np.random.default_rng(seed + 1).choice(len(pool), size=holdout, replace=False))
            pool = [pool[i] for i in keep]
    shot_hashes = [h for p, h in zip(paths, hashes) if p in taken]
    return Split(shot_paths, shot_hashes, [p for p, _ in pool], [h for _, h in pool], len(paths), available)


# --------------------------------------------------------------------------- encoder features


class GraphFeatures:
    """Backbone-like callable over an ONNX encoder on ONNX Runtime CPU (for `references.memory_bank`);
    takes `to_batch` batches, handed to an integer-input INT8 encoder as its uint8 pixels."""

    def __init__(self, onnx_path: PathLike, threads: Optional[int] = None, precision: str = "fp32"):
        from ..runtime.engines import OrtEngine
        from ..runtime.preprocess import pixel_channels
        self.engine = OrtEngine(onnx_path, "cpu", threads, precision=precision)
        self.names = sorted(self.engine.output_names, key=lambda n: (len(n), n))
        self.pixel_channels = pixel_channels(self.engine.input_dtypes["image"], self.engine.input_shapes["image"])

    def __call__(self, images: Any) -> list[Any]:
        import torch

        from ..runtime.preprocess import encoder_input
        x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
        out = self.engine.run({"image": encoder_input(np.ascontiguousarray(x, dtype=np.float32), self.pixel_channels)})
        return [torch.from_numpy(out[n]) for n in self.names]

    def close(self) -> None:
        self.engine.close()


def build_bank(encoder_onnx: Path, bundle: Bundle, shots: np.ndarray, *, augment: bool, coreset: Optional[float],
               seed: int, threads: Optional[int], progress: bool, precision: str = "fp32") -> np.ndarray:
    """Memory bank of the shots with the bundle's patch embedding, features from `encoder_onnx`."""
    from ..models.references import memory_bank
    from ..models.scorers import MemoryBankScorer

    cfg, desc = bundle.scorer, bundle.backbone
    h = bundle.input_spec.size[0]
    scorer = MemoryBankScorer(desc.get("strides") or [], h, grid_stride=int(cfg.get("grid_stride", 8)),
                              sigma=float(cfg.get("sigma", 4.0)))
    feats = GraphFeatures(encoder_onnx, threads, precision)
    try:
        with _single_thread_blas():
            return memory_bank(feats, scorer, shots, augment=augment, coreset=coreset,  # type: ignore[arg-type]
                               seed=seed, progress=progress)
    finally:
        feats.close()


def _single_thread_blas() -> Any:
    """The greedy coreset is a chain of small memory-bound mat-vecs: multi-threaded OpenBLAS made it
    6x slower on 2 busy cores (2.0 s vs 0.33 s for 25k patches), so BLAS runs on one thread here."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional (comes with scikit-learn); without it BLAS keeps its default
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _augmented(shots: np.ndarray, augment: bool) -> np.ndarray:
    if not augment:
        return shots
    import torch

    from ..models.scorers import augment_shots
    return augment_shots(torch.from_numpy(shots)).numpy()


# --------------------------------------------------------------------------- main entry


def calibrate(bundle_path: PathLike, normal_dir: PathLike, *, shots: int = 4, holdout: Optional[int] = None,
              defects_dir: Optional[PathLike] = None, int8: bool = False, out: Optional[PathLike] = None,
              target_frr: float = 0.005, method: str = "quantile", target_recall: float = 0.95,
              pixel_quantile: float = th.PIXEL_QUANTILE, coreset: Optional[float] = None,
              augment: Optional[bool] = None, backend: str = "onnxruntime", threads: Optional[int] = None,
              seed: int = 0, int8_keep_float: Optional[str] = None, histogram: Optional[PathLike] = None,
              progress: bool = True, weights: Optional[PathLike] = None) -> CalibrationReport:
    """Onboard a product: bank from `shots` normals, thresholds on the held-out rest (see module doc).

    `holdout` caps the held-out images (a seeded choice; default all the rest). `coreset` and
    `augment` override the bundle's scorer settings for the new bank (None keeps them). Writes
    to `out` (a new bundle) or, without it, rewrites the bundle in place. `weights`: the CLIP
    folder a torch / cuda-graph `backend` rebuilds from (onnxruntime and tensorrt ignore it).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    src = Bundle.load(bundle_path)
    dest = Path(out).absolute() if out is not None else src.path
    cfg = src.scorer
    if method not in th.METHODS:
        raise CalibrationError(f"unknown threshold method {method!r}; choose one of {', '.join(th.METHODS)}")
    if shots < 0:
        raise CalibrationError(f"shots must be >= 0 (0 keeps the bundle's memory bank), got {shots}")
    if shots and cfg.get("kind") != "memory_bank":
        rebuild = ""
        if cfg.get("kind") == "decoder+memory_bank":
            rebuild = (" (its bank is fused with a decoder whose statistics were fitted to that bank: re-export with "
                       "`iadgpt export --decoder CKPT --train-dir DIR --shots K` for a new bank)")
        raise CalibrationError(f"bundle {src.path} scores with {cfg.get('kind')!r}, not a memory bank{rebuild}: pass "
                               "--shots 0 to fit thresholds only")
    from ..runtime.engines import BACKEND_ALIASES
    backend = BACKEND_ALIASES.get(str(backend).lower(), backend)  # "ort", "trt": the names run takes
    if int8 and backend not in ("onnxruntime", "tensorrt"):
        raise CalibrationError(f"--int8 makes a Q/DQ graph for onnxruntime or tensorrt, not {backend!r}")
    # everything that can be refused is refused before any work: a failure later leaves the bundle as it was
    from ..runtime.detector import BACKENDS, Detector

    if backend not in BACKENDS:
        raise CalibrationError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    th.check_rate("target_frr", target_frr)
    if method == "recall":
        th.check_rate("target_recall", target_recall)
    if coreset is not None and not 0.0 < coreset <= 1.0:
        raise CalibrationError(f"--coreset {coreset} is not a fraction of the bank in (0, 1], e.g. 0.1")
    if seed < 0:
        raise CalibrationError(f"--seed {seed} must be >= 0")
    defects = list_defect_images(defects_dir) if defects_dir is not None else []
    if method in ("f1", "recall") and len(defects) < th.MIN_DEFECT_IMAGES:
        raise CalibrationError(f"method {method!r} needs at least {th.MIN_DEFECT_IMAGES} defective images (got "
                               f"{len(defects)}): pass --defects DIR, or use --method quantile")
    unmasked = [image for image, mask in defects if mask is None]
    if unmasked and len(unmasked) < len(defects):  # the region threshold would fall back to a quantile unseen
        raise CalibrationError(f"{len(unmasked)} of the {len(defects)} defect images have no mask (first: "
                               f"{unmasked[0]}, looked up as <folder>/../ground_truth/<defect>/<stem>_mask.png); the "
                               "region threshold is fitted on masks of every defect image: add the missing masks or "
                               "remove those images")
    if out is not None:
        check_bundle_target(dest)
    if backend == "tensorrt":  # thresholds are fitted on this station's engines: TensorRT must be here
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise CalibrationError("--backend tensorrt fits thresholds on TensorRT engines, but TensorRT is not "
                                   "installed here: calibrate on the station (`pip install iadgpt[trt]`), or "
                                   "pass --backend onnxruntime") from None

    t = time.perf_counter()
    normals = list_normal_images(normal_dir)
    both = sorted({p.resolve() for p in normals} & {p.resolve() for p, _ in defects})
    if both:  # a part cannot be good and defective: the miss rate would be measured on good parts
        raise CalibrationError(f"{len(both)} images are both normal (--normal) and defective (--defects), e.g. "
                               f"{both[0]}; give --defects a folder of defective parts only")
    split = split_images(src, normals, shots, holdout, seed)
    shot_paths, shot_hashes, pool, pool_hashes = split.shots, split.shot_hashes, split.holdout, split.holdout_hashes
    need = th.min_images_for(target_frr, method) if method in ("quantile", "tail") else th.MIN_TAIL_IMAGES
    if len(pool) < need <= split.available:  # the folder has enough: --holdout is what holds them back
        raise CalibrationError(f"--holdout {holdout} keeps {len(pool)} of the {split.available} held-out normal "
                               f"images, and {method!r} at a {100 * target_frr:g}% false-reject rate needs at "
                               f"least {need}: give --holdout {need} or more, or leave --holdout out (all of them)")
    if len(pool) < need:
        detail = th.too_few_message(len(pool), target_frr) if method == "quantile" else (
            f"method {method!r} needs at least {need} held-out normal images (got {len(pool)})")
        raise CalibrationError(f"{detail}. {split.total} images in {normal_dir}, {len(shot_paths)} of them go to "
                               "the memory bank (--shots) and are never used for thresholds")
    timings["list"] = time.perf_counter() - t

    spec = src.input_spec
    dest.parent.mkdir(parents=True, exist_ok=True)
    # a new bank or graph is staged inside `tmp`, scored and given its thresholds there, and only then
    # swapped in for `dest`: an error or Ctrl-C at any step leaves the bundle on disk as it was
    with staging_dir(dest.parent, f".{dest.name}.calib-") as tmp:
        tmp_dir = Path(tmp)
        graphs = {role: (src.graph_path(role), entry.get("precision", "fp32")) for role, entry in src.graphs.items()}
        fp32_role = src.float_encoder_role
        if graphs[fp32_role][1] != "fp32" and int8:
            raise CalibrationError(f"bundle {src.path} has no fp32 encoder to quantize; re-export it with "
                                   "`iadgpt export`")
        shot_batch = np.concatenate(list(_batches(shot_paths, spec))) if shot_paths else None
        # rotations/flips of few shots, as `iadgpt export` does (an explicit `augment` wins)
        do_augment = (0 < shots <= 8) if augment is None else bool(augment)

        # -- INT8 encoder (calibrated on real normal images only)
        int8_report = None
        if int8:
            t = time.perf_counter()
            q_path = tmp_dir / "encoder_int8.onnx"
            int8_report = quantize_on_normals(graphs[fp32_role][0], q_path, spec, shot_batch, do_augment, split,
                                              preset="cpu" if backend == "onnxruntime" else "tensorrt",
                                              keep_float=int8_keep_float, threads=threads)
            if backend == "onnxruntime":  # the station's encoder; fp32 kept as the source of truth
                graphs["encoder_fp32"] = graphs[fp32_role]
                graphs["encoder"] = (q_path, "int8")
            else:  # compiled by `iadgpt build --precision int8`
                graphs["encoder_int8"] = (q_path, "int8")
            timings["int8"] = time.perf_counter() - t

        # -- memory bank from the production encoder graph
        bank = None
        new_cfg = dict(cfg)
        if shots:
            t = time.perf_counter()
            bank_coreset = cfg.get("coreset") if coreset is None else (None if coreset >= 1 else coreset)
            enc_for_bank, enc_precision = graphs["encoder"]
            bank = build_bank(enc_for_bank, src, shot_batch, augment=do_augment, coreset=bank_coreset, seed=seed,
                              threads=threads, progress=progress, precision=enc_precision)
            new_cfg.update(shots=shots, augment=do_augment, coreset=bank_coreset,
                           bank_encoder=graphs["encoder"][1])
            log.info("memory bank: %d patches x %d from %d shots (features from the %s encoder)", bank.shape[0],
                     bank.shape[1], shots, graphs["encoder"][1])
            timings["bank"] = time.perf_counter() - t

        # -- write the new bundle (graphs, references, scorer config) to the staging folder, with
        # the still-valid engines
        t = time.perf_counter()
        staged = shots or int8 or dest != src.path
        if staged:
            bundle = _rewrite(src, tmp_dir / "bundle", graphs, new_cfg, bank, {
                "images": shot_hashes, "files": [p.name for p in shot_paths],
                "normal_dir": str(Path(normal_dir).absolute()), "shots": shots, "seed": int(seed),
                "augment": do_augment, "coreset": new_cfg.get("coreset"), "encoder": graphs["encoder"][1]}, tmp_dir)
        else:
            bundle = src  # thresholds only: one manifest update at the end
        engine_precision = None
        if int8 and backend == "tensorrt":  # the new Q/DQ graph has no engine yet: build it (and the scorer's)
            from ..runtime.tensorrt_engine import build_bundle_engines

            build_bundle_engines(bundle, "int8")
            engine_precision = "int8"
        timings["write"] = time.perf_counter() - t

        # -- score the held-out normals (and defects) on the production backend/precision
        t = time.perf_counter()
        with Detector(bundle, backend, threads=threads, threshold=float("inf"), precision=engine_precision,
                      weights=str(weights) if weights is not None else None) as det:
            precision = det.precision
            n_scores, n_maps = _score(det, pool, spec, progress, "scoring held-out normals")
            d_scores, d_maps = _score(det, [p for p, _ in defects], spec, progress, "scoring defects")
        timings["score"] = time.perf_counter() - t

        t = time.perf_counter()
        image, pixel = _fit(n_scores, n_maps, d_scores, d_maps, [m for _, m in defects], target_frr=target_frr,
                            method=method, target_recall=target_recall, pixel_quantile=pixel_quantile, seed=seed)
        for rec in (image, pixel):
            rec.backend, rec.precision = backend, precision
            rec.images = list(pool_hashes)
        image.defect_images = [sha256_file(p) for p, _ in defects]
        image.params.update(normal_dir=str(Path(normal_dir).absolute()), shots=shots, seed=int(seed))
        timings["fit"] = time.perf_counter() - t

        int8_info = None if int8_report is None else {k: v for k, v in int8_report.to_dict().items()
                                                      if k != "image_hashes"}
        if int8_info is None and any(precision == "int8" for _, precision in graphs.values()):
            # the INT8 encoder is kept, and so is its report (the station's bridge check reads its cosine)
            earlier = (src.extra.get("calibration") or {}).get("int8")
            int8_info = None if earlier is None else {**earlier, "carried": True}
        seconds = time.perf_counter() - t_start
        report = CalibrationReport(
            bundle=dest, seconds=seconds, threshold=image.value, pixel_threshold=pixel.value, method=method,
            target_frr=float(target_frr), frr_estimate=float(image.frr_estimate or 0.0),
            frr_ci=image.frr_ci or (0.0, 1.0), backend=backend, precision=precision, shots=shots,
            holdout=len(pool), defects=len(defects), pixel_method=pixel.method, miss_estimate=image.miss_estimate,
            miss_ci=image.miss_ci, int8=int8_info, timings=timings, normal_scores=[float(s) for s in n_scores],
            defect_scores=[float(s) for s in d_scores])
        bundle.update_manifest(thresholds={"image": image.to_manifest(), "pixel": pixel.to_manifest()},
                               extra={"calibration": {k: v for k, v in report.to_json().items()
                                                      if k not in ("bundle", "histogram")}})
        if staged:
            check_bundle_target(dest)  # still a bundle (or nothing) after the minutes this took
            swap_into_place(bundle.path, dest)
            bundle = Bundle.load(dest, verify=False)
    t = time.perf_counter()  # the figure is drawn after the bundle is ready; not part of `seconds`
    report.histogram = write_histogram(report, Path(histogram) if histogram else
                                       bundle.path.parent / f"{bundle.path.name}.calibration.png")
    report.timings["histogram"] = time.perf_counter() - t
    log.info("calibrated %s in %.1f s", bundle.path, report.seconds)
    return report


def quantize_on_normals(fp32_onnx: Path, out: Path, spec: Any, shot_batch: Optional[np.ndarray], augment: bool,
                        split: Split, *, preset: str, keep_float: Optional[str],
                        threads: Optional[int]) -> Any:
    """INT8 Q/DQ encoder calibrated on the (rotated) shots topped up with held-out normals; the
    feature cosine is reported on other held-out normals."""
    from .int8 import quantize_encoder, rebatch

    calib = _augmented(shot_batch, augment) if shot_batch is not None else np.zeros((0, 3, *spec.size), np.float32)
    extra = split.holdout[: max(0, INT8_CALIBRATION_IMAGES - len(calib))]
    if extra:
        calib = np.concatenate([calib, *_batches(extra, spec)])
    calib = calib[:INT8_CALIBRATION_IMAGES]
    check = split.holdout[len(extra):][-INT8_CHECK_IMAGES:] or split.holdout[-INT8_CHECK_IMAGES:]
    return quantize_encoder(fp32_onnx, out, rebatch(calib), preset=preset, keep_float=keep_float, threads=threads,
                            image_hashes=split.shot_hashes + split.holdout_hashes[: len(extra)],
                            eval_batches=list(_batches(check, spec)))


def _fit(n_scores: np.ndarray, n_maps: np.ndarray, d_scores: np.ndarray, d_maps: np.ndarray,
         masks: list[Optional[Path]], *, target_frr: float, method: str, target_recall: float,
         pixel_quantile: float, seed: int) -> tuple[th.ThresholdRecord, th.ThresholdRecord]:
    """Image threshold, then the region threshold (pixel F1 when every defect has a mask)."""
    image = th.fit_image_threshold(n_scores, target_frr, defect_scores=d_scores if len(d_scores) else None,
                                   method=method, target_recall=target_recall, seed=seed)
    mask_arr = None
    if masks and all(m is not None for m in masks):
        mask_arr = np.stack([read_mask(m, d_maps.shape[1:]) for m in masks])
    pixel = th.fit_pixel_threshold(n_maps, defect_maps=d_maps if mask_arr is not None else None,
                                   defect_masks=mask_arr, quantile=pixel_quantile, image_threshold=image.value,
                                   seed=seed)
    return image, pixel


def _rewrite(src: Bundle, dest: Path, graphs: dict[str, tuple[Path, str]], scorer: dict[str, Any],
             bank: Optional[np.ndarray], bank_provenance: dict[str, Any], tmp_dir: Path) -> Bundle:
    """Write `dest` atomically from `src` with replaced graphs/bank; engines of unchanged graphs follow."""
    engines = _stash_engines(src, tmp_dir)
    bank_name = (src.scorer.get("references") or {}).get("bank")
    with BundleWriter(dest, backbone=src.backbone, scorer=scorer, extra=src.extra) as w:
        own = {src.graph_path(role): role for role in src.graphs}
        for role, (path, precision) in graphs.items():
            if path in own:  # unchanged: copied by its manifest entry (no `onnx` on a station)
                w.copy_graph(role, src, own[path], precision)
            else:
                w.add_graph(role, path, precision=precision)
        for name, entry in src.references.items():
            if bank is not None and name == bank_name:
                w.add_array(name, bank, provenance=bank_provenance)
            else:
                w.add_array(name, src.array(name), provenance=entry.get("provenance"))
    if w.bundle is None:  # pragma: no cover - commit either sets it or raises
        raise CalibrationError(f"bundle {dest} was not written")
    _restore_engines(w.bundle, engines)
    return w.bundle


def _score(det: Any, paths: Sequence[Path], spec: Any, progress: bool, desc: str) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = [], []
    total = (len(paths) + BATCH - 1) // BATCH
    for batch in _progress(_batches(paths, spec), progress, desc, total):
        m, s, _ = det.score_batch(batch)
        scores.append(np.asarray(s, np.float32))
        maps.append(np.asarray(m, np.float32))
    if not scores:
        h, w = spec.size
        return np.zeros(0, np.float32), np.zeros((0, h, w), np.float32)
    return np.concatenate(scores), np.concatenate(maps)


def _stash_engines(src: Bundle, tmp_dir: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """Copy the bundle's engine files aside (a rewrite in place would drop them)."""
    out = []
    for key, entry in src.engines.items():
        path = src.engine_path(key)
        if not path.is_file():
            continue
        keep = tmp_dir / "engines" / path.name
        keep.parent.mkdir(exist_ok=True)
        shutil.copy2(path, keep)
        out.append((key, keep, entry))
    return out


def _restore_engines(bundle: Bundle, engines: list[tuple[str, Path, dict[str, Any]]]) -> None:
    """Re-list engines whose source graph is unchanged; engines of a replaced graph are dropped."""
    graphs = bundle.graphs
    shas = {g["sha256"] for g in graphs.values()}
    for key, path, entry in engines:
        source_sha = entry.get("source_sha256")
        if source_sha is not None and source_sha not in shas:
            log.warning("dropped TensorRT engine %s: its graph was replaced; rebuild with `iadgpt build %s`",
                        key, bundle.path)
            continue
        info = {k: v for k, v in entry.items() if k not in ("file", "sha256", "precision", "trt_version",
                                                          "compute_capability")}
        bundle.add_engine(key, path, precision=entry.get("precision", "fp16"),
                          trt_version=entry.get("trt_version", ""),
                          compute_capability=entry.get("compute_capability", ""), **info)


# --------------------------------------------------------------------------- report figure


def write_histogram(report: CalibrationReport, path: Path) -> Optional[Path]:
    """Held-out normal (and defect) image scores with the threshold: what the line will see. None
    without matplotlib (a station install): the thresholds do not need the picture."""
    try:
        import matplotlib
    except ImportError:
        log.warning("score histogram not drawn: matplotlib is not installed here (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    normal = np.asarray(report.normal_scores)
    defect = np.asarray(report.defect_scores)
    both = np.concatenate([normal, defect]) if defect.size else normal
    bins = np.linspace(float(both.min()), float(max(both.max(), report.threshold)) * 1.02 + 1e-9, 50)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.hist(normal, bins=bins, alpha=0.7, label=f"held-out normal ({len(normal)})", color="tab:blue")
    if defect.size:
        ax.hist(defect, bins=bins, alpha=0.6, label=f"defective ({len(defect)})", color="tab:red")
    ax.axvline(report.threshold, color="k", ls="--", lw=1.2,
               label=f"threshold {report.threshold:.4g} (FRR {100 * report.frr_estimate:.2f}%)")
    ax.set_xlabel(f"image score ({report.backend}/{report.precision})")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if not path.suffix:  # matplotlib would add .png itself: report the file that exists
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
