"""fp16: the model's float tensors converted to half precision, its inputs and outputs kept fp32
(ONNX Runtime's float16 converter, with the shape arithmetic kept fp32 and the lossy fp32 -> fp16 -> fp32
Cast pairs it leaves between fp32 nodes removed). What TensorRT builds fp16 engines from.
"""

from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx_ir as ir

from edgelr.errors import EdgelrError
from edgelr.io.model import first_line, load
from edgelr.passes.base import (
    FunctionalEdgelrPass,
    PassConfig,
    PassDetails,
    register_pass,
)

BIG_MODEL_BYTES = 1 << 30  # past this a converted model is saved with external data (protobuf's 2 GB cap)


@dataclass(frozen=True)
class Fp16Config(PassConfig):
    """Convert float weights and activations to fp16; inputs and outputs stay fp32."""

    kind: ClassVar[str] = "fp16"


@register_pass(Fp16Config)
class Fp16Pass(FunctionalEdgelrPass):
    def call(self, model: ir.Model) -> PassDetails:
        if mostly_fp16(model):
            return PassDetails(model, False)
        out = self.context.scratch("fp16")
        to_fp16(self.context.path, out)
        return PassDetails(load(out), True)


def mostly_fp16(model) -> bool:
    sizes = {"FLOAT16": 0, "FLOAT": 0}
    for value in model.graph.initializers.values():
        if value.dtype is not None and value.dtype.name in sizes and value.const_value is not None:
            sizes[value.dtype.name] += value.const_value.nbytes
    return sizes["FLOAT16"] > sizes["FLOAT"]


def to_fp16(model_path: Path, out: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(model_path))
    keep_fp32 = _shape_computations(proto.graph)
    with warnings.catch_warnings():  # it warns for each weight clamped to fp16's range; that is the intent
        warnings.simplefilter("ignore")
        try:
            half = convert_float_to_float16(proto, keep_io_types=True, node_block_list=keep_fp32,
                                            disable_shape_infer=_weights(proto) > BIG_MODEL_BYTES)
        except Exception as exc:  # noqa: BLE001
            raise EdgelrError(f"{model_path}: could not convert the model to fp16 ({first_line(exc)})") from None
    _drop_round_trips(half.graph)
    _sort_topologically(half.graph)  # the converter appends its input Casts at the end
    big = _weights(half) > BIG_MODEL_BYTES
    onnx.save(half, str(out), save_as_external_data=big, location=out.name + ".data" if big else None)


def _shape_computations(graph) -> list[str]:
    """Names of the nodes that compute from shapes alone (Shape -> Gather -> Cast -> Range -> Mul...):
    they stay fp32. They are index and coordinate math (YOLO's anchor grid), exact in fp32 and not in
    fp16 past 2048, and TensorRT for RTX fails to build them in fp16 with dynamic sizes."""
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    derived: set[str] = set()
    names = []
    for index, node in enumerate(graph.node):  # ONNX graphs are topologically sorted
        if not node.name:
            node.name = f"edgelr_unnamed_{index}"  # the converter blocks nodes by name
        inputs = [i for i in node.input if i]
        from_shapes = inputs and all(i in derived or i in constants for i in inputs) and any(i in derived for i in inputs)
        if node.op_type in ("Shape", "Size") or from_shapes:
            derived.update(node.output)
            names.append(node.name)
    return names


def _drop_round_trips(graph) -> None:
    """Remove the fp32 -> fp16 -> fp32 Cast pairs the converter leaves between two fp32 nodes (lossy, useless)."""
    import onnx

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    fp32 = {v.name for v in [*graph.input, *graph.value_info, *graph.output]
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    fp32 |= {o for n in graph.node if cast_to(n) == onnx.TensorProto.FLOAT for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    rename, dropped = {}, set()
    for node in graph.node:
        users = consumers.get(node.output[0], []) if cast_to(node) == onnx.TensorProto.FLOAT16 else []
        if (users and node.input[0] in fp32 and node.output[0] not in outputs
                and all(cast_to(u) == onnx.TensorProto.FLOAT and u.output[0] not in outputs for u in users)):
            for user in users:
                rename[user.output[0]] = node.input[0]
                dropped.add(id(user))
            dropped.add(id(node))
    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)


def _sort_topologically(graph) -> None:
    """Order nodes so that each comes after the producers of its inputs (Kahn; stable otherwise)."""
    produced_by = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    waiting_on = [{produced_by[name] for name in node.input if name in produced_by} for node in graph.node]
    users: dict[int, list[int]] = {}
    for i, producers in enumerate(waiting_on):
        for p in producers:
            users.setdefault(p, []).append(i)
    ready = [i for i, producers in enumerate(waiting_on) if not producers]  # a heap: earliest node first
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users.get(i, []):
            waiting_on[user].discard(i)
            if not waiting_on[user]:
                heapq.heappush(ready, user)
    if len(order) != len(graph.node):  # a cycle: not a valid graph; leave it for the parser to report
        return
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def _weights(proto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)
