"""Train the RGB + thermal fusion detector (models/fusion.py) on synthetic scenes (models/fusion_data.py), on CPU.

    python tools/train_fusion.py --minutes 30 --out runs/fusion

Fresh scenes every step from the training stream (none seen twice, none from the held-out stream), AdamW
with a short warm-up and a cosine decay over the time limit, torch on every core (--threads fewer when other
work shares the machine: two threads on two busy cores ran ~25x slower than one, measured while another
benchmark ran). At the end, mAP@0.5 on the held-out scenes (models.fusion_data.held_out), the model in eval
mode as it exports. Writes to --out: fusion.pt (the state dict) and train.json (the command, config, steps,
losses, mAP).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.fusion import (
    DEFAULT,
    TINY,
    FusionDetector,
    class_ap50,
    decode,
    detection_loss,
    map50,
)
from models.fusion_data import CLASSES, batch, held_out, training_rng

CONFIGS = {"default": DEFAULT, "tiny": TINY}
WARMUP_STEPS = 100
FINAL_LR = 0.05  # the cosine ends at this fraction of --lr
EVAL_CONF = 0.001  # mAP ranks every detection, as COCO's evaluation does
LOSS_WINDOW = 50  # the reported losses are means over this many steps


def learning_rate(base: float, step: int, elapsed: float, limit: float) -> float:
    """Linear warm-up over the first steps, then a cosine from base to FINAL_LR * base over the time limit."""
    progress = min(elapsed / limit, 1.0)
    cosine = FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress))
    return base * min(1.0, (step + 1) / WARMUP_STEPS) * cosine


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels only: not on norms, biases, or SS2D's A_logs and Ds (as
    VMamba trains them)."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        (keep if p.ndim <= 1 or name.endswith(("A_logs", "Ds")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: FusionDetector, count: int, batch_size: int = 64) -> dict:
    """mAP@0.5 and per-class AP on the first `count` held-out scenes."""
    rgb, thermal, truths = held_out(count, model.config.size)
    model.eval()
    detections = []
    for i in range(0, count, batch_size):
        outputs = model(torch.from_numpy(rgb[i:i + batch_size]), torch.from_numpy(thermal[i:i + batch_size]))
        detections += decode(outputs, conf=EVAL_CONF)
    aps = class_ap50(detections, truths)
    return {"map50": map50(detections, truths), "class_ap50": {CLASSES[c]: ap for c, ap in aps.items()}, "eval_images": count,
            "objects": int(sum(len(t.classes) for t in truths))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for fusion.pt and train.json")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time limit")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the training scenes")
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = FusionDetector(CONFIGS[args.config])
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr)
    rng = training_rng(args.seed)
    limit = args.minutes * 60
    losses, first_loss, step = [], math.nan, 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < limit:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, step, elapsed, limit)
        rgb, thermal, truths = batch(rng, args.batch, model.config.size)
        loss, parts = detection_loss(model, torch.from_numpy(rgb), torch.from_numpy(thermal), truths)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        first_loss = loss.item() if step == 0 else first_loss
        losses = [*losses[-LOSS_WINDOW + 1:], loss.item()]
        step += 1
        if step % args.log_every == 0:
            print(f"step {step}  {elapsed / 60:.1f} min  loss {np.mean(losses):.3f}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)
    trained = time.perf_counter() - started

    result = evaluate(model, args.eval_images)
    torch.save(model.state_dict(), args.out / "fusion.pt")
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {"name": args.config, **dataclasses.asdict(model.config)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": args.threads,
        "steps": step,
        "train_images": step * args.batch,
        "train_seconds": round(trained, 1),
        "first_loss": first_loss,
        "final_loss": float(np.mean(losses)),
        "final_loss_steps": len(losses),
        **result,
    }
    (args.out / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{step} steps in {trained / 60:.1f} min, loss {first_loss:.3f} -> {report['final_loss']:.3f}, "
          f"held-out mAP@0.5 {result['map50']:.3f} ({args.out / 'train.json'})")


if __name__ == "__main__":
    main()
