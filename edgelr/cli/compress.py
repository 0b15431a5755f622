"""`edgelr compress`: compress a model against a budget (flags, or a recipe). Parses, calls the library, prints."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from edgelr.cli.args import (
    add_calib,
    add_judge,
    add_target,
    count,
    fraction,
    positive,
    removed,
    ssh_flags,
    unit_fraction,
)
from edgelr.errors import EdgelrError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="low-rank factorize a model (or an exported pipeline's denoiser) against a budget")
    p.add_argument("model", metavar="MODEL.onnx", help="an ONNX model, or a diffusion pipeline folder `edgelr export` wrote")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="the compressed model (for a pipeline: a folder)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--params", type=fraction, metavar="F", help="keep this fraction of the factorizable params")
    budget.add_argument("--flops", type=fraction, metavar="F", help="keep this fraction of the factorizable FLOPs")
    budget.add_argument("--latency", type=fraction, metavar="F",
                        help="keep this fraction of the model's latency, measured on this machine (ONNX Runtime CPU, the "
                             "target's threads, else 1), or on the device --on names")
    p.add_argument("--max-error", type=positive, metavar="E", help="per-layer relative output error gate")
    p.add_argument("--no-refit", action="store_true", help="keep each factorized pair as fitted on the original's "
                   "inputs (default, with --calib: refit it on the inputs the compressed model feeds it)")
    add_calib(p)
    add_judge(p)
    p.add_argument("--recipe", metavar="RECIPE.yaml",
                   help="the passes to run, as YAML (recipes/ has examples); instead of the budget, --prune and --quantize flags")
    p.add_argument("--write-recipe", metavar="RECIPE.yaml", help="also write the recipe the flags stand for (a new file)")
    add_target(p)
    p.add_argument("--on", metavar="USER@HOST",
                   help="with --latency: time the layers and each round's model on this device over SSH (needs python3, "
                        "numpy and onnxruntime there); its tables are cached by what the device is, for every device alike")
    ssh_flags(p, "--on")
    p.add_argument("--report", metavar="REPORT.json", help="write the per-layer results as JSON")
    p.add_argument("--float-output", metavar="FLOAT.onnx", help="with --quantize: also keep the model before quantization")
    p.add_argument("--prune", type=removed, metavar="F",
                   help="first remove this fraction of the channels of every prunable group (structured pruning)")
    p.add_argument("--quantize", choices=["int8", "int8-lowrank", "int8-dynamic"],
                   help="then quantize with ONNX Runtime: int8 (static, calibrated on --calib), int8-lowrank "
                        "(int8 plus float low-rank branches where they measure better) or int8-dynamic")
    pipe = p.add_argument_group("a pipeline folder (the denoiser is calibrated on sampling trajectories, judged by its images)")
    pipe.add_argument("--remove-blocks", type=count, metavar="N", help="first remove the N residual blocks whose removal "
                      "changes the generated images least (the first quarter of the blocks are kept)")
    pipe.add_argument("--steps", type=count, metavar="N", help="sampling steps of every run (default 20)")
    pipe.add_argument("--seeds", type=count, metavar="K", help="sampling runs to calibrate on, seeds 0..K-1 (default 4)")
    pipe.add_argument("--images", type=count, metavar="N", help="images judged, from seeds of their own (default 4)")
    pipe.add_argument("--prompt", action="append", metavar="TEXT", help="text to image: a prompt to sample with (repeat "
                      "for more; default: a few generic ones)")
    pipe.add_argument("--guidance", type=positive, metavar="G", help="classifier-free guidance scale (default 7.5)")
    pipe.add_argument("--min-psnr", type=positive, metavar="DB", help="not written unless the images' mean PSNR against "
                      "the original's is at least this")
    pipe.add_argument("--min-ssim", type=unit_fraction, metavar="S", help="not written unless their mean SSIM is at least this")
    pipe.add_argument("--distill", type=positive, metavar="MINUTES", help="then train the compressed float denoiser "
                      "towards the original for this long, on the original's own sampling trajectories (before "
                      "--quantize, which then calibrates on the distilled one)")
    pipe.add_argument("--distill-seeds", type=count, metavar="K", help="sampling runs the distillation trains on, at "
                      "--steps steps, up to 2048 of their denoiser inputs (default 32; other seeds' runs are held out)")
    pipe.add_argument("--distill-features", choices=DISTILL_FEATURES, help="also align these inner tensors: factorized "
                      "(each factorized pair's output), blocks (the joins of the blocks --remove-blocks removed), both, "
                      "or none (default: factorized with a budget, both with a budget and --remove-blocks, else none)")


PIPELINE_FLAGS = ("remove_blocks", "steps", "seeds", "images", "prompt", "guidance", "min_psnr", "min_ssim", "distill",
                  "distill_seeds", "distill_features")
DISTILL_FEATURES = ("blocks", "factorized", "factorized+blocks", "none")


def run(args) -> int:
    from edgelr.api import as_recipe, compress
    from edgelr.passes.factorize import FactorizeConfig
    from edgelr.recipe import load_recipe
    from edgelr.report.tables import compression_table

    if Path(args.model).is_dir():
        return _pipeline(args)
    given = [name for name in PIPELINE_FLAGS if getattr(args, name) is not None]
    if given:
        raise EdgelrError(f"--{given[0].replace('_', '-')} is for a pipeline folder; {args.model} is not a folder")

    budget = {"params": args.params, "flops": args.flops, "latency": args.latency, "max_error": args.max_error}
    flags = [name for name, value in budget.items() if value is not None]
    flags += [name for name in ("prune", "quantize") if getattr(args, name) is not None]
    flags += ["no_refit"] if args.no_refit else []
    if args.recipe:
        if flags:
            raise EdgelrError(f"--recipe gives the passes: drop --{flags[0].replace('_', '-')} (or put it in the recipe)")
        if args.write_recipe:
            raise EdgelrError("--write-recipe writes the recipe the flags stand for: with --recipe there is nothing new to write")
        recipe = as_recipe(load_recipe(args.recipe), target=args.target)
    elif not flags:
        raise EdgelrError("say how far to compress: --params F, --flops F, --latency F, --max-error E, --prune F, "
                          "--quantize SCHEME, or --recipe RECIPE.yaml")
    else:  # pruning or quantization alone keeps every layer dense
        factorize = FactorizeConfig(**{k: v for k, v in budget.items() if v is not None}) if any(budget.values()) else None
        recipe = as_recipe(factorize, args.prune, args.quantize, not args.no_refit, args.calib is not None, args.target)
        # what judges the result belongs to the job too: --write-recipe keeps it
        recipe = dataclasses.replace(recipe, metric=args.metric, floor=args.floor, max_output_error=args.max_output_error)
    if args.write_recipe and Path(args.write_recipe).exists():
        raise EdgelrError(f"{args.write_recipe}: exists; edgelr does not overwrite files, pick another name")
    done = compress(args.model, args.output, recipe, calib=args.calib, report=args.report, progress=not args.quiet,
                    float_output=args.float_output, heldout=args.heldout, metric=args.metric, floor=args.floor,
                    max_output_error=args.max_output_error, on=_device(args) if args.on else None)
    if args.write_recipe:
        recipe.save(args.write_recipe)
    if done.pruned:
        p = done.pruned
        print(f"pruned {p['groups_pruned']} of {p['groups'] + p['unprunable_groups']} channel groups: "
              f"{p['params_before']:,} -> {p['params_after']:,} parameters")
    if done.result is not None:
        print(compression_table(done.result))
    if done.result is not None and done.result.refit:
        print(f"refit {len(done.result.refit)} of {len(done.result.factorized)} factorized pairs on the inputs the "
              "compressed model feeds them")
    for warning in done.result.warnings if done.result is not None else []:
        print(f"warning: {warning}", file=sys.stderr)
    if done.latency:
        for r in done.latency["rounds"]:
            alone = r.get("quantized_only_ratio")
            print(f"latency round {r['round']}: predicted {r['predicted_ratio']:.3f}, measured {r['measured_ratio']:.3f} "
                  "of the original" + (f" (quantized alone, timed beside it: {alone:.3f})" if alone else ""))
        print(f"kept round {done.latency['kept_round']}")
        print(f"latency tables: {done.latency['layer_timings']} layer timings new, cached in {done.latency['table']}")
        if done.latency.get("device"):
            d = done.latency["device"]
            print(f"timed on {d['host']} over SSH: {d['machine']}, {d['cpu']}, onnxruntime {d['onnxruntime']}, "
                  f"{d['threads']} thread(s), in {d['batches']} batches")
    if done.distilled:
        d = done.distilled
        print(f"distilled {d['steps']} steps in {d['seconds']:.0f} s, final loss {d['final_loss']:.4g}"
              + (" (stopped at the time limit)" if d.get("stopped_early") else ""))
    if done.quantized:
        q = done.quantized
        kept = q.get("kept_float") or []
        print(f"quantized {q['nodes_quantized']} nodes ({q['scheme']}, {q['activations']} activations)"
              + (f"; kept in float, where INT8's error cost more than its speed: {', '.join(kept)}" if kept else ""))
        if q.get("opset"):
            print(f"quantization: {q['opset']}")
    if done.output_error:
        groups = [f"{k} {v:.4f}" for k, v in done.output_error.items() if "[" in k]
        print(f"relative output error on the {done.judged_on} samples, each output and channel group on its own "
              f"scale: worst {done.output_error['worst']:.4f}" + (f" ({', '.join(groups)})" if groups else "")
              + (f", within the ceiling {done.max_output_error:g}" if done.max_output_error is not None else ""))
        if done.task:
            t = done.task
            checks = "".join(f", {k.replace('_', ' ')} {t[k]:.3f} (at least {least:g})"
                             for k, least in t.get("checks", {}).items() if k in t)
            print(f"task: {t['metric']} {t['value']:.3f} against the original (floor {t['floor']:.2f}){checks}, "
                  f"on {t['samples']} {done.judged_on} samples")
    else:
        print("no calibration data: plain SVD, whole-model error not measured (pass --calib DATA.npz)")
    print(f"wrote {done.output}" + (f" and {args.report}" if args.report else "") + f" in {done.seconds:.1f} s")
    return 0


def _device(args):
    """The device --on names, with the SSH flags (edgelr.measure.device); compress connects to it."""
    from edgelr.measure.device import DeviceTimer
    from edgelr.measure.remote import Device

    return DeviceTimer(Device(args.on, port=args.port, identity=Path(args.identity) if args.identity else None,
                              known_hosts=Path(args.known_hosts) if args.known_hosts else None, timeout=args.timeout),
                       python=args.python)


def _pipeline(args) -> int:
    """A pipeline folder: its denoiser compressed, calibrated on trajectories, judged by images (compress_pipeline)."""
    from edgelr.api import compress_pipeline, pipeline_passes
    from edgelr.passes.factorize import FactorizeConfig
    from edgelr.recipe import load_recipe

    given = [flag for flag, value in (("--calib", args.calib), ("--heldout", args.heldout), ("--metric", args.metric),
                                      ("--floor", args.floor), ("--on", args.on), ("--float-output", args.float_output),
                                      ("--write-recipe", args.write_recipe), ("--report", args.report)) if value]
    if given:
        raise EdgelrError(f"{args.model}: {given[0]} is for ONNX models; a pipeline folder is calibrated on its own "
                          "sampling trajectories and its manifest.json records what was done")
    budget = {"params": args.params, "flops": args.flops, "latency": args.latency, "max_error": args.max_error}
    factorize = FactorizeConfig(**{k: v for k, v in budget.items() if v is not None}) if any(budget.values()) else None
    if args.distill is None and args.distill_features:
        raise EdgelrError("--distill-features says what a distillation aligns: give --distill MINUTES too")
    if args.recipe:
        if factorize or args.prune or args.quantize or args.remove_blocks or args.distill:
            raise EdgelrError("--recipe gives the passes: drop the budget, --prune, --quantize, --remove-blocks and "
                              "--distill flags (or put them in the recipe)")
        passes = load_recipe(args.recipe)
    else:
        if not (factorize or args.prune or args.quantize or args.remove_blocks):
            raise EdgelrError("say how far to compress: --params F, --flops F, --latency F, --max-error E, --prune F, "
                              "--quantize SCHEME, --remove-blocks N, or --recipe RECIPE.yaml")
        features = {None: "auto", "none": None}.get(args.distill_features, args.distill_features)
        passes = pipeline_passes(factorize, args.prune, args.quantize, not args.no_refit, args.remove_blocks,
                                 args.distill, features)
    done = compress_pipeline(args.model, args.output, passes, seeds=args.seeds or 4, steps=args.steps or 20,
                             prompts=args.prompt, guidance=args.guidance or 7.5, images=args.images or 4,
                             max_output_error=args.max_output_error, min_psnr=args.min_psnr, min_ssim=args.min_ssim,
                             target=args.target, distill_seeds=args.distill_seeds, progress=not args.quiet)
    record, c, i = done.manifest["compression"], done.calibration, done.images
    print(f"calibrated on {c['samples']} denoiser inputs from {len(c['seeds'])} sampling runs, {c['timesteps_covered']} "
          f"of {c['steps']} timesteps" + (f", guidance {c['guidance']:g}" if c["guidance"] else ""))
    if record.get("blocks_removed"):
        b = record["blocks_removed"]
        print(f"removed {len(b['removed'])} of {len(b['candidates'])} candidate blocks, judged by their images: "
              f"{', '.join(b['removed'])}")
    if done.distillation:
        d, data = done.distillation, done.distillation["data"]["train"]
        print(f"distilled {d['steps']} steps in {d['seconds']:.0f} s on {data['samples']} denoiser inputs from "
              f"{len(data['seeds'])} of the original's sampling runs, final loss {d['final_loss']:.4g}"
              + (f", {len(d['features'])} inner tensors aligned" if d.get("features") else ""))
        if "heldout_error_before" in d:
            print(f"held-out trajectories' output error: {d['heldout_error_before']:.4f} before, "
                  f"{d['heldout_error_after']:.4f} after" + (" (training raised it: the denoiser is kept as it was)"
                                                              if d.get("kept") == "student" else ""))
    if done.denoiser.quantized:
        q = done.denoiser.quantized
        print(f"quantized {q['nodes_quantized']} nodes ({q['scheme']}, {q['activations']} activations)")
    print(f"denoiser: {record['params_before']:,} -> {record['params_after']:,} weights, {record['bytes_before']:,} -> "
          f"{record['bytes_after']:,} bytes; output error on the trajectories {done.denoiser.output_error.get('worst', 0.0):.4f}")
    print(f"images against the original's, same seeds ({i['images']} images, {i['steps']} steps): PSNR {i['psnr_mean']:.2f} "
          f"dB (worst {i['psnr_min']:.2f}), SSIM {i['ssim_mean']:.4f} (worst {i['ssim_min']:.4f})")
    print(f"wrote {done.output} in {done.seconds:.1f} s; run it there: python run.py --steps {i['steps']}"
          + (' --prompt "..."' if done.manifest["run"]["conditional"] else ""))
    return 0
