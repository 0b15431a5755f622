"""Real photographs (scikit-image ships them) as detector inputs, as .npz files: calibration and held-out.

    python tools/photos.py --size 320 --out calib.npz --heldout heldout.npz --input images
    python tools/photos.py --images photos/        # training images for edgelr distill, as PNG files

The photos and how they are cut are in models/data.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.data import CALIBRATION, HELD_OUT, samples, training_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--input", default="images", help="the model's input name")
    parser.add_argument("--crops", type=int, default=3)
    parser.add_argument("--out", help="calibration .npz")
    parser.add_argument("--heldout", help="held-out .npz")
    parser.add_argument("--images", metavar="DIR", help="a new folder of training images for edgelr distill (no held-out photo)")
    args = parser.parse_args()
    if not (args.out or args.heldout or args.images):
        parser.error("say what to write: --out, --heldout and/or --images")
    if args.images:
        folder = Path(args.images)
        if folder.exists() and any(folder.iterdir()):
            sys.exit(f"{folder}: not empty; give a new folder (nothing is overwritten)")
        folder.mkdir(parents=True, exist_ok=True)
        print(f"wrote {training_folder(folder, extra=True)} training images to {folder}")
    for path, names, seed in ((args.out, CALIBRATION, 0), (args.heldout, HELD_OUT, 1)):
        if path is None:
            continue
        if Path(path).exists():
            sys.exit(f"{path}: exists; pick another name (nothing is overwritten)")
        arrays = samples(names, args.size, args.crops, seed=seed)
        np.savez(path, **{args.input: arrays})
        print(f"wrote {path}: {len(arrays)} samples of {len(names)} photos, '{args.input}' {list(arrays.shape)}")


if __name__ == "__main__":
    main()
