"""Detector recipe: compress -> distill -> quantize -> verify, for the YOLOv8n that `nudenet` ships.

    python models/yolov8n.py --latency 0.5 --quantize int8 --minutes 25 --out runs/yolov8n

1. compress: factorize against the budget (with --quantize, the latency search times INT8 kernels and
   picks which layers stay in float); the float model before quantization is kept for training.
2. distill: the float student learns the original's outputs on unlabeled, augmented real photos
   (scikit-image's, LFW faces 0..49, LFW non-face crops and the detector calibration set's photos of
   people; never a held-out one), each output's channel groups (boxes, class scores) on their own
   scale, each factorized pair aligned with the layer it replaced; with --quantize,
   quantization-aware (Conv inputs rounded as INT8 will round them).
3. quantize: the distilled student, calibrated on the same photos as step 1, with the same layers
   left in float.
4. verify, on the held-out photos of people (tools/photos.py --detector): each output group's error and
   the detection metric against the original (mAP@0.5 agreement, top-class agreement, class-score
   error, detections kept), for the post-training model and the distilled one, beside ONNX Runtime's
   INT8 of the original, all of them timed interleaved (ONNX Runtime CPU, 1 thread).

Steps 1 and 2-3 are the shipped recipes recipes/yolov8n-latency50-int8.yaml (its budget replaced by
--params or --latency) and recipes/yolov8n-distill-int8.yaml (its teacher, photos, time limit and
options filled in from the flags), each run by edgelr.compress. Everything lands in --out: the models
and `recipe.json` with every number.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgelr import compress
from edgelr.io.model import load
from edgelr.io.samples import load_samples
from edgelr.measure.latency import interleaved_latency
from edgelr.measure.task import recognise
from edgelr.measure.verify import judge, output_error
from edgelr.passes.factorize import FactorizeConfig
from edgelr.passes.quantize import QuantizeConfig, quantize
from edgelr.recipe import load_recipe
from edgelr.train.distill import DistillConfig
from models.data import (
    detector_calibration,
    detector_heldout,
    training_folder,
    yolo_path,
)

RECIPES = ROOT / "recipes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--params", type=float, help="keep this fraction of the factorizable parameters")
    budget.add_argument("--latency", type=float, help="keep this fraction of the fp32 model's CPU latency")
    parser.add_argument("--quantize", choices=["int8"], help="quantize the distilled student (static INT8)")
    parser.add_argument("--minutes", type=float, default=25.0, help="distillation time limit")
    parser.add_argument("--steps", type=int, default=100_000, help="distillation steps (the time limit usually ends it first)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-all", action="store_true",
                        help="train every weight (default: only the factorized pairs, which generalised better)")
    parser.add_argument("--no-qat", action="store_true",
                        help="with --quantize, train in float (default: quantization-aware, rounding as INT8 will)")
    parser.add_argument("--no-align", action="store_true",
                        help="outputs only (default: also align every factorized pair with the layer it replaced)")
    parser.add_argument("--out", type=Path, required=True, help="a new or empty folder for the models and recipe.json")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    args = parser.parse_args()
    if args.params is None and args.latency is None:
        args.params = 0.4
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out}: not empty; give a new folder (nothing is overwritten)")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    teacher = yolo_path()
    started = time.perf_counter()

    np.savez(out / "calib.npz", images=detector_calibration())
    np.savez(out / "heldout.npz", images=detector_heldout())
    (out / "train").mkdir()
    training_folder(out / "train", True, nonfaces=True, people=True)

    # 1. compress (the float model is what distillation trains)
    budget = FactorizeConfig(params=args.params) if args.params is not None else FactorizeConfig(latency=args.latency)
    first = [budget if isinstance(c, FactorizeConfig) else c for c in load_recipe(RECIPES / "yolov8n-latency50-int8.yaml").passes
             if args.quantize or not isinstance(c, QuantizeConfig)]
    student = out / "student.float.onnx"
    if args.quantize:
        done = compress(teacher, out / "student.ptq.onnx", first, calib=out / "calib.npz", float_output=student,
                        metric="none", max_output_error=math.inf)  # judged in step 4, after distillation
    else:
        done = compress(teacher, student, first, calib=out / "calib.npz", metric="none", max_output_error=math.inf)
    keep_float = done.result.keep_float

    # 2. distill, 3. quantize with the same layers left in float, calibrated on the same photos as step 1
    tuning, quantizing = load_recipe(RECIPES / "yolov8n-distill-int8.yaml").passes
    tuning = replace(tuning, teacher=str(teacher), data=str(out / "train"), steps=args.steps, lr=args.lr,
                     time_limit=args.minutes * 60, pairs_only=not args.train_all,
                     features=None if args.no_align else "factorized",
                     quantization_aware=bool(args.quantize) and not args.no_qat, checkpoint=str(out / "distill.ckpt"))
    assert isinstance(tuning, DistillConfig)
    if args.quantize:
        trained = compress(student, out / "distilled.int8.onnx", [tuning, replace(quantizing, keep_float=tuple(keep_float))],
                           calib=out / "calib.npz", float_output=out / "distilled.float.onnx", metric="none", max_output_error=math.inf)
    else:
        trained = compress(student, out / "distilled.float.onnx", [tuning], calib=out / "calib.npz", metric="none", max_output_error=math.inf)
    models = {"original": teacher}
    calib = load_samples(out / "calib.npz", load(teacher))
    if args.quantize:
        quantize(teacher, out / "original.int8.onnx", args.quantize, calib)
        models |= {"int8_only": out / "original.int8.onnx", "post_training": out / "student.ptq.onnx",
                   "distilled": out / "distilled.int8.onnx"}
    else:
        models |= {"post_training": student, "distilled": out / "distilled.float.onnx"}

    # 4. verify on held-out photos of people
    heldout = load_samples(out / "heldout.npz", load(teacher))
    task = recognise(load(teacher), "detect")
    rows = {}
    for name, path in models.items():
        if name == "original":
            continue
        verdict = judge(teacher, path, heldout, task)
        rows[name] = {"heldout_error": verdict.errors["worst"], "errors": verdict.errors} | verdict.to_json()
    times = interleaved_latency(models, heldout.feed(0), rounds=args.rounds)
    for name, row in rows.items():
        row["speedup_over_fp32"] = times["original"] / times[name]
        if "int8_only" in times:
            row["speed_over_int8_only"] = times["int8_only"] / times[name]
            for key in ("heldout_error", "class_score_error"):
                row[f"{key}_over_int8_only"] = row[key] / rows["int8_only"][key]
    report = {
        "command": " ".join(sys.argv),
        "budget": {"params": args.params, "latency": args.latency, "quantize": args.quantize},
        "kept_float": keep_float,
        "factorized_layers": len(done.result.factorized),
        "recipes": {"compress": [c.to_dict() for c in first], "distill_quantize": trained.passes},
        "distillation": trained.distilled
        | {"training_images": len(list((out / "train").glob("*.png"))),
           "heldout_error_before": output_error(teacher, student, heldout)["worst"],
           "heldout_error_after": output_error(teacher, out / "distilled.float.onnx", heldout)["worst"]},
        "latency_ms": {k: v * 1e3 for k, v in times.items()},
        "models": rows,
        "seconds": time.perf_counter() - started,
    }
    (out / "recipe.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
