"""A TensorRT (for RTX) engine for a diffusion pipeline folder's denoiser, built beside its ONNX models.

    manifest = add_denoiser_engine(stage, manifest, load_target("rtx"))   # STAGE: a pipeline folder being written

`edgelr export PIPELINE_DIR --target rtx` (edgelr.deploy.pipeline.export_pipeline) writes the ONNX pipeline
folder it writes for ONNX Runtime targets (run.py still runs it anywhere, on a CPU too) and then this adds
engines/unet/: edgelr.deploy.tensorrt.build_engine's folder (model.engine, the ONNX it was built from when it
converted the graph, e.g. model.fp16.onnx, and that build's manifest.json). Given a folder `edgelr export` or
`edgelr compress` wrote, the same command builds the engine for that folder's own denoiser.

The optimization profile comes from the pipeline, not from sample data: the latents at the shape the pipeline
samples, the text encoder's sequence length, and the batch from 1 to MAX_BATCH, OPT the batch one image takes
(2 with classifier-free guidance, which runs the denoiser on the unconditional and the prompted half together).
`shapes` may set the batch range: batch=MIN:OPT:MAX, or an input's full shapes (its other dims must be the
pipeline's). The text encoder and the VAE stay on ONNX Runtime; the manifest says so per component.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import onnx_ir as ir

from edgelr.deploy.files import file_entry
from edgelr.deploy.pipeline_run import MANIFEST
from edgelr.deploy.targets import Target
from edgelr.deploy.tensorrt import (
    build_engine,
    default_timing_cache,
    refuse_asymmetric_quantization,
    tensorrt_module,
)
from edgelr.errors import EdgelrError
from edgelr.io import model as model_io
from edgelr.io.samples import model_inputs
from edgelr.io.shapes import Shape, ShapeRange, declared_dims, dims_text

DENOISER = "unet"
ENGINES = "engines"  # the pipeline folder's engines, one subfolder per component
MAX_BATCH = 8
BATCH_NAME = "batch"  # shapes' key for the batch range alone


def add_denoiser_engine(stage: Path, manifest: dict, target: Target, *, shapes: dict[str, ShapeRange] | None = None,
                        precision: str | None = None, progress: bool = True, named: Path | None = None) -> dict:
    """Build the engine for STAGE's denoiser (STAGE/unet/model.onnx) into STAGE/engines/unet/ and rewrite
    STAGE/manifest.json with it: the engine, its profile, TensorRT's version, the build's seconds, and which
    runtime runs each component. Returns the new manifest. EdgelrError (one line) if it cannot be built, naming
    the pipeline folder NAMED (the user's folder: STAGE is a staging copy) rather than STAGE."""
    try:
        return _add_engine(stage, manifest, target, shapes, precision, progress)
    except EdgelrError as exc:
        raise EdgelrError(str(exc).replace(str(stage), str(named or stage))) from None


def _add_engine(stage: Path, manifest: dict, target: Target, shapes, precision: str | None, progress: bool) -> dict:
    trt = tensorrt_module(target)
    onnx_file = stage / manifest["components"][DENOISER]["file"]
    model = model_io.load(onnx_file)
    refuse_asymmetric_quantization(model, onnx_file)
    precision = _precision(model, onnx_file, target, precision)
    batch = batch_range(model, onnx_file, manifest["run"], shapes)
    profile = denoiser_profile(model, onnx_file, manifest["run"], batch)
    del model
    dest = stage / ENGINES / DENOISER
    dest.mkdir(parents=True)
    _say(progress, f"building the {_product(trt)} engine for {DENOISER} ({precision}, batch {_range_text(batch)})")
    built = build_engine(onnx_file, target, dest, precision=precision, shapes=profile, progress=progress,
                         timing_cache=default_timing_cache(trt))
    built["source_model"] = str(onnx_file.relative_to(stage))  # not the staging folder's path, gone once renamed
    (dest / MANIFEST).write_text(json.dumps(built, indent=2) + "\n", encoding="utf-8")
    manifest = json.loads(json.dumps(manifest))  # a copy: the caller's stays as it was
    manifest["target"] = _target_record(target)
    manifest["engines"] = {DENOISER: _engine_record(built, onnx_file, stage, batch, manifest["run"])}
    for name, component in manifest["components"].items():
        component["runtime"] = target.backend if name == DENOISER else "onnxruntime"
        if name == DENOISER:
            component["engine"] = f"{ENGINES}/{DENOISER}/model.engine"
    manifest["runner"] = (f"run.py: numpy + onnxruntime, every component's ONNX model (the engine's denoiser too); "
                          f"{ENGINES}/{DENOISER}/model.engine runs the denoiser on the GPU with {_product(trt)}'s "
                          "runtime, the text encoder and VAE stay on ONNX Runtime")
    manifest["files"] = {str(p.relative_to(stage)): file_entry(p) for p in sorted(stage.rglob("*"))
                         if p.is_file() and p != stage / MANIFEST}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def copy_without_engines(source: Path, stage: Path) -> None:
    """SOURCE's pipeline folder copied into STAGE, leaving behind its engines (built for another denoiser or
    target) and any staging folders."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if ".edgelr-" in n or (Path(folder) == source and n == ENGINES)]

    shutil.copytree(source, stage, dirs_exist_ok=True, ignore=ignore)


def without_engines(manifest: dict, folder: Path) -> dict:
    """MANIFEST (changed in place) for FOLDER once its engines are gone (its denoiser was replaced): every
    component on ONNX Runtime, and where the engine is rebuilt."""
    if manifest.pop(ENGINES, None) is None:
        return manifest
    for component in manifest["components"].values():
        component.pop("engine", None)
        component["runtime"] = "onnxruntime"
    manifest["runner"] = (f"run.py: numpy + onnxruntime; no engine yet (the denoiser changed): build it with "
                          f"`edgelr export {folder} --target {manifest['target']['name']} -o NEW_FOLDER`")
    return manifest


# ---- the profile ----

def batch_range(model: ir.Model, where: Path, run: dict, shapes: dict[str, ShapeRange] | None) -> tuple[int, int, int]:
    """(min, opt, max) images-times-guidance per denoiser call: 1, the batch one image takes, MAX_BATCH unless
    SHAPES say otherwise (batch=MIN:OPT:MAX, or an input's shapes, whose other dims must be the pipeline's)."""
    default = (1, 2 if run["conditional"] else 1, MAX_BATCH)
    if not shapes:
        return default
    fixed = {name: dims for name, (dims, _, _) in denoiser_profile(model, where, run, default).items()}
    found = set()
    for name, (lo, mid, hi) in shapes.items():
        if name == BATCH_NAME:
            if len(lo) != 1:
                raise EdgelrError(f"--shapes {name}: give the batch as one dim, e.g. batch=1:2:{MAX_BATCH}")
        elif name not in fixed:
            raise EdgelrError(f"{where}: --shapes {name}: the denoiser has no such batched input (it has "
                              f"{', '.join(fixed)}); give its batch range as batch=MIN:OPT:MAX")
        elif any(tuple(s[1:]) != tuple(fixed[name][1:]) for s in (lo, mid, hi)):
            raise EdgelrError(f"--shapes {name}: the pipeline runs its denoiser on {name} of Nx"
                              f"{dims_text(fixed[name][1:])}; only the batch N may vary (or give batch=MIN:OPT:MAX)")
        found.add((lo[0], mid[0], hi[0]))
    if len(found) > 1:
        raise EdgelrError(f"--shapes: the denoiser's inputs need one batch range, not {len(found)} "
                          f"({', '.join(_range_text(r) for r in sorted(found))})")
    return found.pop()


def denoiser_profile(model: ir.Model, where: Path, run: dict, batch: tuple[int, int, int]) -> dict[str, ShapeRange]:
    """{input: (min, opt, max)} for every input with a batch dim; a scalar (e.g. the timestep) has none."""
    profile = {}
    for value in model_inputs(model):
        dims = declared_dims(value)
        if dims == []:
            continue
        rest = _fixed_dims(value.name, dims, run, where)
        profile[value.name] = tuple((b, *rest) for b in batch)
    return profile


def _fixed_dims(name: str, dims: list | None, run: dict, where: Path) -> Shape:
    """An input's dims after the batch: the latents' shape, the text's length and width, or the model's own."""
    if dims is None:
        raise EdgelrError(f"{where}: the denoiser's input '{name}' declares no shape; export the pipeline again")
    known = {"sample": tuple(run["latent_shape"]), "timestep": ()}
    if name == "encoder_hidden_states" and len(dims) == 3 and run.get("tokens"):
        known[name] = (int(run["tokens"]), dims[2])
    rest = known.get(name, tuple(dims[1:]))
    declared = dims[1:]
    if isinstance(dims[0], int) or len(rest) != len(declared) \
            or any(isinstance(d, int) and d != r for d, r in zip(declared, rest)) or not all(isinstance(r, int) for r in rest):
        raise EdgelrError(f"{where}: the denoiser's input '{name}' is {_dims(dims)}, not the pipeline's "
                          f"{_dims(['N', *rest])} with a free batch N; export the pipeline again")
    return tuple(rest)


# ---- precision and quantization ----

def _precision(model: ir.Model, where: Path, target: Target, precision: str | None) -> str:
    """int8 for a denoiser with Q/DQ nodes (the engine runs them as they are); else PRECISION or the target's."""
    if any(node.op_type == "QuantizeLinear" for node in model.graph):
        return precision or "int8"
    precision = precision or target.precision
    if precision == "int8":
        raise EdgelrError(f"{where}: an int8 engine needs a quantized denoiser; quantize it first (edgelr compress "
                          f"EXPORTED --quantize int8 --target {target.name} -o OUT), then export OUT")
    return precision


# ---- manifest pieces ----

def _engine_record(built: dict, onnx_file: Path, stage: Path, batch: tuple[int, int, int], run: dict) -> dict:
    folder = f"{ENGINES}/{DENOISER}"
    return {
        "file": f"{folder}/model.engine",
        "bytes": built["files"]["model.engine"]["bytes"],
        "manifest": f"{folder}/{MANIFEST}",
        "built_from": {"file": str(onnx_file.relative_to(stage)), **file_entry(onnx_file)},
        "graph": built["graph"],
        "precision": built["precision"],
        "batch": {"min": batch[0], "opt": batch[1], "max": batch[2],
                  "why": "images per denoiser call" + (", twice the prompts with classifier-free guidance"
                                                       if run["conditional"] else "")},
        "profile": built["profile"],
        "inputs": built["inputs"],
        "tensorrt": built["tensorrt"],
        "gpus": built["gpus"],
        "build_seconds": built["build_seconds"],
        "total_seconds": built["total_seconds"],
        "parity": built["parity"],
        "warnings": built["warnings"],
    }


def _target_record(target: Target) -> dict:
    return {"name": target.name, "description": target.description, "backend": target.backend,
            "format": target.format, "precision": target.precision, "runtime_version": target.runtime_version}


def _product(trt) -> str:
    return "TensorRT for RTX" if "rtx" in trt.__name__ else "TensorRT"


def _range_text(batch) -> str:
    lo, mid, hi = batch
    return f"{lo}..{hi}, opt {mid}"


def _dims(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr)
