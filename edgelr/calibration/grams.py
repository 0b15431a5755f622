"""Streaming calibration statistics: each layer's input Gram matrix (K x K per weight, K = C * prod(kernel)
over im2col patches for a conv), accumulated one sample at a time, never the activations themselves;
the model's own outputs kept as verification references; observed input shapes."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view

from edgelr.calibration.values import Runs, graph_values, values_by_sample
from edgelr.graph.layers import ConvGeometry, Layer, Use
from edgelr.io.cache import ArrayCache
from edgelr.io.samples import Samples

_CHUNK_BYTES = 32 << 20


# Calibration keeps the model's outputs as verification references up to this size (else verify runs the
# original again): small outputs (a detector's) save a second pass; large ones would add to peak memory.
REFERENCE_LIMIT_BYTES = 16 << 20


class Grams(dict):
    """Layer name -> input Gram, and `rows`: layer name -> how many input rows went into it (im2col
    patches for a conv, token rows for a MatMul): against the Gram's width K, how well the samples
    determine it (edgelr.core.lowrank.adapted_damping)."""

    def __init__(self, grams=(), rows: dict[str, int] | None = None):
        super().__init__(grams)
        self.rows = dict(rows or {})


def collect_grams(
    model: ir.Model, layers: list[Layer], samples: Samples, progress: bool = True, outputs: list | None = None
) -> Grams:
    """Layer name -> sum over samples of the Gram matrix of the layer's input rows (float32, to halve
    the memory: a K x K Gram can outweigh its layer's weight), with the rows counted.

    A layer inside an If branch counts the samples that take the branch; one that no sample reaches, or
    that sits in a Loop or Scan body (Layer.uncalibrated), gets no Gram: factorize treats it data-free.
    Also records each use's observed per-sample input shape, so FLOPs are known for dynamic models.
    `outputs`, if given, receives the model's own outputs for each sample (the references verification
    compares against, for free), unless they would pass REFERENCE_LIMIT_BYTES: then it is left empty.
    """
    by_input: dict[tuple, np.ndarray] = {}  # layers reading the same input (Q, K, V) share one Gram
    rows: dict[tuple, int] = {}
    output_names = [v.name for v in model.graph.outputs]
    calibrated = [layer for layer in layers if layer.uncalibrated is None]
    uses = {_key(use): use for layer in calibrated for use in layer.uses}
    pending = _pending(calibrated)
    kept = 0
    for runs in use_inputs(model, calibrated, samples, progress):
        _record_shapes(pending, runs)
        if outputs is not None and kept <= REFERENCE_LIMIT_BYTES:
            outputs.append({name: np.asarray(runs[id(model.graph)][name]) for name in output_names})
            kept += sum(a.nbytes for a in outputs[-1].values())
            if kept > REFERENCE_LIMIT_BYTES:
                outputs.clear()
        for key, use in uses.items():
            x = input_of(runs, use)
            if x is not None:
                x = np.asarray(x)
                gram = input_gram(x, use)
                if key in by_input:
                    by_input[key] += gram  # in place: one K x K per input, however many samples
                else:
                    by_input[key] = gram
                rows[key] = rows.get(key, 0) + input_rows(x, use)
    grams = Grams()
    for layer in calibrated:
        keys = [_key(use) for use in layer.uses if _key(use) in by_input]
        if keys:
            parts = [by_input[key] for key in keys]
            grams[layer.name] = parts[0] if len(parts) == 1 else sum(parts)
            grams.rows[layer.name] = sum(rows[key] for key in keys)
    return grams


def cached_grams(
    model: ir.Model, layers: list[Layer], samples: Samples, key: str, progress: bool = True
) -> tuple[Grams, list[dict[str, np.ndarray]]]:
    """collect_grams with its reference outputs, or those of an earlier run with the same model and
    samples (`key`: edgelr.cache.content_key), observed input shapes included."""
    store = ArrayCache("calibration")
    names = [layer.name for layer in layers]
    hit = store.get(key)
    if hit is not None and "references" in hit and "rows" in hit and hit["layers"].tolist() == names:
        for i, layer in enumerate(layers):
            for j, use in enumerate(layer.uses):
                if f"shape_{i}_{j}" in hit:
                    use.input_shape = tuple(int(d) for d in hit[f"shape_{i}_{j}"])
        outputs: list[dict] = [{} for _ in range(int(hit["references"]))]
        for name, array in hit.items():
            if name.startswith("out_"):
                _, i, output = name.split("_", 2)
                outputs[int(i)][output] = array
        present = [(i, name) for i, name in enumerate(names) if f"gram_{i}" in hit]
        return Grams({name: hit[f"gram_{i}"] for i, name in present},
                     {name: int(hit["rows"][i]) for i, name in present}), outputs
    outputs = []
    grams = collect_grams(model, layers, samples, progress, outputs)
    arrays = {"layers": np.array(names), "references": np.array(len(outputs)),
              "rows": np.array([grams.rows.get(name, 0) for name in names], dtype=np.int64)}
    for i, layer in enumerate(layers):
        if layer.name in grams:  # a layer calibration did not reach has none
            arrays[f"gram_{i}"] = grams[layer.name]
        arrays.update({f"shape_{i}_{j}": np.array(use.input_shape, dtype=np.int64) for j, use in enumerate(layer.uses)
                       if _known(use.input_shape)})
    for i, sample in enumerate(outputs):
        arrays.update({f"out_{i}_{name}": value for name, value in sample.items()})
    store.put(key, arrays)
    return grams, outputs


def observe_shapes(model: ir.Model, layers: list[Layer], samples: Samples) -> None:
    """Record each use's input shape from the first sample (for models with dynamic dims); a use that
    sample does not reach (an If branch it does not take, a loop body) keeps what shape inference said."""
    calibrated = [layer for layer in layers if layer.uncalibrated is None]
    for runs in use_inputs(model, calibrated, samples.split(1)[0], progress=False):
        _record_shapes(_pending(calibrated), runs)


def _pending(layers: list[Layer]) -> dict[int, Use]:
    return {id(use): use for layer in layers for use in layer.uses}


def _record_shapes(pending: dict[int, Use], runs: Runs) -> None:
    """Record the input shape of each pending use this sample reaches, and take it off PENDING."""
    for key, use in list(pending.items()):
        x = input_of(runs, use)
        if x is not None:
            use.input_shape = tuple(np.shape(x))
            del pending[key]


def use_inputs(model: ir.Model, layers: list[Layer], samples: Samples, progress: bool) -> Iterator[Runs]:
    """Yield, per sample, the layers' inputs of each graph that ran (read them with input_of)."""
    wanted: dict[int, dict[int, ir.Value]] = {}
    for layer in layers:
        for use in layer.uses:
            wanted.setdefault(id(use.node.graph), {})[id(use.input)] = use.input
    return graph_values(model, {g: list(v.values()) for g, v in wanted.items()}, samples, progress)


def input_of(runs: Runs, use: Use) -> np.ndarray | None:
    """The use's input on this sample, None where its graph did not run."""
    return runs.get(id(use.node.graph), {}).get(use.input.name)


def layer_inputs(model: ir.Model, layers: list[Layer], samples: Samples, progress: bool):
    """Yield, per sample, every input of these main-graph layers by name (the graph gets extra outputs meanwhile)."""
    return values_by_sample(model, _unique_values(layers), samples, progress)


def _key(use: Use) -> tuple:
    # the graph too: a layer in an If branch sees only the samples that take it, even on an outer input
    return (id(use.node.graph), use.input.name, use.transpose_input, use.geometry)


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _unique_values(layers: list[Layer]) -> list[ir.Value]:
    seen: dict[int, ir.Value] = {}
    for layer in layers:
        for use in layer.uses:
            seen.setdefault(id(use.input), use.input)
    return list(seen.values())


def input_rows(x: np.ndarray, use: Use) -> int:
    """How many rows input_gram sums over: im2col patches of a conv, rows of a MatMul or Gemm."""
    if use.geometry is not None:
        return x.shape[0] * math.prod(use.geometry.out_spatial(tuple(x.shape[2:])))
    return x.size // (x.shape[0] if use.transpose_input else x.shape[-1])


def input_gram(x: np.ndarray, use: Use, y: np.ndarray | None = None) -> np.ndarray:
    """X^T X over the use's input rows; with `y` (the same layer's input in another model), X^T Y."""
    x = x.astype(np.float32, copy=False)
    y = x if y is None else y.astype(np.float32, copy=False)
    if use.geometry is not None:
        return _conv_gram(x, use.geometry, y)
    if use.transpose_input:
        return x @ y.T
    return x.reshape(-1, x.shape[-1]).T @ y.reshape(-1, y.shape[-1])


def _conv_gram(x: np.ndarray, geom: ConvGeometry, y: np.ndarray | None = None) -> np.ndarray:
    """Gram of the im2col patches of a conv input (b, C, *spatial), columns ordered (c, *kernel); with
    `y`, the cross Gram X^T Y of the two inputs' patches."""
    k = x.shape[1] * math.prod(geom.kernel)
    gram = np.zeros((k, k), dtype=np.float32)
    pairs = zip(_patches(x, geom), _patches(y, geom)) if y is not None and y is not x else ((p, p) for p in _patches(x, geom))
    for p, q in pairs:
        gram += p.T @ q
    return gram


def _patches(x: np.ndarray, geom: ConvGeometry):
    """The im2col rows of a conv input, (rows, C * prod(kernel)), in chunks of bounded size."""
    nd = len(geom.kernel)
    pads = geom.explicit_pads(tuple(x.shape[2:]))
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    span = tuple(d * (k - 1) + 1 for k, d in zip(geom.kernel, geom.dilations))
    windows = sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))  # (b, C, *positions, *span)
    index = (slice(None), slice(None))
    index += tuple(slice(None, None, s) for s in geom.strides) + tuple(slice(None, None, d) for d in geom.dilations)
    windows = windows[index]  # (b, C, *out, *kernel), still a view
    perm = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
    windows = windows.transpose(perm)  # (b, *out, C, *kernel)
    k = x.shape[1] * math.prod(geom.kernel)
    row_bytes = 4 * k * math.prod(windows.shape[2 : 1 + nd]) * windows.shape[0]
    step = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, windows.shape[1], step):
        yield np.ascontiguousarray(windows[:, start : start + step]).reshape(-1, k)
