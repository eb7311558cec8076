#!/usr/bin/env python3
"""Where the description says a real defect is: the measured facts (runtime/facts.py, no LLM; what
every description states first) against the labelled masks of a dataset's test split.

    python benchmarks/facts_position.py --data ../shared/data/mvtec_ad --category bottle --bundle B --json F

Each defective test image goes through the bundle's detector at its calibrated threshold, as on
the station. For a flagged image the description's main region (the largest measured one) is
compared with the largest labelled region: its 3x3 cell on the part's box (the words the
description uses), the cell on the whole frame (what `benchmarks/bridge.py` scores), and whether
the main region's box touches the labelled region. A defect the detector passes has no
description: it is counted as missed, and the position shares are given both over the flagged
images and over all defects. A defective image whose mask is empty cannot be placed: it is counted
apart (`unlabelled`) and left out of both.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iadgpt.cli import run_reporting_errors, writable_output  # noqa: E402


def judge(facts: Any, truth: np.ndarray) -> dict[str, Any]:
    """One flagged defect: does the description's main region sit where the largest labelled one is?"""
    from iadgpt.runtime.facts import grid_position

    w, h = facts.frame_size
    main = facts.main
    ys, xs = np.nonzero(truth)
    cx, cy = float(xs.mean()), float(ys.mean())
    said_part = None if main is None else main.position
    said_frame = None if main is None else grid_position(*main.centroid, (0, 0, w, h))[2]
    overlap = False
    if main is not None:
        x0, y0, x1, y1 = main.box
        overlap = bool(truth[y0:y1, x0:x1].any())
    return {"truth_part": grid_position(cx, cy, facts.part_box)[2], "said_part": said_part,
            "truth_frame": grid_position(cx, cy, (0, 0, w, h))[2], "said_frame": said_frame,
            "box_overlaps_defect": overlap}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="dataset root holding <category>/test and ground_truth")
    ap.add_argument("--category", required=True)
    ap.add_argument("--bundle", required=True, type=Path, help="a calibrated bundle (its threshold flags the parts)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the summary and every image's row here")
    args = ap.parse_args(argv)
    if args.json is not None:
        writable_output(args.json)

    from tqdm import tqdm

    from iadgpt.bundle import Bundle
    from iadgpt.data import load_split, read_image, read_mask
    from iadgpt.errors import DataError
    from iadgpt.runtime.detector import Detector
    from iadgpt.runtime.facts import facts_from_verdict, largest_component
    from iadgpt.runtime.sources import Frame

    samples = [s for s in load_split(args.data, args.category, "test") if s.label]
    if not samples:
        raise DataError(f"{args.data}/{args.category}/test: no defective images; give a dataset root with "
                        "test/<defect type>/ and ground_truth/<defect type>/ folders")
    rows = []
    with Detector(Bundle.load(args.bundle), "onnxruntime", threads=args.threads) as det:
        for i, s in enumerate(tqdm(samples, desc="defects", unit="img")):
            image = read_image(s.path)
            truth = largest_component(read_mask(s, image.shape))
            row: dict[str, Any] = {"image": f"{s.defect_type}/{s.path.name}"}
            verdict = det.detect(Frame(image=image, frame_id=i, timestamp=0.0, source=str(s.path)))
            row["flagged"] = bool(verdict.anomalous)
            row["labelled"] = truth is not None
            if verdict.anomalous and truth is not None:
                row.update(judge(facts_from_verdict(verdict, image), truth))
            rows.append(row)
    judged = [r for r in rows if "truth_part" in r]
    n = sum(r["labelled"] for r in rows)

    def share(key_a: str, key_b: str) -> dict[str, Optional[float]]:
        hits = sum(r[key_a] == r[key_b] for r in judged)
        return {"of_flagged": hits / len(judged) if judged else None, "of_defects": hits / n if n else None}

    summary = {"category": args.category, "bundle": str(args.bundle), "defects": n,
               "unlabelled": len(rows) - n, "flagged": sum(r["flagged"] for r in rows if r["labelled"]),
               "judged": len(judged),
               "position_on_part": share("said_part", "truth_part"),
               "position_on_frame": share("said_frame", "truth_frame"),
               "box_overlaps_defect": (sum(r["box_overlaps_defect"] for r in judged) / len(judged)
                                       if judged else None)}
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print(f"{args.category}: {summary['flagged']}/{n} defects flagged; main region's 3x3 cell right: on the part "
          f"{pct(summary['position_on_part']['of_flagged'])} of flagged ({pct(summary['position_on_part']['of_defects'])} "
          f"of all defects), on the frame {pct(summary['position_on_frame']['of_flagged'])}; its box touches the "
          f"labelled region on {pct(summary['box_overlaps_defect'])}")
    if args.json is not None:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
