"""Distil a reduced fusion detector (models/fusion.py) towards the one tools/train_fusion.py trained, on CPU, with
edgelr.train.structured's losses (DLRMamba's: task, SVD, state, feature).

    python tools/distill_fusion.py --teacher runs/fusion/fusion.pt --minutes 20 --out runs/fusion-distill --ablation

The student is the teacher with every SS2D block reduced on calibration scenes (edgelr.train.structured
.reduced_copy): --states per direction, --width-fraction of the inner channels, in_proj and out_proj factorized
to --params of their parameters. It trains on fresh scenes from the training stream (each variant the same
scenes, none held out), for --minutes. --ablation adds, each for the same time from the same reduced student:
task loss only (no distillation), and each of the four terms off in turn. Reported per model: held-out mAP@0.5
(models.fusion.map50 on models.fusion_data.held_out, as tools/train_fusion.py measures it) and ONNX Runtime
latency, 1 thread, timed interleaved with the teacher (edgelr.measure.latency.interleaved_latency), as a ratio
to the teacher's. Writes to --out: distill.json, the ONNX files, and the distilled student's state dict.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgelr.measure.latency import interleaved_latency
from edgelr.train.lowrank import export_onnx
from edgelr.train.structured import (
    TERMS,
    StructuredDistillConfig,
    distill_ss2d,
    reduced_copy,
)
from models.fusion import FusionDetector, detection_loss
from models.fusion_data import batch, training_rng
from tools.train_fusion import CONFIGS, evaluate

DEFAULT_WEIGHTS = {"task": 1.0, "svd": 0.5, "state": 0.1, "feat": 1.5}
CALIBRATION_SEED_OFFSET = 7919  # the calibration scenes come from a training stream of their own


def variants(ablation: bool, baseline: bool = False) -> dict[str, dict[str, float]]:
    """Variant name -> term weights: the full loss; with --baseline or --ablation the task loss alone; with
    --ablation each term off in turn."""
    found = {"distilled": DEFAULT_WEIGHTS}
    if ablation or baseline:
        found["task only (no distillation)"] = {**DEFAULT_WEIGHTS, "svd": 0.0, "state": 0.0, "feat": 0.0}
    if ablation:
        found.update({f"no {term}": {**DEFAULT_WEIGHTS, term: 0.0} for term in TERMS})
    return found


def scenes(seed: int, count: int, size: int):
    """Fresh training scenes, batch after batch, as (rgb, thermal, truths)."""
    rng = training_rng(seed)
    while True:
        rgb, thermal, truths = batch(rng, count, size)
        yield torch.from_numpy(rgb), torch.from_numpy(thermal), truths


def task_loss(model, scene_batch):
    return detection_loss(model, *scene_batch)


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def teacher_config(path: Path, chosen: str | None) -> str:
    """--config, else the one the teacher's record names (NAME.train.json or train.json beside it), else 'default'."""
    if chosen:
        return chosen
    for record in (path.with_suffix(".train.json"), path.parent / "train.json"):
        if record.is_file():
            return json.loads(record.read_text()).get("config", {}).get("name", "default")
    return "default"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="fusion.pt written by tools/train_fusion.py")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="the teacher's (default: from its train.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for distill.json and the ONNX files")
    parser.add_argument("--minutes", type=float, default=10.0, help="training time of each variant")
    parser.add_argument("--ablation", action="store_true", help="also task loss only, and each term off in turn")
    parser.add_argument("--baseline", action="store_true", help="also task loss only (the student undistilled)")
    parser.add_argument("--states", type=int, default=8, help="states kept per direction")
    parser.add_argument("--width-fraction", type=float, default=0.67, help="inner channels kept, a fraction")
    parser.add_argument("--params", type=float, default=0.5, help="in_proj / out_proj parameters kept, a fraction")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="seeds the calibration and training scenes")
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    args = parser.parse_args()
    if not args.teacher.is_file():
        parser.error(f"--teacher {args.teacher}: no such file; train one with tools/train_fusion.py")
    if not 0 < args.width_fraction <= 1 or not 0 < args.params <= 1:
        parser.error("--width-fraction and --params: fractions in (0, 1]")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    name = teacher_config(args.teacher, args.config)
    teacher = FusionDetector(CONFIGS[name])
    teacher.load_state_dict(torch.load(args.teacher, map_location="cpu", weights_only=True))
    teacher.eval()
    size = teacher.config.size
    rgb, thermal, _ = batch(training_rng(args.seed + CALIBRATION_SEED_OFFSET), args.calib_images, size)
    calibration = (torch.from_numpy(rgb), torch.from_numpy(thermal))
    torch.manual_seed(args.seed)
    student, reductions = reduced_copy(teacher, calibration, states=args.states, width=args.width_fraction,
                                       params=args.params)

    models = {"teacher": teacher, "reduced, not trained": student}
    runs = {}
    for variant, weights in variants(args.ablation, args.baseline).items():
        print(f"{variant}: {args.minutes} min", flush=True)
        trained = copy.deepcopy(student)
        config = StructuredDistillConfig(steps=None, lr=args.lr, time_limit=args.minutes * 60, **weights)
        runs[variant] = distill_ss2d(teacher, trained, scenes(args.seed, args.batch, size), config, task_loss)
        models[variant] = trained.eval()
        first, last = runs[variant]["first"], runs[variant]["last"]
        print("  " + "  ".join(f"{term} {first[term]:.3g} -> {last[term]:.3g}" for term in (*TERMS, "total")
                               if first[term] is not None), flush=True)
    torch.save(models["distilled"].state_dict(), args.out / "student.pt")

    rows = {}
    example = (calibration[0][:1], calibration[1][:1])
    files = {}
    for i, (variant, model) in enumerate(models.items()):
        rows[variant] = {"map50": evaluate(model, args.eval_images)["map50"], "parameters": parameters(model)}
        files[variant] = args.out / ("teacher.onnx" if variant == "teacher" else f"student{i}.onnx")
        rows[variant]["onnx"] = files[variant].name
        with warnings.catch_warnings():  # the tracer's notes on the scan's Python-side shape arithmetic
            warnings.simplefilter("ignore")
            export_onnx(model, files[variant], example, input_names=["rgb", "thermal"], output_names=["output"],
                        dynamic_batch=False)
        print(f"{variant}: mAP@0.5 {rows[variant]['map50']:.3f}", flush=True)
    seconds = interleaved_latency(files, {"rgb": example[0].numpy(), "thermal": example[1].numpy()}, threads=1,
                                  rounds=args.rounds)
    for variant, row in rows.items():
        row["latency_ms"] = round(seconds[variant] * 1e3, 3)
        row["latency_ratio"] = round(seconds[variant] / seconds["teacher"], 3)
        if variant in runs:
            row["training"] = runs[variant]

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "teacher": str(args.teacher),
        "config": name,
        "reduction": {"states": args.states, "width_fraction": args.width_fraction, "params": args.params,
                      "blocks": reductions},
        "minutes_each": args.minutes,
        "batch": args.batch,
        "lr": args.lr,
        "threads": args.threads,
        "eval_images": args.eval_images,
        "models": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "distill.json").write_text(json.dumps(report, indent=2) + "\n")
    for variant, row in rows.items():
        print(f"{variant:32s} mAP@0.5 {row['map50']:.3f}  latency x{row['latency_ratio']:.2f}  "
              f"params {row['parameters']}")
    print(f"wrote {args.out / 'distill.json'}")


if __name__ == "__main__":
    main()
