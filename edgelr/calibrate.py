"""Calibration: run sample inputs through ONNX Runtime once and keep each layer's input Gram matrix.

Memory stays bounded by the statistics (one K x K matrix per layer, K = in_features; for a conv,
K = C * prod(kernel) over im2col patches), never by the activations: samples go through one at a time
and each conv's patches are folded into its Gram in chunks.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view
from tqdm.auto import tqdm

from edgelr.cache import ArrayCache
from edgelr.errors import EdgelrError
from edgelr.layers import ConvGeometry, Layer, Use
from edgelr.model_io import ort_session

_CHUNK_BYTES = 32 << 20
# Calibration keeps the model's outputs as verification references up to this size (else verify runs the
# original again): small outputs (a detector's) save a second pass; large ones would add to peak memory.
REFERENCE_LIMIT_BYTES = 16 << 20


@dataclass
class Samples:
    """Model inputs, one array per input name, first axis = samples."""

    arrays: dict[str, np.ndarray]
    batched: dict[str, bool]  # True: the sample axis is the model's batch axis; False: a new axis

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def feed(self, index: int) -> dict[str, np.ndarray]:
        return {
            name: arr[index : index + 1] if self.batched[name] else arr[index]
            for name, arr in self.arrays.items()
        }

    def split(self, count: int) -> tuple[Samples, Samples]:
        """The first `count` samples and the rest."""
        head = {k: v[:count] for k, v in self.arrays.items()}
        tail = {k: v[count:] for k, v in self.arrays.items()}
        return Samples(head, self.batched), Samples(tail, self.batched)


def model_inputs(model: ir.Model) -> list[ir.Value]:
    """The inputs a user must feed (old models list initializers as inputs too)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def load_samples(path: str | Path, model: ir.Model) -> Samples:
    """Read DATA.npz and check it against the model's inputs: names, ranks, static dims, dtypes."""
    path = Path(path)
    if not path.is_file():
        raise EdgelrError(f"{path}: calibration file not found")
    if not zipfile.is_zipfile(path):
        raise EdgelrError(f"{path}: not an .npz archive; save the samples with numpy.savez(path, input_name=array)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise EdgelrError(f"{path}: not a readable .npz file ({exc}); save one with numpy.savez") from None
    return samples_from_arrays(arrays, model, path)


def samples_from_arrays(arrays: dict[str, np.ndarray], model: ir.Model, path: str | Path = "samples") -> Samples:
    """Check arrays named after the model's inputs (samples on axis 0, or on the batch axis) and wrap them;
    `path` names them in errors."""
    arrays = dict(arrays)
    inputs = {v.name: v for v in model_inputs(model)}
    missing = sorted(set(inputs) - set(arrays))
    extra = sorted(set(arrays) - set(inputs))
    if missing or extra:
        raise EdgelrError(
            f"{path}: arrays {sorted(arrays)} do not match the model inputs {sorted(inputs)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unknown {extra})" if extra else "")
            + "; name each array after a model input"
        )
    batched = {}
    counts = set()
    for name, value in inputs.items():
        arr = arrays[name]
        batched[name] = _check_array(path, name, arr, value)
        arrays[name] = _cast(arr, value)
        counts.add(len(arr) if arr.ndim else 0)
    if len(counts) != 1 or 0 in counts:
        raise EdgelrError(f"{path}: arrays must hold the same number (>0) of samples on axis 0, got {sorted(counts)}")
    return Samples(arrays, batched)


def _check_array(path: Path, name: str, arr: np.ndarray, value: ir.Value) -> bool:
    dims = list(value.shape.dims) if value.shape is not None else None
    want = value.dtype.numpy() if value.dtype is not None else None
    if want is not None and _kind(arr.dtype) != _kind(want):
        raise EdgelrError(f"{path}: array '{name}' is {arr.dtype}, the model input is {want}; convert it")
    if dims is None:
        return True
    if arr.ndim == len(dims):
        sample_dims, batched = dims[1:], True
        if isinstance(dims[0], int) and dims[0] > 1:
            raise EdgelrError(
                f"{path}: input '{name}' has a fixed batch of {dims[0]}; give samples on a new first axis, "
                f"shape (S, {', '.join(map(str, dims))})"
            )
    elif arr.ndim == len(dims) + 1:
        sample_dims, batched = dims, False
    else:
        raise EdgelrError(
            f"{path}: array '{name}' has rank {arr.ndim}, the model input has rank {len(dims)} "
            f"(shape {_fmt(dims)}); stack samples on axis 0"
        )
    got = arr.shape[1:]
    for i, (want_dim, got_dim) in enumerate(zip(sample_dims, got)):
        if isinstance(want_dim, int) and want_dim >= 0 and want_dim != got_dim:
            raise EdgelrError(
                f"{path}: array '{name}' has shape {tuple(arr.shape)}, the model input is {_fmt(dims)} "
                f"(dim {i + 1 if batched else i} should be {want_dim})"
            )
    return batched


def _kind(dtype) -> str:
    kind = np.dtype(dtype).kind
    return {"f": "float", "i": "int", "u": "int", "b": "bool"}.get(kind, kind)


def _cast(arr: np.ndarray, value: ir.Value) -> np.ndarray:
    return arr.astype(value.dtype.numpy(), copy=False) if value.dtype is not None else arr


def _fmt(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def collect_grams(
    model: ir.Model, layers: list[Layer], samples: Samples, progress: bool = True, outputs: list | None = None
) -> dict[str, np.ndarray]:
    """Layer name -> sum over samples of the Gram matrix of the layer's input rows (float32, to halve
    the memory: a K x K Gram can outweigh its layer's weight).

    Also records each use's observed per-sample input shape, so FLOPs are known for dynamic models.
    `outputs`, if given, receives the model's own outputs for each sample (the references verification
    compares against, for free), unless they would pass REFERENCE_LIMIT_BYTES: then it is left empty.
    """
    by_input: dict[tuple, np.ndarray] = {}  # layers reading the same input (Q, K, V) share one Gram
    output_names = [v.name for v in model.graph.outputs]
    kept = 0
    for i, values in enumerate(_layer_inputs(model, layers, samples, progress)):
        if i == 0:
            _record_shapes(layers, values)
        if outputs is not None and kept <= REFERENCE_LIMIT_BYTES:
            outputs.append({name: np.asarray(values[name]) for name in output_names})
            kept += sum(a.nbytes for a in outputs[-1].values())
            if kept > REFERENCE_LIMIT_BYTES:
                outputs.clear()
        for use in {_key(use): use for layer in layers for use in layer.uses}.values():
            gram = _gram(np.asarray(values[use.input.name]), use)
            if _key(use) in by_input:
                by_input[_key(use)] += gram
            else:
                by_input[_key(use)] = gram
    grams = {}
    for layer in layers:
        parts = [by_input[_key(use)] for use in layer.uses]
        grams[layer.name] = parts[0] if len(parts) == 1 else sum(parts)
    return grams


def cached_grams(
    model: ir.Model, layers: list[Layer], samples: Samples, key: str, progress: bool = True
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """collect_grams with its reference outputs, or those of an earlier run with the same model and
    samples (`key`: edgelr.cache.content_key), observed input shapes included."""
    store = ArrayCache("calibration")
    names = [layer.name for layer in layers]
    hit = store.get(key)
    if hit is not None and "references" in hit and hit["layers"].tolist() == names:
        for i, layer in enumerate(layers):
            for j, use in enumerate(layer.uses):
                use.input_shape = tuple(int(d) for d in hit[f"shape_{i}_{j}"])
        outputs: list[dict] = [{} for _ in range(int(hit["references"]))]
        for name, array in hit.items():
            if name.startswith("out_"):
                _, i, output = name.split("_", 2)
                outputs[int(i)][output] = array
        return {name: hit[f"gram_{i}"] for i, name in enumerate(names)}, outputs
    outputs = []
    grams = collect_grams(model, layers, samples, progress, outputs)
    arrays = {"layers": np.array(names), "references": np.array(len(outputs))}
    for i, layer in enumerate(layers):
        arrays[f"gram_{i}"] = grams[layer.name]
        arrays.update({f"shape_{i}_{j}": np.array(use.input_shape, dtype=np.int64) for j, use in enumerate(layer.uses)})
    for i, sample in enumerate(outputs):
        arrays.update({f"out_{i}_{name}": value for name, value in sample.items()})
    store.put(key, arrays)
    return grams, outputs


def observe_shapes(model: ir.Model, layers: list[Layer], samples: Samples) -> None:
    """Record each use's input shape from one sample (for models with dynamic dims)."""
    for values in _layer_inputs(model, layers, samples.split(1)[0], progress=False):
        _record_shapes(layers, values)


def _record_shapes(layers: list[Layer], values: dict[str, np.ndarray]) -> None:
    for layer in layers:
        for use in layer.uses:
            use.input_shape = tuple(np.shape(values[use.input.name]))


def _layer_inputs(model: ir.Model, layers: list[Layer], samples: Samples, progress: bool):
    """Yield, per sample, every layer input by name (the graph gets extra outputs meanwhile)."""
    return values_by_sample(model, _unique_values(layers), samples, progress)


def values_by_sample(model: ir.Model, values: list[ir.Value], samples: Samples, progress: bool,
                     desc: str = "calibrating"):
    """Yield, per sample, these values of the model's graph (and its outputs and feed) by name."""
    graph = model.graph
    original_outputs = list(graph.outputs)
    fed = {v.name for v in model_inputs(model)}
    graph.outputs.extend(v for v in values if v.name not in fed and v not in original_outputs)
    try:
        with ort_session(model) as session:
            names = [o.name for o in session.get_outputs()]
            for i in tqdm(range(len(samples)), desc=desc, unit="sample", disable=not progress, leave=False):
                feed = samples.feed(i)
                try:
                    values = dict(zip(names, session.run(None, feed)))
                except Exception as exc:  # ORT reports bad input as a generic runtime error
                    raise EdgelrError(f"calibration sample {i} does not run through the model: {_short(exc)}") from None
                values.update(feed)
                yield values
    finally:
        graph.outputs.clear()
        graph.outputs.extend(original_outputs)


def _key(use: Use) -> tuple:
    return (use.input.name, use.transpose_input, use.geometry)


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def _unique_values(layers: list[Layer]) -> list[ir.Value]:
    seen: dict[int, ir.Value] = {}
    for layer in layers:
        for use in layer.uses:
            seen.setdefault(id(use.input), use.input)
    return list(seen.values())


def _gram(x: np.ndarray, use: Use, y: np.ndarray | None = None) -> np.ndarray:
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
