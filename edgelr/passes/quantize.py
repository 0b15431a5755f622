"""INT8 quantization with ONNX Runtime's own tools (onnxruntime.quantization).

    quantize("model.onnx", "model.int8.onnx", "int8", samples)            # static, calibrated, Q/DQ
    quantize("model.onnx", "model.int8.onnx", "int8", samples, activations="int8-symmetric")  # for TensorRT
    quantize("model.onnx", "model.lr.onnx", "int8-lowrank", samples)     # + float low-rank branches (SVDQuant)
    quantize("model.onnx", "model.dq.onnx", "int8-dynamic")               # MatMul/Gemm weights only

Static ("int8"): activation ranges come from calibration samples (MinMax), weights are per-channel
symmetric INT8, the format is QDQ (QuantizeLinear/DequantizeLinear pairs around the float ops), which
ONNX Runtime fuses into integer kernels and TensorRT reads as explicit quantization.

The activation type is what the runtime wants (onnxruntime.quantization.quantize_static's guidance):
  uint8           x86 CPUs (ONNX Runtime's U8S8 kernels; INT8 activations ran 3.6x slower here)
  int8            ARM CPUs (Raspberry Pi)
  int8-symmetric  TensorRT: zero points 0, biases left in float, Q/DQ only on the inputs of Conv,
                  ConvTranspose, MatMul and Gemm (TensorRT rejects non-zero zero points, INT32 bias
                  dequantization and quantized constants that feed anything but a DequantizeLinear)

The output tail stays in float: the nodes between the last weighted op and a graph output (a
detector's decoding, Sigmoid, Concat, Softmax) run no integer kernel, so quantizing them saves nothing,
and it would put unrelated values under one scale. YOLOv8's output concatenates box pixels (0..320)
with class scores (0..1): quantized as one tensor, the scores flatten to a few levels and the top class
agreed with the float model's nowhere (docs/benchmarks.md).

Nodes whose names contain FLOAT_BRANCH (edgelr.passes.svdquant's low-rank branches), and the nodes named in
`keep_float` (layers whose INT8 error costs more than their INT8 speed is worth, chosen by
edgelr.passes.factorize's latency search), stay in float and read float inputs: ORT would feed them the
dequantized copy of a shared activation, so they are rewired to the float tensor after quantization.

Dynamic ("int8-dynamic"): weights of MatMul and Gemm stored as INT8, activations quantized at run
time; no calibration. For transformer-style models, where the time goes into MatMul.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx_ir as ir

from edgelr.errors import EdgelrError
from edgelr.io.model import check_output_path, load
from edgelr.io.progress import progress_bar
from edgelr.io.samples import Samples
from edgelr.passes.base import (
    FunctionalEdgelrPass,
    PassConfig,
    PassDetails,
    register_pass,
)

SCHEMES = ("int8", "int8-lowrank", "int8-dynamic")
ACTIVATIONS = ("uint8", "int8", "int8-symmetric")
# The ops that carry weights: where TensorRT wants its Q/DQ pairs (and where INT8 pays on any runtime).
_WEIGHTED_OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm"]
_PERIODIC = ("Sin", "Cos")  # an error in their argument wraps around: kept float with what feeds them
_DYNAMIC_OPS = ["MatMul", "Gemm"]  # ORT's CPU kernels have no ConvInteger for INT8 weights
FLOAT_BRANCH = "/float_branch"  # in a node's name: keep the node in float, on float inputs
# Schemes that rewrite the float model before static INT8: scheme -> f(model_path, tmp, samples, activations,
# progress) writing tmp/branched.onnx and returning a per-layer table (edgelr.passes.svdquant registers int8-lowrank).
SCHEME_REWRITES: dict[str, Callable] = {}
# Models this large go through ONNX external data (protobuf cannot hold 2 GB in one message).
_EXTERNAL_DATA_BYTES = 1 << 30


def activations_for(target) -> str:
    """The activation type a Target's runtime wants: TensorRT symmetric INT8, ARM INT8, x86 UINT8."""
    if target.is_tensorrt:
        return "int8-symmetric"
    return "int8" if target.arch == "aarch64" else "uint8"


def quantize(
    model_path: Path,
    out_path: Path,
    scheme: str,
    samples: Samples | None = None,
    *,
    activations: str = "uint8",
    progress: bool = True,
    prepare: bool = True,
    keep_float: tuple[str, ...] | list[str] = (),
    where: str | os.PathLike | None = None,
) -> dict:
    """Quantize the model at MODEL_PATH to OUT_PATH (written atomically: the whole file or nothing).

    Returns {"scheme", "activations", "nodes_quantized", "by_op" (op type -> nodes with INT8 weights),
    "samples", "preprocess", "seconds"}, and "kept_float" (those of `keep_float`, node names, that were
    found and left in float; static schemes only). `prepare=False` skips ORT's pre-processing (for tiny
    models that need none, timed by the latency tables). `where`: the model errors name (default MODEL_PATH;
    a pipeline's scratch copy names the user's model).
    """
    started = time.perf_counter()
    model_path, out_path = Path(model_path), Path(out_path)
    shown = Path(where) if where is not None else model_path
    if scheme not in SCHEMES:
        raise EdgelrError(f"unknown quantization scheme '{scheme}'; known schemes: {', '.join(SCHEMES)}")
    if activations not in ACTIVATIONS:
        raise EdgelrError(f"unknown activation type '{activations}'; use one of {', '.join(ACTIVATIONS)}")
    if scheme in ("int8", "int8-lowrank") and (samples is None or len(samples) == 0):
        raise EdgelrError(
            "static INT8 quantization needs calibration data: pass sample inputs (--calib DATA.npz, one array "
            "per model input), or use the scheme int8-dynamic, which needs none"
        )
    load(model_path)  # a missing or corrupt model fails here, with the model_io's one-line message
    check_output_path(out_path, model_path)
    external = _weight_bytes(model_path) > _EXTERNAL_DATA_BYTES

    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".edgelr-quant-") as tmp:
        tmp = Path(tmp).resolve()
        staged = tmp / out_path.name  # same name: ORT names an external data file after its model file
        rewrite = SCHEME_REWRITES.get(scheme)
        branches = rewrite(model_path, tmp, samples, activations, progress) if rewrite is not None else None
        with quiet():
            if scheme != "int8-dynamic":
                source = tmp / "branched.onnx" if (tmp / "branched.onnx").exists() else model_path
                source, opset_note = _per_channel_opset(source, tmp, external)
                source, preprocess = _preprocess(source, tmp, external) if prepare else (source, "skipped")
                source = _tidy_fusions(source, tmp, external)
                floated = _static(source, staged, samples, activations, external, progress, shown, list(keep_float),
                                  per_channel=opset_note is None or opset_note.startswith("upgraded"))
            else:
                preprocess, floated, opset_note = "not needed", [], None
                _dynamic(model_path, staged, external, shown)
        by_op = _quantized_nodes(staged)
        if not by_op:
            raise EdgelrError(
                f"{shown}: ONNX Runtime found nothing to quantize (no Conv, MatMul or Gemm with constant "
                "weights); the model would be unchanged"
            )
        data = tmp / (out_path.name + ".data")
        if data.exists():
            os.replace(data, out_path.parent / data.name)
        os.replace(staged, out_path)
    done = {
        "scheme": scheme,
        "activations": activations if scheme != "int8-dynamic" else "dynamic uint8",
        "nodes_quantized": sum(by_op.values()),
        "by_op": by_op,
        "samples": len(samples) if scheme != "int8-dynamic" else 0,
        "preprocess": preprocess,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if opset_note is not None:
        done["opset"] = opset_note
    if keep_float:
        done["kept_float"] = [name for name in keep_float if name in floated]
    if branches is not None:
        done["low_rank_branches"] = [row.to_json() for row in branches]
    return done


PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis` (per-channel weights) arrived in opset 13


def _per_channel_opset(model_path: Path, tmp: Path, external: bool) -> tuple[Path, str | None]:
    """A model older than opset 13 cannot hold per-channel Q/DQ: convert it to 13 (ONNX's version
    converter), or, where that fails, quantize its weights per tensor. Returns (model, what was done)."""
    import onnx
    from onnx import version_converter

    proto = onnx.load(str(model_path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
    if opset >= PER_CHANNEL_OPSET:
        return model_path, None
    out = tmp / "opset13.onnx"
    try:
        proto = onnx.load(str(model_path))
        upgraded = version_converter.convert_version(proto, PER_CHANNEL_OPSET)
        onnx.save(upgraded, str(out), save_as_external_data=external, location=out.name + ".data" if external else None)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors; per-tensor still works
        return model_path, f"per-tensor weights: opset {opset} has no per-channel DequantizeLinear ({_first_line(exc)})"
    return out, f"upgraded from opset {opset} to {PER_CHANNEL_OPSET} for per-channel weights"


def _preprocess(model_path: Path, tmp: Path, external: bool) -> tuple[Path, str]:
    """ORT's recommended pre-processing (shape inference, graph clean-up), as far as it goes.

    Symbolic shape inference often fails on models with dynamic dims (YOLOv8n: 'Incomplete symbolic
    shape inference'); then ONNX's own shape inference alone, then none: quantization works without.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = (tmp / "preprocessed.onnx").resolve()
    model_file = str(model_path.resolve())  # before the chdir below: a relative path would resolve inside tmp
    opts = {"save_as_external_data": external, "external_data_location": "preprocessed.onnx.data"} if external else {}
    for skip_symbolic, note in ((False, "full"), (True, "without symbolic shape inference")):
        try:
            # in tmp: when symbolic shape inference fails it dumps the model into the working directory
            with contextlib.chdir(tmp):
                quant_pre_process(model_file, str(out), skip_symbolic_shape=skip_symbolic, **opts)
            return out, note
        except Exception:  # noqa: BLE001 - ORT raises bare Exception here; the fallback below is safe
            out.unlink(missing_ok=True)
    return model_path, "skipped (ONNX Runtime's pre-processing failed on this model)"


FUSED = "/MatMulAddFusion"  # what ORT's pre-processing appends to the name of a MatMul it fused with its Add


def _tidy_fusions(model_path: Path, tmp: Path, external: bool) -> Path:
    """Undo two things ORT's pre-processing does when it fuses a MatMul and its Add into a Gemm, which later
    steps trip on: the Gemm's new name (NAME/MatMulAddFusion: nodes are excluded, and factorized pairs found
    again by refit, by their names) and its [1, N] bias (ORT's per-channel INT8 bias check fails on it: "The
    truth value of an array with more than one element is ambiguous", onnxruntime 1.32; [N] broadcasts the
    same). Magika's dense head is such a MatMul + Add."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    names = {node.name for node in graph.node}
    renames = {node.name for node in graph.node if node.name.endswith(FUSED) and node.name.removesuffix(FUSED) not in names}
    inits = {init.name: init for init in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    biases = {node.input[2] for node in graph.node if node.op_type == "Gemm" and len(node.input) > 2
              and node.input[2] in inits and uses[node.input[2]] == 1 and list(inits[node.input[2]].dims[:1]) == [1]
              and len(inits[node.input[2]].dims) == 2}
    if not renames and not biases:
        return model_path
    proto = onnx.load(str(model_path))
    for node in proto.graph.node:
        if node.name in renames:
            node.name = node.name.removesuffix(FUSED)
    for init in proto.graph.initializer:
        if init.name in biases:
            init.dims[:] = init.dims[1:]  # the same values in the same order: only the shape changes
    for value in [*proto.graph.value_info, *proto.graph.input]:  # a shape recorded for it would contradict
        if value.name in biases and len(value.type.tensor_type.shape.dim) == 2:
            del value.type.tensor_type.shape.dim[0]
    out = tmp / "tidied.onnx"
    onnx.save(proto, str(out), save_as_external_data=external, location=out.name + ".data" if external else None)
    return out


def _static(source: Path, staged: Path, samples: Samples, activations: str, external: bool, progress: bool,
            model_path: Path, keep_float: list[str], per_channel: bool = True) -> list[str]:
    """ORT's static quantization; returns the names of the nodes kept in float on float inputs."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    tensorrt = activations == "int8-symmetric"
    # Calibration keeps only each tensor's min and max per sample (ORT reduces in the graph), so memory is
    # small; ORT 1.32's CalibMaxIntermediateOutputs would drop samples unseen (it clears without merging).
    extra = {"WeightSymmetric": True}
    if tensorrt:
        extra |= {"ActivationSymmetric": True, "QuantizeBias": False}
    source, tail, branch = _float_nodes(source, staged.parent, keep_float)
    reader = _Reader(samples, progress)
    try:
        quantize_static(
            str(source),
            str(staged),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=_WEIGHTED_OPS if tensorrt else None,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=external,
            nodes_to_exclude=tail + branch,
            extra_options=extra,
        )
    except Exception as exc:  # noqa: BLE001 - ORT raises many types; the user gets one line either way
        raise EdgelrError(f"{model_path}: ONNX Runtime could not quantize the model ({_first_line(exc)})") from None
    finally:
        reader.bar.close()
    if branch:
        _float_inputs(staged, set(branch), external, source)
    return branch


def _float_nodes(source: Path, tmp: Path, keep_float: list[str]) -> tuple[Path, list[str], list[str]]:
    """The nodes that stay in float, by name: the output tail (those that reach a graph output without
    passing through a weighted op) and the inputs of periodic functions alike, and the float branches with the nodes in `keep_float`, which read
    float inputs. Unnamed nodes get names first, in a copy (ORT excludes nodes by name)."""
    import onnx

    from edgelr.graph.layers import name_nodes
    from edgelr.io.model import save

    graph = onnx.load(str(source), load_external_data=False).graph
    if any(not node.name for node in graph.node):
        model = load(source)
        name_nodes(model.graph)
        source = tmp / "named.onnx"
        save(model, source)
        graph = onnx.load(str(source), load_external_data=False).graph
    producer = {output: node for node in graph.node for output in node.output}
    # the tail, and what feeds a Sin or Cos (a diffusion model's timestep embedding: t * frequencies reaches
    # ~1000 radians, where one uint8 step is a turn and more): back to the nearest weighted ops
    tail, seen = [], set()
    stack = [value.name for value in graph.output] + [output for node in graph.node if node.op_type in _PERIODIC
                                                      for output in node.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen or node.op_type in _WEIGHTED_OPS:
            continue
        seen.add(node.name)
        tail.append(node.name)
        stack.extend(node.input)
    keep = set(keep_float)
    return source, tail, [node.name for node in graph.node if FLOAT_BRANCH in node.name or node.name in keep]


def _float_inputs(path: Path, branch: set[str], external: bool, source: Path) -> None:
    """Feed the float-branch nodes the float tensors ORT quantized for their quantized neighbours
    (X -> QuantizeLinear -> DequantizeLinear -> node becomes X -> node), where X is still what it was in
    SOURCE: ORT drops a Relu after a quantized op (the quantization range clamps at 0 instead), and then
    only the dequantized copy has the Relu's effect."""
    import onnx

    before = {output: node.op_type for node in onnx.load(str(source), load_external_data=False).graph.node
              for output in node.output}
    proto = onnx.load(str(path))
    producer = {output: node for node in proto.graph.node for output in node.output}
    for node in proto.graph.node:
        if node.name not in branch:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            x = q.input[0]
            if x in producer and before.get(x) != producer[x].op_type:  # its producer was folded away
                continue
            node.input[i] = x
    onnx.save(proto, str(path), save_as_external_data=external, location=path.name + ".data")


def _dynamic(source: Path, staged: Path, external: bool, model_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(
            str(source),
            str(staged),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=_DYNAMIC_OPS,
            use_external_data_format=external,
        )
    except Exception as exc:  # noqa: BLE001
        raise EdgelrError(f"{model_path}: ONNX Runtime could not quantize the model ({_first_line(exc)})") from None


class _Reader:
    """ORT's CalibrationDataReader over Samples: one sample per call, a progress bar as it goes."""

    def __init__(self, samples: Samples, progress: bool):
        self.samples = samples
        self.index = 0
        self.bar = progress_bar(total=len(samples), desc="calibrating (int8)", unit="sample", show=progress)

    def get_next(self) -> dict | None:
        if self.index >= len(self.samples):
            return None
        feed = self.samples.feed(self.index)
        self.index += 1
        self.bar.update(1)
        return feed

    def __len__(self) -> int:
        return len(self.samples)


def quantized_already(model: ir.Model) -> int:
    """How many quantization nodes (QuantizeLinear, DequantizeLinear, integer ops) the model holds already."""
    return sum(1 for node in ir.traversal.RecursiveGraphIterator(model.graph)
               if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
               or node.op_type.endswith("Integer") or node.op_type.startswith("QLinear"))


def _quantized_nodes(path: Path) -> dict[str, int]:
    """Op type -> how many nodes now hold their constant inputs (weights) as INT8: fed by a
    DequantizeLinear of an initializer (QDQ), or an integer op (dynamic)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    int8_weights = {
        node.output[0] for node in graph.node if node.op_type == "DequantizeLinear" and node.input[0] in constants
    }
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            continue
        integer_op = node.op_type.endswith("Integer") or node.op_type.startswith(("QLinear", "DynamicQuantize"))
        if integer_op or any(name in int8_weights for name in node.input):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _weight_bytes(path: Path) -> int:
    """The model file plus the external data files beside it (what ORT will hold as one protobuf)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    external = {entry.value for t in proto.graph.initializer for entry in t.external_data if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in external)


@contextlib.contextmanager
def quiet():
    """ORT's quantization tools log advice, warnings and caught tracebacks; edgelr reports its own line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _first_line(exc: BaseException) -> str:
    """The cause in ORT's message, without its status prefix and temporary paths."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from \S+ failed:\s*", "", text)
    return text[:400]


@dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    """scheme: int8 (static, calibrated), int8-lowrank (int8 plus float low-rank branches where they
    measure better, SVDQuant) or int8-dynamic. activations: uint8, int8 or int8-symmetric; None takes the
    one the target's runtime runs fast (activations_for), uint8 without a target. keep_float: node names
    to leave in float (a latency search adds the ones it chose)."""

    kind: ClassVar[str] = "quantize"
    scheme: str = "int8"
    activations: str | None = None
    keep_float: tuple[str, ...] = ()

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise EdgelrError(f"scheme '{self.scheme}': unknown; known schemes: {', '.join(SCHEMES)}")
        if self.activations is not None and self.activations not in ACTIVATIONS:
            raise EdgelrError(f"activations '{self.activations}': use one of {', '.join(ACTIVATIONS)}")

    def needs_calibration(self) -> str | None:
        if self.scheme == "int8-dynamic":
            return None
        return f"{self.scheme} calibrates activation ranges (int8-dynamic needs none)"

    def activations_on(self, target) -> str:
        if self.activations is not None:
            return self.activations
        return activations_for(target) if target is not None else "uint8"


@register_pass(QuantizeConfig)
class QuantizePass(FunctionalEdgelrPass):
    """quantize() on the pipeline's model, through ONNX Runtime's tools (files in, files out); the float
    model stays on the context (a refit after this pass reads both)."""

    def call(self, model: ir.Model) -> PassDetails:
        ctx, config = self.context, self.config
        factorized = ctx.factorized
        keep = list(config.keep_float) + [n for n in (factorized.result.keep_float if factorized else []) if n not in config.keep_float]
        out = ctx.scratch("quantized")
        ctx.quantized = quantize(ctx.path, out, config.scheme, ctx.samples, activations=config.activations_on(ctx.target),
                                 progress=ctx.progress, keep_float=keep, where=ctx.source)
        ctx.float_model = model
        return PassDetails(load(out), True, ctx.quantized)
