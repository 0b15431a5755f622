"""Real photographs (scikit-image ships them) as detector inputs, as .npz files: calibration and held-out.

    python tools/photos.py --size 320 --out calib.npz --heldout heldout.npz --input images

The photos and how they are cut are in models/data.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.data import (  # noqa: E402, F401
    CALIBRATION,
    HELD_OUT,
    detection_heldout,
    face_mosaics,
    lfw_mosaics,
    photo,
    samples,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--input", default="images", help="the model's input name")
    parser.add_argument("--crops", type=int, default=3)
    parser.add_argument("--out", required=True, help="calibration .npz")
    parser.add_argument("--heldout", help="held-out .npz")
    args = parser.parse_args()
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
