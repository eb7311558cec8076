"""`iadgpt synth`: a grid of NSA synthetic anomalies from a folder of normal images, to check by eye."""
from __future__ import annotations

import argparse
from pathlib import Path

GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # formats cv2.imwrite always writes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a grid of NSA synthetic anomalies (the training data of the decoder)")
    p.add_argument("--train-dir", required=True, type=Path, help="folder of normal images (e.g. <category>/train/good)")
    p.add_argument("--n", type=int, default=16, help="number of samples in the grid")
    p.add_argument("--out", required=True, type=Path, help="PNG to write")
    p.add_argument("--kind", choices=("auto", "object", "texture"), default="auto",
                   help="object: patches on the part's foreground only; texture: anywhere; auto: guess")
    p.add_argument("--size", type=int, default=224, help="synthesis resolution in px (the training input size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cols", type=int, default=4)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import cv2

    from ..bundle import InputSpec
    from ..data import IMAGE_EXTENSIONS, read_image
    from ..errors import DataError
    from ..models.synth import NSASynthesizer, synth_grid
    from ..runtime.preprocess import resize_frame

    if args.n < 1:
        raise DataError(f"--n {args.n}: ask for at least one sample")
    if args.cols < 1:
        raise DataError(f"--cols {args.cols}: give an integer >= 1 (cells per grid row)")
    if args.size < 1:
        raise DataError(f"--size {args.size}: give the synthesis resolution in px, an integer >= 1 (e.g. 224)")
    # cv2.imwrite picks its encoder by suffix: anything else fails only after the synthesis.
    if args.out.suffix.lower() not in GRID_SUFFIXES:
        raise DataError(f"--out {args.out}: the grid is an image; end the name in one of "
                        f"{', '.join(GRID_SUFFIXES)} (e.g. grid.png)")
    if args.out.is_dir():
        raise DataError(f"--out {args.out} is a folder; give a file name such as {args.out / 'grid.png'}")
    spec = InputSpec((args.size, args.size), (0.0,) * 3, (1.0,) * 3, resize="area")
    if not args.train_dir.is_dir():
        raise DataError(f"{args.train_dir}: no such folder; pass a folder of normal images (<category>/train/good)")
    paths = sorted(p for p in args.train_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"{args.train_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    try:  # before the synthesis, so that a bad --out folder fails fast
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--out {args.out}: cannot create its folder ({exc}); choose a writable path") from exc
    images = [resize_frame(read_image(p), spec) for p in paths]
    synth = NSASynthesizer(images, kind=args.kind)
    grid = synth_grid(synth, args.n, seed=args.seed, cols=args.cols)
    if not cv2.imwrite(str(args.out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise DataError(f"cannot write {args.out}; use a .png path in a writable folder")
    print(f"{args.out}: {args.n} NSA samples ({synth.config.kind}) from {len(images)} images in {args.train_dir}; "
          "green = binary mask (label > 0.3), yellow = pasted patch, right = soft label")
    return 0
