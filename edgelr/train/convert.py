"""ONNX <-> torch: a student graph as a trainable torch module, and its trained weights back into the graph.

    module = to_torch("student.onnx", freeze=["*dfl*"])     # onnx2torch, every float weight an nn.Parameter
    info = onnx_info(module)                                 # which ONNX value each parameter came from
    write_back(module, "student.onnx", "tuned.onnx")         # same nodes and names, new weight values

The student is converted with onnx2torch; its Conv, ConvTranspose, Gemm, MatMul, BatchNormalization /
LayerNormalization / InstanceNormalization weights and the bias Adds behind MatMul/Gemm/Conv become
trainable parameters, each tied to the ONNX initializer (or Constant node) it came from. onnx2torch is
imported so that a missing or broken torchvision does not stop it (only NonMaxSuppression and RoiAlign
need torchvision). `check_conversion` and `parity` hold the torch module to ONNX Runtime's outputs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import operator
import os
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from edgelr.errors import EdgelrError
from edgelr.io import model as model_io

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # torch is only needed for training; the rest of edgelr runs without it
    torch = None  # type: ignore[assignment]

PARITY_TOLERANCE = 1e-4  # relative max error, saved ONNX (ORT) vs the torch student

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


def need_torch() -> None:
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


def import_onnx2torch():
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
        raise EdgelrError("this module was not made by edgelr.train.convert.to_torch")
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
    need_torch()
    path = Path(model_path)
    model_io.load(path)  # the usual clear errors for a missing, corrupt or incomplete file
    proto = onnx.load(str(path))
    trainable, weights = _trainable_values(proto, freeze)
    conv = _conversion_copy(proto, weights)
    onnx2torch = import_onnx2torch()
    check_ops(conv, path)
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
                                  "version is not supported by edgelr.train.convert)")

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
                                      f"'{node.name}'; edgelr.train.convert cannot write it back")
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


def check_ops(proto: onnx.ModelProto, path: Path) -> None:
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
    atomically, once ONNX Runtime has run it (edgelr.io.model.deliver)."""
    return model_io.deliver(trained_copy(module, student), out)


def trained_copy(module, student: str | os.PathLike) -> ir.Model:
    """STUDENT with MODULE's trained weights: same nodes and names, only initializer and Constant values changed."""
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
    return model


# ---------------------------------------------------------------------------------------------------
# the torch module against ONNX Runtime


def ort_threads() -> int:
    """ONNX Runtime's intra-op threads for edgelr's training sessions: EDGELR_ORT_THREADS, else 0 (ORT's default)."""
    return int(os.environ.get("EDGELR_ORT_THREADS", "0") or 0)


def to_tensors(feed: dict[str, np.ndarray], names: list[str], device: str):
    """The model inputs NAMES of FEED as torch tensors on DEVICE, in that order."""
    return [torch.from_numpy(np.ascontiguousarray(feed[n])).to(device) for n in names]


def relative_max_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (the plain max error where b is all zeros)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = float(np.max(np.abs(b))) if b.size else 0.0
    num = float(np.max(np.abs(a - b))) if b.size else 0.0
    return num / den if den > 0 else num


def check_conversion(module, student: Path, feed, input_names, out_names) -> None:
    """The converted student must compute what ONNX Runtime computes, before any time goes into training."""
    with model_io.ort_session(student, threads=ort_threads()) as session:
        want = session.run(out_names, feed)
    with torch.no_grad():
        got = module(*to_tensors(feed, input_names, "cpu"))
    for name, a, b in zip(out_names, want, got):
        if np.asarray(a).dtype.kind == "f":
            err = relative_max_error(a, b.numpy())
            if err > PARITY_TOLERANCE:
                raise EdgelrError(f"{student}: onnx2torch's conversion gives output '{name}' {err:.2e} away from "
                                  "ONNX Runtime's (relative max error); cannot distil this model faithfully")


def parity(module, out: Path, feed: dict[str, np.ndarray], input_names, out_names, where: Path | None = None
           ) -> dict[str, float]:
    """Relative max error of each float output of the saved model OUT in ONNX Runtime against the torch MODULE;
    EdgelrError (naming WHERE, else OUT) past PARITY_TOLERANCE."""
    with model_io.ort_session(out, threads=ort_threads()) as session:
        ort_out = session.run(out_names, feed)
    with torch.no_grad():
        torch_out = module(*to_tensors(feed, input_names, "cpu"))
    parity = {}
    for name, a, b in zip(out_names, ort_out, torch_out):
        if np.asarray(a).dtype.kind == "f":
            parity[name] = relative_max_error(a, b.numpy())
    worst = max(parity.items(), key=lambda kv: kv[1], default=None)
    if worst is not None and worst[1] > PARITY_TOLERANCE:
        raise EdgelrError(f"{where or out}: the saved model's output '{worst[0]}' differs from the trained torch student by "
                          f"{worst[1]:.2e} (relative max error, tolerance {PARITY_TOLERANCE}); it was not kept")
    return parity
