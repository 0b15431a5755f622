"""Diffusion pipelines as deployable folders: a diffusers pipeline folder in, its components in ONNX, each
checked against torch, and a runner that generates images with them on ONNX Runtime.

    done = export_pipeline("runs/sd", "x86-cpu", "out/")      # EdgelrError (one line) on any problem
    done.manifest["components"]["unet"]["parity"]             # {"relative_error": 3e-7, "max_abs_error": ..., ...}
    images = OnnxDiffusionPipeline("out/")("a red cat", steps=25)   # edgelr.deploy.pipeline_run

Two paths, by the pipeline's denoiser:
- Stable-Diffusion style (UNet2DConditionModel, AutoencoderKL, a CLIP text encoder and tokenizer): optimum-onnx's
  diffusers exporter, `main_export(DIR, OUT, task="text-to-image")`; it writes text_encoder/, unet/,
  vae_encoder/ and vae_decoder/ (model.onnx each), tokenizer/, scheduler/ and model_index.json, a layout
  optimum's ORTDiffusionPipeline also loads.
- Unconditional (DDPMPipeline: a UNet2DModel and a scheduler): optimum has no path for it; the UNet goes through
  torch.onnx.export (the TorchScript exporter: inputs sample and int64 timestep of shape (batch,), output
  out_sample) into the same layout.

Before anything is exported, every component loads with all of its weights (edgelr.io.diffusers_dir). After,
every exported component runs in ONNX Runtime on seeded inputs beside its torch module (the denoiser at two
timesteps); its relative error must stay within `tolerance`. The folder (OUT plus manifest.json with each
component's parity, and run.py, the numpy + onnxruntime runner) is written beside OUT and renamed into place:
a component that does not export, or one that exports wrong, is one EdgelrError line and OUT is left as it was.

The runner steps the scheduler in numpy (DDPM and DDIM, from scheduler_config.json), not with diffusers'
scheduler classes: the folder runs on a device with numpy and onnxruntime alone, no torch.

A TensorRT target (--target rtx) writes the same folder plus a TensorRT engine for the denoiser in
engines/unet/ (edgelr.deploy.pipeline_engine); given a folder `edgelr export` or `edgelr compress` wrote, it
copies that folder and builds the engine for its denoiser: export -> compress -> export --target rtx.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelr.deploy.files import file_entry, whole_folder
from edgelr.deploy.pipeline_engine import add_denoiser_engine, copy_without_engines
from edgelr.deploy.pipeline_run import MANIFEST, check_scheduler
from edgelr.deploy.targets import Target, load_target
from edgelr.deploy.tensorrt import tensorrt_module
from edgelr.errors import EdgelrError
from edgelr.io import model as model_io
from edgelr.io.diffusers_dir import (
    PipelineDir,
    component_class,
    import_diffusers,
    load_component,
    quiet_libraries,
    read_pipeline_dir,
)
from edgelr.io.shapes import ShapeRange
from edgelr.version import __version__

PARITY_TOLERANCE = 1e-4  # relative error (||onnx - torch|| / ||torch||, per output) each component must stay within
RUN_PY = Path(__file__).with_name("pipeline_run.py")
OPSET = 17
# the order optimum's text-to-image export writes its submodels in (a failure names the first not written)
OPTIMUM_ORDER = ("text_encoder", "text_encoder_2", "unet", "transformer", "vae_encoder", "vae_decoder")


@dataclass
class PipelineExportResult:
    target: Target
    out_dir: Path
    manifest: dict
    seconds: float

    @property
    def parity(self) -> dict[str, dict]:
        return {name: c["parity"] for name, c in self.manifest["components"].items()}


@dataclass(frozen=True)
class _Plan:
    kind: str                    # "text-to-image" (optimum) | "unconditional" (torch.onnx)
    exporter: str
    models: tuple[str, ...]      # the pipeline's components that become ONNX models


def export_pipeline(pipeline_dir: str | os.PathLike, target: str | Target, out_dir: str | os.PathLike, *,
                    threads: int | None = None, shapes: dict[str, ShapeRange] | None = None,
                    precision: str | None = None, tolerance: float = PARITY_TOLERANCE,
                    progress: bool = True) -> PipelineExportResult:
    """Export the diffusers pipeline in `pipeline_dir` for `target` into `out_dir` (new, empty, or an earlier
    export: replaced whole). An ONNX Runtime target (format onnx) gets the ONNX folder; a TensorRT one the same
    folder plus an engine for the denoiser (edgelr.deploy.pipeline_engine: `shapes` may set its batch range,
    `precision` its precision). `pipeline_dir` may also be a folder `edgelr export` or `edgelr compress` wrote:
    for a TensorRT target it is copied with an engine built for its own denoiser. EdgelrError, with nothing
    written, when the folder is not a pipeline, a component does not load or export, one's parity exceeds
    `tolerance`, or the engine does not build."""
    start = time.perf_counter()
    target = _pipeline_target(target, threads, shapes, precision)
    if (Path(pipeline_dir) / MANIFEST).is_file():
        return _engine_for_exported(pipeline_dir, target, out_dir, threads, shapes, precision, progress, start)
    if precision == "int8":
        raise EdgelrError(f"{pipeline_dir}: --precision int8 needs a quantized denoiser; export the pipeline, quantize "
                          f"it (edgelr compress OUT --quantize int8 --target {target.name} -o OUT2), then export OUT2")
    if target.is_tensorrt:
        tensorrt_module(target)  # a missing TensorRT is one line before the export, not after it
    pipe = read_pipeline_dir(pipeline_dir)
    out_dir = model_io.check_output_folder(out_dir, pipe.path, what="exported pipeline", manifest=MANIFEST)
    plan = _plan(pipe)
    _say(progress, f"{pipe.path}: {pipe.class_name} ({plan.kind}); loading {', '.join(plan.models)}")
    modules = {name: load_component(pipe.components[name]) for name in (*plan.models,)}
    with _writing(out_dir) as stage:
        manifest = _write(pipe, plan, modules, target, stage, tolerance, progress)
        if target.is_tensorrt:
            manifest = add_denoiser_engine(stage, manifest, target, shapes=shapes, precision=precision,
                                           progress=progress, named=out_dir)
    return PipelineExportResult(target, out_dir, manifest, time.perf_counter() - start)


def _pipeline_target(target: str | Target, threads: int | None, shapes, precision) -> Target:
    """The target, checked: ONNX Runtime (format onnx) or TensorRT; --shapes and --precision for engines only."""
    target = target if isinstance(target, Target) else load_target(target)
    if not target.is_tensorrt and (target.backend != "onnxruntime" or target.format != "onnx"):
        raise EdgelrError(f"target '{target.name}' ({target.backend}, format {target.format}): diffusion pipelines "
                          "export to ONNX Runtime targets of format onnx (e.g. --target x86-cpu) or to TensorRT "
                          "targets (e.g. --target rtx)")
    given = [flag for flag, value in (("--shapes", shapes), ("--precision", precision)) if value]
    if given and not target.is_tensorrt:
        raise EdgelrError(f"{' and '.join(given)}: for a pipeline, these set its TensorRT engine; target "
                          f"'{target.name}' runs the exported ONNX models as they are (give e.g. --target rtx)")
    if threads is not None:
        if threads < 1:
            raise EdgelrError(f"--threads {threads}: need threads >= 1")
        target = dataclasses.replace(target, threads=threads)
    return target


@contextlib.contextmanager
def _writing(out_dir: Path):
    """whole_folder(OUT_DIR), with a failed write (no space, no permission) as one EdgelrError line."""
    try:
        with whole_folder(out_dir) as stage:
            yield stage
    except OSError as exc:
        raise EdgelrError(f"{out_dir}: could not write the pipeline folder ({exc.strerror or exc}); "
                          "check the free space and permissions there") from None


def _engine_for_exported(folder, target: Target, out_dir, threads: int | None, shapes, precision, progress: bool,
                         start: float) -> PipelineExportResult:
    """An exported (or compressed) pipeline folder copied to OUT_DIR with an engine for its own denoiser."""
    from edgelr.deploy.pipeline_compress import read_exported

    source = read_exported(folder)
    if not target.is_tensorrt:
        raise EdgelrError(f"{source.path}: already an exported pipeline (for '{source.manifest['target']['name']}'); "
                          f"it runs as it is (python run.py); give a TensorRT target (e.g. --target rtx) to build "
                          "an engine for its denoiser")
    tensorrt_module(target)
    out_dir = model_io.check_output_folder(out_dir, source.path, what="exported pipeline", manifest=MANIFEST)
    _say(progress, f"{source.path}: an exported pipeline; copying it and building its denoiser's engine")
    with _writing(out_dir) as stage:
        copy_without_engines(source.path, stage)
        manifest = source.manifest
        if threads is not None:
            manifest = {**manifest, "threads": threads}
        manifest = add_denoiser_engine(stage, manifest, target, shapes=shapes, precision=precision, progress=progress,
                                       named=source.path)
    return PipelineExportResult(target, out_dir, manifest, time.perf_counter() - start)


def _say(progress: bool, text: str) -> None:
    if progress:
        import sys

        print(text, file=sys.stderr)


def _plan(pipe: PipelineDir) -> _Plan:
    diffusers = import_diffusers()
    denoiser = pipe.denoiser
    cls = component_class(denoiser)
    why = check_scheduler(pipe.scheduler_config())
    if why is not None:
        raise EdgelrError(f"{pipe.path}/scheduler: the exported pipeline's runner cannot step {why}; switch the "
                          "pipeline to DDIM first (pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config); "
                          "pipe.save_pretrained(DIR))")
    roles = {c.role: name for name, c in pipe.components.items()}
    if issubclass(cls, diffusers.UNet2DConditionModel):
        needed = {"text_encoder", "tokenizer", "vae"}
        if not needed <= roles.keys() or "text_encoder_2" in pipe.components:
            raise EdgelrError(f"{pipe.path}: {pipe.class_name} is not Stable-Diffusion style (a UNet2DConditionModel "
                              "with one CLIP text encoder, its tokenizer and a VAE); edgelr exports those and "
                              "unconditional UNet2DModel pipelines")
        tokenizer = pipe.components[roles["tokenizer"]].path
        if not all((tokenizer / f).is_file() for f in ("vocab.json", "merges.txt")):
            raise EdgelrError(f"{tokenizer}: no vocab.json and merges.txt; the exported pipeline's runner reads CLIP's "
                              "BPE from them (save the pipeline with a CLIPTokenizer)")
        vae_cls = component_class(pipe.components["vae"])
        if not issubclass(vae_cls, diffusers.AutoencoderKL):
            raise EdgelrError(f"{pipe.path}/vae: a {vae_cls.__name__}; the text-to-image export takes an AutoencoderKL")
        return _Plan("text-to-image", "optimum-onnx main_export", ("text_encoder", denoiser.name, "vae"))
    if issubclass(cls, diffusers.UNet2DModel):
        if "vae" in pipe.components:
            raise EdgelrError(f"{pipe.path}: {pipe.class_name} runs its UNet2DModel in a VAE's latent space; edgelr "
                              "exports unconditional pixel-space pipelines (DDPMPipeline) and Stable-Diffusion-style ones")
        return _Plan("unconditional", "torch.onnx.export", (denoiser.name,))
    raise EdgelrError(f"{denoiser.path}: the denoiser is a {denoiser.class_name}; edgelr exports UNet2DModel "
                      "(unconditional) and UNet2DConditionModel (Stable-Diffusion-style) pipelines")


# ---- writing the folder ----

def _write(pipe: PipelineDir, plan: _Plan, modules: dict, target: Target, stage: Path, tolerance: float,
           progress: bool) -> dict:
    import torch

    with _torch_threads(target.threads or 1), torch.no_grad():
        if plan.kind == "text-to-image":
            _export_optimum(pipe, stage, progress)
        else:
            _export_unet(pipe, modules[pipe.denoiser.name], stage, progress)
        _say(progress, "checking each component against torch in ONNX Runtime")
        parity = _check_parity(pipe, plan, modules, stage, tolerance)
    run = _run_info(pipe, plan, modules)
    shutil.copyfile(RUN_PY, stage / "run.py")
    files = {str(p.relative_to(stage)): file_entry(p) for p in sorted(stage.rglob("*")) if p.is_file()}
    components = {}
    for name, check in parity.items():
        source = pipe.components[name if name in pipe.components else "vae"]
        components[name] = {"file": f"{name}/model.onnx", "source": source.name, "class": source.qualified_class,
                            "exporter": plan.exporter, "parity": check}
    manifest = {
        "pipeline": 1,
        "edgelr": __version__,
        "source": {"folder": str(pipe.path), "class": pipe.class_name},
        "kind": plan.kind,
        "target": {"name": target.name, "description": target.description, "backend": target.backend,
                   "format": target.format, "runtime_version": target.runtime_version},
        "threads": target.threads,
        "providers": list(target.providers),
        "opset": OPSET if plan.kind == "unconditional" else None,
        "components": components,
        "scheduler": pipe.scheduler_config().get("_class_name"),
        "runner": "run.py: numpy + onnxruntime (edgelr.deploy.pipeline_run), its own DDPM/DDIM scheduler step",
        "run": run,
        "versions": _versions(),
        "files": files,
    }
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


@contextlib.contextmanager
def _quiet_fds():
    """stdout and stderr, at the file-descriptor level, into a discarded file: torch's TorchScript exporter logs
    the whole traced graph from C++ when a conversion fails (its log switch is always on)."""
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "diffusers", "transformers", "optimum-onnx", "onnxruntime"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def _export_failed(pipe: PipelineDir, name: str, exc: BaseException) -> EdgelrError:
    component = pipe.components.get(name) or pipe.components["vae"]
    return EdgelrError(f"{component.path}: component '{name}' ({component.class_name}) cannot be exported to ONNX "
                       f"({type(exc).__name__}: {model_io.first_line(exc)}); nothing was written")


def _export_optimum(pipe: PipelineDir, stage: Path, progress: bool) -> None:
    try:
        with quiet_libraries():
            from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise EdgelrError(f"the text-to-image export needs optimum-onnx ({exc}); pip install 'edgelr[diffusion]'") from None
    _say(progress, "exporting with optimum-onnx (text-to-image)")
    try:
        with quiet_libraries(), _quiet_fds():
            main_export(str(pipe.path), str(stage), task="text-to-image", device="cpu", do_validation=False,
                        library_name="diffusers")
    except Exception as exc:  # noqa: BLE001  (the exporter raises whatever the traced module raises)
        failed = next((n for n in OPTIMUM_ORDER if (stage / n).is_dir() and not (stage / n / "model.onnx").is_file()),
                      None)
        if failed is None:
            raise EdgelrError(f"{pipe.path}: optimum-onnx could not export the pipeline ({type(exc).__name__}: "
                              f"{model_io.first_line(exc)}); nothing was written") from None
        raise _export_failed(pipe, failed, exc) from None


def _export_unet(pipe: PipelineDir, unet, stage: Path, progress: bool) -> None:
    import torch

    name = pipe.denoiser.name
    _say(progress, f"exporting {name} with torch.onnx.export")

    class Denoiser(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep):
            return self.unet(sample, timestep, return_dict=False)[0]

    sample, timestep = _unet_example(unet, batch=2, timesteps=(500,))
    (stage / "unet").mkdir()
    try:
        with quiet_libraries(), _quiet_fds():
            torch.onnx.export(Denoiser(unet).eval(), (torch.from_numpy(sample), torch.from_numpy(timestep)),
                              str(stage / "unet" / "model.onnx"), input_names=["sample", "timestep"],
                              output_names=["out_sample"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"},
                                            "out_sample": {0: "batch"}})
    except Exception as exc:  # noqa: BLE001
        raise _export_failed(pipe, name, exc) from None
    shutil.copyfile(pipe.denoiser.path / "config.json", stage / "unet" / "config.json")
    shutil.copytree(pipe.components["scheduler"].path, stage / "scheduler")
    index = {k: v for k, v in pipe.index.items() if k.startswith("_")}
    index.update({"unet": ["onnx", "model.onnx"], "scheduler": pipe.index["scheduler"]})
    (stage / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _size(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _unet_example(unet, batch: int, timesteps=(500,), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A sample at the UNet's size and timesteps (repeated to the batch); the export's example is at t = 500,
    parity runs at others, so an export that froze the timestep cannot pass."""
    rng = np.random.default_rng(seed)
    h, w = _size(unet.config.sample_size)
    sample = rng.standard_normal((batch, unet.config.in_channels, h, w), dtype=np.float32)
    return sample, np.resize(np.array(timesteps, np.int64), batch)


# ---- parity ----

def _check_parity(pipe: PipelineDir, plan: _Plan, modules: dict, stage: Path, tolerance: float) -> dict:
    """Each exported model against its torch module on seeded inputs: {component: parity entry}; EdgelrError
    naming the first that fails."""
    import torch

    rng = np.random.default_rng(1)
    cases: dict[str, list[tuple[dict, callable]]] = {}
    unet = modules[pipe.denoiser.name]
    if plan.kind == "unconditional":
        cases["unet"] = [({"sample": sample, "timestep": timestep},
                          lambda f: {"out_sample": unet(torch.from_numpy(f["sample"]),
                                                        torch.from_numpy(f["timestep"])).sample})
                         for sample, timestep in (_unet_example(unet, 2, (999,), seed=1), _unet_example(unet, 2, (10,), seed=2))]
    else:
        text, vae = modules["text_encoder"], modules["vae"]
        tokens = min(_tokens(pipe), text.config.max_position_embeddings)
        ids = rng.integers(0, text.config.vocab_size, (2, tokens)).astype(np.int64)
        ids[:, -1] = text.config.eos_token_id
        cases["text_encoder"] = [({"input_ids": ids}, lambda f: dict(zip(
            ("last_hidden_state", "pooler_output"), text(torch.from_numpy(f["input_ids"]), return_dict=False)[:2])))]
        sample, _ = _unet_example(unet, batch=2, seed=1)
        hidden = rng.standard_normal((2, tokens, unet.config.cross_attention_dim), dtype=np.float32)
        cases["unet"] = [({"sample": sample, "timestep": np.array(t, np.float32), "encoder_hidden_states": hidden},
                          lambda f: {"out_sample": unet(torch.from_numpy(f["sample"]), torch.from_numpy(f["timestep"]),
                                                        torch.from_numpy(f["encoder_hidden_states"])).sample})
                         for t in (999, 10)]
        latent = _size(unet.config.sample_size)
        z = rng.standard_normal((1, vae.config.latent_channels, *latent), dtype=np.float32)
        cases["vae_decoder"] = [({"latent_sample": z},
                                 lambda f: {"sample": vae.decode(torch.from_numpy(f["latent_sample"])).sample})]
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        x = rng.uniform(-1, 1, (1, vae.config.in_channels, latent[0] * factor, latent[1] * factor)).astype(np.float32)
        cases["vae_encoder"] = [({"sample": x}, lambda f: {
            "latent_parameters": vae.encode(torch.from_numpy(f["sample"])).latent_dist.parameters})]

    out = {}
    for name, runs in cases.items():
        file = stage / name / "model.onnx"
        try:
            with model_io.ort_session(file, threads=1) as session:
                onnx_inputs = {i.name for i in session.get_inputs()}
                rel, worst, outputs = 0.0, 0.0, set()
                for feed, reference in runs:
                    got = dict(zip([o.name for o in session.get_outputs()],
                                   session.run(None, {k: v for k, v in feed.items() if k in onnx_inputs})))
                    for key, ref in reference(feed).items():
                        if key not in got:
                            continue
                        ref = ref.detach().numpy()
                        err = got[key] - ref
                        rel = max(rel, float(np.linalg.norm(err) / max(np.linalg.norm(ref), 1e-12)))
                        worst = max(worst, float(np.abs(err).max()))
                        outputs.add(key)
        except EdgelrError:
            raise
        except Exception as exc:  # noqa: BLE001  (ORT's errors for a model it cannot load or run)
            raise EdgelrError(f"{stage.name}: the exported {name} does not run in ONNX Runtime ({type(exc).__name__}: "
                              f"{model_io.first_line(exc)}); nothing was written") from None
        lost = sorted(set(runs[0][0]) - onnx_inputs)
        entry = {"relative_error": rel, "max_abs_error": worst, "tolerance": tolerance, "passed": rel <= tolerance,
                 "outputs": sorted(outputs), "runs": len(runs)}
        if lost:
            entry["inputs_dropped"] = lost
        if not entry["passed"] or not outputs:
            dropped = (f"; its ONNX model has no input {', '.join(map(repr, lost))}: the export froze it to the "
                       "example's value" if lost else "")
            source = pipe.components.get(name) or pipe.components["vae"]
            raise EdgelrError(f"{source.path}: the exported {name} does not match torch (relative error {rel:.2e}, "
                              f"tolerance {tolerance:.0e}{dropped}); nothing was written")
        out[name] = entry
    return out


def _tokens(pipe: PipelineDir) -> int:
    config = pipe.components["tokenizer"].path / "tokenizer_config.json"
    try:
        length = int(json.loads(config.read_text()).get("model_max_length", 77))
    except (OSError, ValueError, TypeError):
        length = 77
    return min(length, 77) if length > 10_000 else length  # transformers' "no limit" sentinel is a huge number


def _run_info(pipe: PipelineDir, plan: _Plan, modules: dict) -> dict:
    """What run.py needs beside the models: the latent shape, the VAE's scaling, the tokenizer's length."""
    unet = modules[pipe.denoiser.name]
    info = {"conditional": plan.kind == "text-to-image",
            "latent_shape": [unet.config.in_channels, *_size(unet.config.sample_size)], "vae": False}
    if plan.kind == "text-to-image":
        vae = modules["vae"]
        info.update(vae=True, vae_scaling_factor=float(vae.config.scaling_factor), tokens=_tokens(pipe))
    return info
