"""Train the small DDPM on scikit-learn's digits (models/digits.py) and the digit classifier that judges it, on CPU.

    nice -n 19 python tools/train_ddpm_digits.py --minutes 35            # classifier, UNet, judgement
    python tools/train_ddpm_digits.py --judge-only                       # judge the saved pipeline again

1. The digit classifier (models.digits.train_classifier, on the training split) unless --classifier already
   exists: writes digit_classifier.pt and digit_classifier.json (its held-out accuracy).
2. The UNet (diffusers UNet2DModel, models.digits.unet_config, 1.06 M parameters) with DDPMScheduler's
   1000-step linear noise schedule, epsilon prediction, MSE: batch 32 from the 1,437 training digits, AdamW
   with a short warm-up and a cosine decay over the time limit, gradient clipping at 1, an EMA of the weights
   (decay 0.998 after warm-up) which is what gets saved. One torch thread by default (on 2 busy cores, two
   threads ran several times slower). A checkpoint goes to --work every few minutes and at the end; --resume
   continues from it (the time limit counts the minutes already spent).
3. Saves the EMA UNet as a diffusers DDPMPipeline folder at --out (fp32 safetensors, about 4 MB) whose scheduler
   is DDIMScheduler (same noise schedule, "trailing" timesteps, eta 0: deterministic given the seed): sample it
   with `num_inference_steps=50` (models.digits.SAMPLE_STEPS). 1000-step DDPM sampling takes 20x longer on CPU.
4. Judges it: --samples images (seed 0, models.digits.sample), classified by the classifier: mean top
   probability, the share above 0.9, the class histogram and its total-variation distance from uniform, beside
   the same numbers on the real held-out digits; writes --out/train.json and the sample grid --grid. With
   --floors, reference points for judging compression: the class-histogram distance between two seed sets, and
   PSNR/SSIM/classifier measure of the same pipeline with fp16-rounded weights from the same seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import digits

WARMUP_STEPS = 200
FINAL_LR = 0.1  # the cosine ends at this fraction of --lr
EMA_DECAY = 0.998
LOSS_WINDOW = 100  # the reported losses are means over this many steps
CHECKPOINT_EVERY = 300  # seconds


def learning_rate(base: float, step: int, elapsed: float, limit: float) -> float:
    progress = min(elapsed / limit, 1.0)
    cosine = FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress))
    return base * min(1.0, (step + 1) / WARMUP_STEPS) * cosine


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def classifier(args, log) -> dict:
    if args.classifier.exists() and not args.retrain_classifier:
        report = json.loads(args.classifier.with_suffix(".json").read_text())
        log(f"classifier: {args.classifier} (held-out accuracy {report['held_out_accuracy']:.4f})")
        return report
    started = time.perf_counter()
    model, report = digits.train_classifier(log=log)
    report["train_seconds"] = round(time.perf_counter() - started, 1)
    report["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    digits.save_classifier(model, report, args.classifier)
    log(f"classifier: held-out accuracy {report['held_out_accuracy']:.4f} -> {args.classifier}")
    return report


def train_unet(args, log) -> tuple[torch.nn.Module, dict]:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_x = torch.from_numpy(digits.split()[0])
    model = UNet2DModel(**digits.unet_config())
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ckpt_path = args.work / "checkpoint.pt"
    step, spent, losses, history, first_loss, resumed = 0, 0.0, [], [], math.nan, None
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, spent, history, first_loss = ckpt["step"], ckpt["seconds"], ckpt["history"], ckpt["first_loss"]
        rng = np.random.default_rng([args.seed, step])
        torch.manual_seed(args.seed + step)
        resumed = {"step": step, "seconds": round(spent, 1)}
        log(f"resumed from {ckpt_path}: step {step}, {spent / 60:.1f} min spent")

    def checkpoint(seconds: float) -> None:
        args.work.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "seconds": seconds, "history": history, "first_loss": first_loss},
                   ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)

    limit = args.minutes * 60
    started = time.perf_counter() - spent
    last_ckpt = time.perf_counter()
    log(f"UNet: {sum(p.numel() for p in model.parameters()):,} parameters, {len(train_x)} training digits, "
        f"batch {args.batch}, {args.minutes} min")
    model.train()
    while (elapsed := time.perf_counter() - started) < limit:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, step, elapsed, limit)
        clean = train_x[rng.integers(0, len(train_x), size=args.batch)]
        noise = torch.randn_like(clean)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (args.batch,))
        noisy = noise_schedule.add_noise(clean, noise, t)
        loss = torch.nn.functional.mse_loss(model(noisy, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, model, step)
        first_loss = loss.item() if step == 0 else first_loss
        losses = [*losses[-LOSS_WINDOW + 1:], loss.item()]
        step += 1
        if step % args.log_every == 0:
            history.append([step, round(elapsed, 1), round(float(np.mean(losses)), 5)])
            log(f"step {step}  {elapsed / 60:.1f} min  {step / max(elapsed, 1e-9):.2f} step/s  "
                f"loss {np.mean(losses):.4f}  lr {optimizer.param_groups[0]['lr']:.2e}")
        if time.perf_counter() - last_ckpt > CHECKPOINT_EVERY:
            checkpoint(time.perf_counter() - started)
            last_ckpt = time.perf_counter()
    trained = time.perf_counter() - started
    checkpoint(trained)
    report = {"steps": step, "train_images": step * args.batch, "train_seconds": round(trained, 1),
              "first_loss": first_loss, "final_loss": float(np.mean(losses)) if losses else history[-1][2],
              "final_loss_steps": len(losses), "lr": args.lr, "batch": args.batch, "threads": args.threads,
              "ema_decay": EMA_DECAY, "seed": args.seed, "resumed_from": resumed, "loss_history": history,
              "parameters": int(sum(p.numel() for p in model.parameters()))}
    return ema.eval(), report


def save_pipeline(unet: torch.nn.Module, out: Path) -> None:
    from diffusers import DDIMScheduler, DDPMPipeline

    # "trailing" spacing starts sampling at t=999 (pure noise, as training saw it) for any step count; the
    # default "leading" would start 50 steps at t=980 and 4 steps at t=750, from noise the UNet never saw there
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                              timestep_spacing="trailing")
    out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)


def judge(args, log) -> dict:
    from PIL import Image

    from edgelr.measure.image_quality import (
        class_histogram,
        classifier_summary,
        total_variation,
    )

    pipeline = digits.load_pipeline(args.out)
    pipeline.set_progress_bar_config(disable=True)
    classify = digits.load_classifier(args.classifier)
    started = time.perf_counter()
    samples = digits.sample(pipeline, args.samples, seed=0, steps=args.sample_steps)
    seconds = time.perf_counter() - started
    probs = classify(samples)
    _, _, held_x, held_y = digits.split()
    real = classify(held_x)
    uniform = np.full(digits.CLASSES, 1.0 / digits.CLASSES)
    result = {
        "scheduler": type(pipeline.scheduler).__name__, "sample_steps": args.sample_steps, "samples": args.samples,
        "sample_seconds": round(seconds, 1), "seed": 0,
        "generated": {**classifier_summary(probs),
                      "tv_from_uniform_points": 100 * total_variation(class_histogram(probs), uniform)},
        "real_held_out": {**classifier_summary(real),
                          "tv_from_uniform_points": 100 * total_variation(class_histogram(real), uniform),
                          "accuracy": float((real.argmax(1) == held_y).mean())},
    }
    g = result["generated"]
    log(f"{args.samples} samples ({result['scheduler']}, {args.sample_steps} steps, {seconds:.0f} s): mean top "
        f"probability {g['mean_confidence']:.3f}, {100 * g['confident_share']:.1f} % above 0.9, histogram "
        f"{g['histogram_counts']} (TV from uniform {g['tv_from_uniform_points']:.1f} points); real held-out digits: "
        f"{result['real_held_out']['mean_confidence']:.3f}")
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    picture = digits.grid(samples[:args.grid_images], columns=16)
    Image.fromarray(picture).resize((picture.shape[1] * 2, picture.shape[0] * 2), Image.NEAREST).save(args.grid)
    log(f"grid of the first {args.grid_images} samples -> {args.grid}")
    if args.floors:
        result["floors"] = floors(args, pipeline, classify, samples, log)
    return result


def floors(args, pipeline, classify, samples: np.ndarray, log) -> dict:
    """Reference points for judging a compressed pipeline by these measures: (1) the same pipeline from other
    seeds (--samples images from seed 10000): how far two class histograms lie apart by sampling alone, when the
    images are not paired by seed; (2) the UNet's weights rounded to fp16 and back, same seeds: how far a
    barely perturbed denoiser moves PSNR, SSIM and the classifier measure."""
    from edgelr.measure.image_quality import (
        class_histogram,
        classifier_compare,
        pixel_summary,
        total_variation,
    )

    other = digits.sample(pipeline, args.samples, seed=10_000, steps=args.sample_steps)
    unseeded = {"seed_sets": [0, 10_000], "histogram_tv_points":
                100 * total_variation(class_histogram(classify(samples)), class_histogram(classify(other)))}
    log(f"two seed sets of {args.samples}: class histograms {unseeded['histogram_tv_points']:.1f} points apart")
    saved = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    with torch.no_grad():
        for v in pipeline.unet.state_dict().values():
            if v.is_floating_point():
                v.copy_(v.half().float())
    rounded = digits.sample(pipeline, args.samples, seed=0, steps=args.sample_steps)
    pipeline.unet.load_state_dict(saved)
    fp16 = {**pixel_summary(samples, rounded), **classifier_compare(classify, samples, rounded)}
    log(f"fp16-rounded weights, same seeds: PSNR mean {fp16['psnr_mean']:.1f} dB (min {fp16['psnr_min']:.1f}), "
        f"SSIM mean {fp16['ssim_mean']:.4f} (min {fp16['ssim_min']:.4f}), class agreement {fp16['agreement']:.3f}, "
        f"histogram {fp16['histogram_tv_points']:.1f} points apart")
    return {"other_seeds": unseeded, "fp16_weights_same_seeds": fp16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=digits.PIPELINE_DIR, help="the DDPMPipeline folder")
    parser.add_argument("--classifier", type=Path, default=digits.CLASSIFIER_PATH)
    parser.add_argument("--retrain-classifier", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ddpm_digits", help="checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from --work/checkpoint.pt")
    parser.add_argument("--minutes", type=float, default=35.0, help="UNet training time limit")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--samples", type=int, default=256, help="images generated to judge the pipeline")
    parser.add_argument("--sample-steps", type=int, default=digits.SAMPLE_STEPS)
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "images" / "ddpm_digits_samples.png")
    parser.add_argument("--grid-images", type=int, default=128)
    parser.add_argument("--judge-only", action="store_true", help="judge the pipeline at --out, train nothing")
    parser.add_argument("--floors", action="store_true",
                        help="also measure reference points: other seeds, fp16-rounded weights (2x the sampling)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    report_path = args.out / "train.json"
    if args.judge_only:
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
    else:
        cls_report = classifier(args, log)
        unet, train_report = train_unet(args, log)
        save_pipeline(unet, args.out)
        size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
        log(f"pipeline -> {args.out} ({size / 1e6:.1f} MB)")
        report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "unet_config": digits.unet_config(),
                  **train_report, "classifier_held_out_accuracy": cls_report["held_out_accuracy"],
                  "pipeline_bytes": size}
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    cls_json = args.classifier.with_suffix(".json")
    if cls_json.exists():  # the classifier that judges, which --judge-only may judge with anew
        report["classifier_held_out_accuracy"] = json.loads(cls_json.read_text())["held_out_accuracy"]
    report["judgement"] = judge(args, log)
    report_path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
