"""Calibration: run sample inputs through ONNX Runtime once and keep each layer's input Gram matrix.

Memory stays bounded by the statistics (one K x K matrix per layer, K = in_features; for a conv,
K = C * prod(kernel) over im2col patches), never by the activations: samples go through one at a time
and each conv's patches are folded into its Gram in chunks.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.errors import EdgelrError


@dataclass
class Samples:
    """Model inputs, one array per input name, first axis = samples."""

    arrays: dict[str, np.ndarray]
    batched: dict[str, bool]  # True: the sample axis is the model's batch axis; False: a new axis

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def feed(self, index: int) -> dict[str, np.ndarray]:
        return {
            name: arr[index : index + 1] if self.batched[name] else np.asarray(arr[index])  # a scalar input: a 0-d array
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
    if not dims and arr.ndim != 1:  # a scalar input (e.g. a sample rate): one value per sample
        raise EdgelrError(f"{path}: input '{name}' is a scalar; give one value per sample, shape (S,), "
                          f"not {tuple(arr.shape)}")
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



