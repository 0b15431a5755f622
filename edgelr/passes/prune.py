"""Structured channel pruning: remove whole output channels of Conv, Gemm and MatMul nodes.

    model = edgelr.load("model.onnx")
    result = prune(model, 0.5, samples)        # in place; samples optional (activation-weighted)

Removing output channel c of a *producer* (a Conv with group 1, a Gemm or a MatMul with a constant
weight) removes the matching input channel of every node downstream that reads it. The pass follows
the channels forward through the graph, one channel at a time:

- pass-through, channel for channel: BatchNormalization and InstanceNormalization (their parameters
  are sliced), elementwise unary ops (Relu, Sigmoid, Clip, HardSwish, ...), elementwise ops with a
  constant operand (a per-channel constant is sliced, a broadcast one kept), pools, Resize/Upsample,
  depthwise Conv (group == channels: its weight, bias and group shrink with its input), Split and
  Concat on the channel axis (sizes and offsets follow), Flatten right after a global pool;
- coupling: an elementwise op of two followed tensors (a residual Add, SiLU's x * sigmoid(x)) ties
  channel i of one to channel i of the other: the producers behind them form one group that keeps one
  channel set;
- absorbed: a Conv (group 1), Gemm or MatMul that reads the channels loses the matching input rows.

Anything else that reads a followed tensor (Reshape, Transpose, Slice, Softmax, Shape, a grouped conv,
an unknown op, a graph output, a subgraph) makes every channel that reaches it unprunable: those
channels stay as they are. A factorized pair (edgelr.passes.factorize) is a producer (the down node) feeding
a consumer (the up node), so its rank is pruned by the same machinery.

A group is a set of channels that the graph treats alike (they appear in exactly the same tensors).
Each keeps ceil((1 - ratio) * n) channels, rounded up to a multiple of `multiple` (at least
`multiple`, at most n), the most important ones: per channel, the sum over the group's producers of
||W_c|| times the RMS of the producer's output channel c on the samples (without samples, ||W_c||).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from edgelr.errors import EdgelrError
from edgelr.graph.layers import FLOAT_TYPES, name_nodes
from edgelr.graph.lowrank_pair import add_initializer, drop_weight
from edgelr.io.model import ort_session
from edgelr.io.progress import progress_bar
from edgelr.io.samples import Samples, model_inputs
from edgelr.passes.base import EdgelrPass, PassConfig, PassDetails, register_pass

UNARY = {
    "Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu",
    "Softplus", "Softsign", "Clip", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Identity",
    "Mish", "ThresholdedRelu", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Cast", "Dropout",
}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"}
POOLS = {"MaxPool", "AveragePool", "LpPool"}
GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}


@dataclass
class PrunedGroup:
    """A set of channels pruned as one: the nodes that produce them and how many stay."""

    producers: list[str]
    channels_before: int
    channels_after: int


@dataclass
class UnprunableGroup:
    """Channels left alone, and the first reason found."""

    producers: list[str]
    channels: int
    reason: str


@dataclass
class PruneResult:
    groups: list[PrunedGroup]  # every prunable group, pruned or (at ratio 0 or too small) not
    unprunable: list[UnprunableGroup]
    params_before: int  # floating-point constants of the whole model
    params_after: int
    ratio: float
    data_aware: bool  # importance weighted by activations measured on samples

    @property
    def pruned(self) -> list[PrunedGroup]:
        return [g for g in self.groups if g.channels_after < g.channels_before]


def prune(
    model: ir.Model, ratio: float, samples: Samples | None = None, *, multiple: int = 8, progress: bool = True
) -> PruneResult:
    """Remove `ratio` of the channels of every prunable group, in place (see the module docstring)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio < 1:
        raise EdgelrError(
            f"prune ratio {ratio!r}: the fraction of channels to remove must be in [0, 1), e.g. 0.5"
        )
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise EdgelrError(f"prune multiple {multiple!r}: channel counts round to a multiple of a positive integer, e.g. 8")
    graph = model.graph
    name_nodes(graph)
    params_before = _params(graph)
    flow = _Flow(graph)
    flow.trace()

    blocks = flow.blocks()
    prunable = [b for b in blocks if not b.blocked]
    counts = [_keep_count(len(b.roots), ratio, multiple) for b in prunable]
    cut = [b for b, keep in zip(prunable, counts) if keep < len(b.roots)]
    producers = sorted({p for b in cut for p in b.producers}, key=lambda p: p.order)
    rms = _channel_rms(model, producers, samples, progress) if samples is not None and producers else {}
    importance = flow.importance(producers, rms)

    dropped: set[int] = set()  # the channel classes removed
    groups = []
    for block, keep in zip(prunable, counts):
        n = len(block.roots)
        if keep < n:
            scores = np.array([importance.get(r, 0.0) for r in block.roots])
            order = np.argsort(-scores, kind="stable")
            dropped.update(block.roots[i] for i in order[keep:])
        groups.append(PrunedGroup([p.node.name for p in block.producers], n, keep))
    unprunable = [
        UnprunableGroup([p.node.name for p in b.producers], len(b.roots), b.reason) for b in blocks if b.blocked
    ]
    if any(g.channels_after < g.channels_before for g in groups):
        flow.rewrite(dropped)
    return PruneResult(groups, unprunable, params_before, _params(graph), float(ratio), bool(rms))


def _keep_count(n: int, ratio: float, multiple: int) -> int:
    want = math.ceil(round(n * (1.0 - ratio), 9))
    return min(n, max(multiple, -(-want // multiple) * multiple))


# --- following channels ---------------------------------------------------------------------
class _Refuse(Exception):
    """A node that reads followed channels in a way the pass cannot rewrite."""


@dataclass
class _Chan:
    """The channel axis of a followed tensor: element ids per position, axis counted from the end."""

    ids: np.ndarray
    axis: int  # negative
    rank: int | None
    spatial_one: bool = False  # output of a global pool: every non-channel axis but the batch is 1


@dataclass(eq=False)
class _Producer:
    node: ir.Node  # its weight is input 1
    out_axis: int  # the weight's output-channel axis
    bias_index: int | None
    order: int
    ids: np.ndarray | None = None

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def channel_axis(self) -> int:  # in the output tensor
        return 1 if self.node.op_type == "Conv" else -1


@dataclass
class _Block:
    roots: list[int]
    producers: list[_Producer]
    blocked: bool
    reason: str = ""


@dataclass
class _Slice:
    """Keep, along `axis` of constant input `index` of `node`, the positions kept in `value`."""

    node: ir.Node
    index: int
    axis: int
    value: ir.Value


class _Flow:
    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.parent: list[int] = []
        self.reason: dict[int, str] = {}  # root -> why it cannot be pruned
        self.maps: dict[ir.Value, _Chan] = {}
        self.producers: list[_Producer] = []
        self.slices: list[_Slice] = []
        self.splits: list[ir.Node] = []
        self.depthwise: list[ir.Node] = []
        self.opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 17))
        self.order = {id(node): i for i, node in enumerate(graph)}

    # union-find over channel elements
    def fresh(self, n: int, reason: str | None = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if reason:
            for i in range(start, start + n):
                self.reason[i] = reason
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(i)) for i in ids), dtype=np.int64, count=len(ids))

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx
                if ry in self.reason and rx not in self.reason:
                    self.reason[rx] = self.reason[ry]

    def block(self, ids: np.ndarray, reason: str) -> None:
        for i in ids.tolist():
            self.reason.setdefault(self.find(i), reason)

    # the forward pass
    def trace(self) -> None:
        for order, node in enumerate(self.graph):
            traced = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v in self.maps]
            outputs: dict[ir.Value, _Chan] = {}
            if traced:
                pending = (len(self.slices), len(self.splits), len(self.depthwise))
                try:
                    outputs = self.visit(node, traced)
                except _Refuse as why:
                    del self.slices[pending[0]:], self.splits[pending[1]:], self.depthwise[pending[2]:]
                    for _, v in traced:
                        self.block(self.maps[v].ids, f"{node.op_type} '{node.name}' {why}")
                    outputs = {}
            producer = _as_producer(node, order)
            if producer is not None:
                shape = _const(node.inputs[1]).shape
                producer.ids = self.fresh(int(shape[producer.out_axis]))
                self.producers.append(producer)
                if node.op_type == "Conv":
                    outputs[node.outputs[0]] = _Chan(producer.ids, 1 - len(shape), len(shape))
                else:
                    outputs[node.outputs[0]] = _Chan(producer.ids, -1, 2 if node.op_type == "Gemm" else _rank(node.outputs[0]))
            for value, chan in outputs.items():
                self.maps[value] = chan
                self._check_escape(value, chan, order)

    def _check_escape(self, value: ir.Value, chan: _Chan, order: int) -> None:
        """Block channels that leave the graph, or reach a reader the forward pass will not visit."""
        if value.is_graph_output():
            self.block(chan.ids, f"'{value.name}' is a graph output")
        for use in value.uses():
            if use.node.graph is not self.graph:
                self.block(chan.ids, f"'{value.name}' is read inside a subgraph ({use.node.op_type} '{use.node.name}')")
            elif self.order.get(id(use.node), -1) <= order:
                self.block(chan.ids, f"'{value.name}' is read by {use.node.op_type} '{use.node.name}', listed before it")

    def visit(self, node: ir.Node, traced: list[tuple[int, ir.Value]]) -> dict[ir.Value, _Chan]:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise _Refuse(f"(domain {node.domain}) is not followed")
        if op == "Conv":
            return self._conv(node, traced)
        if op in ("Gemm", "MatMul"):
            return self._matmul(node, traced)
        if op in ("BatchNormalization", "InstanceNormalization"):
            return self._norm(node, traced)
        if op in UNARY:
            chan = self._only_first(node, traced)
            if op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
                raise _Refuse("uses its mask output")
            return {node.outputs[0]: _Chan(chan.ids, chan.axis, chan.rank, chan.spatial_one)}
        if op in ELEMENTWISE:
            return self._elementwise(node, traced)
        if op == "Concat":
            return self._concat(node, traced)
        if op == "Split":
            return self._split(node, traced)
        if op in POOLS or op in GLOBAL_POOLS or op in ("Resize", "Upsample"):
            chan = self._only_first(node, traced)
            self._need_nchw(chan)
            if op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].uses():
                raise _Refuse("uses its indices output")
            if op == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None:
                raise _Refuse("resizes to explicit sizes (which name the channel count)")
            return {node.outputs[0]: _Chan(chan.ids, chan.axis, chan.rank, op in GLOBAL_POOLS)}
        if op == "Flatten":
            chan = self._only_first(node, traced)
            if not chan.spatial_one or node.attributes.get_int("axis", 1) != 1 or chan.axis != 1 - (chan.rank or 0):
                raise _Refuse("mixes channels with other axes")
            return {node.outputs[0]: _Chan(chan.ids, -1, 2)}
        raise _Refuse("is not followed")

    def _only_first(self, node: ir.Node, traced) -> _Chan:
        if [i for i, _ in traced] != [0]:
            raise _Refuse("reads the channels through a parameter input")
        return self.maps[traced[0][1]]

    def _need_nchw(self, chan: _Chan) -> None:
        if chan.rank is None or chan.axis != 1 - chan.rank:
            raise _Refuse("needs the channels on axis 1")

    def _weight(self, node: ir.Node, index: int) -> ir.TensorProtocol:
        value = node.inputs[index] if index < len(node.inputs) else None
        tensor = _const(value) if value is not None else None
        if tensor is None:
            raise _Refuse("has a weight that is not a constant")
        if len(value.uses()) != 1 or value.is_graph_output():
            raise _Refuse("shares its weight with another node")
        return tensor

    def _conv(self, node: ir.Node, traced) -> dict[ir.Value, _Chan]:
        chan = self._only_first(node, traced)
        self._need_nchw(chan)
        w = self._weight(node, 1)
        c = len(chan.ids)
        group = node.attributes.get_int("group", 1)
        if len(w.shape) != chan.rank:
            raise _Refuse("has a weight of another rank than its input")
        if group == 1 and w.shape[1] == c:
            self.slices.append(_Slice(node, 1, 1, node.inputs[0]))
            return {}  # its output is new channels (a producer) or left alone
        if group == c and w.shape[0] == c and w.shape[1] == 1:  # depthwise: channel in, channel out
            self.slices.append(_Slice(node, 1, 0, node.inputs[0]))
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                self._weight(node, 2)
                self.slices.append(_Slice(node, 2, 0, node.inputs[0]))
            self.depthwise.append(node)
            return {node.outputs[0]: _Chan(chan.ids, chan.axis, chan.rank)}
        raise _Refuse(f"is a grouped conv (group {group})")

    def _matmul(self, node: ir.Node, traced) -> dict[ir.Value, _Chan]:
        chan = self._only_first(node, traced)
        if chan.axis != -1:
            raise _Refuse("reads the channels on an axis other than the last")
        w = self._weight(node, 1)
        c = len(chan.ids)
        if len(w.shape) != 2:
            raise _Refuse("has a weight that is not 2-D")
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0):
                raise _Refuse("transposes its input (transA)")
            axis = 1 if node.attributes.get_int("transB", 0) else 0
        else:
            axis = 0
        if w.shape[axis] != c:
            raise _Refuse("has a weight that does not match its input")
        self.slices.append(_Slice(node, 1, axis, node.inputs[0]))
        return {}

    def _norm(self, node: ir.Node, traced) -> dict[ir.Value, _Chan]:
        chan = self._only_first(node, traced)
        self._need_nchw(chan)
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            raise _Refuse("uses its training outputs")
        params = range(1, 5 if node.op_type == "BatchNormalization" else 3)
        for i in params:
            tensor = _const(node.inputs[i]) if i < len(node.inputs) and node.inputs[i] is not None else None
            if tensor is None or tuple(tensor.shape) != (len(chan.ids),):
                raise _Refuse("has parameters that are not per-channel constants")
        self.slices.extend(_Slice(node, i, 0, node.inputs[0]) for i in params)
        return {node.outputs[0]: _Chan(chan.ids, chan.axis, chan.rank)}

    def _elementwise(self, node: ir.Node, traced) -> dict[ir.Value, _Chan]:
        chans = [self.maps[v] for _, v in traced]
        first = chans[0]
        c = len(first.ids)
        for other in chans[1:]:
            if other.axis != first.axis or len(other.ids) != c:
                raise _Refuse("combines tensors whose channels do not line up")
        traced_at = {i for i, _ in traced}
        slices = []
        ranks = [ch.rank for ch in chans]
        for i, value in enumerate(node.inputs):
            if i in traced_at or value is None:
                continue
            tensor = _const(value)
            shape = tuple(tensor.shape) if tensor is not None else _static_dims(value)
            if shape is None:
                raise _Refuse(f"combines the channels with '{value.name}', whose shape is unknown")
            ranks.append(len(shape))
            pos = len(shape) + first.axis
            if pos < 0 or shape[pos] == 1:
                continue  # broadcast along the channels: the same for every channel
            if shape[pos] == c and tensor is not None:
                slices.append(_Slice(node, i, pos, traced[0][1]))
                continue
            raise _Refuse(f"combines the channels with '{value.name}' of shape {list(shape)}")
        for other in chans[1:]:
            self.union(first.ids, other.ids)
        self.slices.extend(slices)
        rank = None if any(r is None for r in ranks) else max(ranks)
        return {node.outputs[0]: _Chan(first.ids, first.axis, rank)}

    def _axis(self, node: ir.Node, chan: _Chan, default: int | None = None) -> int:
        axis = node.attributes.get_int("axis", default) if default is not None else node.attributes.get_int("axis")
        if axis is None:
            raise _Refuse("has no axis")
        if axis >= 0:
            if chan.rank is None:
                raise _Refuse("has an axis that cannot be placed (rank unknown)")
            axis -= chan.rank
        return axis

    def _concat(self, node: ir.Node, traced) -> dict[ir.Value, _Chan]:
        known = self.maps[traced[0][1]]
        rank = next((self.maps[v].rank for _, v in traced if self.maps[v].rank is not None), None)
        probe = _Chan(known.ids, known.axis, rank)
        axis = self._axis(node, probe)
        chans = {i: self.maps[v] for i, v in traced}
        if any(ch.axis != known.axis for ch in chans.values()):
            raise _Refuse("joins tensors with channels on different axes")
        if axis != known.axis:  # joined along another axis: channel i of every input is channel i out
            if len(chans) != len(node.inputs) or any(len(ch.ids) != len(known.ids) for ch in chans.values()):
                raise _Refuse("joins followed channels with others along another axis")
            for ch in chans.values():
                self.union(known.ids, ch.ids)
            return {node.outputs[0]: _Chan(known.ids, known.axis, rank)}
        parts = []
        for i, value in enumerate(node.inputs):
            if i in chans:
                parts.append(chans[i].ids)
                continue
            tensor = _const(value)
            shape = tuple(tensor.shape) if tensor is not None else _static_dims(value)
            pos = None if shape is None else len(shape) + axis
            if pos is None or pos < 0 or not isinstance(shape[pos], int):
                raise _Refuse(f"joins the channels with '{value.name}', whose channel count is unknown")
            parts.append(self.fresh(shape[pos], f"Concat '{node.name}' joins them with '{value.name}'"))
        return {node.outputs[0]: _Chan(np.concatenate(parts), known.axis, rank)}

    def _split(self, node: ir.Node, traced) -> dict[ir.Value, _Chan]:
        chan = self._only_first(node, traced)
        axis = self._axis(node, chan, 0)
        if axis != chan.axis:
            return {out: _Chan(chan.ids, chan.axis, chan.rank) for out in node.outputs}
        sizes = _split_sizes(node, len(chan.ids))
        if sizes is None or sum(sizes) != len(chan.ids):
            raise _Refuse("splits by sizes that are not constant")
        self.splits.append(node)
        bounds = np.cumsum([0, *sizes])
        return {out: _Chan(chan.ids[a:b], chan.axis, chan.rank) for out, a, b in zip(node.outputs, bounds, bounds[1:])}

    # grouping and scoring
    def blocks(self) -> list[_Block]:
        """Classes of channels that appear in the same tensors, split by whether they can be pruned."""
        seen_in: dict[int, set[int]] = {}
        for k, chan in enumerate(self.maps.values()):
            for root in set(self.roots(chan.ids).tolist()):
                seen_in.setdefault(root, set()).add(k)
        owners: dict[int, list[_Producer]] = {}
        for p in self.producers:
            for root in set(self.roots(p.ids).tolist()):
                owners.setdefault(root, []).append(p)
        by_signature: dict[tuple, list[int]] = {}
        for root, where in seen_in.items():
            if root not in owners:
                continue  # channels that no producer makes (a constant joined by Concat)
            key = (root in self.reason, frozenset(where))
            by_signature.setdefault(key, []).append(root)
        blocks = []
        for (blocked, _), roots in by_signature.items():
            producers = {id(p): p for r in roots for p in owners[r]}
            ordered = sorted(producers.values(), key=lambda p: p.order)
            reason = next((self.reason[r] for r in roots if r in self.reason), "")
            blocks.append(_Block(sorted(roots), ordered, blocked, reason))
        blocks.sort(key=lambda b: (b.producers[0].order, b.roots[0]))
        return blocks

    def importance(self, producers: list[_Producer], rms: dict[str, np.ndarray]) -> dict[int, float]:
        scores: dict[int, float] = {}
        for p in producers:
            w = _array(_const(p.node.inputs[1])).astype(np.float64)
            w = np.moveaxis(w, p.out_axis, 0).reshape(w.shape[p.out_axis], -1)
            norms = np.linalg.norm(w, axis=1)
            if p.output.name in rms:
                norms = norms * rms[p.output.name]
            for root, score in zip(self.roots(p.ids).tolist(), norms.tolist()):
                scores[root] = scores.get(root, 0.0) + score
        return scores

    # the rewrite
    def rewrite(self, dropped: set[int]) -> None:
        memo: dict[ir.Value, np.ndarray] = {}

        def keep(value: ir.Value) -> np.ndarray:
            if value not in memo:
                roots = self.roots(self.maps[value].ids)
                memo[value] = np.flatnonzero([r not in dropped for r in roots.tolist()])
            return memo[value]

        def changed(value: ir.Value) -> bool:
            return len(keep(value)) < len(self.maps[value].ids)

        todo: dict[tuple[int, int], tuple[ir.Node, int, list[tuple[int, np.ndarray]]]] = {}
        for p in self.producers:
            if changed(p.output):
                idx = keep(p.output)
                todo.setdefault((id(p.node), 1), (p.node, 1, []))[2].append((p.out_axis, idx))
                if p.bias_index is not None and p.bias_index < len(p.node.inputs) and p.node.inputs[p.bias_index] is not None:
                    bias = _const(p.node.inputs[p.bias_index])
                    if len(bias.shape) and bias.shape[-1] == len(p.ids):
                        todo.setdefault((id(p.node), p.bias_index), (p.node, p.bias_index, []))[2].append((len(bias.shape) - 1, idx))
        for s in self.slices:
            if changed(s.value):
                todo.setdefault((id(s.node), s.index), (s.node, s.index, []))[2].append((s.axis, keep(s.value)))
        for node, index, cuts in todo.values():
            array = _array(_const(node.inputs[index]))
            for axis, idx in cuts:
                array = np.take(array, idx, axis=axis)
            _replace_const(self.graph, node, index, np.ascontiguousarray(array))
        for node in self.depthwise:
            if changed(node.inputs[0]):
                node.attributes["group"] = ir.AttrInt64("group", len(keep(node.inputs[0])))
        for node in self.splits:
            if any(changed(o) for o in node.outputs):
                _set_split(self.graph, node, [len(keep(o)) for o in node.outputs], self.opset)
        for value, chan in self.maps.items():
            if changed(value) and value.shape is not None:
                dims = list(value.shape.dims)
                pos = len(dims) + chan.axis
                if 0 <= pos < len(dims):
                    dims[pos] = len(keep(value))
                    value.shape = ir.Shape(dims)


# --- helpers --------------------------------------------------------------------------------
def _const(value: ir.Value | None):
    if value is None:
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def _array(tensor) -> np.ndarray:
    array = np.array(tensor.numpy())
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    return array


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _static_dims(value: ir.Value) -> tuple | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape.dims)


def _as_producer(node: ir.Node, order: int) -> _Producer | None:
    """A node whose output channels can be removed: a constant, unshared, floating-point weight."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    if node.inputs[0] is None or len(node.outputs) != 1:
        return None
    weight = node.inputs[1]
    tensor = _const(weight)
    if tensor is None or tensor.dtype not in FLOAT_TYPES or len(weight.uses()) != 1 or weight.is_graph_output():
        return None
    shape = tuple(tensor.shape)
    bias_index = 2 if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if bias_index is not None and _const(node.inputs[2]) is None:  # a shared bias is copied when sliced
        return None
    if op == "Conv":
        if node.attributes.get_int("group", 1) != 1 or len(shape) < 3:
            return None
        out_axis = 0
        if bias_index is not None and tuple(_const(node.inputs[2]).shape) != (shape[0],):
            return None
    elif len(shape) != 2:
        return None
    elif op == "Gemm":
        out_axis = 0 if node.attributes.get_int("transB", 0) else 1
        if bias_index is not None:
            bshape = tuple(_const(node.inputs[2]).shape)
            if bshape and bshape[-1] not in (1, shape[out_axis]):
                return None
    else:
        out_axis = 1
    return _Producer(node, out_axis, bias_index, order)


def _split_sizes(node: ir.Node, total: int) -> list[int] | None:
    n = len(node.outputs)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        tensor = _const(node.inputs[1])
        return None if tensor is None else [int(x) for x in np.asarray(tensor.numpy()).ravel()]
    attr = node.attributes.get_ints("split")
    if attr is not None:
        return [int(x) for x in attr]
    if "num_outputs" in node.attributes:  # opset 18: equal chunks, the last one smaller
        chunk = -(-total // n)
        return [chunk] * (n - 1) + [total - chunk * (n - 1)]
    return [total // n] * n if total % n == 0 else None


def _set_split(graph: ir.Graph, node: ir.Node, sizes: list[int], opset: int) -> None:
    if opset < 13:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
        return
    node.attributes.pop("num_outputs", None)
    value = add_initializer(graph, f"{node.name}.pruned_split", np.array(sizes, dtype=np.int64))
    old = node.inputs[1] if len(node.inputs) > 1 else None
    if len(node.inputs) > 1:
        node.replace_input_with(1, value)
    else:
        node.resize_inputs(2)
        node.replace_input_with(1, value)
    if old is not None:
        drop_weight(graph, old)


def _replace_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give input `index` of `node` this constant: in place if only this node reads it, else a new one."""
    old = node.inputs[index]
    if old.is_initializer() and len(old.uses()) == 1 and not old.is_graph_output() and not old.is_graph_input():
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        return
    value = add_initializer(graph, f"{old.name or node.name}.pruned", array)
    node.replace_input_with(index, value)
    drop_weight(graph, old)


def _params(graph: ir.Graph) -> int:
    """Floating-point constants: initializers and Constant nodes."""
    total = 0
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype in FLOAT_TYPES:
            total += math.prod(tensor.shape)
    for node in graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.outputs[0].is_initializer():
            tensor = _const(node.outputs[0])
            if tensor is not None and tensor.dtype in FLOAT_TYPES:
                total += math.prod(tensor.shape)
    return total


def _channel_rms(model: ir.Model, producers: list[_Producer], samples: Samples, progress: bool) -> dict[str, np.ndarray]:
    """Per producer output, the RMS of each channel over the samples (one ONNX Runtime pass)."""
    graph = model.graph
    original = list(graph.outputs)
    fed = {v.name for v in model_inputs(model)}
    wanted = [p for p in producers if p.output.name not in fed]
    graph.outputs.extend(p.output for p in wanted if p.output not in original)
    sums = {p.output.name: None for p in wanted}
    count = dict.fromkeys(sums, 0)
    try:
        with ort_session(model) as session:
            names = list(sums)
            for i in progress_bar(range(len(samples)), desc="pruning: importance", unit="sample", show=progress):
                try:
                    values = session.run(names, samples.feed(i))
                except Exception as exc:  # noqa: BLE001  (ORT reports bad input as a generic runtime error)
                    text = str(exc).strip().splitlines()
                    raise EdgelrError(
                        f"pruning sample {i} does not run through the model: {text[0][:300] if text else type(exc).__name__}"
                    ) from None
                for p, value in zip(wanted, values):
                    a = np.moveaxis(np.asarray(value, dtype=np.float64), p.channel_axis, -1)
                    a = a.reshape(-1, a.shape[-1])
                    sq = np.einsum("ij,ij->j", a, a)
                    name = p.output.name
                    sums[name] = sq if sums[name] is None else sums[name] + sq
                    count[name] += a.shape[0]
    finally:
        graph.outputs.clear()
        graph.outputs.extend(original)
    return {name: np.sqrt(s / max(count[name], 1)) for name, s in sums.items() if s is not None}


@dataclass(frozen=True)
class PruneConfig(PassConfig):
    """ratio: the fraction of every prunable channel group to remove, in [0, 1); multiple: channel counts
    kept round up to a multiple of it. With calibration samples, channels are ranked by activation too."""

    kind: ClassVar[str] = "prune"
    ratio: float
    multiple: int = 8

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise EdgelrError(f"ratio {self.ratio}: the fraction of channels to remove must be in [0, 1), e.g. 0.25")
        if self.multiple < 1:
            raise EdgelrError(f"multiple {self.multiple}: channel counts round to a multiple of a positive integer, e.g. 8")


@register_pass(PruneConfig)
class PrunePass(EdgelrPass):
    def call(self, model: ir.Model) -> PassDetails:
        ctx = self.context
        result = prune(model, self.config.ratio, ctx.samples, multiple=self.config.multiple, progress=ctx.progress)
        ctx.pruned = {"ratio": self.config.ratio, "groups_pruned": len(result.pruned), "groups": len(result.groups),
                      "unprunable_groups": len(result.unprunable), "params_before": result.params_before,
                      "params_after": result.params_after, "data_aware": result.data_aware}
        return PassDetails(model, bool(result.pruned), result)
