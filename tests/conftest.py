"""Shared fixtures: tiny real bundles built once per session from synthetic parts (no data needed)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from iadgpt.runtime.synthetic import SyntheticProduct

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_SIZE = 128  # px of the synthetic frames and the network input: keeps exports to seconds


def write_parts(folder: Path, n: int, seed: int, size: int = TINY_SIZE) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    product = SyntheticProduct(kind="part", size=size, seed=seed, defect_rate=0.0)
    paths = []
    for i in range(n):
        p = folder / f"good_{i:03d}.png"
        cv2.imwrite(str(p), cv2.cvtColor(product.sample(i).image, cv2.COLOR_RGB2BGR))
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory) -> Path:
    """An efficientnet-lite0 memory-bank bundle at 128 px with a quantile threshold on held-out normals."""
    from iadgpt.export.bundle_export import export_bundle
    from iadgpt.runtime.detector import Detector
    from iadgpt.runtime.preprocess import to_batch

    root = tmp_path_factory.mktemp("tiny")
    train = root / "train"
    write_parts(train, 10, seed=11)
    bundle, _ = export_bundle("efficientnet-lite0", train, root / "bundle", shots=0, resolution=TINY_SIZE,
                              progress=False)
    holdout = SyntheticProduct(kind="part", size=TINY_SIZE, seed=12, defect_rate=0.0)
    with Detector(bundle, "onnxruntime", threshold=float("inf")) as det:
        scores = det.score_batch(to_batch([holdout.sample(i).image for i in range(16)], bundle.input_spec))[1]
    bundle.update_manifest(thresholds={"image": {"value": float(np.max(scores)), "method": "max", "n_images": 16,
                                                 "backend": "onnxruntime", "precision": "fp32"}})
    return bundle.path


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch intra-op thread: on a shared 2-core box every multi-threaded op waits for a
    descheduled thread (~20 ms per op under load); one thread keeps tiny-model tests at seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
