"""The verbs: compress (a list of passes, a recipe, or flags that stand for one), and the pipeline that runs it.

    report = edgelr.compress("model.onnx", "small.onnx", FactorizeConfig(params=0.5), calib="data.npz")
    report = edgelr.compress("model.onnx", "fast.onnx", load_recipe("recipes/yolov8n-latency50-int8.yaml"), calib=...)
    done = compress_pipeline("sd-onnx/", "sd-small/", FactorizeConfig(params=0.5))   # an exported diffusion pipeline

A pipeline loads the model once, runs each pass on it in order (each sees what the earlier ones left on
the shared Context), writes OUTPUT whole or not at all, and measures the result against the model as
given, on every output. compress_pipeline does the same to an exported diffusion pipeline's denoiser, calibrated
on the pipeline's own sampling trajectories and judged by the images it makes, into a new pipeline folder.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from edgelr.deploy.targets import Target, load_target
from edgelr.errors import EdgelrError
from edgelr.graph.einsum import lower_weight_einsums
from edgelr.io import model as model_io
from edgelr.io.samples import load_samples
from edgelr.measure.device import DeviceTimer
from edgelr.measure.profile import compare_models, layer_times, sample_feed
from edgelr.measure.remote import Device
from edgelr.measure.task import recognise
from edgelr.measure.verify import ceiling_for, judge, rounded_up
from edgelr.passes.base import Context, PassConfig, make_pass
from edgelr.passes.factorize import FactorizeConfig, FactorizeResult
from edgelr.passes.prune import PruneConfig
from edgelr.passes.quantize import SCHEMES, QuantizeConfig, quantized_already
from edgelr.passes.refit import RefitConfig
from edgelr.passes.remove_blocks import RemoveBlocksConfig
from edgelr.recipe import Recipe
from edgelr.report.tables import plain_json, result_json, write_json


@dataclass
class CompressReport:
    source: Path
    output: Path
    result: FactorizeResult | None  # None when no factorize pass ran
    output_error: dict[str, float]  # per output and channel group, and the worst (edgelr.core.objective)
    seconds: float
    latency: dict | None = None  # with a latency budget: predicted vs measured per search round, table use
    quantized: dict | None = None  # with quantize: what edgelr.passes.quantize did
    pruned: dict | None = None  # with prune: what edgelr.passes.prune did
    distilled: dict | None = None  # with distill: steps, seconds, final loss
    passes: list[dict] = field(default_factory=list)  # the recipe that ran (configs as dicts)
    target: str | None = None
    task: dict | None = None  # the task metric against the original, and on what it was judged
    judged_on: str = "calibration"  # or "held-out": the samples output_error and task were measured on
    max_output_error: float | None = None  # the ceiling output_error["worst"] was held to
    blocks_removed: dict | None = None  # with remove_blocks: the candidates, their sensitivity, what went

    def to_json(self) -> dict:
        data = {"source": str(self.source), "output": str(self.output), "seconds": round(self.seconds, 3),
                "target": self.target, "passes": self.passes}
        if self.result is not None:
            data.update(result_json(self.result))
        data["output_error"] = self.output_error
        data["judged_on"] = self.judged_on
        if self.max_output_error is not None:
            data["max_output_error"] = self.max_output_error
        if self.task is not None:
            data["task"] = self.task
        for name in ("latency", "quantized", "pruned", "distilled", "blocks_removed"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data


def flag_passes(factorize: FactorizeConfig | None, prune: float | None = None, quantize: str | None = None,
                refit: bool = True, calibrated: bool = True) -> list[PassConfig]:
    """The passes the command-line flags stand for: prune, factorize, then refit and quantize. A static
    INT8 model is refit after quantization (the refit reads its inputs); any other before it. Without
    calibration data there is nothing to refit on."""
    if quantize is not None and quantize not in SCHEMES:
        raise EdgelrError(f"--quantize {quantize}: unknown scheme; known schemes: {', '.join(SCHEMES)}")
    if factorize is None:  # pruning or quantization alone: every layer stays dense
        factorize = FactorizeConfig(ranks={})
    passes: list[PassConfig] = [PruneConfig(ratio=prune)] if prune is not None else []
    passes.append(factorize)
    refitting = [RefitConfig()] if refit and calibrated and factorize.ranks != {} else []
    quantizing = [QuantizeConfig(scheme=quantize)] if quantize is not None else []
    passes += quantizing + refitting if quantize == "int8" else refitting + quantizing
    return passes


def compress(
    source: str | os.PathLike,
    output: str | os.PathLike,
    passes: FactorizeConfig | Sequence[PassConfig] | Recipe | None,
    calib: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    progress: bool = True,
    quantize: str | None = None,
    prune: float | None = None,
    float_output: str | os.PathLike | None = None,
    refit: bool = True,
    target: str | Target | None = None,
    heldout: str | os.PathLike | None = None,
    metric: str | None = None,
    floor: float | None = None,
    max_output_error: float | None = None,
    on: str | DeviceTimer | None = None,
    block_judge: Callable[[ir.Model], float] | None = None,
) -> CompressReport:
    """Run PASSES on SOURCE and write OUTPUT; with CALIB the passes are data-aware and the result is
    measured on it against SOURCE. PASSES is a recipe, a list of pass configs, or a FactorizeConfig with
    the flags' sugar around it: `prune` (a fraction of channels to remove first), `quantize` ("int8":
    static, calibrated on CALIB; "int8-lowrank"; "int8-dynamic") and `refit` (flag_passes says the order).
    `target` (a name from targets/, a .toml path, or a Target) sets what quantization and latency
    tables aim at. `float_output` keeps the model before quantization (what edgelr distill trains).

    The result is judged on HELDOUT (else on CALIB) by the objective (each output and channel group on
    its own scale) and by the task metric: `metric` (a kind of edgelr.measure.task, or "none"), else the
    recipe's, else what the model's metadata says. A result under the metric's `floor`, or with an output
    group's error over `max_output_error` (default: edgelr.measure.verify.MAX_OUTPUT_ERROR where no task
    metric judges), is not written: EdgelrError says what it measured.

    `on` ("user@host", or a DeviceTimer for SSH options) times a latency search's layers and rounds on that
    device over SSH, into latency tables keyed by what the device is (edgelr.measure.device).

    `block_judge` (model -> error, lower is better) ranks blocks for a remove_blocks pass by what the model
    makes (compress_pipeline judges a diffusion denoiser by its generated images); default: output error."""
    start = time.perf_counter()
    source = Path(source)
    recipe = as_recipe(passes, prune, quantize, refit, calib is not None, target)
    output = model_io.check_output_path(output, source, calib)
    if report is not None:
        report = model_io.check_output_path(report, source, calib)
        if report.resolve() == output.resolve():
            raise EdgelrError(f"{report}: the report and the model cannot be the same file")
    if float_output is not None:
        if not any(isinstance(c, QuantizeConfig) for c in recipe.passes):
            raise EdgelrError("--float-output keeps the model before quantization: it needs --quantize")
        float_output = model_io.check_output_path(float_output, source, calib)
        if float_output.resolve() == output.resolve():
            raise EdgelrError(f"{float_output}: the float model and the output cannot be the same file")
    recipe.check(calibrated=calib is not None)
    resolved = target if isinstance(target, Target) else load_target(recipe.target) if recipe.target else None
    if on is not None:  # before anything slow: an unreachable device or one without onnxruntime fails here
        if not any(isinstance(c, FactorizeConfig) and c.latency is not None for c in recipe.passes):
            raise EdgelrError("--on times a latency search on the device: give --latency F too")
        on = (on if isinstance(on, DeviceTimer) else DeviceTimer(Device(on))).connect()
    model = model_io.load(source)
    if any(isinstance(c, QuantizeConfig) for c in recipe.passes) and (count := quantized_already(model)):
        raise EdgelrError(f"{source}: already quantized ({count} quantization nodes): quantize the float model it was "
                          "made from, or leave out --quantize")
    samples = load_samples(calib, model) if calib is not None else None
    task = recognise(model, metric if metric is not None else recipe.metric, floor if floor is not None else recipe.floor)
    if heldout is not None and samples is None:
        raise EdgelrError("--heldout judges a calibrated compression: give --calib DATA.npz too")
    judged = load_samples(heldout, model) if heldout is not None else samples
    if task is not None and judged is None:
        if task.source != "metadata":
            raise EdgelrError(f"the {task.kind} metric is judged on samples: give --calib DATA.npz (and --heldout)")
        task = None  # nothing to judge on: the model's metadata names a task nobody asked to gate
    given = max_output_error if max_output_error is not None else recipe.max_output_error
    ceiling = ceiling_for(task, given) if judged is not None else None
    with tempfile.TemporaryDirectory(prefix=".edgelr-", dir=output.parent) as tmp:
        tmp = Path(tmp).resolve()
        path = source
        if any(isinstance(c, FactorizeConfig) for c in recipe.passes) and any(n.op_type == "Einsum" for n in model.graph):
            model_io.infer_shapes(model)  # fixed sizes become constant shapes in the rewrite
            if lower_weight_einsums(model):
                path = tmp / "einsums-as-matmuls.onnx"  # exact; the passes that read files read this one
                model_io.save(model, path)
        ctx = Context(source, samples, Path(calib) if calib is not None else None, tmp, resolved, progress, path=path,
                      task=task, judged=judged, ceiling=ceiling, device=on, block_judge=block_judge)
        for i, config in enumerate(recipe.passes):
            ctx.later = tuple(recipe.passes[i + 1:])
            try:
                done = make_pass(config, ctx)(model)
            except ir.passes.PreconditionError as exc:  # onnx-ir wraps what `requires` raised
                if isinstance(exc.__cause__, EdgelrError):
                    raise EdgelrError(f"{recipe.where(i)}: {exc.__cause__}") from None
                raise
            model = done.model
            ctx.pristine = ctx.pristine and not done.modified
            if ctx.later:  # passes that work on files (timing, quantization, probes) read the model from here
                ctx.path = tmp / f"{i}-{config.kind}.onnx"
                model_io.save(model, ctx.path)
            model_io.checkpoint(f"after-{config.kind}")
        # both models are judged where they were written, beside OUTPUT, and move into place only once passed
        with model_io.Delivery(samples.feed(0) if samples is not None else None) as delivery:
            staged = delivery.write(model, output)
            if float_output is not None:
                delivery.write(ctx.float_model, float_output)
            result = ctx.factorized.result if ctx.factorized is not None else None
            del model
            ctx.float_model = None  # verification below loads both files in ONNX Runtime; free the graphs first
            model_io.checkpoint("judging")
            verdict = (judge(source, staged, judged, task, ctx.references if heldout is None else None, ctx.objective,
                             ceiling) if judged is not None else None)
            if verdict is not None:
                delivery.ran(staged)  # on every sample
            if verdict is not None and not verdict.passed:
                way = "lower the floor (--floor)" if verdict.score is not None and not verdict.score.passed else \
                    f"pass --max-output-error {rounded_up(verdict.errors['worst'])}"
                budgeted = any(isinstance(c, (PruneConfig, RemoveBlocksConfig))
                               or (isinstance(c, FactorizeConfig) and c.ranks != {})
                               for c in recipe.passes)  # else quantization alone: there is no budget to loosen
                raise EdgelrError(f"{output}: not written: {verdict.line()}, on {verdict.samples} "
                                  f"{'held-out' if heldout is not None else 'calibration'} samples; "
                                  + (f"loosen the budget, or {way}" if budgeted else way))
            errors = verdict.errors if verdict is not None else {}
            if report is not None and ctx.factorized is not None:
                _measure_layers(ctx.factorized, staged, samples)
    done = CompressReport(source, output, result, errors, time.perf_counter() - start, ctx.latency, ctx.quantized,
                          ctx.pruned, ctx.distilled, [c.to_dict() for c in recipe.passes],
                          recipe.target if resolved is None else resolved.name,
                          verdict.to_json() if verdict is not None and task is not None else None,
                          "held-out" if heldout is not None else "calibration", ceiling if verdict is not None else None,
                          ctx.blocks_removed)
    if report is not None:
        write_json(done.to_json(), report)
    return done


@dataclass
class PipelineCompressReport:
    source: Path  # the exported pipeline folder
    output: Path  # the new pipeline folder
    denoiser: CompressReport  # what compress did to the denoiser, judged on the trajectory samples
    images: dict  # PSNR/SSIM of the new pipeline's images against the source's, same seeds (ImageJudge.describe too)
    calibration: dict  # the trajectories the denoiser was calibrated on (Trajectories.summary)
    manifest: dict  # the new folder's manifest.json
    seconds: float
    distillation: dict | None = None  # with a distill pass: what it did and the trajectories it trained on


def compress_pipeline(
    export_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    passes: FactorizeConfig | Sequence[PassConfig] | Recipe,
    *,
    seeds: int | Sequence[int] = 4,
    steps: int = 20,
    prompts: Sequence[str] | None = None,
    guidance: float = 7.5,
    samples: int = 64,
    images: int = 4,
    max_output_error: float | None = None,
    min_psnr: float | None = None,
    min_ssim: float | None = None,
    target: str | None = None,
    distill_seeds: int | None = None,
    distill_samples: int | None = None,
    progress: bool = True,
) -> PipelineCompressReport:
    """Compress the denoiser of the pipeline EXPORT_DIR (an `edgelr export PIPELINE_DIR` folder) with PASSES and
    write the pipeline, with it in place, to OUT_DIR (new, empty, or an earlier edgelr pipeline: replaced
    whole; EXPORT_DIR is never changed).

    Calibration: the pipeline runs STEPS steps once per seed (SEEDS: a count, or the seeds), a text-to-image one
    on PROMPTS (default: edgelr.calibration.trajectories.DEFAULT_PROMPTS) with classifier-free GUIDANCE, and at
    most SAMPLES of its denoiser's inputs, spread evenly over the timesteps, are what compress() calibrates on
    and judges the denoiser's output error on (MAX_OUTPUT_ERROR: compress's ceiling, default 0.2).
    Judgement: IMAGES seeds of their own (edgelr.deploy.pipeline_compress.JUDGE_SEED on) generate with the
    original and the compressed denoiser from the same noise; PSNR and SSIM of the images are reported (and
    held to MIN_PSNR / MIN_SSIM when given: under them, nothing is written), and a remove_blocks pass ranks
    blocks by those runs' images (1 - mean SSIM), not by one step's output.

    Distillation: a distill pass (edgelr.api.denoiser_distill_config, or any DistillConfig without
    data of its own) trains the float denoiser the passes before it made towards the original on the original's
    own trajectories (no images needed): DISTILL_SEEDS runs (default 32, seeds
    edgelr.deploy.pipeline_compress.DISTILL_SEED on) at the same steps, prompts and guidance, at most
    DISTILL_SAMPLES (default 2048) of their inputs; runs of other seeds are held out (the error before and after;
    a training that raised it is not kept). It goes before any quantize pass, which then calibrates on the
    distilled model; its features may be "blocks" (the joins of the blocks a remove_blocks pass removed). The
    manifest records it under "distillation": steps, seconds, loss, held-out error, the tensors aligned and the
    trajectories trained on (Trajectories.summary)."""
    from edgelr.calibration.trajectories import DEFAULT_PROMPTS, capture_trajectories
    from edgelr.deploy.pipeline_compress import (
        BLOCK_JUDGE,
        DENOISER,
        DISTILL_SAMPLES,
        DISTILL_SEEDS,
        JUDGE_SEED,
        ImageJudge,
        capture_distill_data,
        file_bytes,
        float_params,
        image_measures,
        read_exported,
        write_compressed,
    )
    from edgelr.deploy.pipeline_run import OnnxDiffusionPipeline
    from edgelr.version import __version__

    start = time.perf_counter()
    source = read_exported(export_dir)
    out_dir = model_io.check_output_folder(out_dir, source.path, what="compressed pipeline")
    recipe = as_recipe(passes, target=target)
    if recipe.target is None:  # quantization aims at the target the pipeline was exported for
        try:
            recipe = dataclasses.replace(recipe, target=load_target(source.manifest["target"]["name"]).name)
        except (EdgelrError, KeyError, TypeError):
            pass
    for name, value in (("steps", steps), ("images", images), ("samples", samples), ("distill_seeds", distill_seeds),
                        ("distill_samples", distill_samples)):
        if value is not None and value < 1:
            raise EdgelrError(f"{name} {value}: need 1 or more")
    on_trajectories = _check_distill_order(recipe, distill_seeds, distill_samples)
    if any(c.kind == "distill" for c in recipe.passes):
        from edgelr.train.distill import check_distillable

        check_distillable(source.denoiser)
    if prompts and not source.conditional:
        raise EdgelrError(f"{source.path}: an unconditional pipeline takes no prompts; leave them out")
    prompts = (tuple(prompts) if prompts else DEFAULT_PROMPTS) if source.conditional else None
    pipe = OnnxDiffusionPipeline(source.path)
    say = print if progress else (lambda *a, **k: None)
    say(f"sampling trajectories: {seeds if isinstance(seeds, int) else len(seeds)} seeds x {steps} steps",
        file=sys.stderr)
    trajectories = capture_trajectories(pipe, seeds=seeds, steps=steps, prompts=prompts, guidance=guidance,
                                        samples=samples)
    judge = ImageJudge(pipe, seeds=range(JUDGE_SEED, JUDGE_SEED + images), steps=steps, prompts=prompts,
                       guidance=guidance)
    removes = any(isinstance(c, RemoveBlocksConfig) for c in recipe.passes)
    with tempfile.TemporaryDirectory(prefix=".edgelr-", dir=out_dir.parent) as tmp:
        calib = trajectories.save(Path(tmp) / "trajectories.npz")
        unet = Path(tmp) / "model.onnx"
        taught = None
        if on_trajectories:
            runs = distill_seeds or DISTILL_SEEDS
            say(f"sampling the teacher's trajectories to distil on: {runs} seeds x {steps} steps", file=sys.stderr)
            taught = capture_distill_data(pipe, Path(tmp), seeds=runs, steps=steps, prompts=prompts, guidance=guidance,
                                          samples=distill_samples or DISTILL_SAMPLES)
        try:
            done = compress(source.denoiser, unet, _with_distill_data(recipe, taught), calib=calib, progress=progress,
                            max_output_error=max_output_error, block_judge=judge.judge if removes else None)
        except EdgelrError as exc:  # name the file the user will get, not the scratch one
            raise EdgelrError(str(exc).replace(str(unet), str(out_dir / DENOISER / "model.onnx"))) from None
        compressed = judge.images(unet)
        quality = {**judge.describe(), **image_measures(judge.reference, compressed)}
        short = [f"{what} {quality[key]:.2f}{unit} under {least:g}" for what, key, unit, least in
                 (("PSNR", "psnr_mean", " dB", min_psnr), ("SSIM", "ssim_mean", "", min_ssim))
                 if least is not None and not quality[key] >= least]
        if short:
            raise EdgelrError(f"{out_dir}: not written: the compressed pipeline's images against the original's: "
                              f"{', '.join(short)} (mean of {quality['images']} images); loosen the budget")
        done.passes = [c.to_dict() for c in recipe.passes]  # as given: the scratch files they read are gone
        denoiser = done.to_json()
        denoiser["output"] = f"{DENOISER}/model.onnx"
        denoiser["judged_on"] = "trajectory samples"
        record = {"edgelr": __version__, "from": str(source.path), "passes": done.passes,
                  "params_before": float_params(source.denoiser), "params_after": float_params(unet),
                  "bytes_before": file_bytes(source.denoiser), "bytes_after": file_bytes(unet),
                  "calibration": trajectories.summary(), "images": quality, "denoiser": denoiser,
                  "seconds": round(time.perf_counter() - start, 3)}
        if removes and done.blocks_removed is not None:
            names = done.blocks_removed["candidates"]
            record["blocks_removed"] = {**done.blocks_removed, "judged_by": BLOCK_JUDGE,
                                        "candidate_images": dict(zip(names, judge.judged))}
        distillation = {**(done.distilled or {}), "data": taught.summary} if taught is not None else None
        if distillation is not None:
            record["distillation"] = distillation
        manifest = write_compressed(source, out_dir, unet, plain_json(record), judge, compressed)
    done.output = out_dir / DENOISER / "model.onnx"
    return PipelineCompressReport(source.path, out_dir, done, quality, trajectories.summary(), manifest,
                                  time.perf_counter() - start, distillation)


def pipeline_passes(factorize: FactorizeConfig | None = None, prune: float | None = None, quantize: str | None = None,
                    refit: bool = True, remove_blocks: int | None = None, distill: float | None = None,
                    distill_features: str | None = "auto") -> list[PassConfig]:
    """The passes compress_pipeline's flags stand for: remove_blocks (REMOVE_BLOCKS of them), prune, factorize and
    refit (flag_passes), a distillation of DISTILL minutes (edgelr.api.denoiser_distill_config), then
    quantize, calibrated on the distilled model. DISTILL_FEATURES: a DistillConfig.features kind, None, or "auto",
    as measured on the digits DDPM (260 steps, 16 images): "factorized" where a budget factorizes (flops 0.35:
    PSNR 26.8 dB against 25.2 without), and "factorized+blocks" where blocks are removed too (one block and flops
    0.5: 28.5 against 28.3); removed blocks alone, none (two blocks' joins aligned: 26.8 dB against 27.6)."""
    passes: list[PassConfig] = [RemoveBlocksConfig(count=remove_blocks)] if remove_blocks else []
    if distill is None:
        return passes + (flag_passes(factorize, prune, quantize, refit) if factorize or prune or quantize else [])
    if not (factorize or prune or remove_blocks):
        raise EdgelrError("--distill trains a compressed float denoiser towards the original: give a budget, --prune "
                          "or --remove-blocks too")
    if distill_features == "auto":
        distill_features = ("factorized+blocks" if remove_blocks else "factorized") if factorize else None
    wants = {"blocks": remove_blocks, "factorized": factorize}
    for kind in (distill_features or "").split("+"):
        if kind in wants and not wants[kind]:
            raise EdgelrError(f"--distill-features {distill_features}: aligns what "
                              + ("--remove-blocks removed: give --remove-blocks N" if kind == "blocks"
                                 else "a budget factorized: give --params, --flops or --latency"))
    if factorize or prune:  # the float passes: a refit after quantization would undo the distillation
        passes += flag_passes(factorize, prune, None, refit)
    return passes + [denoiser_distill_config(distill, distill_features)] + ([QuantizeConfig(scheme=quantize)] if quantize else [])


def denoiser_distill_config(minutes: float, features: str | None = None):
    """How a denoiser is distilled for MINUTES (edgelr.train.distill.DistillConfig): batch 16 at lr 1e-4 (what
    tools/bench_diffusion.py distils the digits DDPM with), decayed to 0 by the time limit, no augmentation
    (the inputs are the trajectories themselves), the noise prediction as one output."""
    from edgelr.train.distill import DistillConfig

    return DistillConfig(steps=1_000_000, batch=16, lr=1e-4, augment="none", by_group=False,
                         time_limit=minutes * 60, anneal_by_time=True, features=features)


def _check_distill_order(recipe: Recipe, seeds: int | None, samples: int | None) -> bool:
    """Whether a distill pass of the recipe trains on the teacher's trajectories (names no data of its own);
    EdgelrError for one after a quantize pass (it trains the float model), or for distillation data settings
    with nothing to distil."""
    distills = [i for i, c in enumerate(recipe.passes) if c.kind == "distill"]
    quantized = [i for i, c in enumerate(recipe.passes) if isinstance(c, QuantizeConfig)]
    if distills and quantized and quantized[0] < distills[-1]:
        raise EdgelrError(f"{recipe.where(distills[-1])}: distill trains the float denoiser: put it before quantize "
                          "(which then calibrates on the distilled model)")
    taught = any(recipe.passes[i].data is None for i in distills)
    if not taught and (seeds is not None or samples is not None):
        raise EdgelrError("--distill-seeds sets the runs a distillation trains on: give --distill MINUTES (or a "
                          "distill pass without data of its own in the recipe) too")
    return taught


def _with_distill_data(recipe: Recipe, taught) -> Recipe:
    """RECIPE with its distill passes that name no data of their own training on TAUGHT's trajectories (the
    teacher's, edgelr.deploy.pipeline_compress.DistillData) and evaluated on its held-out ones."""
    if taught is None:
        return recipe
    passes = tuple(dataclasses.replace(c, data=str(taught.train), heldout=str(taught.heldout))
                   if c.kind == "distill" and c.data is None else c for c in recipe.passes)
    return dataclasses.replace(recipe, passes=passes)


def as_recipe(passes: FactorizeConfig | Sequence[PassConfig] | Recipe | None, prune: float | None = None,
              quantize: str | None = None, refit: bool = True, calibrated: bool = True,
              target: str | Target | None = None) -> Recipe:
    """The recipe compress runs for these arguments (the flags' sugar spelled out, a target added)."""
    target_name = target.name if isinstance(target, Target) else target
    if passes is None or isinstance(passes, FactorizeConfig):
        configs = flag_passes(passes, prune, quantize, refit, calibrated)
        return Recipe(tuple(configs), target_name, flags=tuple(_flag(c) for c in configs))
    if prune is not None or quantize is not None or not refit:
        raise EdgelrError("prune, quantize and refit are sugar for a FactorizeConfig: with a recipe or a list of "
                          "passes, put them in the list")
    if isinstance(passes, Recipe):
        if target_name is not None and passes.target is not None and target_name != passes.target:
            raise EdgelrError(f"--target {target_name}: the recipe names target {passes.target!r}; give one")
        return passes if target_name is None else dataclasses.replace(passes, target=target_name)
    passes = tuple(passes)
    if not passes or not all(isinstance(c, PassConfig) for c in passes):
        raise EdgelrError("passes: give a list of pass configs (FactorizeConfig, QuantizeConfig, ...)")
    return Recipe(passes, target_name)


def _flag(config: PassConfig) -> str:
    """The command-line flag a pass of flag_passes stands for (errors name flags on the command line)."""
    if isinstance(config, FactorizeConfig):
        budget = next(((name, getattr(config, name)) for name in ("params", "flops", "latency", "max_error")
                       if getattr(config, name) is not None), None)
        return f"--{budget[0].replace('_', '-')} {budget[1]:g}" if budget else ""
    if isinstance(config, QuantizeConfig):
        return f"--quantize {config.scheme}"
    return f"--prune {config.ratio:g}" if isinstance(config, PruneConfig) else ""


def _measure_layers(factorized, output: Path, samples) -> None:
    """Each layer's measured ms per run before and after, from ONNX Runtime's profiler (for the report)."""
    before_path = factorized.before
    try:
        feed = samples.feed(0) if samples is not None else sample_feed(before_path)
    except EdgelrError:
        return  # dynamic dims and no samples: nothing to run the models on
    found = compare_models({"original": before_path, "compressed": output}, feed, runs=20, warmup=3, threads=1)
    before, after = (layer_times(found[k], factorized.aliases) for k in ("original", "compressed"))
    for row in factorized.result.layers:
        row.measured_ms_before, row.measured_ms_after = before.get(row.name), after.get(row.name)
