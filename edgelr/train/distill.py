"""Distillation: train a compressed ONNX student towards its ONNX teacher, in PyTorch, without labels.

    report = edgelr.distill.distill("model.onnx", "model.small.onnx", "photos/", "model.tuned.onnx", steps=500)

The student is converted to PyTorch with onnx2torch (`to_torch`); its Conv, ConvTranspose, Gemm,
MatMul, BatchNormalization / LayerNormalization / InstanceNormalization weights and the bias Adds
behind MatMul/Gemm/Conv become trainable parameters, each tied to the ONNX initializer (or Constant
node) it came from. Every step feeds one (augmented) batch to the teacher in ONNX Runtime and to
the student in torch and lowers the distance between their outputs. At the end the trained values
are written into a copy of the student graph (same nodes, same names: only weight values change),
saved atomically, and checked against the torch student in ONNX Runtime.

Loss. For each float output, the squared error is normalised by the teacher's own scale, so outputs
(and parts of outputs) of very different magnitude count alike:
  * outputs of rank >= 3 ([N, C, ...], e.g. a YOLO head [N, 4 + classes, anchors]): per channel
    (axis 1), by the teacher's RMS of that channel over the batch: box pixels (0..320) and class
    scores (0..1) each weigh as much as the other. A channel's RMS is floored at the median
    channel's RMS (CHANNEL_FLOOR), so a channel the batch never lights up (a class absent from it,
    RMS 3e-5 on YOLOv8n against a median of 4e-4) is not blown up into noise: with a floor of 0.1 x
    the median, those channels dominated the loss and Adam drove all class scores towards 0;
  * other outputs ([N, K] logits, scalars): by the teacher's mean square of the whole output.
The loss is the mean of these over the outputs: about the squared relative error of the student.
Feature alignment (PELA-style, `features=[(teacher_tensor, student_tensor), ...]`): MSE between
the two intermediate tensors divided by the teacher tensor's variance, added with `feature_weight`.
`features="factorized"` aligns every factorized pair with the layer it replaced (DLRMamba-style).

Data. An image folder is decoded once and kept in memory (up to IMAGE_CACHE_BYTES). With a few
dozen photos, `augment="strong"` (Augment: crops from 5% to all of a photo, letterboxed views, 2x2
mosaics of several photos, colour, hue, greyscale, mixup) gives every step new inputs; the light
default (crop, flip, small colour changes) lets a student fit the photos and drift elsewhere.

Determinism and resuming. The data order (a permutation per epoch) and each step's augmentation are
pure functions of (seed, step); the model runs in eval mode (BatchNorm uses its stored statistics,
exactly as the ONNX graph does; no dropout). A checkpoint holds the student's state, AdamW's and
the schedule's state, the step, the loss history and the torch/numpy RNG states, written atomically;
a resumed run ends with bit-identical weights to an uninterrupted one (on CPU, same thread count;
not with anneal_by_time, whose schedule follows the clock).

Threads: torch keeps its default unless EDGELR_TORCH_THREADS is set; the teacher's ONNX Runtime
session uses EDGELR_ORT_THREADS if set (else ORT's default), with its worker threads not spinning
between runs. On a 2-core machine the teacher and the student run one after the other, each with
both cores.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import operator
import os
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from tqdm.auto import tqdm

from edgelr.errors import EdgelrError
from edgelr.io import model as model_io
from edgelr.io.samples import Samples, load_samples, model_inputs

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # torch is only needed here; the rest of edgelr runs without it
    torch = None  # type: ignore[assignment]

CHANNEL_FLOOR = 1.0  # a channel's scale is at least this fraction of the median channel's RMS
CHECKPOINT_EVERY = 50  # steps
# features="factorized": each pair's weight. Its normalised error starts near its relative error^2 (0.01-0.1),
# the outputs' near the model's (0.002 on YOLOv8n), so the pairs lead: on YOLOv8n 0.01 did better than
# 0.002 (held-out error 0.0344 against 0.0361 after 20 minutes, docs/benchmarks.md), and 0.03 no better.
FACTORIZED_FEATURE_WEIGHT = 0.01
LOG_EVERY = 5  # the returned loss history: the mean loss of each window of this many steps
PARITY_TOLERANCE = 1e-4  # relative max error, saved ONNX (ORT) vs the torch student
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
PREPROCESS_KEYS = ("size", "letterbox", "mean", "std", "scale", "layout", "channel_order")
IMAGE_CACHE_BYTES = 1 << 30  # decoded images of a folder kept in memory, up to this many bytes
EVAL_IMAGES = 32  # an image folder given as eval_samples: its first this many images, unaugmented

# Where ONNX ops keep weights worth training: input positions (only constant float32 inputs count).
_TRAINABLE_POSITIONS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
}
_BIAS_AFTER = ("MatMul", "Gemm", "Conv", "ConvTranspose")  # a constant Add behind these is a bias


def _need_torch() -> None:
    if torch is None:
        raise EdgelrError("distillation needs PyTorch: pip install torch==2.13.0 (the CPU wheel), then onnx2torch")


# ---------------------------------------------------------------------------------------------------
# onnx2torch, imported so that a missing or broken torchvision does not stop it


_TORCHVISION_HELP = (
    "this graph has NonMaxSuppression or RoiAlign: onnx2torch converts them with torchvision, which is "
    "missing or does not load with this torch; install a torchvision that matches torch, or cut those "
    "ops off the graph (distil the network before its post-processing)"
)


class _NoTorchvision(types.ModuleType):
    """Stands in for torchvision while onnx2torch is imported; any use raises a clear error."""

    def __getattr__(self, name: str):
        if name.startswith("__"):  # the import machinery probes __path__, __spec__ ...
            raise AttributeError(name)
        raise EdgelrError(_TORCHVISION_HELP)


def _unavailable(*args, **kwargs):
    raise EdgelrError(_TORCHVISION_HELP)


def _import_onnx2torch():
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    before = set(sys.modules)
    placeholders = {}
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001  (ImportError, or RuntimeError from its compiled ops)
        for name in set(sys.modules) - before:  # half-imported pieces of the broken torchvision
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        root, ops = _NoTorchvision("torchvision"), _NoTorchvision("torchvision.ops")
        ops.roi_align = _unavailable  # onnx2torch binds this name at import time
        root.ops = ops
        placeholders = {"torchvision": root, "torchvision.ops": ops}
    saved = {name: sys.modules.get(name) for name in placeholders}
    sys.modules.update(placeholders)
    try:
        import onnx2torch
    except ImportError as exc:
        raise EdgelrError(
            f"distillation needs onnx2torch ({model_io.first_line(exc)}): pip install onnx2torch --no-deps"
        ) from None
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return onnx2torch


# ---------------------------------------------------------------------------------------------------
# ONNX -> torch


@dataclass(frozen=True)
class WeightSource:
    """Where a trainable parameter lives in the ONNX graph: an initializer, or a Constant node's value.

    `value` is the ONNX value name (the initializer's name, or the Constant node's output);
    `node` the Constant node's name ("" for an initializer)."""

    kind: str  # "initializer" | "constant"
    value: str
    node: str
    shape: tuple[int, ...]


@dataclass
class TorchGraph:
    """What to_torch attaches to its module as `module.onnx` (read it with `onnx_info(module)`)."""

    path: Path
    inputs: list[str]
    outputs: list[str]
    weights: dict[str, WeightSource]  # ONNX value name -> source
    params: dict[str, object]  # ONNX value name -> its nn.Parameter (shared where the graph shares it)
    producers: dict[str, tuple[str, int, int]]  # value name -> (module name, output index, output count)
    frozen: list[str] = field(default_factory=list)  # value names kept fixed


if torch is not None:

    class _ConstGemm(nn.Module):
        """ONNX Gemm with a constant B (and C), holding B and C exactly as the ONNX graph stores them
        (onnx2torch's nn.Linear holds alpha * B^T, which cannot be written back as it is)."""

        def __init__(self, weight, bias, alpha: float, beta: float, trans_b: bool):
            super().__init__()
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(bias) if bias is not None else None
            self.alpha, self.beta, self.trans_b = float(alpha), float(beta), bool(trans_b)

        def forward(self, x):
            y = F.linear(x, self.weight if self.trans_b else self.weight.t())
            if self.alpha != 1.0:
                y = y * self.alpha
            if self.bias is not None:
                y = y + (self.bias * self.beta if self.beta != 1.0 else self.bias)
            return y


def onnx_info(module) -> TorchGraph:
    """The TorchGraph that to_torch attached to MODULE."""
    info = getattr(module, "_edgelr_onnx", None)
    if info is None:
        raise EdgelrError("this module was not made by edgelr.distill.to_torch")
    return info


def to_torch(model_path: str | os.PathLike, freeze: Sequence[str] = ()) -> nn.Module:
    """Convert an ONNX model to a torch.fx GraphModule (onnx2torch) whose weights are trainable.

    forward(*inputs) takes the model's inputs in ONNX order and returns a tuple of its outputs in ONNX
    order. Every constant float32 weight of Conv / ConvTranspose / Gemm / MatMul, the affine scale and
    bias of BatchNormalization / LayerNormalization / InstanceNormalization, and the constant of an
    Add behind MatMul / Gemm / Conv (a bias) is an nn.Parameter; a weight the graph shares is one
    shared parameter. `onnx_info(module).params` maps each ONNX initializer (or Constant output) name
    to its parameter, `.weights` to where it lives. Every other parameter or buffer stays fixed.
    `freeze`: fnmatch patterns of ONNX weight or node names to keep fixed (still mapped). The module
    is returned in eval mode: BatchNorm uses its stored statistics, as ONNX does.
    """
    _need_torch()
    path = Path(model_path)
    model_io.load(path)  # the usual clear errors for a missing, corrupt or incomplete file
    proto = onnx.load(str(path))
    trainable, weights = _trainable_values(proto, freeze)
    conv = _conversion_copy(proto, weights)
    onnx2torch = _import_onnx2torch()
    _check_ops(conv, path)
    gm = _convert(onnx2torch, conv, path)

    from onnx2torch.onnx_graph import OnnxGraph, ValueType

    graph = OnnxGraph(conv.graph)
    inputs = list(graph.input_values)
    producers = {
        out: (uname, i, len(node.output_values))
        for uname, node in graph.nodes.items()
        for i, out in enumerate(node.output_values)
        if out
    }
    # onnx2torch keeps each use of an initializer as a buffer 'initializers.onnx_initializer_<k>', k counting
    # the initializer inputs of the nodes in order: replay that count to know which buffer is which
    buffers: dict[str, list[str]] = {}  # value name -> buffer names
    count = 0
    for uname in graph.nodes:
        mapping = getattr(_submodule(gm, uname), "onnx_mapping", None)
        for value in mapping.inputs if mapping is not None else ():
            if graph.value_type(value) == ValueType.GRAPH_INITIALIZER:
                buffers.setdefault(value, []).append(f"onnx_initializer_{count}")
                count += 1
    container = getattr(gm, "initializers", None)
    inits = {t.name: t for t in conv.graph.initializer}
    for value, names in buffers.items():
        for name in names:
            held = getattr(container, name, None) if container is not None else None
            if held is not None and not np.array_equal(held.detach().numpy(), numpy_helper.to_array(inits[value])):
                raise EdgelrError(f"{path}: onnx2torch stored initializer '{value}' unexpectedly (this onnx2torch "
                                  "version is not supported by edgelr.train.distill)")

    # one parameter per trainable ONNX weight, put in every place onnx2torch holds it
    params: dict[str, nn.Parameter] = {}

    def param(value: str) -> nn.Parameter:
        if value not in params:
            array = numpy_helper.to_array(inits[value]).copy()
            params[value] = nn.Parameter(torch.from_numpy(array), requires_grad=value not in weights.frozen)
        return params[value]

    for uname, node in graph.nodes.items():
        module = _submodule(gm, uname)
        inputs_of = list(node.input_values)
        if isinstance(module, nn.Linear):  # Gemm with constant B: keep B and C as ONNX stores them
            attrs = node.attributes
            b = inputs_of[1]
            c = inputs_of[2] if len(inputs_of) > 2 and inputs_of[2] else None
            gemm = _ConstGemm(
                torch.from_numpy(numpy_helper.to_array(inits[b]).copy()),
                torch.from_numpy(numpy_helper.to_array(inits[c]).copy()) if c else None,
                attrs.get("alpha", 1.0), attrs.get("beta", 1.0), attrs.get("transB", 0) != 0,
            )
            gemm.onnx_mapping = module.onnx_mapping
            setattr(gm, uname, gemm)
            module = gemm
        inner = module[-1] if isinstance(module, nn.Sequential) else module  # (padding, conv) for odd pads
        for position, attr in ((1, "weight"), (2, "bias")):
            current = getattr(inner, attr, None) if not isinstance(inner, nn.Sequential) else None
            if isinstance(current, nn.Parameter) and position < len(inputs_of) and inputs_of[position] in trainable:
                shared = param(inputs_of[position])
                if tuple(shared.shape) != tuple(current.shape):
                    raise EdgelrError(f"{path}: onnx2torch reshaped weight '{inputs_of[position]}' of node "
                                      f"'{node.name}'; edgelr.train.distill cannot write it back")
                setattr(inner, attr, shared)
    for value, names in buffers.items():
        if value in trainable:
            for name in names:
                if name in container._buffers:
                    del container._buffers[name]
                    container.register_parameter(name, param(value))
    mapped = {id(p) for p in params.values()}
    for p in gm.parameters():
        if id(p) not in mapped:
            p.requires_grad_(False)

    info = TorchGraph(
        path=path,
        inputs=inputs,
        outputs=[o.name for o in conv.graph.output],
        weights={v: weights.sources[v] for v in params},
        params=params,
        producers=producers,
        frozen=sorted(v for v in params if v in weights.frozen),
    )
    gm._edgelr_onnx = info
    set_outputs(gm, info.outputs)
    gm.eval()
    return gm


def parameter_sources(module) -> dict[str, WeightSource]:
    """Each parameter name of MODULE (from to_torch; a shared weight under every name it has) -> where
    its value goes in the ONNX graph."""
    info = onnx_info(module)
    by_id = {id(p): info.weights[v] for v, p in info.params.items()}
    return {n: by_id[id(p)] for n, p in module.named_parameters(remove_duplicate=False) if id(p) in by_id}


def set_outputs(module, names: Sequence[str]) -> None:
    """Make MODULE (from to_torch) return the ONNX values NAMES, as a tuple in that order: the graph's
    outputs, or any intermediate tensor (for feature alignment)."""
    info = onnx_info(module)
    graph = module.graph
    out = next(n for n in graph.nodes if n.op == "output")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    calls = {n.target: n for n in graph.nodes if n.op == "call_module"}
    values = []
    for name in names:
        if name in info.inputs:
            values.append(placeholders[info.inputs.index(name)])
            continue
        if name not in info.producers:
            raise EdgelrError(f"{info.path}: no tensor named '{name}' is computed by a node of this graph")
        target, index, count = info.producers[name]
        node = calls[target]
        if count > 1:
            existing = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem
                        and u.args[1] == index]
            if existing:
                node = existing[0]
            else:
                with graph.inserting_before(out):
                    node = graph.call_function(operator.getitem, (node, index))
        values.append(node)
    graph.erase_node(out)
    graph.output(tuple(values))
    graph.eliminate_dead_code()
    module.recompile()


def _submodule(gm, name: str):
    return gm._modules[name]


@dataclass
class _Weights:
    sources: dict[str, WeightSource]
    frozen: set[str]


def _trainable_values(proto: onnx.ModelProto, freeze: Sequence[str]) -> tuple[set[str], _Weights]:
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    sources: dict[str, WeightSource] = {}

    def source(name: str) -> WeightSource | None:
        if name in inits:
            t = inits[name]
            return WeightSource("initializer", name, "", tuple(t.dims)) if t.data_type == onnx.TensorProto.FLOAT else None
        node = producers.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None and attr.t.data_type == onnx.TensorProto.FLOAT:
                return WeightSource("constant", name, node.name, tuple(attr.t.dims))
        return None

    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        positions = _TRAINABLE_POSITIONS.get(node.op_type, ())
        if node.op_type == "Add" and len(node.input) == 2:
            kinds = [producers[i].op_type if i in producers else None for i in node.input]
            positions = tuple(i for i in (0, 1) if kinds[1 - i] in _BIAS_AFTER)
        for i in positions:
            if i < len(node.input) and node.input[i]:
                found = source(node.input[i])
                if found is not None:
                    sources[node.input[i]] = found
    frozen = set()
    if freeze:
        owners: dict[str, list[str]] = {}
        for node in graph.node:
            for name in node.input:
                owners.setdefault(name, []).append(node.name)
        for value, src in sources.items():
            names = [value, src.node, *owners.get(value, [])]
            if any(fnmatch.fnmatchcase(n, pattern) for n in names if n for pattern in freeze):
                frozen.add(value)
    return set(sources), _Weights(sources, frozen)


def _conversion_copy(proto: onnx.ModelProto, weights: _Weights) -> onnx.ModelProto:
    """The graph onnx2torch sees: trainable Constant nodes become initializers (its Conv converter needs
    initializers), initializers listed as inputs are no inputs. The student file itself is not changed."""
    conv = onnx.ModelProto()
    conv.CopyFrom(proto)
    graph = conv.graph
    constants = {s.value for s in weights.sources.values() if s.kind == "constant"}
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in constants:
            attr = next(a for a in node.attribute if a.name == "value")
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    init_names = {t.name for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in init_names]
    del graph.input[:]
    graph.input.extend(real_inputs)
    return conv


def _check_ops(proto: onnx.ModelProto, path: Path) -> None:
    from onnx2torch.node_converters import get_converter

    opsets = {o.domain: o.version for o in proto.opset_import}
    seen = set()
    for node in proto.graph.node:
        key = (node.domain, node.op_type)
        if key in seen:
            continue
        seen.add(key)
        version = opsets.get(node.domain, opsets.get("ai.onnx" if node.domain == "" else node.domain, 1))
        try:
            get_converter(domain=node.domain, operation_type=node.op_type, version=version)
        except NotImplementedError:
            where = f"{node.domain}." if node.domain else ""
            raise EdgelrError(
                f"{path}: onnx2torch cannot convert op {where}{node.op_type} (opset {version}, node '{node.name}'); "
                "distillation needs a graph of ops it supports"
            ) from None


def _convert(onnx2torch, proto: onnx.ModelProto, path: Path):
    """onnx2torch.convert, with a failure inside a converter reported as the op and node it was on."""
    import onnx2torch.converter as converter_module

    current: list = [None]
    original = converter_module.get_converter

    def tracking(domain, operation_type, version):
        convert = original(domain=domain, operation_type=operation_type, version=version)

        def run(node, graph):
            current[0] = node
            return convert(node, graph)

        return run

    converter_module.get_converter = tracking
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return onnx2torch.convert(proto, attach_onnx_mapping=True)
    except EdgelrError:
        raise
    except Exception as exc:  # noqa: BLE001  (converters raise anything for what they do not handle)
        node = current[0]
        where = f" op {node.operation_type} (node '{node.name}')" if node is not None else ""
        raise EdgelrError(
            f"{path}: onnx2torch cannot convert{where}: {type(exc).__name__}: {model_io.first_line(exc)}"
        ) from None
    finally:
        converter_module.get_converter = original


# ---------------------------------------------------------------------------------------------------
# writing the weights back


def write_back(module, student: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Save a copy of STUDENT with MODULE's trained weights (module from to_torch(STUDENT)) to OUT,
    atomically: same nodes and names, only initializer and Constant values changed."""
    info = onnx_info(module)
    model = model_io.load(student)
    constants = {}
    for node in model.graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.outputs:
            constants[node.outputs[0].name] = node
    for value, p in info.params.items():
        src = info.weights[value]
        array = p.detach().to("cpu", torch.float32).numpy().reshape(src.shape).copy()
        if src.kind == "initializer":
            init = model.graph.initializers.get(value)
            if init is None:
                raise EdgelrError(f"{student}: has no initializer '{value}'; is the module from this student?")
            init.const_value = ir.tensor(array, name=value)
        else:
            node = constants.get(value)
            if node is None:
                raise EdgelrError(f"{student}: has no Constant node for '{value}'; is the module from this student?")
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=value))
    return model_io.save(model, out)


# ---------------------------------------------------------------------------------------------------
# data


@dataclass
class Preprocess:
    """How an image becomes a model input (YOLO's convention by default)."""

    size: tuple[int, int]  # H, W
    letterbox: bool = True
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1 / 255
    layout: str = "NCHW"
    channel_order: str = "RGB"


class _Data:
    """A dataset: per-sample model inputs, drawn by index, optionally augmented."""

    names: list[str]
    batched: dict[str, bool]

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, indices: np.ndarray, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        """Inputs stacked on a new first (sample) axis; augmented with RNG unless it is None."""
        raise NotImplementedError


class _NpzData(_Data):
    def __init__(self, samples: Samples, model: ir.Model):
        self.samples = samples
        self.names = list(samples.arrays)
        self.batched = dict(samples.batched)
        self.flip_axis: dict[str, int] = {}
        for value in model_inputs(model):
            dims = list(value.shape.dims) if value.shape is not None else None
            kind = value.dtype.numpy().kind if value.dtype is not None else "f"
            if dims is None or len(dims) != 4 or kind != "f":
                continue
            if dims[1] in (1, 3, 4):
                self.flip_axis[value.name] = -1  # NCHW: width is last
            elif dims[3] in (1, 3, 4):
                self.flip_axis[value.name] = -2  # NHWC

    def __len__(self) -> int:
        return len(self.samples)

    def batch(self, indices, rng):
        out = {name: np.array(self.samples.arrays[name][indices]) for name in self.names}
        if rng is not None and self.flip_axis:
            flips = rng.random(len(indices)) < 0.5  # one coin per sample, shared by its image inputs
            for name, axis in self.flip_axis.items():
                out[name][flips] = np.flip(out[name][flips], axis=axis)
        return out


class _ImageData(_Data):
    def __init__(self, files: list[Path], spec: Preprocess, name: str, batched: bool):
        self.files, self.spec = files, spec
        self.names, self.batched = [name], {name: batched}
        self.strong: Augment | None = None  # set by distill(augment=...): the strong pipeline instead of _prepare's
        self._cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices, rng):
        if rng is not None and self.strong is not None:
            arrays = [_strong_sample(self, int(i), rng, self.strong) for i in indices]
        else:
            arrays = [_prepare(self.image(int(i)), self.spec, rng) for i in indices]
        stacked = np.stack(arrays)
        if not self.batched[self.names[0]]:
            stacked = stacked[:, None]
        return {self.names[0]: stacked}

    def image(self, index: int) -> np.ndarray:
        """The decoded uint8 HxWx3 RGB image (kept in memory while the decoded images stay under IMAGE_CACHE_BYTES)."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        image = self._load(self.files[index])
        if self._cached_bytes + image.nbytes <= IMAGE_CACHE_BYTES:
            self._cache[index] = image
            self._cached_bytes += image.nbytes
        return image

    def _load(self, file: Path) -> np.ndarray:
        from PIL import Image

        h, w = self.spec.size
        try:
            with Image.open(file) as img:
                if self.strong is None:
                    img.draft("RGB", (2 * w, 2 * h))  # JPEG: decode at a reduced size, much faster
                return np.asarray(img.convert("RGB"))
        except Exception as exc:  # noqa: BLE001
            raise EdgelrError(f"{file}: cannot decode this image ({model_io.first_line(exc)})") from None


@dataclass(frozen=True)
class Augment:
    """The strong augmentation for an image folder (`distill(augment="strong")` or an instance): every
    step draws new views of the photos, so a few dozen photos give thousands of distinct inputs.

    Each sample is, with probability `mosaic`, a 2x2 mosaic (YOLO-style: a random centre, each quarter
    filled with a crop of a random photo), else one view of its photo: with probability `letterbox` (when
    the preprocessing letterboxes) a crop of free aspect resized into the canvas at a random zoom and
    place, grey around it, as the model sees a whole photo; else a crop filling the canvas. A crop covers
    `scale` (a fraction of the photo's area, drawn log-uniform) with an aspect ratio within `ratio` of the
    target's. Then: a horizontal flip (p `flip`); brightness, contrast and saturation each x(1 +- `jitter`);
    a hue rotation of up to +-`hue` turns; a colour cast (each channel's gain x e^(+-`tint`): the only
    change here that gives a grey photo colour, and photo sets are often mostly grey); greyscale with
    probability `grey`; and with probability `mixup` a blend (weight 0.3..0.7) with a second such sample.
    Only image folders take it; an .npz is flipped."""

    scale: tuple[float, float] = (0.05, 1.0)
    ratio: tuple[float, float] = (0.75, 1.333)
    letterbox: float = 0.5
    zoom: tuple[float, float] = (0.4, 1.0)
    mosaic: float = 0.4
    flip: float = 0.5
    jitter: float = 0.4
    hue: float = 0.5
    tint: float = 0.3
    grey: float = 0.1
    mixup: float = 0.1


def _augment_spec(augment) -> Augment | None:
    if isinstance(augment, Augment):
        return augment
    if augment == "strong":
        return Augment()
    if isinstance(augment, bool) or augment is None:
        return None
    raise EdgelrError(f"augment must be True, False, 'strong' or an edgelr.distill.Augment, not {augment!r}")


def _crop(image: np.ndarray, rng: np.random.Generator, aug: Augment, aspect: float | None) -> np.ndarray:
    """A random crop of IMAGE covering aug.scale of its area; with ASPECT (w/h), of about that aspect
    (within aug.ratio), else of the photo's own aspect times a factor within aug.ratio squared."""
    ih, iw = image.shape[:2]
    lo, hi = aug.scale
    area = ih * iw * math.exp(rng.uniform(math.log(lo), math.log(hi)))
    base = aspect if aspect is not None else iw / ih
    spread = math.log(aug.ratio[1] / aug.ratio[0]) if aspect is not None else 2 * math.log(aug.ratio[1] / aug.ratio[0])
    r = base * math.exp(rng.uniform(-spread / 2, spread / 2))
    cw = round(math.sqrt(area * r))
    ch = round(math.sqrt(area / r))
    cw, ch = max(1, min(iw, cw)), max(1, min(ih, ch))
    y, x = int(rng.integers(0, ih - ch + 1)), int(rng.integers(0, iw - cw + 1))
    crop = image[y : y + ch, x : x + cw]
    if rng.random() < aug.flip:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), dtype=np.float32)


def _colour(x: np.ndarray, rng: np.random.Generator, aug: Augment) -> np.ndarray:
    """float HxWx3 in 0..255 -> float 3xHxW in 0..255: brightness, contrast, saturation, hue and tint, or
    greyscale, clipped. All of them are one affine map of the colour, applied in one pass."""
    b, c, s = rng.uniform(1 - aug.jitter, 1 + aug.jitter, size=3)
    luma = np.array([0.299, 0.587, 0.114])
    if rng.random() < aug.grey:
        colour = np.outer(np.ones(3), luma)
    else:
        colour = (1 - s) * np.outer(np.ones(3), luma) + s * np.eye(3)
        if aug.hue:
            colour = _hue_matrix(rng.uniform(-aug.hue, aug.hue) * 2 * math.pi) @ colour
        if aug.tint:
            colour = np.exp(rng.uniform(-aug.tint, aug.tint, size=(3, 1))) * colour
    matrix = (c * b * colour).astype(np.float32)  # contrast about the (brightened) mean, which grey maps keep
    offset = np.float32((1 - c) * b * float(x.mean()))
    planes = np.ascontiguousarray(x.transpose(2, 0, 1))  # 3xHxW
    out = np.empty_like(planes)
    for i in range(3):  # elementwise, not BLAS: no threads of its own beside torch's
        np.multiply(planes[0], matrix[i, 0], out=out[i])
        out[i] += matrix[i, 1] * planes[1]
        out[i] += matrix[i, 2] * planes[2] + offset
    return np.clip(out, 0, 255, out=out)


def _hue_matrix(angle: float) -> np.ndarray:
    """Rotates colours about the grey axis by ANGLE (radians) in YIQ space, keeping luma."""
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])
    return (np.linalg.inv(to_yiq) @ rotate @ to_yiq).astype(np.float32)


def _strong_view(data: _ImageData, index: int, rng: np.random.Generator, aug: Augment) -> np.ndarray:
    """One augmented HxWx3 float image (0..255) of the canvas size, before normalisation."""
    th, tw = data.spec.size
    if rng.random() < aug.mosaic:
        canvas = np.empty((th, tw, 3), np.float32)
        cy, cx = int(rng.uniform(0.25, 0.75) * th), int(rng.uniform(0.25, 0.75) * tw)
        n = len(data)
        for k, (y0, y1, x0, x1) in enumerate(((0, cy, 0, cx), (0, cy, cx, tw), (cy, th, 0, cx), (cy, th, cx, tw))):
            source = index if k == 0 else int(rng.integers(0, n))
            h, w = y1 - y0, x1 - x0
            canvas[y0:y1, x0:x1] = _resize(_crop(data.image(source), rng, aug, w / h), h, w)
    elif data.spec.letterbox and rng.random() < aug.letterbox:
        crop = _crop(data.image(index), rng, aug, None)
        ch, cw = crop.shape[:2]
        s = min(th / ch, tw / cw) * rng.uniform(*aug.zoom)
        nh, nw = max(1, min(th, round(ch * s))), max(1, min(tw, round(cw * s)))
        canvas = np.full((th, tw, 3), 114, dtype=np.float32)
        top, left = int(rng.integers(0, th - nh + 1)), int(rng.integers(0, tw - nw + 1))
        canvas[top : top + nh, left : left + nw] = _resize(crop, nh, nw)
    else:
        canvas = _resize(_crop(data.image(index), rng, aug, tw / th), th, tw)
    return canvas


def _strong_sample(data: _ImageData, index: int, rng: np.random.Generator, aug: Augment) -> np.ndarray:
    x = _colour(_strong_view(data, index, rng, aug), rng, aug)
    if rng.random() < aug.mixup:
        lam = np.float32(rng.uniform(0.3, 0.7))
        x *= lam
        x += (1 - lam) * _colour(_strong_view(data, int(rng.integers(0, len(data))), rng, aug), rng, aug)
    return _normalise(x, data.spec, chw=True)


def _normalise(canvas: np.ndarray, spec: Preprocess, chw: bool = False) -> np.ndarray:
    """float HxWx3 (3xHxW with CHW) RGB 0..255 -> the model input (CHW or HWC float32) by SPEC's scale,
    mean, std, channel order and layout."""
    if not chw:
        canvas = canvas.transpose(2, 0, 1)
    gain = np.float32(spec.scale) / np.asarray(spec.std, np.float32)
    shift = np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32)
    x = canvas * gain[:, None, None] - shift[:, None, None]
    if spec.channel_order == "BGR":
        x = x[::-1]
    if spec.layout == "NHWC":
        x = x.transpose(1, 2, 0)
    return np.ascontiguousarray(x, dtype=np.float32)


def _prepare(image: np.ndarray, spec: Preprocess, rng: np.random.Generator | None) -> np.ndarray:
    """uint8 HxWx3 RGB -> one model input (CHW or HWC float32), augmented with RNG unless None:
    a random crop (60-100% of each side), a horizontal flip (p 0.5), a small colour jitter
    (brightness, contrast, saturation +-15%), and with letterbox a random zoom-out (70-100%)."""
    from PIL import Image

    th, tw = spec.size
    if rng is not None:
        ih, iw = image.shape[:2]
        fh, fw = rng.uniform(0.6, 1.0, size=2)
        ch, cw = max(1, round(ih * fh)), max(1, round(iw * fw))
        y, x = int(rng.integers(0, ih - ch + 1)), int(rng.integers(0, iw - cw + 1))
        image = image[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            image = image[:, ::-1]
        image = np.ascontiguousarray(image)
    ih, iw = image.shape[:2]
    if spec.letterbox:
        zoom = rng.uniform(0.7, 1.0) if rng is not None else 1.0
        s = min(th / ih, tw / iw) * zoom
        nh, nw = max(1, min(th, round(ih * s))), max(1, min(tw, round(iw * s)))
    else:
        nh, nw = th, tw
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    if rng is not None:
        b, c, s = rng.uniform(0.85, 1.15, size=3)
        resized = resized * b
        resized = (resized - resized.mean()) * c + resized.mean()
        grey = resized.mean(axis=2, keepdims=True)
        resized = np.clip(grey + (resized - grey) * s, 0, 255)
    if spec.letterbox:
        canvas = np.full((th, tw, 3), 114, dtype=np.float32)
        if rng is not None:
            top, left = int(rng.integers(0, th - nh + 1)), int(rng.integers(0, tw - nw + 1))
        else:
            top, left = (th - nh) // 2, (tw - nw) // 2
        canvas[top : top + nh, left : left + nw] = resized
    else:
        canvas = resized
    return _normalise(canvas, spec)


def _read_preprocess(spec, folder: Path, value: ir.Value) -> Preprocess:
    where = "preprocess"
    if spec is None and (folder / "preprocess.json").is_file():
        spec = folder / "preprocess.json"
    if isinstance(spec, (str, os.PathLike)):
        where = str(spec)
        try:
            spec = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as exc:
            raise EdgelrError(f"{where}: not a readable JSON preprocessing spec ({model_io.first_line(exc)})") from None
    spec = dict(spec or {})
    if not isinstance(spec, dict):
        raise EdgelrError(f"{where}: must be a JSON object with keys {', '.join(PREPROCESS_KEYS)}")
    unknown = sorted(set(spec) - set(PREPROCESS_KEYS))
    if unknown:
        raise EdgelrError(f"{where}: unknown keys {unknown}; known: {', '.join(PREPROCESS_KEYS)}")
    layout = str(spec.get("layout", "NCHW")).upper()
    if layout not in ("NCHW", "NHWC"):
        raise EdgelrError(f"{where}: layout must be NCHW or NHWC, not {layout}")
    order = str(spec.get("channel_order", "RGB")).upper()
    if order not in ("RGB", "BGR"):
        raise EdgelrError(f"{where}: channel_order must be RGB or BGR, not {order}")
    dims = list(value.shape.dims) if value.shape is not None else None
    if dims is None or len(dims) != 4:
        raise EdgelrError(f"an image folder feeds a model whose input is an image batch [N,3,H,W]; input "
                          f"'{value.name}' has shape {dims}: give the data as an .npz instead")
    channels, hw = (dims[1], dims[2:4]) if layout == "NCHW" else (dims[3], dims[1:3])
    if isinstance(channels, int) and channels != 3:
        raise EdgelrError(f"input '{value.name}' has {channels} channels ({layout}); images give 3: use an .npz")
    if "size" in spec:
        size = spec["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise EdgelrError(f"{where}: size must be a positive int or [H, W], not {spec['size']}")
    elif all(isinstance(d, int) and d > 0 for d in hw):
        size = tuple(hw)
    else:
        raise EdgelrError(f"input '{value.name}' has a dynamic image size {dims}: say which in a preprocessing "
                          'spec, e.g. preprocess.json {"size": 320} in the image folder')
    if all(isinstance(d, int) and d > 0 for d in hw) and tuple(hw) != tuple(size):
        raise EdgelrError(f"{where}: size {list(size)} differs from the model's input size {list(hw)}")

    def triple(key, default):
        v = spec.get(key, default)
        v = [v] * 3 if isinstance(v, (int, float)) else list(v)
        if len(v) != 3:
            raise EdgelrError(f"{where}: {key} must be a number or 3 numbers, not {spec[key]}")
        return tuple(float(x) for x in v)

    std = triple("std", 1.0)
    if any(s == 0 for s in std):
        raise EdgelrError(f"{where}: std must not be 0")
    return Preprocess(size=(int(size[0]), int(size[1])), letterbox=bool(spec.get("letterbox", True)),
                      mean=triple("mean", 0.0), std=std, scale=float(spec.get("scale", 1 / 255)),
                      layout=layout, channel_order=order)


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        other = f" (it holds {len(files)} other files, e.g. {files[0].name})" if files else " (it is empty)"
        raise EdgelrError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}){other}")
    from PIL import Image

    for p in images:
        try:
            with Image.open(p) as img:
                img.verify()
        except Exception as exc:  # noqa: BLE001
            raise EdgelrError(f"{p}: cannot decode this image ({model_io.first_line(exc)}); remove or fix it") from None
    return images


def load_data(data, model: ir.Model, preprocess=None) -> _Data:
    """DATA (an .npz of model inputs, Samples, or an image folder) checked against MODEL's inputs."""
    if isinstance(data, Samples):
        return _NpzData(data, model)
    path = Path(data)
    if path.is_dir():
        inputs = model_inputs(model)
        if len(inputs) != 1:
            raise EdgelrError(f"{path}: an image folder feeds a model with one input; this one has "
                              f"{[v.name for v in inputs]}: give the data as an .npz")
        value = inputs[0]
        spec = _read_preprocess(preprocess, path, value)
        if value.dtype is not None and value.dtype.numpy().kind != "f":
            raise EdgelrError(f"input '{value.name}' is {value.dtype}; images give float inputs: use an .npz")
        dims = list(value.shape.dims)
        if isinstance(dims[0], int) and dims[0] > 1:
            raise EdgelrError(f"input '{value.name}' has a fixed batch of {dims[0]}; use an .npz")
        return _ImageData(_image_files(path), spec, value.name, batched=dims[0] != 1)
    if not path.exists():
        raise EdgelrError(f"{path}: no such file or folder; give an .npz of model inputs or a folder of images")
    return _NpzData(load_samples(path, model), model)


def _eval_samples(eval_samples, model: ir.Model, preprocess) -> Samples | None:
    if eval_samples is None or isinstance(eval_samples, Samples):
        return eval_samples
    data = load_data(eval_samples, model, preprocess)
    if isinstance(data, _NpzData):
        return data.samples
    indices = np.arange(min(len(data), EVAL_IMAGES))
    arrays = data.batch(indices, None)
    return Samples(arrays, dict(data.batched))


# ---------------------------------------------------------------------------------------------------
# the loss


def _chunks(batch: dict[str, np.ndarray], batched: dict[str, bool]) -> list[dict[str, np.ndarray]]:
    """The model feeds for a batch: one, when every input takes the samples on its batch axis; else one per sample."""
    if all(batched.values()):
        return [batch]
    n = len(next(iter(batch.values())))
    return [{k: (v[i : i + 1] if batched[k] else v[i]) for k, v in batch.items()} for i in range(n)]


def _scales(teacher: list[list[np.ndarray]], per_channel: bool,
            scores: tuple[int, int | None] | None = None) -> list[np.ndarray | None]:
    """Per float output: what its error is divided by (see the module docstring); None for non-float outputs.
    SCORES (channels [a, b) of axis 1 holding probabilities) are left out of an output's scale."""
    scales = []
    for k in range(len(teacher[0])):
        arrays = [np.asarray(chunk[k]) for chunk in teacher]
        if arrays[0].dtype.kind != "f":
            scales.append(None)
            continue
        a = [x.astype(np.float64) for x in arrays]
        if per_channel and a[0].ndim >= 3:
            axes = tuple(i for i in range(a[0].ndim) if i != 1)
            sq = sum(np.sum(x * x, axis=axes) for x in a)
            count = sum(x.size // x.shape[1] for x in a)
            rms = np.sqrt(sq / max(count, 1))
            floor = max(CHANNEL_FLOOR * float(np.median(rms)), 1e-12)
            scale = np.maximum(rms, floor).reshape((1, -1) + (1,) * (a[0].ndim - 2))
        else:
            if scores is not None and a[0].ndim >= 3:
                keep = np.ones(a[0].shape[1], bool)
                keep[slice(*scores)] = False
                a = [x[:, keep] for x in a]
            total = sum(float(np.sum(x * x)) for x in a)
            scale = np.array(max(math.sqrt(total / max(sum(x.size for x in a), 1)), 1e-12))
        scales.append(scale.astype(np.float32))
    return scales


def _output_loss(student, teacher, scale, scores: tuple[int, int | None] | None = None, score_weight: float = 1.0):
    """Squared error / scale^2, averaged; with SCORES, those channels of an [N, C, ...] output are compared
    as probabilities instead, by the binary KL divergence (teacher || student), times score_weight."""
    if scores is None or student.dim() < 3:
        return torch.mean(((student - teacher) / scale) ** 2)
    channels = slice(*scores)
    keep = torch.ones(student.shape[1], dtype=torch.bool, device=student.device)
    keep[channels] = False
    box = ((student[:, keep] - teacher[:, keep]) / (scale[:, keep] if scale.dim() else scale)) ** 2
    return torch.mean(box) + score_weight * _binary_kl(teacher[:, channels], student[:, channels])


def _binary_kl(p, q, eps: float = 1e-6):
    """Mean binary KL divergence KL(Bernoulli(p) || Bernoulli(q)) of probabilities p (teacher), q (student):
    its gradient in q's logit is q - p, the logit's natural distance, where squared error vanishes."""
    p = p.clamp(eps, 1 - eps)
    q = q.clamp(eps, 1 - eps)
    return torch.mean(p * (torch.log(p) - torch.log(q)) + (1 - p) * (torch.log1p(-p) - torch.log1p(-q)))


def _factorized_features(s_model: ir.Model, student, features: str) -> list[tuple[str, str]]:
    if features != "factorized":
        raise EdgelrError(f"features must be pairs of tensor names or 'factorized', not {features!r}")
    pairs = [(n.outputs[0].name, n.outputs[0].name) for n in s_model.graph if n.name.endswith("/lowrank_up")]
    if not pairs:
        raise EdgelrError(f"{student}: no factorized pairs to align (features='factorized' wants a student from "
                          "edgelr compress); name the tensors instead")
    return pairs


def weights_outside_pairs(student: str | os.PathLike) -> list[str]:
    """The initializers of an `edgelr compress` student that are not factorized-pair weights (theirs are
    named `*lowrank*`): for `freeze` (train only the pairs) or `lr_scale` (train the rest slower)."""
    graph = onnx.load(str(student), load_external_data=False).graph
    return [t.name for t in graph.initializer if "lowrank" not in t.name]


def _feature_loss(student, teacher):
    return torch.mean((student - teacher) ** 2) / (teacher.var(unbiased=False) + 1e-12)


# ---------------------------------------------------------------------------------------------------
# checkpoints


def _save_checkpoint(path: Path, state: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _numpy_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


# ---------------------------------------------------------------------------------------------------
# distillation


def _check_pair(teacher: ir.Model, student: ir.Model, tpath: Path, spath: Path) -> None:
    t_in = {v.name: v for v in model_inputs(teacher)}
    s_in = {v.name: v for v in model_inputs(student)}
    if set(t_in) != set(s_in):
        raise EdgelrError(f"{spath}: its inputs {sorted(s_in)} are not the teacher's {sorted(t_in)} "
                          f"({tpath}); the student must take the same inputs")
    for name, tv in t_in.items():
        sv = s_in[name]
        td = list(tv.shape.dims) if tv.shape is not None else None
        sd = list(sv.shape.dims) if sv.shape is not None else None
        if tv.dtype != sv.dtype:
            raise EdgelrError(f"{spath}: input '{name}' is {sv.dtype}, the teacher's is {tv.dtype}")
        if td is not None and sd is not None and (
            len(td) != len(sd) or any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(td, sd))
        ):
            raise EdgelrError(f"{spath}: input '{name}' has shape {sd}, the teacher's has {td}; "
                              "the student must take the same inputs")
    t_out = [v.name for v in teacher.graph.outputs]
    s_out = [v.name for v in student.graph.outputs]
    if len(t_out) != len(s_out) or set(t_out) != set(s_out):
        raise EdgelrError(f"{spath}: its outputs {s_out} are not the teacher's {t_out} ({tpath}); "
                          "the student must give the same outputs")


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise EdgelrError(f"device '{device}': {model_io.first_line(exc)}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EdgelrError(f"device '{device}': no CUDA GPU is available to torch here; use 'cpu' or 'auto'")
    return device


def _schedule(total: int, warmup: int, clock: Callable[[], float] | None = None):
    """The learning rate's factor: a linear warm-up over WARMUP steps, then a cosine decay to 0 at step
    TOTAL, or with CLOCK (the fraction of the time budget spent) at whichever comes first."""
    def factor(step: int) -> float:  # LambdaLR calls it with the number of steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if clock is not None:
            progress = max(progress, clock())
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class _Stream:
    """Which samples step S uses: a permutation of the data per epoch, a pure function of (seed, epoch)."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def indices(self, step: int) -> np.ndarray:
        out = []
        for p in range(step * self.batch, (step + 1) * self.batch):
            epoch, i = divmod(p, self.n)
            if epoch not in self._perms:
                self._perms = {epoch: np.random.default_rng([self.seed, epoch, 0]).permutation(self.n)}
            out.append(self._perms[epoch][i])
        return np.asarray(out, dtype=np.int64)

    def augmentation(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step, 1])


def _relative_max_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = float(np.max(np.abs(b))) if b.size else 0.0
    num = float(np.max(np.abs(a - b))) if b.size else 0.0
    return num / den if den > 0 else num


def _to_tensors(feed: dict[str, np.ndarray], names: list[str], device: str):
    return [torch.from_numpy(np.ascontiguousarray(feed[n])).to(device) for n in names]


def _ort_threads() -> int:
    return int(os.environ.get("EDGELR_ORT_THREADS", "0") or 0)


def distill(
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    data,
    out: str | os.PathLike,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch: int = 8,
    lr: float = 2e-5,
    weight_decay: float = 0.0,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = CHECKPOINT_EVERY,
    features: Sequence[tuple[str, str]] | str | None = None,
    feature_weight: float | None = None,
    task_loss: Callable | None = None,
    task_weight: float = 1.0,
    per_channel: bool = True,
    augment: bool | str | Augment = True,
    preprocess: dict | str | os.PathLike | None = None,
    freeze: Sequence[str] = (),
    lr_scale: Mapping[str, float] | None = None,
    clip: float = 1.0,
    device: str = "auto",
    progress: bool = True,
    time_limit: float | None = None,
    eval_samples=None,
    precision: str = "fp32",
    quantization_aware: bool = False,
    anneal_by_time: bool = False,
    scores: tuple[int, int | None] | None = None,
    score_weight: float = 1.0,
) -> dict:
    """Train STUDENT (an ONNX model with the teacher's inputs and outputs, e.g. `edgelr compress`'s
    result) to reproduce TEACHER's outputs on DATA, and write it to OUT (a copy of the student graph
    with new weight values). No labels needed: the teacher, run in ONNX Runtime, gives the targets.

    data: an .npz of model inputs (as --calib), a Samples, or a folder of images with an optional
        preprocessing spec (`preprocess`: a dict or JSON file; default: the folder's preprocess.json,
        else YOLO's convention: letterbox to the input's static size with grey 114, /255, RGB, NCHW).
    steps / epochs: how long (exactly one of them). batch: samples per step.
    lr: AdamW's peak learning rate, after a linear warm-up (5% of the steps, at most 100) and before a
        cosine decay to 0. Adam moves every weight by about lr per step whatever its gradient, and a
        compressed student starts close to its target: on YOLOv8n (conv weights ~1e-2) lr 1e-4 at
        batch 8 wrecked the class scores within 40 steps (their error 0.48 -> 1.0), 2e-5 did not; a
        few hundred steps at 2e-5 can still move a weight by ~1e-3..1e-2. Small models with larger
        weights take 1e-3 and more.
    weight_decay: 0 by default (AdamW's decoupled decay, on matrices and kernels only, never on biases
        or norm scales): the target is the teacher, not a prior towards small weights, and decay would
        only pull the student away from it.
    checkpoint / resume / checkpoint_every: see the module docstring; resume=True with no checkpoint
        file starts from the beginning.
    features: pairs (teacher tensor, student tensor) of intermediate ONNX values aligned with an MSE
        normalised by the teacher tensor's variance, each weighted by feature_weight; or "factorized":
        the output of every factorized pair of an `edgelr compress` student, aligned with the layer it
        replaced (the pair keeps that layer's output name), as DLRMamba's structure-aware distillation
        aligns each low-rank block: a target inside the network for every pair, on every augmented
        view, not only at the outputs. feature_weight: 1 by default; FACTORIZED_FEATURE_WEIGHT with
        "factorized".
    task_loss: optional hook task_loss(student_outputs: dict[name, Tensor], indices: np.ndarray) ->
        scalar Tensor, called per forward with the data indices of its samples (to look up labels);
        added with task_weight. Augmentation moves and mirrors images: pass augment=False when the
        labels depend on geometry.
    augment: True: a light augmentation (random crop of 60-100% of each side, flip, +-15% colour,
        letterbox zoom); "strong" or an Augment: crops from 5% to all of a photo, letterboxed views,
        2x2 mosaics, colour and hue jitter, greyscale, mixup (see Augment), for image folders (an .npz
        is only flipped); False: none.
    per_channel: normalise [N, C, ...] outputs per channel (module docstring); False: per output.
    scores: (first, end) channels of axis 1 of [N, C, ...] outputs that are probabilities (sigmoid
        scores; end None: to the last), e.g. (4, None) for YOLOv8's class scores: compared by the
        binary KL divergence (teacher || student) instead, times score_weight, and left out of the
        output's scale. Squared error on scores of 1e-4..1 follows the few large ones; KL follows
        their logits, which decide a detector's ranking. On YOLOv8n the mean KL is ~1/25 of the
        boxes' relative squared error: score_weight 25 weighs them alike.
    freeze: fnmatch patterns of ONNX weight or node names to keep fixed.
    lr_scale: {fnmatch pattern of ONNX weight names (or of the Constant node holding one): factor on lr},
        the first matching pattern wins, other weights train at lr. E.g. the factorized pairs at lr and
        everything else at a tenth: the pairs have most to learn, the rest only needs to follow.
    clip: max gradient norm. device: "auto" (CUDA if torch sees one), "cpu", "cuda", ...
    time_limit: seconds (counted from the call); training stops cleanly when the next step would
        start past it, and the output is still written (and the checkpoint, if any).
    anneal_by_time: with time_limit, the cosine decay runs on whichever is further along, the steps or
        the clock, so a run that the time limit ends has its learning rate decayed to 0 by then (give
        more steps than fit). Such a run depends on the machine's speed: not reproducible bit for bit.
    eval_samples: an .npz, Samples or image folder: the student's relative output error against the
        teacher (edgelr.verify.output_error) before and after.
    precision: "bf16" runs the student's forward pass under torch.autocast in bfloat16 (weights,
        gradients, the optimizer and the loss stay float32): about 1.6x faster on CPUs with AMX or
        AVX512-BF16, outputs within ~0.2% of float32 on YOLOv8n. The saved model is float32 either way.
    quantization_aware: train for static INT8 (edgelr.passes.quantize) after: the input of every Conv and
        Linear is rounded to 256 levels over the min..max it has reached so far in training (as ONNX
        Runtime's MinMax calibration sets its uint8 range), with straight-through gradients, so the
        student learns weights whose activations survive that rounding. The saved model is float.

    Returns a dict: steps (taken in all), planned_steps, stopped_early, seconds, final_loss, losses
    [(step, mean loss of the last LOG_EVERY steps)], parity (per output: relative max error of the
    saved ONNX in ORT vs the torch student), error_before / error_after (with eval_samples), timings.
    """
    _need_torch()
    start = time.perf_counter()
    teacher, student = Path(teacher), Path(student)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    out = model_io.check_output_path(out, teacher, student)
    if checkpoint is not None:
        if checkpoint.resolve() in (teacher.resolve(), student.resolve(), out.resolve()):
            raise EdgelrError(f"{checkpoint}: the checkpoint cannot be the teacher, the student or the output")
        if not checkpoint.parent.is_dir():
            raise EdgelrError(f"{checkpoint}: folder '{checkpoint.parent}' does not exist")
    if steps is not None and epochs is not None:
        raise EdgelrError("give steps or epochs, not both")
    if steps is None and epochs is None:
        raise EdgelrError("say how long to train: steps=N or epochs=E")
    if (steps is not None and not steps > 0) or (epochs is not None and not epochs > 0):
        raise EdgelrError(f"steps / epochs must be positive, got steps={steps}, epochs={epochs}")
    if not (isinstance(batch, int) and batch > 0):
        raise EdgelrError(f"batch must be a positive integer, got {batch}")
    if not lr > 0:
        raise EdgelrError(f"lr must be positive, got {lr}")
    if not (isinstance(seed, int) and seed >= 0):
        raise EdgelrError(f"seed must be a non-negative integer, got {seed}")
    bad = {k: v for k, v in (lr_scale or {}).items() if not (isinstance(v, (int, float)) and v >= 0)}
    if bad:
        raise EdgelrError(f"lr_scale: factors must be numbers >= 0 (0 freezes), got {bad}")
    if scores is not None:
        if not (isinstance(scores, (tuple, list)) and len(scores) == 2 and isinstance(scores[0], int)
                and (scores[1] is None or isinstance(scores[1], int))):
            raise EdgelrError(f"scores must be (first, end) channels, end None for the last, not {scores!r}")
        scores = (int(scores[0]), None if scores[1] is None else int(scores[1]))
    if precision not in ("fp32", "bf16"):
        raise EdgelrError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
    device = _resolve_device(device)

    t_model = model_io.load(teacher)
    s_model = model_io.load(student)
    _check_pair(t_model, s_model, teacher, student)
    strong = _augment_spec(augment)
    dataset = load_data(data, t_model, preprocess)
    if strong is not None and isinstance(dataset, _ImageData):
        dataset.strong = strong
    evaluation = _eval_samples(eval_samples, t_model, preprocess)
    total = int(steps) if steps is not None else max(1, math.ceil(epochs * len(dataset) / batch))
    if isinstance(features, str):
        features = _factorized_features(s_model, student, features)
        feature_weight = FACTORIZED_FEATURE_WEIGHT if feature_weight is None else feature_weight
    feature_weight = 1.0 if feature_weight is None else feature_weight
    features = [tuple(f) for f in features or []]
    t_values = {v.name for n in t_model.graph for v in n.outputs} | {v.name for v in t_model.graph.inputs}
    for t_name, _ in features:
        if t_name not in t_values:
            raise EdgelrError(f"{teacher}: no tensor named '{t_name}' (features)")

    threads = os.environ.get("EDGELR_TORCH_THREADS")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    quiet = warnings.catch_warnings()
    quiet.__enter__()
    # onnx2torch's Slice indexes with a list of slices, which torch warns about (the results are right)
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
    try:
        module = to_torch(student, freeze=freeze)
        info = onnx_info(module)
        out_names = list(info.outputs)
        set_outputs(module, out_names + [s for _, s in features])
        input_names = list(info.inputs)
        probe = _chunks(dataset.batch(np.arange(min(len(dataset), 2)), None), dataset.batched)[0]
        _check_conversion(module, student, probe, input_names, out_names)
        module.to(device)
        rounding = _fake_quantize_inputs(module) if quantization_aware else []
        t_out_names = out_names + [t for t, _ in features]
        del s_model
        with _teacher_session(t_model, [t for t, _ in features]) as session:
            del t_model
            result = _train(module, info, session, dataset, input_names, out_names, t_out_names, len(features),
                            total=total, batch=batch, lr=lr, weight_decay=weight_decay, seed=seed,
                            checkpoint=checkpoint, resume=resume, checkpoint_every=checkpoint_every,
                            feature_weight=feature_weight, task_loss=task_loss, task_weight=task_weight,
                            per_channel=per_channel, augment=augment, clip=clip, device=device,
                            progress=progress, time_limit=time_limit, start=start, precision=precision,
                            anneal_by_time=anneal_by_time, scores=scores, score_weight=score_weight,
                            lr_scale=dict(lr_scale or {}),
                            meta=_meta(teacher, student, seed, batch, total, lr, weight_decay, info,
                                       augment if strong is None else strong, precision, scores,
                                       score_weight, lr_scale, quantization_aware))
        for hook in rounding:  # the saved model and the parity check are float
            hook.remove()
        module.to("cpu")
        write_back(module, student, out)
        try:
            result["parity"] = _parity(module, out, probe, input_names, out_names)
        except BaseException:
            with contextlib.suppress(OSError):
                out.unlink()
            raise
        if evaluation is not None:
            from edgelr.measure.verify import output_error

            result["error_before"] = output_error(teacher, student, evaluation)
            result["error_after"] = output_error(teacher, out, evaluation)
    finally:
        quiet.__exit__(None, None, None)
        if threads:
            torch.set_num_threads(old_threads)
    result["seconds"] = time.perf_counter() - start
    result["output"] = str(out)
    return result


QUANT_LEVELS = 256  # uint8 activations, as edgelr.passes.quantize's static INT8


def _fake_quantize_inputs(module) -> list:
    """Round each Conv/Linear input to QUANT_LEVELS steps over its running min..max (a buffer, so a
    checkpoint keeps it), straight-through in the backward pass. Returns the hooks, to remove."""
    hooks = []
    for sub in module.modules():
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            sub.register_buffer("edgelr_input_range", torch.tensor([0.0, 0.0], device=next(sub.parameters()).device))
            hooks.append(sub.register_forward_pre_hook(_round_input))
    if not hooks:
        raise EdgelrError(f"{onnx_info(module).path}: quantization_aware needs a Conv or Gemm layer to round the "
                          "inputs of, and the student has none; train without it")
    return hooks


def _round_input(sub, args):
    x, *rest = args
    seen = sub.edgelr_input_range
    with torch.no_grad():  # the range includes 0, as ORT's does (zero must be exact)
        seen[0] = torch.minimum(seen[0], x.min().float())
        seen[1] = torch.maximum(seen[1], x.max().float())
    low, step = seen[0], (seen[1] - seen[0]).clamp_min(1e-8) / (QUANT_LEVELS - 1)
    zero = torch.round(-low / step)
    rounded = (torch.clamp(torch.round(x.float() / step) + zero, 0, QUANT_LEVELS - 1) - zero) * step
    return (x + (rounded.to(x.dtype) - x).detach(), *rest)


def _autocast(device: str, precision: str):
    """The student's forward pass in bfloat16 (weights, gradients and the loss stay float32) with
    precision 'bf16'; a no-op for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@contextlib.contextmanager
def _teacher_session(model: ir.Model, extra: list[str]):
    """The teacher in ONNX Runtime, with the intermediate tensors EXTRA as outputs too."""
    if extra:
        known = {v.name: v for n in model.graph for v in n.outputs}
        model.graph.outputs.extend(known[name] for name in extra if name not in {o.name for o in model.graph.outputs})
    size = model_io.model_bytes(model)
    if size <= model_io._LAZY_BYTES and model_io._inline_bytes(model) == size:  # as model_io.ort_session
        import onnxruntime as ort

        # ORT's worker threads spin between runs by default, taking the cores torch needs next
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if _ort_threads():
            opts.intra_op_num_threads = _ort_threads()
        yield ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return
    with model_io.ort_session(model, threads=_ort_threads()) as session:
        yield session


def _meta(teacher, student, seed, batch, total, lr, weight_decay, info: TorchGraph, augment, precision,
          scores=None, score_weight=1.0, lr_scale=None, quantization_aware=False) -> dict:
    return {"version": 1, "teacher": str(Path(teacher).resolve()), "student": str(Path(student).resolve()),
            "seed": int(seed), "batch": int(batch), "steps": int(total), "lr": float(lr),
            "weight_decay": float(weight_decay), "weights": sorted(info.params), "augment": repr(augment),
            "precision": precision, "scores": list(scores) if scores else None,
            "score_weight": float(score_weight) if scores else None,
            "lr_scale": {k: float(v) for k, v in (lr_scale or {}).items()},
            "quantization_aware": bool(quantization_aware)}


def _check_conversion(module, student: Path, feed, input_names, out_names) -> None:
    """The converted student must compute what ONNX Runtime computes, before any time goes into training."""
    with model_io.ort_session(student, threads=_ort_threads()) as session:
        want = session.run(out_names, feed)
    with torch.no_grad():
        got = module(*_to_tensors(feed, input_names, "cpu"))
    for name, a, b in zip(out_names, want, got):
        if np.asarray(a).dtype.kind == "f":
            err = _relative_max_error(a, b.numpy())
            if err > PARITY_TOLERANCE:
                raise EdgelrError(f"{student}: onnx2torch's conversion gives output '{name}' {err:.2e} away from "
                                  "ONNX Runtime's (relative max error); cannot distil this model faithfully")


def _parity(module, out: Path, feed: dict[str, np.ndarray], input_names, out_names) -> dict[str, float]:
    with model_io.ort_session(out, threads=_ort_threads()) as session:
        ort_out = session.run(out_names, feed)
    with torch.no_grad():
        torch_out = module(*_to_tensors(feed, input_names, "cpu"))
    parity = {}
    for name, a, b in zip(out_names, ort_out, torch_out):
        if np.asarray(a).dtype.kind == "f":
            parity[name] = _relative_max_error(a, b.numpy())
    worst = max(parity.items(), key=lambda kv: kv[1], default=None)
    if worst is not None and worst[1] > PARITY_TOLERANCE:
        raise EdgelrError(f"{out}: the saved model's output '{worst[0]}' differs from the trained torch student by "
                          f"{worst[1]:.2e} (relative max error, tolerance {PARITY_TOLERANCE}); it was not kept")
    return parity


def _train(module, info: TorchGraph, session, dataset: _Data, input_names, out_names, t_out_names, n_features, *,
           total, batch, lr, weight_decay, seed, checkpoint, resume, checkpoint_every, feature_weight, task_loss,
           task_weight, per_channel, augment, clip, device, progress, time_limit, start, meta, precision,
           anneal_by_time, scores, score_weight, lr_scale) -> dict:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if device.startswith("cuda"):
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    trainable = [p for p in info.params.values() if p.requires_grad]
    if not trainable:
        raise EdgelrError(f"{info.path}: no trainable float32 weight (Conv, Gemm, MatMul, norms) to distil")
    groups: dict[tuple[float, bool], list] = {}  # (lr factor, decayed) -> parameters
    seen = set()
    for value, p in info.params.items():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            names = (value, info.weights[value].node)
            factor = next((float(f) for pattern, f in lr_scale.items()
                           if any(n and fnmatch.fnmatchcase(n, pattern) for n in names)), 1.0)
            groups.setdefault((factor, p.dim() >= 2), []).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": lr * factor, "weight_decay": weight_decay if decayed else 0.0}
         for (factor, decayed), ps in sorted(groups.items())], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    warmup = max(1, min(100, total // 20))
    clock = (lambda: (time.perf_counter() - start) / time_limit) if anneal_by_time and time_limit else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, warmup, clock))
    stream = _Stream(len(dataset), batch, seed)
    step, losses, window = 0, [], []
    resumed_from = None

    if checkpoint is not None and resume and checkpoint.exists():
        try:
            state = torch.load(checkpoint, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise EdgelrError(f"{checkpoint}: not a readable distillation checkpoint ({model_io.first_line(exc)})") from None
        if state.get("meta") != meta:
            diff = sorted(k for k in set(meta) | set(state.get("meta", {})) if meta.get(k) != state.get("meta", {}).get(k))
            raise EdgelrError(f"{checkpoint}: made for another run (differs in {', '.join(diff)}); "
                              "use the same models and settings, or resume=False to start over")
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses, window = int(state["step"]), [tuple(x) for x in state["losses"]], list(state["window"])
        torch.set_rng_state(state["torch_rng"].cpu())
        _set_numpy_rng_state(state["numpy_rng"])
        resumed_from = step

    def save():
        if checkpoint is None:
            return
        _save_checkpoint(checkpoint, {
            "meta": meta, "module": module.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "losses": [list(x) for x in losses],
            "window": list(window), "torch_rng": torch.get_rng_state(), "numpy_rng": _numpy_rng_state(),
        })

    teacher_s = student_s = data_s = 0.0
    taken = 0
    stopped = False
    loss_value = float("nan")
    bar = tqdm(total=total, initial=step, desc="distilling", unit="step", disable=not progress, leave=False)
    try:
        while step < total:
            if time_limit is not None and time.perf_counter() - start > time_limit:
                stopped = True
                break
            t_data = time.perf_counter()
            indices = stream.indices(step)
            feeds = _chunks(dataset.batch(indices, stream.augmentation(step) if augment else None), dataset.batched)
            t0 = time.perf_counter()
            data_s += t0 - t_data
            targets = [session.run(t_out_names, feed) for feed in feeds]
            t1 = time.perf_counter()
            scales = _scales([t[: len(out_names)] for t in targets], per_channel, scores)
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            per_chunk = len(indices) // len(feeds)
            for c, (feed, target) in enumerate(zip(feeds, targets)):
                with _autocast(device, precision):
                    outputs = module(*_to_tensors(feed, input_names, device))
                if precision != "fp32":
                    outputs = tuple(o.float() if o.is_floating_point() else o for o in outputs)
                parts = []
                for k, scale in enumerate(scales):
                    if scale is not None:
                        t = torch.from_numpy(np.asarray(target[k])).to(device)
                        parts.append(_output_loss(outputs[k], t, torch.from_numpy(scale).to(device), scores, score_weight))
                loss = torch.stack(parts).mean() if parts else outputs[0].new_zeros(())
                for j in range(n_features):
                    t = torch.from_numpy(np.asarray(target[len(out_names) + j])).to(device)
                    loss = loss + feature_weight * _feature_loss(outputs[len(out_names) + j], t)
                if task_loss is not None:
                    named = dict(zip(out_names, outputs[: len(out_names)]))
                    loss = loss + task_weight * task_loss(named, indices[c * per_chunk : (c + 1) * per_chunk])
                (loss / len(feeds)).backward()
                loss_value += float(loss.detach()) / len(feeds)
            if not math.isfinite(loss_value):
                raise EdgelrError(f"the distillation loss became {loss_value} at step {step}; lower lr (now {lr})")
            if clip:
                torch.nn.utils.clip_grad_norm_(trainable, clip)
            optimizer.step()
            scheduler.step()
            t2 = time.perf_counter()
            teacher_s += t1 - t0
            student_s += t2 - t1
            step += 1
            taken += 1
            window.append(loss_value)
            if len(window) == LOG_EVERY or step == total:
                losses.append((step, float(np.mean(window))))
                window = []
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}")
            if checkpoint_every and step % checkpoint_every == 0 and step < total:
                save()
        if window and stopped:
            losses.append((step, float(np.mean(window))))
            window = []
        save()
    finally:
        bar.close()
    return {
        "steps": step,
        "planned_steps": total,
        "steps_this_run": taken,
        "stopped_early": stopped,
        "resumed_from": resumed_from,
        "final_loss": losses[-1][1] if losses else None,
        "losses": losses,
        "trainable_parameters": int(sum(p.numel() for p in trainable)),
        "device": device,
        "teacher_seconds_per_step": teacher_s / taken if taken else None,
        "student_seconds_per_step": student_s / taken if taken else None,
        "data_seconds_per_step": data_s / taken if taken else None,
    }
