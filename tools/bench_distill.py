"""Distillation of a factorized YOLOv8n (`nudenet`) towards the original on real photos: held-out error
(and detection agreement) before and after.

    python tools/bench_distill.py --params 0.4 --lr 3e-4 --steps 3000 --only-lowrank --map --json docs/bench_distill_6.json

Student: `compress --params F` calibrated on the calibration photos. Training data: a folder of
scikit-image photos (the calibration ones and others not held out, at full size) and LFW mosaics of
faces 0..49 (and with --nonfaces of LFW's non-face images 100..199), augmented by edgelr.train.data
(`--augment strong`: random crops from 5% to all of a photo, letterboxed views, 2x2 mosaics, colour,
hue and greyscale, mixup; every step sees new views). Evaluation on the held-out photos
(models/data.py), and with --map the detection agreement mAP@0.5 on models.data.detection_heldout,
as tools/bench_yolo.py measures it. Never trained on: the held-out photos, LFW faces 50..99.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgelr import (
    FactorizeConfig,  # noqa: E402
    compress,
)
from edgelr.train.data import Augment  # noqa: E402
from edgelr.train.distill import DistillConfig, distill  # noqa: E402
from edgelr.train.losses import weights_outside_pairs  # noqa: E402
from models.data import (  # noqa: E402
    CALIBRATION,
    HELD_OUT,
    detection_heldout,
    samples,
    training_folder,
    yolo_path,
)
from tools.bench_yolo import _channel_errors  # noqa: E402

HEAD = ["/model.22/Concat_output_0", "/model.22/Concat_1_output_0", "/model.22/Concat_2_output_0"]



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=0.4)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    trains = parser.add_mutually_exclusive_group()
    trains.add_argument("--only-lowrank", action="store_true", help="train only the factorized pairs' weights")
    trains.add_argument("--others-lr", type=float, metavar="F",
                        help="train every weight, those outside the factorized pairs at F x --lr")
    parser.add_argument("--whole-outputs", action="store_true", help="scale each output whole, not each channel group")
    parser.add_argument("--features", action="store_true", help="also align YOLO's head logits")
    parser.add_argument("--align-factorized", type=float, metavar="W",
                        help="also align every factorized pair's output with the original layer's (weight W each)")
    parser.add_argument("--score-weight", type=float, default=0.0,
                        help="compare the class scores (channels 4..) by binary KL with this weight (0: squared error)")
    parser.add_argument("--no-extra", action="store_true", help="train on the calibration photos and faces only")
    parser.add_argument("--nonfaces", action="store_true", help="also LFW's non-face images 100..199, as mosaics")
    parser.add_argument("--augment", choices=["strong", "light", "none"], default="light",
                        help="edgelr.train.data's augmentation: strong (crops, mosaics, colour, mixup), light, none")
    parser.add_argument("--tint", type=float, help="--augment strong's colour cast (edgelr.train.data.Augment.tint; 0: none)")
    parser.add_argument("--train-precision", choices=["fp32", "bf16"], default="fp32",
                        help="the training compute: the student's forward pass")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole distill call: it stops past this, "
                        "its learning rate decayed to 0 by then (anneal_by_time); give more --steps than fit")
    parser.add_argument("--map", action="store_true", help="also detection agreement mAP@0.5, before and after")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    os.environ["EDGELR_TORCH_THREADS"] = str(args.threads)
    os.environ["EDGELR_ORT_THREADS"] = str(args.threads)
    source = yolo_path()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("EDGELR_CACHE", str(tmp / "cache"))
        np.savez(tmp / "calib.npz", images=samples(CALIBRATION, 320, 3, seed=0))
        np.savez(tmp / "heldout.npz", images=samples(HELD_OUT, 320, 3, seed=1))
        (tmp / "train").mkdir()
        images = training_folder(tmp / "train", not args.no_extra, args.nonfaces)
        t0 = time.perf_counter()
        compress(source, tmp / "student.onnx", FactorizeConfig(params=args.params), calib=tmp / "calib.npz", progress=False)
        compress_seconds = time.perf_counter() - t0
        freeze = ["*dfl*"]  # the DFL conv's fixed arange weights
        lr_scale = None
        if args.only_lowrank:
            freeze += weights_outside_pairs(tmp / "student.onnx")
        elif args.others_lr is not None:
            lr_scale = dict.fromkeys(weights_outside_pairs(tmp / "student.onnx"), args.others_lr)
        features, feature_weight = ([(f, f) for f in HEAD], 1.0) if args.features else (None, None)
        if args.align_factorized:  # every factorized pair towards the layer it replaced
            features, feature_weight = "factorized", args.align_factorized
        augment = args.augment
        if args.augment == "strong" and args.tint is not None:
            augment = Augment(tint=args.tint)
        config = DistillConfig(steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed, freeze=freeze,
                               lr_scale=lr_scale or (), by_group=not args.whole_outputs, features=features,
                               feature_weight=feature_weight, augment=augment,
                               scores=(4, None) if args.score_weight else None, score_weight=args.score_weight or 1.0,
                               train_precision=args.train_precision, time_limit=args.time_limit,
                               anneal_by_time=args.time_limit is not None, device="cpu")
        done = distill(source, tmp / "student.onnx", tmp / "train", tmp / "tuned.onnx", config,
                       eval_samples=tmp / "heldout.npz", progress=False)
        load_after = os.getloadavg()
        from edgelr.io.model import load
        from edgelr.io.samples import load_samples

        heldout = load_samples(tmp / "heldout.npz", load(source))
        channels = {name: _channel_errors(source, tmp / f"{name}.onnx", heldout) for name in ("student", "tuned")}
        detection = None
        if args.map:
            from edgelr.io.samples import samples_from_arrays
            from edgelr.measure.detection import detection_agreement

            scenes = samples_from_arrays({"images": detection_heldout()}, load(source))
            found = {name: detection_agreement(source, tmp / f"{name}.onnx", scenes) for name in ("student", "tuned")}
            detection = {"map50_before": found["student"]["map50"], "map50_after": found["tuned"]["map50"],
                         "per_class_before": found["student"]["per_class"], "per_class_after": found["tuned"]["per_class"],
                         "reference_detections": found["tuned"]["reference_detections"]}
    result = {"command": "python tools/bench_distill.py " + shlex.join(sys.argv[1:]), "settings": vars(args),
              "training_images": images, "compress_seconds": compress_seconds, "steps": done["steps"],
              "stopped_early": done["stopped_early"], "seconds": done["seconds"],
              "teacher_seconds_per_step": done["teacher_seconds_per_step"],
              "student_seconds_per_step": done["student_seconds_per_step"],
              "data_seconds_per_step": done["data_seconds_per_step"],
              "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
              "first_loss": done["losses"][0][1] if done["losses"] else None, "final_loss": done["final_loss"],
              "heldout_error_before": done["error_before"]["worst"], "heldout_error_after": done["error_after"]["worst"],
              "heldout_by_channel_before": channels["student"], "heldout_by_channel_after": channels["tuned"]}
    if detection is not None:
        result.update(detection)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
