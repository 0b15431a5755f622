"""TensorRT engines from ONNX models, for TensorRT (Jetson, data-centre GPUs) and TensorRT for RTX.

    manifest = build_engine(Path("yolov8n.onnx"), load_target("rtx"), Path(tmpdir), feed=samples)

One code path serves both Python APIs, which are nearly the same: `tensorrt` (full TensorRT: it needs
the GPU the engine will run on, so Jetson engines are built on the Jetson) and `tensorrt_rtx_bindings`
(TensorRT for RTX: builds ahead of time on any x86-64 machine, even without a GPU; the engine is
specialised for the RTX GPU when it is first loaded there). target.backend picks the module.

Networks are strongly typed in both: the precision comes from the ONNX graph, not from builder flags.
So fp16 converts the graph's float tensors to fp16 (inputs and outputs stay fp32), int8 builds from a
Q/DQ graph (the model's own, or one quantized here with ONNX Runtime's tools and calibration samples),
fp32 builds the graph as it is.

`sparsity="2:4"` first zeroes the two smallest of every four weights along each Conv/MatMul/Gemm input
dimension (the semi-structured pattern Ampere and newer GPUs run on sparse tensor cores) and turns on
SPARSE_WEIGHTS; the manifest records what it cost in output error (magnitude 2:4 without fine-tuning
loses accuracy: distill the sparse model back, edgelr distill, where it matters).

`dest` receives model.engine, the ONNX it was built from when edgelr converted it
(model.fp16.onnx, model.int8.onnx, model.sparse.onnx), and manifest.json describing all of it.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.deploy.files import file_entry, whole_folder
from edgelr.deploy.targets import PRECISIONS, Target
from edgelr.errors import EdgelrError
from edgelr.io import model as model_io
from edgelr.io.cache import cache_root
from edgelr.io.samples import Samples, samples_from_arrays
from edgelr.io.shapes import ShapeRange, random_feed, resolve_shapes
from edgelr.measure.verify import output_error
from edgelr.passes.fp16 import mostly_fp16, to_fp16
from edgelr.passes.sparsity import sparsify_2_4

ENGINE_FILE = "model.engine"
MANIFEST_FILE = "manifest.json"
# TensorRT for RTX is importable as `tensorrt_rtx` from the SDK or the metapackage, else from its bindings wheel.
_RTX_MODULES = ("tensorrt_rtx", "tensorrt_rtx_bindings")
# Parity: engine vs ONNX Runtime on at most this many reference inputs.
_PARITY_SAMPLES = 4
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}

ShapeTriple = ShapeRange  # (min, opt, max)


# --- the TensorRT module ------------------------------------------------------------------------
def tensorrt_module(target: Target):
    """The TensorRT Python module for the target's backend; EdgelrError saying what to install if absent."""
    if not target.is_tensorrt:
        raise EdgelrError(
            f"target '{target.name}' uses backend '{target.backend}'; TensorRT engines are for targets with "
            "backend tensorrt or tensorrt-rtx"
        )
    if target.backend == "tensorrt-rtx":
        for name in _RTX_MODULES:
            module = _import(name)
            if module is not None:
                return module
        raise EdgelrError(
            f"target '{target.name}' needs TensorRT for RTX, which is not installed: pip install edgelr[trt] "
            "(the tensorrt-rtx-cu12-libs and tensorrt-rtx-cu12-bindings wheels; it builds engines on any "
            "x86-64 machine, no GPU needed)"
        )
    module = _import("tensorrt")
    if module is None:
        raise EdgelrError(
            f"target '{target.name}' needs TensorRT (the `tensorrt` Python module), which is not installed here. "
            "TensorRT engines for Jetson and data-centre GPUs are tied to the GPU and TensorRT version that build "
            "them: build on the device itself (JetPack ships TensorRT; on a data-centre GPU: pip install tensorrt)"
        )
    return module


def _import(name: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except ImportError:
        return None
    except Exception:  # noqa: BLE001 - a stub package or a broken install: treat as absent
        return None


def _is_rtx(trt) -> bool:
    return "rtx" in trt.__name__


def default_timing_cache(trt) -> Path:
    """Where a caller may keep the timing cache: ~/.cache/edgelr/tensorrt/<module>-<version>.cache."""
    return cache_root() / "tensorrt" / f"{trt.__name__}-{trt.__version__}.cache"


def _logger(trt):
    """A TensorRT logger that collects messages instead of printing them: errors become edgelr's one line."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING and msg not in self.warnings:
                self.warnings.append(msg)

        def last_error(self) -> str:
            return _one_line(self.errors[-1]) if self.errors else "no detail from TensorRT"

    return Logger()


# --- the verb -----------------------------------------------------------------------------------
def build_engine(
    model_path: Path,
    target: Target,
    dest: Path,
    feed: Samples | dict[str, np.ndarray] | None = None,
    *,
    precision: str | None = None,
    shapes: dict[str, ShapeTriple] | None = None,
    timing_cache: Path | None = None,
    sparsity: str | None = None,
    progress: bool = True,
) -> dict:
    """Build a TensorRT engine for TARGET from the ONNX model into the existing empty folder DEST.

    feed: sample inputs, one array per model input with samples on the first axis (as in a --calib
        .npz; a single feed works too), or Samples. They calibrate INT8 (with the activation type
        edgelr.passes.quantize.activations_for(target) gives), fix the optimization profile of dynamic
        inputs when no shapes are given, and are the reference inputs of the GPU parity check.
    precision: fp32 | fp16 | int8; overrides target.precision.
    shapes: input name -> (min, opt, max) shapes for dynamic dims; overrides target.shapes. Without shapes
        or feed, the model's own metadata sizes them (edgelr.io.shapes.resolve_shapes), else one error line.
    timing_cache: TensorRT's timing cache file, loaded if present and saved after the build
        (full TensorRT only: TensorRT for RTX picks kernels on the device and has no timing cache).
    sparsity: "2:4" to prune the weights to 2:4 and build with SPARSE_WEIGHTS (see the module doc).
    Returns the manifest (also written to DEST/manifest.json).
    """
    started = time.perf_counter()
    model_path, dest = Path(model_path), Path(dest)
    precision = precision or target.precision
    if precision not in PRECISIONS:
        raise EdgelrError(f"precision '{precision}' is not one of {', '.join(sorted(PRECISIONS))}")
    if not dest.is_dir() or any(dest.iterdir()):
        raise EdgelrError(f"{dest}: must be an existing empty folder for the engine files")
    with whole_folder(dest) as stage:  # DEST gets the engine, checked, and its manifest, or stays empty
        return _build(model_path, target, stage, feed, precision, shapes, timing_cache, sparsity, progress, started)


def refuse_asymmetric_quantization(model, where: Path) -> None:
    """TensorRT takes symmetric int8 Q/DQ (zero points 0); ONNX Runtime's x86 uint8 activations fail its parser
    with an unhelpful "Invalid Node"."""
    for node in model.graph:
        zero = node.inputs[2] if node.op_type == "QuantizeLinear" and len(node.inputs) > 2 else None
        if zero is not None and zero.const_value is not None and zero.const_value.dtype == ir.DataType.UINT8:
            raise EdgelrError(f"{where}: quantized with uint8 activations (ONNX Runtime's x86 layout), which "
                              "TensorRT cannot run; compress the float model again with --quantize int8 --target "
                              "rtx (symmetric int8), or without --quantize")


def _build(model_path: Path, target: Target, dest: Path, feed, precision: str, shapes, timing_cache: Path | None,
           sparsity: str | None, progress: bool, started: float) -> dict:
    trt = tensorrt_module(target)
    _check_version(target, trt)
    model = model_io.load(model_path)
    refuse_asymmetric_quantization(model, model_path)
    samples = _as_samples(feed, model, model_path) if feed is not None else None
    sparse, source_model = None, model_path
    if sparsity is not None:
        if sparsity != "2:4":
            raise EdgelrError(f"--sparsity {sparsity}: the only pattern TensorRT runs is 2:4")
        sparse = sparsify_2_4(model, model_path)
        model_io.save(model, dest / "model.sparse.onnx")
        sparse["output_error"] = output_error(model_path, dest / "model.sparse.onnx", samples)["worst"] if samples is not None else None
        model_path, model = dest / "model.sparse.onnx", model_io.load(dest / "model.sparse.onnx")

    onnx_path, how, converted = _graph_for(model_path, model, precision, samples, dest, progress, target)
    written = ({onnx_path} if converted else set()) | ({model_path} if sparse is not None else set())
    feed = samples.feed(0) if samples is not None else model_io.made_up_feed(model, model_path)
    for path in written:  # every ONNX file the folder holds runs in ONNX Runtime, GPU or none
        model_io.run_once(path, feed, path)
    logger = _logger(trt)
    builder = _builder(trt, logger)
    if not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        raise EdgelrError(f"TensorRT {trt.__version__} is too old: edgelr builds strongly typed networks, which need "
                          "TensorRT 10 or newer (JetPack 6.1+)")
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EdgelrError(f"{model_path}: TensorRT cannot parse the model: {_parse_errors(parser, trt)}")
    config = builder.create_builder_config()
    if sparse is not None:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = _profile(network, model, model_path, shapes if shapes is not None else target.shapes, samples)
    if profile:
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile.items():
            opt.set_shape(name, lo, mid, hi)
        if config.add_optimization_profile(opt) < 0:
            raise EdgelrError(f"{model_path}: TensorRT rejected the optimization profile: {logger.last_error()}")
    cache_note = _load_timing_cache(trt, config, timing_cache)

    build_started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - build_started
    if serialized is None:
        raise EdgelrError(f"{model_path}: TensorRT could not build the engine: {logger.last_error()}")
    engine = dest / ENGINE_FILE
    try:
        with open(engine, "wb") as out:
            out.write(memoryview(serialized))
    except OSError as exc:
        raise EdgelrError(f"{engine}: could not write the engine ({exc.strerror or exc})") from None
    del serialized
    cache_note = _save_timing_cache(trt, config, timing_cache, cache_note)

    files = [engine] + ([onnx_path, *_external_files(onnx_path)] if converted else [])
    if sparse is not None and model_path not in files:
        files += [model_path, *_external_files(model_path)]
    manifest = {
        "kind": "tensorrt-engine",
        "target": _target_fields(target),
        "tensorrt": {"module": trt.__name__, "version": trt.__version__},
        "precision": precision,
        "graph": how,
        "sparsity": sparse,
        "source_model": str(source_model),
        "inputs": [_tensor(network.get_input(i), trt) for i in range(network.num_inputs)],
        "outputs": [_tensor(network.get_output(i), trt) for i in range(network.num_outputs)],
        "profile": {name: {"min": list(lo), "opt": list(mid), "max": list(hi)} for name, (lo, mid, hi) in profile.items()}
        or None,
        "gpus": "RTX GPUs, Ampere and newer (TensorRT for RTX's default; specialised on the GPU at first load)"
        if _is_rtx(trt) else "the GPU model that built it",
        "timing_cache": cache_note,
        "files": {str(f.relative_to(dest)): file_entry(f) for f in files},
        "build_seconds": round(build_seconds, 3),
        "total_seconds": None,
        "warnings": [_one_line(w) for w in logger.warnings[:20]],
        "parity": None,
    }
    manifest["parity"] = parity_check(trt, engine, model_path, onnx_path, samples, profile, model)
    manifest["total_seconds"] = round(time.perf_counter() - started, 3)
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _check_version(target: Target, trt) -> None:
    """An engine loads only on the TensorRT (for RTX) release that built it."""
    if target.runtime_version == "installed":
        return
    want, have = target.runtime_version.split("."), trt.__version__.split(".")
    if have[: len(want)] != want:
        product = "TensorRT for RTX" if _is_rtx(trt) else "TensorRT"
        fix = (f"pip install 'tensorrt-rtx-cu12-libs=={target.runtime_version}.*' "
               f"'tensorrt-rtx-cu12-bindings=={target.runtime_version}.*'") if _is_rtx(trt) else \
            "build on the device with its own TensorRT"
        raise EdgelrError(
            f"target '{target.name}' runs {product} {target.runtime_version}, but {trt.__version__} is installed "
            f"here and engines load only on the release that built them: {fix}, or set runtime_version in the "
            "target file to the device's version"
        )


def _builder(trt, logger):
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # noqa: BLE001 - full TensorRT raises when it finds no usable GPU
        builder, logger.errors = None, [*logger.errors, str(exc)]
    if builder is None:
        raise EdgelrError(
            f"TensorRT could not start ({logger.last_error()}); full TensorRT builds engines only on a machine "
            "with the GPU that will run them"
        )
    return builder


# --- the graph, in the precision asked for -------------------------------------------------------
def _graph_for(model_path: Path, model, precision: str, samples: Samples | None, dest: Path, progress: bool,
               target: Target):
    """(ONNX file to parse, how it was made, whether it is a new file in dest)."""
    quantized = any(node.op_type in _QDQ_OPS for node in model.graph)
    half = mostly_fp16(model)
    if quantized:
        if precision != "int8":
            raise EdgelrError(
                f"{model_path}: the model is already quantized (QuantizeLinear/DequantizeLinear nodes), so its "
                f"engine is int8, not {precision}; export it with precision int8"
            )
        return model_path, "as is: the model's own Q/DQ nodes", False
    if precision == "fp32":
        if half:
            raise EdgelrError(f"{model_path}: the model's weights are fp16; export it with precision fp16")
        return model_path, "as is (fp32)", False
    if precision == "fp16":
        if half:
            return model_path, "as is: the model is fp16", False
        out = dest / "model.fp16.onnx"
        to_fp16(model_path, out)
        return out, "converted to fp16 by edgelr (onnxruntime float16 converter; inputs and outputs stay fp32)", True
    # int8 from a float model: quantize here with ONNX Runtime's tools, the Q/DQ layout TensorRT accepts
    if samples is None:
        raise EdgelrError(
            f"{model_path}: an int8 engine needs calibration data to quantize the model: pass sample inputs "
            "(--calib DATA.npz, one array per model input), or give a model that already has Q/DQ nodes"
        )
    from edgelr.passes.quantize import activations_for, quantize

    out = dest / "model.int8.onnx"
    activations = activations_for(target)  # the activation type the target's runtime wants, as compress uses it
    result = quantize(model_path, out, "int8", samples, activations=activations, progress=progress)
    flavour = "symmetric" if activations == "int8-symmetric" else f"{activations} activations"
    return out, (f"quantized by edgelr (ONNX Runtime static int8, Q/DQ, {flavour}, per-channel weights, "
                 f"{result['samples']} calibration samples, {result['nodes_quantized']} nodes)"), True



def _external_files(onnx_path: Path) -> list[Path]:
    data = onnx_path.with_name(onnx_path.name + ".data")
    return [data] if data.exists() else []


# --- optimization profile ------------------------------------------------------------------------
def _profile(network, model, model_path: Path, shapes: dict, samples: Samples | None) -> dict[str, ShapeTriple]:
    """Input name -> (min, opt, max) for every input with a dynamic dim or given shapes; {} for a static model.
    The sizes come from edgelr.io.shapes.resolve_shapes: shapes, samples, the model's metadata."""
    sizes = resolve_shapes(model, samples=samples, shapes=shapes, where=model_path)
    profile = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        name = tensor.name
        if all(d >= 0 for d in tuple(tensor.shape)) and name not in (shapes or {}):
            continue
        if getattr(tensor, "is_shape_tensor", False):
            raise EdgelrError(f"{model_path}: input '{name}' is a shape tensor (its values set shapes); edgelr cannot "
                              "profile shape-tensor inputs yet: fix them in the model")
        profile[name] = sizes.ranges[name]
    return profile


def _x(shape) -> str:
    return "x".join(str(d) for d in shape)


# --- feed -----------------------------------------------------------------------------------------
def _as_samples(feed, model, model_path: Path) -> Samples:
    """Samples from Samples, or from a dict of arrays laid out as in a --calib .npz."""
    return feed if isinstance(feed, Samples) else samples_from_arrays(feed, model, model_path)


# --- timing cache (full TensorRT) --------------------------------------------------------------
def _load_timing_cache(trt, config, path: Path | None):
    if path is None:
        return None
    if _is_rtx(trt):  # its timing-cache calls are deprecated no-ops: kernels are chosen on the device
        return "not used: TensorRT for RTX chooses kernels on the device when the engine loads"
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # another GPU's or version's cache
        data = b""
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return {"path": str(path), "loaded_bytes": len(data)}


def _save_timing_cache(trt, config, path: Path | None, note):
    if not isinstance(note, dict):
        return note
    data = bytes(memoryview(config.get_timing_cache().serialize()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".edgelr-", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)
    return {**note, "saved_bytes": len(data)}


# --- parser errors -------------------------------------------------------------------------------
def _parse_errors(parser, trt) -> str:
    """One line: each parser error as node 'NAME' (op OP): what is wrong."""
    parts = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node = _call(error, "node_name") or f"#{_call(error, 'node')}"
        op = _call(error, "node_operator") or "?"
        part = f"node '{node}' (op {op}): {_describe(error, trt)}"
        if part not in parts:
            parts.append(part)
    return "; ".join(parts) if parts else "no detail from TensorRT"


def _describe(error, trt) -> str:
    code = _call(error, "code")
    desc = _one_line(_call(error, "desc") or "")
    name = getattr(code, "name", str(code))
    if "Plugin not found" in desc:
        return "not an ONNX op TensorRT knows, and no TensorRT plugin implements it"
    if name == "UNSUPPORTED_NODE" and (desc in ("", "false") or desc.startswith("Assertion failed: false")):
        return "TensorRT does not support this op (or these attributes or types)"
    return f"{desc} ({name})" if name and name not in desc else desc


def _call(obj, method):
    try:
        return getattr(obj, method)()
    except Exception:  # noqa: BLE001 - older TensorRT lacks some accessors
        return None


# --- parity on a GPU ------------------------------------------------------------------------------
def gpu_available() -> bool:
    """An NVIDIA GPU and its driver are here (CUDA's driver API answers with at least one device)."""
    return _CudaDriver.open() is not None


def parity_check(trt, engine_path: Path, model_path: Path, built_from: Path, samples: Samples | None,
                 profile: dict, model) -> dict | str:
    """Run the engine on the GPU and ONNX Runtime (CPU) on the same inputs; relative output errors
    against the graph it was built from and, when edgelr converted it, against the source model."""
    cuda = _CudaDriver.open()
    if cuda is None:
        return "skipped: no GPU"
    feeds = _reference_feeds(samples, profile, model)
    try:
        got = _run_engine(trt, cuda, engine_path, feeds)
    except _CannotRunHere as exc:
        return f"skipped: {exc}"
    except EdgelrError as exc:
        return f"failed: {exc}"
    result = {"samples": len(feeds), "relative_error": _relative_error(built_from, feeds, got)}
    if built_from != model_path:
        result["relative_error_vs_source"] = _relative_error(model_path, feeds, got)
    return result


class _CannotRunHere(EdgelrError):
    """This GPU cannot run the engine at all (e.g. a compute capability TensorRT for RTX does not support)."""


# Engine validity diagnostics that say "this machine", not "this engine".
_HARDWARE_REASONS = {"UNSUPPORTED_CC", "OLD_CUDA_DRIVER", "OLD_CUDA_RUNTIME", "INSUFFICIENT_GPU_MEMORY"}


def _reference_feeds(samples: Samples | None, profile: dict, model) -> list[dict]:
    """Up to _PARITY_SAMPLES of the samples, else one random input at each input's OPT size."""
    if samples is not None:
        return [samples.feed(i) for i in range(min(len(samples), _PARITY_SAMPLES))]
    return [random_feed(model, resolve_shapes(model, shapes=profile).fixed())]


def _relative_error(onnx_path: Path, feeds: list[dict], got: list[dict]) -> float:
    num = den = 0.0
    with model_io.ort_session(onnx_path) as session:
        names = [o.name for o in session.get_outputs()]
        for feed, outputs in zip(feeds, got):
            for name, ref in zip(names, session.run(names, feed)):
                ref = np.asarray(ref)
                if ref.dtype.kind != "f" or name not in outputs:
                    continue
                diff = ref.astype(np.float64) - outputs[name].astype(np.float64).reshape(ref.shape)
                num += float(np.sum(diff**2))
                den += float(np.sum(ref.astype(np.float64) ** 2))
    return round(float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num)), 6)


def _run_engine(trt, cuda, engine_path: Path, feeds: list[dict]) -> list[dict[str, np.ndarray]]:
    """Inference with TensorRT's runtime API; device buffers from CUDA's driver API (no extra package)."""
    logger = _logger(trt)
    runtime = trt.Runtime(logger)
    plan = engine_path.read_bytes()
    if hasattr(runtime, "get_engine_validity"):  # TensorRT for RTX: ask before loading
        validity, diagnostics = runtime.get_engine_validity(plan)
        if validity == trt.EngineValidity.INVALID:
            reasons = {n for n, v in trt.EngineInvalidityDiagnostics.__members__.items() if int(diagnostics) & int(v)}
            detail = ", ".join(sorted(reasons)) or "no diagnostics"
            if reasons and reasons <= _HARDWARE_REASONS:
                raise _CannotRunHere(f"this GPU cannot run the engine ({detail})")
            raise EdgelrError(f"the engine is not valid here ({detail})")
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EdgelrError(f"the engine did not load on this GPU: {logger.last_error()}")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    results = []
    stream = cuda.stream()
    try:
        for feed in feeds:
            buffers: dict[str, int] = {}
            outputs: dict[str, np.ndarray] = {}
            try:
                for name in inputs:
                    array = np.ascontiguousarray(feed[name], dtype=trt.nptype(engine.get_tensor_dtype(name)))
                    if not context.set_input_shape(name, array.shape):
                        raise EdgelrError(f"input '{name}' of shape {_x(array.shape)} is outside the engine's profile")
                    buffers[name] = cuda.alloc(array.nbytes)
                    cuda.to_device(buffers[name], array)
                    context.set_tensor_address(name, buffers[name])
                for name in names:
                    if name in inputs:
                        continue
                    shape = tuple(context.get_tensor_shape(name))
                    if any(d < 0 for d in shape):
                        raise EdgelrError(f"output '{name}' has a data-dependent shape; parity needs fixed output shapes")
                    outputs[name] = np.empty(shape, dtype=trt.nptype(engine.get_tensor_dtype(name)))
                    buffers[name] = cuda.alloc(outputs[name].nbytes)
                    context.set_tensor_address(name, buffers[name])
                if not context.execute_async_v3(stream):
                    raise EdgelrError(f"the engine failed to run: {logger.last_error()}")
                cuda.synchronize(stream)
                for name, array in outputs.items():
                    cuda.to_host(array, buffers[name])
            finally:
                for pointer in buffers.values():
                    cuda.free(pointer)
            results.append(outputs)
    finally:
        cuda.destroy_stream(stream)
    return results


class _CudaDriver:
    """Just enough of CUDA's driver API (libcuda, which every NVIDIA driver installs) to feed an engine.

    TensorRT's runtime uses the device's primary context; retaining it here shares that context.
    """

    _instance = None

    def __init__(self, lib):
        self.lib = lib
        u64, ptr, size = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t
        lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(u64), size]
        lib.cuMemFree_v2.argtypes = [u64]
        lib.cuMemcpyHtoD_v2.argtypes = [u64, ptr, size]
        lib.cuMemcpyDtoH_v2.argtypes = [ptr, u64, size]
        lib.cuStreamCreate.argtypes = [ctypes.POINTER(ptr), ctypes.c_uint]
        lib.cuStreamSynchronize.argtypes = [ptr]
        lib.cuStreamDestroy_v2.argtypes = [ptr]
        device, context = ctypes.c_int(), ctypes.c_void_p()
        self.check(lib.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
        self.check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
        self.check(lib.cuCtxSetCurrent(context), "cuCtxSetCurrent")

    @classmethod
    def open(cls) -> _CudaDriver | None:
        if cls._instance is None:
            cls._instance = cls._load() or False
        return cls._instance or None

    @classmethod
    def _load(cls):
        name = "nvcuda.dll" if sys.platform.startswith("win") else "libcuda.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            return None
        count = ctypes.c_int()
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
            return None
        try:
            return cls(lib)
        except EdgelrError:
            return None

    @staticmethod
    def check(status: int, call: str) -> None:
        if status != 0:
            raise EdgelrError(f"CUDA {call} failed (error {status})")

    def alloc(self, nbytes: int) -> int:
        pointer = ctypes.c_uint64()
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(pointer), max(nbytes, 1)), "cuMemAlloc")
        return pointer.value

    def free(self, pointer: int) -> None:
        self.lib.cuMemFree_v2(pointer)

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        self.check(self.lib.cuMemcpyHtoD_v2(pointer, array.ctypes.data, array.nbytes), "cuMemcpyHtoD")

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        self.check(self.lib.cuMemcpyDtoH_v2(array.ctypes.data, pointer, array.nbytes), "cuMemcpyDtoH")

    def stream(self) -> int:
        handle = ctypes.c_void_p()
        self.check(self.lib.cuStreamCreate(ctypes.byref(handle), 0), "cuStreamCreate")
        return handle.value or 0

    def synchronize(self, stream: int) -> None:
        self.check(self.lib.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def destroy_stream(self, stream: int) -> None:
        if stream:
            self.lib.cuStreamDestroy_v2(stream)


# --- manifest pieces ------------------------------------------------------------------------------
def _target_fields(target: Target) -> dict:
    return {
        "name": target.name, "description": target.description, "arch": target.arch, "backend": target.backend,
        "precision": target.precision, "format": target.format, "runtime_version": target.runtime_version,
    }


def _tensor(tensor, trt) -> dict:
    try:
        dtype = np.dtype(trt.nptype(tensor.dtype)).name
    except TypeError:  # bf16, fp8: no numpy equivalent
        dtype = str(tensor.dtype).split(".")[-1].lower()
    return {"name": tensor.name, "dtype": dtype, "shape": list(tensor.shape)}


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:400]

