"""Input sizes: the concrete shape of every model input, and made-up inputs of that shape.

    shapes = parse_shapes(["images=1x3x640x640"], model)     # --shapes texts -> {name: (min, opt, max)}
    sizes = resolve_shapes(model, samples=samples, shapes=shapes)   # every input's (min, opt, max)
    feed = input_feed(model, samples=samples, shapes=shapes)   # --calib's first sample, or random inputs

Where each input's size comes from, first match wins:
  1. `samples` (--calib DATA.npz): the first sample's shape. With `shapes` too, the sample must fit them
     (`shapes` then set a TensorRT range around it, `samples` the data).
  2. `shapes` (--shapes NAME=DIMS, or NAME=MIN:OPT:MAX for a TensorRT optimization profile; ONNX Runtime
     runs at OPT).
  3. the model's own metadata, where an exporter wrote it: Ultralytics writes `imgsz` ("[320, 320]") and
     `batch` ("1") into metadata_props; they size the N, H and W of a rank-4 (NCHW) input.
  4. the dims the model declares, where all are fixed.
Otherwise SizesUnknown: one line naming --shapes with an example built from the model's own input.

One shape type throughout: a tuple of ints; a range is (min, opt, max), all three equal when fixed.
Made-up inputs are deterministic: floats in [0, 1) (a valid image, probability or mask alike), integers
0 or 1 (valid as an index, a token id or a mask), booleans at random.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgelr.errors import EdgelrError
from edgelr.io.samples import Samples, model_inputs

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # min, opt, max

FLAG = "--shapes"
CALIB_HINT = "--calib DATA.npz"
EXAMPLE_SIZE = 640  # a dynamic dim other than the batch, in examples (an image side; any size the model takes)
METADATA_KEYS = ("imgsz", "batch")


class SizesUnknown(EdgelrError):
    """An input has dynamic dims and nothing says their size; the message names --shapes with an example
    (`hint`: the message without the model's name in front)."""

    def __init__(self, where: str, hint: str):
        super().__init__(f"{where}: {hint}")
        self.hint = hint


@dataclass(frozen=True)
class InputSizes:
    """Every model input's shape range, and where it came from ("--calib", "--shapes", "metadata", "static")."""

    ranges: dict[str, ShapeRange]
    sources: dict[str, str]

    def fixed(self) -> dict[str, Shape]:
        """The shape each input runs at (OPT of a range)."""
        return {name: r[1] for name, r in self.ranges.items()}

    def describe(self) -> str:
        """One line for humans, e.g. 'images 1x3x320x320 (the model's metadata: imgsz, batch)'."""
        parts = []
        for name, (lo, mid, hi) in self.ranges.items():
            size = dims_text(mid) if lo == mid == hi else f"{dims_text(lo)}:{dims_text(mid)}:{dims_text(hi)}"
            source = {"metadata": f"the model's metadata: {', '.join(METADATA_KEYS)}",
                      "static": "fixed by the model"}.get(self.sources[name], self.sources[name])
            parts.append(f"{name} {size} ({source})")
        return ", ".join(parts)


# --- --shapes texts ---------------------------------------------------------------------------------------
def parse_dims(text: str, where: str = FLAG) -> Shape:
    """'1x3x320x320' -> (1, 3, 320, 320); EdgelrError naming `where` if it is not such a shape."""
    try:
        dims = tuple(int(d) for d in str(text).strip().lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise EdgelrError(f"{where}: '{text}' is not a shape; write it as 1x3x320x320")
    return dims


def parse_shapes(texts, model: ir.Model | str | os.PathLike | None = None, flag: str = FLAG) -> dict[str, ShapeRange]:
    """--shapes texts, NAME=DIMS or NAME=MIN:OPT:MAX, as {name: (min, opt, max)}.

    A bad text is one EdgelrError line with an example built from `model`'s own input (a model, or a path
    to one that is read only to write that example)."""
    out: dict[str, ShapeRange] = {}
    for text in texts or ():
        name, sep, rest = str(text).partition("=")
        name, parts = name.strip(), rest.split(":")
        try:
            if not sep or not name or len(parts) not in (1, 3):
                raise EdgelrError("not NAME=DIMS")
            shapes = tuple(parse_dims(p, f"{flag} {name}") for p in parts)
        except EdgelrError:
            raise EdgelrError(f"{flag} '{text}': write NAME=DIMS or NAME=MIN:OPT:MAX, e.g. "
                              f"{_example_for(model, name)}") from None
        lo, mid, hi = shapes * 3 if len(shapes) == 1 else shapes
        if name in out:
            raise EdgelrError(f"{flag} {name}: given twice; give each input once")
        if not len(lo) == len(mid) == len(hi):
            raise EdgelrError(f"{flag} '{text}': min, opt and max must have the same number of dims")
        if not all(a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise EdgelrError(f"{flag} '{text}': shapes for '{name}' must grow min <= opt <= max in every dim, "
                              f"not {dims_text(lo)}, {dims_text(mid)}, {dims_text(hi)}")
        out[name] = (lo, mid, hi)
    return out


def shape_texts(shapes: dict[str, ShapeRange]) -> list[str]:
    """The inverse of parse_shapes: {name: range} -> ['NAME=DIMS' or 'NAME=MIN:OPT:MAX', ...]."""
    return [f"{name}={dims_text(lo)}" if lo == mid == hi else f"{name}={dims_text(lo)}:{dims_text(mid)}:{dims_text(hi)}"
            for name, (lo, mid, hi) in shapes.items()]


# --- the model's own word -----------------------------------------------------------------------------------
def declared_dims(value: ir.Value) -> list[int | str | None] | None:
    """The dims an input declares: an int where fixed, the dim's name (or None) where dynamic; None: no shape."""
    if value.shape is None:
        return None
    out: list[int | str | None] = []
    for d in value.shape.dims:
        if isinstance(d, int):
            out.append(d if d >= 0 else None)
        else:
            out.append(getattr(d, "value", None))
    return out


def is_dynamic(value: ir.Value) -> bool:
    dims = declared_dims(value)
    return dims is None or any(not isinstance(d, int) for d in dims)


def has_dynamic_inputs(model: ir.Model) -> bool:
    return any(is_dynamic(v) for v in model_inputs(model))


def metadata_sizes(model: ir.Model) -> dict[str, Shape]:
    """Input shapes the model's metadata fixes (Ultralytics' `imgsz` and `batch` on a rank-4 NCHW input):
    {name: shape} for each input whose every dynamic dim they size; {} when the model says nothing."""
    props = model.metadata_props or {}
    imgsz, batch = _ints(props.get("imgsz")), _ints(props.get("batch"))
    if imgsz is not None and len(imgsz) == 1:
        imgsz = imgsz * 2  # one number: a square image
    if (imgsz is not None and len(imgsz) != 2) or (batch is not None and len(batch) != 1):
        imgsz = batch = None  # not what Ultralytics writes: do not guess
    if imgsz is None and batch is None:
        return {}
    out = {}
    for value in model_inputs(model):
        dims = declared_dims(value)
        if dims is None or len(dims) != 4:
            continue
        known = {0: batch[0] if batch else (1 if imgsz else None)}
        if imgsz:
            known.update({2: imgsz[0], 3: imgsz[1]})
        filled = [d if isinstance(d, int) else known.get(axis) for axis, d in enumerate(dims)]
        if all(isinstance(d, int) and d >= 1 for d in filled) and filled != dims:
            out[value.name] = tuple(filled)
    return out


def _ints(text) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        value = ast.literal_eval(str(text).strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        return None
    return tuple(values)


# --- resolving ------------------------------------------------------------------------------------------------
def resolve_shapes(model: ir.Model, *, samples: Samples | None = None, shapes: dict[str, ShapeRange] | None = None,
                   where: str | os.PathLike | None = None) -> InputSizes:
    """Every model input's (min, opt, max) shape: from samples, shapes, the model's metadata or its fixed dims
    (the module doc's order). EdgelrError for shapes that do not fit the model; SizesUnknown, one line naming
    --shapes, when a dynamic dim has no size from any of them."""
    where = _where(model, where)
    inputs = {v.name: v for v in model_inputs(model)}
    shapes = dict(shapes or {})
    unknown = [name for name in shapes if name not in inputs]
    if unknown:
        raise EdgelrError(f"{where}: {FLAG} given for {', '.join(map(repr, unknown))}, which the model does not have; "
                          f"its inputs: {', '.join(inputs)}")
    first = samples.feed(0) if samples is not None else {}
    from_metadata = metadata_sizes(model)
    ranges: dict[str, ShapeRange] = {}
    sources: dict[str, str] = {}
    missing: list[ir.Value] = []
    for name, value in inputs.items():
        dims = declared_dims(value)
        if name in shapes:
            ranges[name], sources[name] = _check_range(where, name, dims, shapes[name]), FLAG
            if name in first:
                _check_sample_fits(where, name, tuple(np.shape(first[name])), ranges[name])
                sources[name] = f"{FLAG}; data from --calib"
        elif name in first:
            shape = tuple(int(d) for d in np.shape(first[name]))
            ranges[name], sources[name] = (shape, shape, shape), "--calib"
        elif name in from_metadata:
            shape = from_metadata[name]
            ranges[name], sources[name] = (shape, shape, shape), "metadata"
        elif dims is not None and all(isinstance(d, int) for d in dims):
            shape = tuple(dims)
            ranges[name], sources[name] = (shape, shape, shape), "static"
        else:
            missing.append(value)
    if missing:
        raise SizesUnknown(where, sizes_hint(model, missing))
    return InputSizes(ranges, sources)


def sizes_hint(model: ir.Model, values: list[ir.Value] | None = None) -> str:
    """'input 'images' has dynamic dims [batch, 3, height, width]; give --shapes images=1x3x640x640 (or --calib
    DATA.npz)', for the given inputs (default: every input with a dynamic dim)."""
    values = values if values is not None else [v for v in model_inputs(model) if is_dynamic(v)]
    if not values:
        return ""
    said = [f"'{v.name}' {_dims_repr(v)}" for v in values]
    flags = " ".join(f"{FLAG} {_example(v, model)}" for v in values)
    if len(values) == 1:
        return f"input '{values[0].name}' has dynamic dims {_dims_repr(values[0])}; give {flags} (or {CALIB_HINT})"
    return f"inputs {', '.join(said)} have dynamic dims; give {flags} (or {CALIB_HINT})"


def _check_range(where: str, name: str, dims, triple: ShapeRange) -> ShapeRange:
    if len(triple) != 3:
        raise EdgelrError(f"{where}: {FLAG} for '{name}' must be one shape or three: min, opt, max")
    triple = tuple(tuple(int(d) for d in s) for s in triple)
    fixed = len(set(triple)) == 1
    for label, shape in zip(("min", "opt", "max"), triple):
        what = f"the shape of '{name}', {dims_text(shape)}," if fixed else f"the {label} shape of '{name}', {dims_text(shape)},"
        if dims is not None and len(shape) != len(dims):
            raise EdgelrError(f"{where}: {what} has {len(shape)} dims; the input has {len(dims)} "
                              f"({_dims_list(dims)})")
        for axis, got in enumerate(shape):
            want = dims[axis] if dims is not None else None
            if got < 1:
                raise EdgelrError(f"{where}: {what} must have positive dims")
            if isinstance(want, int) and want != got:
                raise EdgelrError(f"{where}: {what} has {got} in dim {axis}, which the model fixes at {want}")
    lo, mid, hi = triple
    if not all(a <= b <= c for a, b, c in zip(lo, mid, hi)):
        raise EdgelrError(f"{where}: shapes for '{name}' must grow min <= opt <= max in every dim, not "
                          f"{dims_text(lo)}, {dims_text(mid)}, {dims_text(hi)}")
    return triple


def _check_sample_fits(where: str, name: str, shape: Shape, triple: ShapeRange) -> None:
    lo, _, hi = triple
    if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
        given = dims_text(lo) if lo == hi else f"{dims_text(lo)}..{dims_text(hi)}"
        raise EdgelrError(f"{where}: --calib's '{name}' samples are {dims_text(shape)}, outside {FLAG} {name}={given}; "
                          "make them agree (or leave one out)")


# --- feeds -----------------------------------------------------------------------------------------------------
def random_feed(model: ir.Model, sizes: dict[str, Shape], seed: int = 0,
                where: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Deterministic inputs of these shapes, of each input's dtype (the module doc says what values)."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in model_inputs(model):
        shape = sizes[value.name]
        dtype = _numpy_dtype(value)
        if dtype is None:
            kind = f"tensor({value.dtype.name.lower()})" if value.dtype is not None else "input of unknown type"
            raise EdgelrError(f"{_where(model, where)}: input '{value.name}' is a {kind}, which edgelr cannot make up; "
                              f"pass real inputs ({CALIB_HINT})")
        if dtype.kind == "f":
            out[value.name] = rng.random(shape).astype(dtype)
        elif dtype.kind == "b":
            out[value.name] = rng.random(shape) < 0.5
        else:
            out[value.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return out


def input_feed(model: ir.Model, *, samples: Samples | None = None, shapes: dict[str, ShapeRange] | None = None,
               where: str | os.PathLike | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """One input per model input: the first of `samples`, else random inputs at the resolved sizes."""
    sizes = resolve_shapes(model, samples=samples, shapes=shapes, where=where)
    if samples is not None:
        return samples.feed(0)
    return random_feed(model, sizes.fixed(), seed, where)


def sizing_samples(model: ir.Model, *, samples: Samples | None = None, shapes: dict[str, ShapeRange] | None = None,
                   where: str | os.PathLike | None = None) -> Samples | None:
    """What to run through the model once to learn the sizes inside it: `samples`, else one random input at
    the resolved sizes; None when there is nothing to learn (every input fixed, nothing given)."""
    if samples is not None:
        resolve_shapes(model, samples=samples, shapes=shapes, where=where)
        return samples
    if not shapes and not has_dynamic_inputs(model):
        return None
    feed = input_feed(model, shapes=shapes, where=where)
    return Samples({k: v[None] for k, v in feed.items()}, {k: False for k in feed})


# --- text ------------------------------------------------------------------------------------------------------
def dims_text(shape) -> str:
    return "x".join(str(d) for d in shape)


def _dims_list(dims) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


def _dims_repr(value: ir.Value) -> str:
    dims = declared_dims(value)
    return _dims_list(dims) if dims is not None else "(rank unknown)"


def _example(value: ir.Value, model: ir.Model | None = None) -> str:
    """NAME=DIMS for this input: its fixed dims, the metadata's sizes, else 1 for the batch, 640 elsewhere."""
    dims = declared_dims(value)
    if dims is None:
        return f"{value.name}=1x3x{EXAMPLE_SIZE}x{EXAMPLE_SIZE}"
    known = metadata_sizes(model).get(value.name) if model is not None else None
    if known:
        return f"{value.name}={dims_text(known)}"
    return f"{value.name}=" + "x".join(str(d) if isinstance(d, int) else ("1" if axis == 0 else str(EXAMPLE_SIZE))
                                       for axis, d in enumerate(dims))


def _example_for(model, name: str) -> str:
    """An example --shapes text for the input called `name`, or the model's first input that needs one."""
    if model is not None and not isinstance(model, ir.Model):
        try:  # read directly (io.model imports this module): only its inputs are needed, for a message
            model = ir.load(os.fspath(model))
        except Exception:  # noqa: BLE001 - an unreadable model gets the generic example
            model = None
    if model is None:
        return f"images=1x3x{EXAMPLE_SIZE}x{EXAMPLE_SIZE}"
    inputs = model_inputs(model)
    chosen = next((v for v in inputs if v.name == name), None) or next((v for v in inputs if is_dynamic(v)), None) \
        or (inputs[0] if inputs else None)
    return _example(chosen, model) if chosen is not None else f"images=1x3x{EXAMPLE_SIZE}x{EXAMPLE_SIZE}"


def _numpy_dtype(value: ir.Value) -> np.dtype | None:
    if value.dtype is None:
        return np.dtype(np.float32)
    try:
        dtype = np.dtype(value.dtype.numpy())
    except (TypeError, ValueError, NotImplementedError):
        return None
    return dtype if dtype.kind in "fiub" else None


def _where(model, where) -> str:
    if where is not None:
        return str(where)
    name = getattr(getattr(model, "graph", None), "name", None)
    return name or "the model"
