"""Issue 22's acceptance table: a diffusers pipeline exported, its denoiser compressed by each technique alone and
combined (and some flows distilled on the teacher's own trajectories), every flow judged against the original.

    python tools/bench_diffusion.py models/weights/ddpm_digits --work runs/bench_diffusion \\
        --json docs/bench_diffusion_digits.json --grid docs/images/bench_diffusion_digits.png

Steps:
1. `edgelr export PIPELINE --target x86-cpu` (edgelr.deploy.pipeline.export_pipeline) into WORK/exported.
2. Each --flow (default FLOWS) through edgelr.api.compress_pipeline into WORK/<flow>: a flow is comma-separated
   words: a factorization budget (params=F, flops=F, latency=F), blocks=N (remove_blocks, N blocks by
   their images), int8 (static INT8, ONNX Runtime). The output-error ceiling is open (--max-output-error,
   default inf): the bench measures what a budget gives, judged by the images.
3. Images: --images images from seeds --image-seed, --image-seed + 1, ... (initial noise numpy default_rng(seed),
   as `OnnxDiffusionPipeline(seed=)` draws it; run in batches, per-step noise if the scheduler draws any from
   one generator seeded --image-seed), --steps steps with the pipeline's own scheduler, the same for every
   flow. PSNR/SSIM of each flow's images against the original's (edgelr.measure.image_quality, [0, 1]), and
   the classifier measure (image_quality.classifier_compare with models/digits.py's classifier, when the
   images are 1x32x32 and the classifier file exists): the mean top-probability drop and the class-histogram
   total variation, in points (the bar: both within 2 points of the original's), and beside them the agreement
   of each image's class with the original image's from the same seed. Two independent seed sets of the
   original differ by ~8 histogram points at 512 images: read the bar on thousands of images (--images, with
   --reuse --no-timing on the folders a timed run made).
4. Distillation (--distill FLOW, or "auto": the --distill-count flows with the highest per-step speed-up among
   those whose images pass the PSNR/SSIM bars, else the best SSIM): the one-stage flow made again with
   `edgelr compress --distill MINUTES` (edgelr.api.pipeline_passes: the float denoiser trained towards the
   original on the original's own trajectories from --distill-seeds runs, no images, before any INT8; the
   joins of removed blocks and the factorized pairs' outputs aligned too). Judged as the others.
5. Timing, ONNX Runtime CPU at 1 thread: the denoiser per step (edgelr.measure.latency.interleaved_timing:
   every model A B C ... at batch 1, median, re-measured while the spread is wide) and the whole pipeline at
   --steps steps, batch 1 (OnnxDiffusionPipeline, flows interleaved per round, median of --pipeline-rounds).
   Ratios are the original's time over the flow's (> 1 is faster). The load average is recorded beside them.

Output: a printed table, --json (everything measured, the command, the load average) and --grid (a PNG: one
row per flow, the original first, the same seeds' images side by side).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgelr.errors import EdgelrError
from edgelr.report.tables import plain_json

FLOWS = ("params=0.5", "flops=0.5", "flops=0.35", "blocks=1", "blocks=2", "int8", "flops=0.5,int8",
         "flops=0.5,blocks=1", "flops=0.5,blocks=1,int8")
BARS = {"per_step_ratio": 1.5, "pipeline_ratio": 1.4, "psnr_mean": 25.0, "ssim_mean": 0.9, "classifier_points": 2.0}
ORIGINAL = "original"
# int8-tf keeps the timestep embedding float by name (the quantize pass now does so itself); int8-lr adds
# SVDQuant's float low-rank branches beside the INT8 weights
INT8_WORDS = {"int8": "int8", "int8-tf": "int8", "int8-lr": "int8-lowrank"}


# ---- flows ----

def parse_flow(flow: str) -> list[dict]:
    """'flops=0.35>blocks=1>int8-tf' -> one dict per stage ("budget", "blocks", "int8": the quantize scheme or
    None, "time_float")."""
    stages = []
    for part in flow.split(">"):
        spec = {"budget": {}, "blocks": None, "int8": None, "time_float": False}
        for word in filter(None, (w.strip() for w in part.split(","))):
            key, _, value = word.partition("=")
            if key in ("params", "flops", "latency", "max_error") and value:
                spec["budget"][key] = float(value)
            elif key == "blocks" and value:
                spec["blocks"] = int(value)
            elif key in INT8_WORDS and not value:
                spec["int8"], spec["time_float"] = INT8_WORDS[key], key == "int8-tf"
            else:
                raise SystemExit(f"bench_diffusion: --flow {flow!r}: unknown word {word!r} (params=F, flops=F, "
                                 "latency=F, blocks=N, int8, int8-tf, int8-lr; stages joined by >)")
        if not (spec["budget"] or spec["blocks"] or spec["int8"]):
            raise SystemExit(f"bench_diffusion: --flow {flow!r}: a stage says nothing to do")
        stages.append(spec)
    return stages


def time_embedding_nodes(unet: Path) -> tuple[str, ...]:
    """The nodes whose outputs feed a Sin or Cos (the sinusoidal timestep embedding's argument, t x frequency:
    up to ~1000 radians, which one INT8 scale cannot hold to a fraction of a period)."""
    import onnx_ir as ir

    model = ir.load(str(unet))
    return tuple(sorted({n.inputs[0].producer().name for n in model.graph.all_nodes()
                         if n.op_type in ("Sin", "Cos") and n.inputs[0] is not None
                         and n.inputs[0].producer() is not None}))


def flow_passes(spec: dict, unet: Path, distill: float | None = None) -> list:
    """The stage's passes as `edgelr compress` flags make them (edgelr.api.pipeline_passes), with a distillation
    of DISTILL minutes where given."""
    import dataclasses

    from edgelr.api import pipeline_passes
    from edgelr.passes.factorize import FactorizeConfig
    from edgelr.passes.quantize import QuantizeConfig

    factorize = FactorizeConfig(**spec["budget"]) if spec["budget"] else None
    passes = pipeline_passes(factorize, quantize=spec["int8"], remove_blocks=spec["blocks"], distill=distill)
    if spec["time_float"]:
        keep = time_embedding_nodes(unet)
        passes = [dataclasses.replace(c, keep_float=keep) if isinstance(c, QuantizeConfig) else c for c in passes]
    return passes


def distillable(flow: str) -> bool:
    """One stage that factorizes or removes blocks (a float student to train)."""
    stages = parse_flow(flow)
    return len(stages) == 1 and bool(stages[0]["budget"] or stages[0]["blocks"])


def folder_name(flow: str) -> str:
    return flow.replace("=", "").replace(",", "+").replace(".", "p").replace(">", "_then_")


def compress_flow(exported: Path, work: Path, flow: str, folders: dict, args) -> dict:
    """The flow's pipeline in WORK: its stages (joined by >) one compress_pipeline call each, on the previous
    stage's folder; a stage another flow already made (the same prefix) is reused."""
    from edgelr.api import compress_pipeline

    start = time.perf_counter()
    parts = flow.split(">")
    source, stage_seconds = exported, []
    for i, (part, spec) in enumerate(zip(parts, parse_flow(flow))):
        prefix = ">".join(parts[:i + 1])
        if prefix in folders:
            source = folders[prefix]
            continue
        out = work / folder_name(prefix)
        if args.reuse and (out / "manifest.json").is_file():  # an earlier run's stage, judged again
            source = out
            continue
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            compress_pipeline(source, out, flow_passes(spec, source / "unet" / "model.onnx"), seeds=args.calib_seeds,
                              steps=args.steps, samples=args.calib_samples, images=args.judge_images,
                              max_output_error=args.max_output_error, progress=args.verbose)
        except EdgelrError as exc:
            return {"flow": flow, "error": f"stage {part!r}: {exc}", "compress_seconds": round(time.perf_counter() - start, 1)}
        stage_seconds.append(round(time.perf_counter() - t0, 1))
        source = out
    manifest = json.loads((source / "manifest.json").read_text())
    c = manifest["compression"]
    chain, passes, removed, first = c, [], [], c
    while chain:  # the stages' records, last first
        passes = [p.get("_type") for p in chain["passes"]] + passes
        removed = (chain.get("blocks_removed") or {}).get("removed", []) + removed
        first, chain = chain, chain.get("previous")
    record = {"flow": flow, "folder": str(source), "passes": passes, "params_before": first["params_before"],
              "params_after": c["params_after"], "bytes_before": first["bytes_before"], "bytes_after": c["bytes_after"],
              "output_error_worst_last_stage": (c["denoiser"].get("output_error") or {}).get("worst"),
              "compress_seconds": round(time.perf_counter() - start, 1), "stage_seconds": stage_seconds}
    if removed:
        record["blocks_removed"] = removed
    keep = ((c.get("denoiser") or {}).get("quantized") or {}).get("kept_float", [])
    if keep:
        record["kept_float"] = keep
    return record


# ---- images ----

class Images:
    """The images every flow is judged on: the same initial noise (one seed per image) and per-step noise."""

    def __init__(self, exported: Path, count: int, steps: int, seed: int, batch: int):
        from edgelr.deploy.pipeline_run import OnnxDiffusionPipeline

        self.steps, self.seed, self.batch = steps, seed, batch
        shape = OnnxDiffusionPipeline(exported, threads=1).run_info["latent_shape"]
        self.latents = np.concatenate([np.random.default_rng(seed + i).standard_normal((1, *shape), dtype=np.float32)
                                       for i in range(count)])

    def generate(self, folder: Path) -> np.ndarray:
        """(N, C, H, W) in [0, 1]."""
        from edgelr.deploy.pipeline_run import OnnxDiffusionPipeline

        pipe = OnnxDiffusionPipeline(folder, threads=1)
        rng = np.random.default_rng(self.seed)  # per-step noise (DDPM): the same draws for every flow

        def noise(shape):
            return rng.standard_normal(shape, dtype=np.float32)

        out = [pipe(None, steps=self.steps, latents=self.latents[i:i + self.batch], noise=noise)
               for i in range(0, len(self.latents), self.batch)]
        return np.concatenate(out).transpose(0, 3, 1, 2)


def load_classify(path: Path | None, reference: np.ndarray):
    """models/digits.py's classifier as numpy [0, 1] images -> probabilities, or None where it does not apply."""
    if path is None or not path.is_file() or reference.shape[1:] != (1, 32, 32):
        return None
    from models import digits

    classify = digits.load_classifier(path)
    return lambda x: classify(np.asarray(x, np.float32) * 2.0 - 1.0)


def measure_images(reference: np.ndarray, images: np.ndarray, classify) -> dict:
    from edgelr.measure.image_quality import classifier_compare, pixel_summary

    out = pixel_summary(reference, images, value_range=(0.0, 1.0))
    if classify is not None:
        c = classifier_compare(classify, reference, images)
        out["classifier"] = {"agreement_points": 100 * c["agreement"],
                             "disagreement_points": 100 * (1 - c["agreement"]),
                             "confidence_drop_points": c["confidence_drop_points"],
                             "histogram_tv_points": c["histogram_tv_points"],
                             "mean_confidence": c["test"]["mean_confidence"],
                             "histogram_counts": c["test"]["histogram_counts"]}
        # the bar is the issue's distribution measure: mean confidence and class histogram within
        # BARS["classifier_points"] of the original's; per-seed agreement is reported beside it
        out["classifier"]["worst_points"] = max(abs(c["confidence_drop_points"]), c["histogram_tv_points"])
    return out


def grid_png(path: Path, rows: list[tuple[str, np.ndarray]], columns: int, scale: int) -> None:
    """One row per (label, images (N, C, H, W) in [0, 1]): the first COLUMNS images, upscaled SCALE times."""
    from PIL import Image, ImageDraw

    _, c, h, w = rows[0][1].shape
    columns = min(columns, len(rows[0][1]))
    gap, label_w = 2, 230
    cell_h, cell_w = h * scale, w * scale
    width = label_w + columns * (cell_w + gap) + gap
    height = len(rows) * (cell_h + gap) + gap
    canvas = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = gap + r * (cell_h + gap)
        draw.text((4, y + cell_h // 2 - 6), label, fill=(255, 255, 255))
        for i, image in enumerate(images[:columns]):
            pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
            tile = Image.fromarray(pixels[..., 0] if c == 1 else pixels).convert("RGB")
            canvas.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (label_w + gap + i * (cell_w + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# ---- distillation ----

def distill_flow(exported: Path, work: Path, flow: str, args) -> dict:
    """The flow made again in one compress_pipeline run with a distillation before its quantization (`edgelr
    compress --distill`: the original's own trajectories from --distill-seeds runs are the training set).
    Returns the record (its folder under "folder", or "error")."""
    from edgelr.api import compress_pipeline

    start = time.perf_counter()
    record = {"flow": flow + " +distill", "from": flow}
    stages = parse_flow(flow)
    if not distillable(flow):
        return {**record, "error": "distil one-stage flows that factorize or remove blocks (e.g. blocks=1,flops=0.35,int8)"}
    out = work / (folder_name(flow) + "+distill")
    if not (args.reuse and (out / "manifest.json").is_file()):
        shutil.rmtree(out, ignore_errors=True)
        try:
            compress_pipeline(exported, out, flow_passes(stages[0], exported / "unet" / "model.onnx",
                                                         distill=args.distill_minutes),
                              seeds=args.calib_seeds, steps=args.steps, samples=args.calib_samples,
                              images=args.judge_images, max_output_error=args.max_output_error,
                              distill_seeds=args.distill_seeds, distill_samples=args.distill_samples,
                              progress=args.verbose)
        except EdgelrError as exc:
            return {**record, "error": str(exc), "distill_seconds": round(time.perf_counter() - start, 1)}
    compression = json.loads((out / "manifest.json").read_text())["compression"]
    return {**record, "folder": str(out), "passes": [p.get("_type") for p in compression["passes"]],
            "params_after": compression["params_after"], "distill": compression.get("distillation"),
            "blocks_removed": (compression.get("blocks_removed") or {}).get("removed"),
            "compress_seconds": round(time.perf_counter() - start, 1)}


def pick_for_distill(flows: list[dict], count: int) -> list[str]:
    """The COUNT flows with the highest per-step speed-up among those whose images pass the PSNR and SSIM bars;
    if fewer pass, the rest by SSIM. (Per-step ratios come from a quick timing before the real one.)"""
    ok = [f for f in flows if "error" not in f and distillable(f["flow"])]
    passing = sorted((f for f in ok if f["psnr_mean"] >= BARS["psnr_mean"] and f["ssim_mean"] >= BARS["ssim_mean"]),
                     key=lambda f: -f["quick_per_step_ratio"])
    rest = sorted((f for f in ok if f not in passing), key=lambda f: -f["ssim_mean"])
    return [f["flow"] for f in (passing + rest)[:count]]


# ---- timing ----

def time_denoisers(folders: dict, feed: dict, rounds: int) -> dict:
    from edgelr.measure.latency import interleaved_timing

    timing = interleaved_timing({n: f / "unet" / "model.onnx" for n, f in folders.items()}, feed, threads=1,
                                rounds=rounds)
    return {"seconds": timing.seconds, "spread": timing.spread, "stable": timing.stable}


def time_pipelines(folders: dict, steps: int, rounds: int, seed: int) -> dict:
    """Median seconds of a whole batch-1 run at STEPS steps, the folders interleaved round by round."""
    from edgelr.deploy.pipeline_run import OnnxDiffusionPipeline

    pipes = {n: OnnxDiffusionPipeline(f, threads=1) for n, f in folders.items()}
    for pipe in pipes.values():  # warm up
        pipe(None, steps=min(steps, 3), seed=seed)
    times = {n: [] for n in pipes}
    for _ in range(rounds):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            pipe(None, steps=steps, seed=seed)
            times[name].append(time.perf_counter() - start)
    from edgelr.measure.latency import spread

    return {"seconds": {n: float(np.median(t)) for n, t in times.items()},
            "spread": max(spread(t) for t in times.values()), "rounds": rounds}


def time_all(folders: dict, feed: dict, args, load: dict, say) -> dict:
    load["timing"] = os.getloadavg()
    say("timing the denoisers and the pipelines (interleaved, 1 thread)")
    found = {"step": time_denoisers(folders, feed, args.rounds),
             "pipeline": time_pipelines(folders, args.steps, args.pipeline_rounds, args.image_seed)}
    load["end"] = os.getloadavg()
    return found


def denoiser_feed(exported: Path) -> dict:
    from edgelr.deploy.pipeline_run import OnnxDiffusionPipeline

    pipe = OnnxDiffusionPipeline(exported, threads=1)
    sample = np.random.default_rng(0).standard_normal((1, *pipe.run_info["latent_shape"]), dtype=np.float32)
    return {"sample": sample, "timestep": pipe._timestep(500, 1)}


# ---- the table ----

def bars_met(row: dict) -> dict:
    met = {k: row.get(k) is not None and row[k] >= v for k, v in BARS.items() if k != "classifier_points"}
    if "classifier" in row:
        met["classifier_points"] = row["classifier"]["worst_points"] <= BARS["classifier_points"]
    return met


def table(rows: list[dict]) -> str:
    head = (f"{'flow':30} {'step x':>7} {'pipe x':>7} {'PSNR':>6} {'SSIM':>6} {'agree':>6} {'conf-':>6} {'histTV':>6} "
            f"{'params':>9} bars")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['flow']:30} {r['error'][:120]}")
            continue
        c = r.get("classifier", {})

        def f(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(int(fmt.split(".")[0].rstrip(",d")))

        met = r.get("bars_met", {})
        lines.append(f"{r['flow']:30} {f(r.get('per_step_ratio'), '7.2f')} {f(r.get('pipeline_ratio'), '7.2f')} "
                     f"{f(min(r['psnr_mean'], 99.99), '6.2f')} {f(r['ssim_mean'], '6.4f')} "
                     f"{f(c.get('agreement_points'), '6.1f')} {f(c.get('confidence_drop_points'), '6.2f')} "
                     f"{f(c.get('histogram_tv_points'), '6.2f')} {f(r.get('params_after'), '9,d')} "
                     f"{'all' if met and all(met.values()) else ','.join(k.split('_')[0] for k, v in met.items() if not v) or '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pipeline", type=Path, help="a diffusers pipeline folder (e.g. models/weights/ddpm_digits)")
    p.add_argument("--work", type=Path, required=True, help="folder for the exported and compressed pipelines")
    p.add_argument("--flow", action="append", help=f"comma-separated passes (default: {' '.join(FLOWS)})")
    p.add_argument("--steps", type=int, help="sampling steps, every flow (default: models/digits.SAMPLE_STEPS for "
                                             "the digits pipeline, else 20)")
    p.add_argument("--images", type=int, default=128, help="images judged per flow (same seeds)")
    p.add_argument("--image-seed", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=64, help="images per denoiser call while judging")
    p.add_argument("--calib-seeds", type=int, default=4, help="compress_pipeline's calibration runs")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--judge-images", type=int, default=4, help="compress_pipeline's judge (ranks blocks by them)")
    p.add_argument("--max-output-error", type=float, default=math.inf)
    p.add_argument("--classifier", type=Path, default=ROOT / "models" / "weights" / "digit_classifier.pt")
    p.add_argument("--distill", action="append", help='a flow to distil, or "auto" (default) or "none"')
    p.add_argument("--distill-count", type=int, default=2, help="flows --distill auto picks")
    p.add_argument("--distill-seeds", type=int, default=32, help="the original's sampling runs it trains on")
    p.add_argument("--distill-samples", type=int, default=2048, help="denoiser inputs kept from them")
    p.add_argument("--distill-minutes", type=float, default=2.5, help="training time per distillation")
    p.add_argument("--rounds", type=int, default=30, help="interleaved denoiser timing rounds")
    p.add_argument("--pipeline-rounds", type=int, default=5, help="interleaved whole-pipeline runs per flow")
    p.add_argument("--grid-images", type=int, default=16)
    p.add_argument("--grid-scale", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--grid", type=Path)
    p.add_argument("--reuse", action="store_true", help="keep WORK's exported and compressed folders where they "
                   "exist (judge them again, e.g. on more images) instead of making them anew")
    p.add_argument("--seed-floor", action="store_true", help="also judge the original on other seeds against "
                   "itself (the measures' sampling noise)")
    p.add_argument("--no-timing", action="store_true", help="judge the images only (the speed columns stay empty)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    import torch

    saved = torch.get_num_threads(), {k: os.environ.get(k) for k in ("EDGELR_TORCH_THREADS", "EDGELR_ORT_THREADS")}
    torch.set_num_threads(1)
    os.environ.update({k: "1" for k in saved[1]})
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(saved[0])
        for k, v in saved[1].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(args, argv) -> int:
    from edgelr.deploy.pipeline import export_pipeline

    start = time.perf_counter()
    load = {"start": os.getloadavg()}
    flows = list(dict.fromkeys(args.flow or FLOWS))
    for flow in flows:
        parse_flow(flow)
    if args.steps is None:
        args.steps = 50 if (args.pipeline / "unet").is_dir() and "ddpm_digits" in str(args.pipeline) else 20
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    def say(text):
        print(f"[{time.perf_counter() - start:6.0f} s] {text}", file=sys.stderr, flush=True)

    exported = work / "exported"
    if args.reuse and (exported / "manifest.json").is_file():
        manifest = json.loads((exported / "manifest.json").read_text())
    else:
        manifest = export_pipeline(args.pipeline, "x86-cpu", exported, threads=1, progress=args.verbose).manifest
    unet_parity = manifest["components"]["unet"]["parity"]
    scheduler = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    say(f"exported {args.pipeline} ({scheduler['_class_name']}, {args.steps} steps); unet parity "
        f"{unet_parity.get('relative_error')}")

    folders = {ORIGINAL: exported}
    rows: list[dict] = []
    stages: dict[str, Path] = {}  # intermediate stages of chained flows, reused by flows that share them
    for flow in flows:
        record = compress_flow(exported, work, flow, {**stages, **{k: v for k, v in folders.items() if k != ORIGINAL}},
                               args)
        rows.append(record)
        if "error" not in record:
            folders[flow] = Path(record["folder"])
            for i in range(1, len(flow.split(">"))):
                prefix = ">".join(flow.split(">")[:i])
                if (work / folder_name(prefix)).is_dir():
                    stages.setdefault(prefix, work / folder_name(prefix))
        say(f"{flow}: " + (record.get("error") or f"{record['params_before']:,} -> {record['params_after']:,} weights "
                                                  f"in {record['compress_seconds']} s"))

    images = Images(exported, args.images, args.steps, args.image_seed, args.batch)
    reference = images.generate(exported)
    classify = load_classify(args.classifier, reference)
    original = {"flow": ORIGINAL, "params_after": None, **measure_images(reference, reference, classify)}
    if classify is not None:
        from edgelr.measure.image_quality import classifier_summary

        original["classifier_summary"] = classifier_summary(classify(reference))
    generated = {ORIGINAL: reference}
    feed = denoiser_feed(exported)
    for row in rows:
        if "error" not in row:
            generated[row["flow"]] = images.generate(folders[row["flow"]])
            row.update(measure_images(reference, generated[row["flow"]], classify))
    if args.seed_floor:  # what the measures read between two independent seed sets of the same generator
        other = Images(exported, args.images, args.steps, args.image_seed + 1_000_000, args.batch).generate(exported)
        original["other_seeds"] = measure_images(reference, other, classify)
    say(f"judged {len(generated) - 1} flows on {args.images} images")

    distilled: list[dict] = []
    wanted = [d for d in (args.distill or ["auto"]) if d != "none"]
    if wanted:
        if "auto" in wanted:
            quick = time_denoisers(folders, feed, rounds=5)["seconds"]
            for row in rows:
                if "error" not in row:
                    row["quick_per_step_ratio"] = quick[ORIGINAL] / quick[row["flow"]]
            wanted = [w for w in wanted if w != "auto"] + pick_for_distill(rows, args.distill_count)
        wanted = list(dict.fromkeys(wanted))
        say(f"distilling {wanted}: {args.distill_minutes:g} minutes each, on the original's trajectories from "
            f"{args.distill_seeds} runs")
        for flow in wanted:
            record = distill_flow(exported, work, flow, args)
            distilled.append(record)
            if "error" not in record:
                folders[record["flow"]] = Path(record["folder"])
                generated[record["flow"]] = images.generate(Path(record["folder"]))
                record.update(measure_images(reference, generated[record["flow"]], classify))
            say(f"{record['flow']}: " + (record.get("error") or f"PSNR {record['psnr_mean']:.2f}, SSIM "
                                                                 f"{record['ssim_mean']:.4f}"))

    timing = None if args.no_timing else time_all(folders, feed, args, load, say)
    if timing is not None:
        t0, p0 = timing["step"]["seconds"][ORIGINAL], timing["pipeline"]["seconds"][ORIGINAL]
        original.update({"seconds_per_step": t0, "pipeline_seconds": p0, "per_step_ratio": 1.0, "pipeline_ratio": 1.0})
    for row in rows + distilled:
        if "error" not in row:
            if timing is not None:
                step, pipe = (timing[k]["seconds"][row["flow"]] for k in ("step", "pipeline"))
                row.update({"seconds_per_step": step, "pipeline_seconds": pipe, "per_step_ratio": t0 / step,
                            "pipeline_ratio": p0 / pipe})
            row["bars_met"] = bars_met(row)

    floor = [{"flow": "original, other seeds", **original["other_seeds"]}] if args.seed_floor else []
    print(table([original] + floor + rows + distilled))
    if timing is not None:
        print(f"load average (1, 5, 15 min): start {load['start']}, timing {load['timing']}, end {load['end']}; "
              f"denoiser timing spread {timing['step']['spread']:.3f}, pipeline spread {timing['pipeline']['spread']:.3f}")
    if args.grid:
        grid_png(args.grid, [(n, generated[n]) for n in generated], args.grid_images, args.grid_scale)
        print(f"wrote {args.grid}")
    if args.json:
        command = "python tools/bench_diffusion.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        report = {"command": command, "pipeline": str(args.pipeline), "scheduler": scheduler["_class_name"],
                  "steps": args.steps, "images": args.images, "image_seeds": [args.image_seed, args.image_seed + args.images - 1],
                  "unet_parity": unet_parity, "bars": BARS,
                  "classifier": str(args.classifier) if classify is not None else None,
                  "timing": timing and {
                      "threads": 1, "denoiser": "interleaved_timing, batch 1, median", "denoiser_rounds": args.rounds,
                      "denoiser_spread": timing["step"]["spread"], "denoiser_stable": timing["step"]["stable"],
                      "pipeline_rounds": args.pipeline_rounds, "pipeline_spread": timing["pipeline"]["spread"],
                      "cpus": os.cpu_count()},
                  "load_average": load, "original": original, "flows": rows, "distilled": distilled,
                  "seconds": round(time.perf_counter() - start, 1)}
        for r in rows + distilled:
            r.pop("folder", None)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plain_json(report), indent=1) + "\n")
        print(f"wrote {args.json}")
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
