"""Distillation of a factorized YOLOv8n (`nudenet`) towards the original on real photos: held-out error
before and after.

    python tools/bench_distill.py --params 0.4 --lr 1e-5 --steps 300 --only-lowrank --json docs/bench_distill.json

Student: `compress --params F` calibrated on the calibration photos. Training data: a folder of
scikit-image photos (the calibration ones and others not held out) and LFW face mosaics of faces
0..49, augmented by edgelr.distill; evaluation on the held-out photos (tools/photos.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgelr import FactorizeConfig, compress  # noqa: E402
from edgelr.distill import distill  # noqa: E402
from tools.bench_yolo import yolo_path  # noqa: E402
from tools.photos import CALIBRATION, HELD_OUT, face_mosaics, photo, samples  # noqa: E402

# scikit-image photos in neither CALIBRATION nor HELD_OUT (files inside the package)
EXTRA = ["motorcycle_left.png", "motorcycle_right.png", "horse.png", "clock_motion.png", "logo.png", "color.png",
         "microaneurysms.png", "phantom.png", "chessboard_RGB.png"]
HEAD = ["/model.22/Concat_output_0", "/model.22/Concat_1_output_0", "/model.22/Concat_2_output_0"]


def training_folder(folder: Path, extra: bool) -> int:
    import skimage
    from PIL import Image

    for name in CALIBRATION:
        Image.fromarray(photo(name)).save(folder / f"{name}.png")
    for grid in (2, 3, 4):
        for i, mosaic in enumerate(face_mosaics(slice(0, 50), grid, 320)):
            Image.fromarray((mosaic.transpose(1, 2, 0) * 255).astype(np.uint8)).save(folder / f"faces{grid}_{i}.png")
    if extra:
        base = Path(skimage.__file__).parent / "data"
        for name in EXTRA:
            Image.open(base / name).convert("RGB").save(folder / name)
    (folder / "preprocess.json").write_text(json.dumps({"size": 320}))
    return len(list(folder.glob("*.png")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=0.4)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--only-lowrank", action="store_true", help="train only the factorized pairs' weights")
    parser.add_argument("--per-channel", action="store_true", help="normalise the loss per output channel")
    parser.add_argument("--features", action="store_true", help="also align YOLO's head logits")
    parser.add_argument("--no-extra", action="store_true", help="train on the calibration photos and faces only")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    source = yolo_path()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("EDGELR_CACHE", str(tmp / "cache"))
        np.savez(tmp / "calib.npz", images=samples(CALIBRATION, 320, 3, seed=0))
        np.savez(tmp / "heldout.npz", images=samples(HELD_OUT, 320, 3, seed=1))
        (tmp / "train").mkdir()
        images = training_folder(tmp / "train", not args.no_extra)
        compress(source, tmp / "student.onnx", FactorizeConfig(params=args.params), calib=tmp / "calib.npz", progress=False)
        freeze = ["*dfl*"]  # the DFL conv's fixed arange weights
        if args.only_lowrank:
            import onnx

            student = onnx.load(str(tmp / "student.onnx"), load_external_data=False)
            freeze += [t.name for t in student.graph.initializer if "lowrank" not in t.name]
        done = distill(source, tmp / "student.onnx", tmp / "train", tmp / "tuned.onnx", steps=args.steps, lr=args.lr,
                       freeze=freeze, per_channel=args.per_channel,
                       features=[(f, f) for f in HEAD] if args.features else None,
                       eval_samples=tmp / "heldout.npz", progress=False)
    result = {"settings": vars(args), "training_images": images, "steps": done["steps"],
              "seconds": done["seconds"], "teacher_seconds_per_step": done["teacher_seconds_per_step"],
              "student_seconds_per_step": done["student_seconds_per_step"],
              "first_loss": done["losses"][0][1] if done["losses"] else None, "final_loss": done["final_loss"],
              "heldout_error_before": done["error_before"]["all"], "heldout_error_after": done["error_after"]["all"]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
