"""Loading and saving ONNX models (through onnx-ir, so external data stays lazy), and ORT sessions."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import onnx
import onnx_ir as ir

from edgelr.errors import EdgelrError

# Models with more weight than this are handled memory-mapped and handed to ONNX Runtime as files.
_LAZY_BYTES = 256 << 20
# Protobuf cannot serialize a model over 2 GB in one piece; stay well under it.
_INLINE_LIMIT_BYTES = 1 << 30


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model; tensors in external data files are read lazily."""
    path = Path(path)
    if not path.exists():
        raise EdgelrError(f"{path}: no such file; check the path to the ONNX model")
    if path.is_dir():
        raise EdgelrError(f"{path}: is a folder, not an ONNX file")
    try:
        model = ir.load(path)
    except Exception as exc:  # onnx/protobuf raise many types for corrupt input
        raise EdgelrError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {first_line(exc)}); "
            "is the file complete and really an .onnx file?"
        ) from None
    if len(model.graph) == 0 and not model.graph.outputs:
        raise EdgelrError(f"{path}: the file parsed but holds no graph; is it really an ONNX model?")
    _check_external_data(model, path)
    if _inline_bytes(model) > _LAZY_BYTES:
        model = _spill(model)
        gc.collect()  # the parsed model sits in reference cycles: free its weights now, not at a later GC
    return model


def _inline_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes
        for v in model.graph.initializers.values()
        if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
    )


def _spill(model: ir.Model) -> ir.Model:
    """Move a large model's weights to a temporary external-data file and reload them memory-mapped.

    A parsed protobuf keeps every weight resident until the very end (dropping one does not free it);
    mapped weights are read one layer at a time and released, so memory stays near one model's size.
    """
    tmp = tempfile.mkdtemp(prefix="edgelr-")
    try:
        ir.save(model, Path(tmp) / "model.onnx", external_data="model.onnx.data")
        lazy = ir.load(Path(tmp) / "model.onnx")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(lazy, shutil.rmtree, tmp, ignore_errors=True)
    return lazy


def _check_external_data(model: ir.Model, path: Path) -> None:
    for init in model.graph.initializers.values():
        tensor = init.const_value
        if isinstance(tensor, ir.ExternalTensor):
            location = Path(tensor.base_dir) / tensor.location
            if not location.exists():
                raise EdgelrError(
                    f"{path}: weight '{init.name}' lives in external file '{tensor.location}', "
                    f"which is missing; keep it next to the model"
                )


def _inline(model_file: Path, data_file: Path) -> None:
    """Pack a model and its external data into one .onnx file, one weight in memory at a time.

    Protobuf parses concatenated messages as one merged message, and merging appends repeated
    fields: so the model without weights, followed by one ModelProto per weight that holds only
    graph.initializer, is the complete model (serializing it whole needs it in memory twice).
    """
    proto = onnx.load(model_file, load_external_data=False)
    weights = list(proto.graph.initializer)
    proto.graph.ClearField("initializer")
    with open(data_file, "rb") as data, open(model_file.with_suffix(".packing"), "wb") as out:
        for tensor in _subgraph_initializers(proto.graph):  # If/Loop/Scan bodies' weights stay where they are
            _read_back(tensor, data)
        out.write(proto.SerializeToString())
        for tensor in weights:
            _read_back(tensor, data)
            piece = onnx.ModelProto()
            piece.graph.initializer.append(tensor)
            out.write(piece.SerializeToString())
            tensor.Clear()
    os.replace(model_file.with_suffix(".packing"), model_file)
    os.remove(data_file)


def _read_back(tensor: onnx.TensorProto, data) -> None:
    """An external tensor's bytes from the open data file, into the tensor."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        where = {entry.key: entry.value for entry in tensor.external_data}
        data.seek(int(where.get("offset", 0)))
        tensor.raw_data = data.read(int(where["length"]))
        tensor.ClearField("external_data")
        tensor.data_location = onnx.TensorProto.DEFAULT


def _subgraph_initializers(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from body.initializer
                yield from _subgraph_initializers(body)


def release_mapped(model: ir.Model) -> None:
    """Unmap weights that reading mapped in: mapped pages count as resident memory while mapped."""
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value.release()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no detail"


def model_bytes(model: ir.Model) -> int:
    """Bytes of all initializers (what the model weighs on disk)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def check_output_path(out: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Fail early (before any work) if OUT cannot be written or would overwrite an input."""
    out = Path(out)
    if not out.parent.exists():
        raise EdgelrError(f"{out}: folder '{out.parent}' does not exist; create it or pick another path")
    if out.is_dir():
        raise EdgelrError(f"{out}: is a folder; give a file name such as {out / 'model.onnx'}")
    for src in inputs:
        if src is not None and Path(src).exists() and (out.resolve() == Path(src).resolve() or out.exists() and out.samefile(src)):
            raise EdgelrError(f"{out}: is also the input; edgelr never overwrites its input, pick another name")
    if not os.access(out.parent, os.W_OK):
        raise EdgelrError(f"{out}: cannot write in '{out.parent}' (permission denied)")
    return out


def remove(path: Path) -> None:
    """Delete a model file and its external data file, if there."""
    path.unlink(missing_ok=True)
    Path(str(path) + ".data").unlink(missing_ok=True)


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write the model atomically: a complete file (and its external data) or nothing.

    Large models go to external data beside the file (`NAME.onnx.data`), as ONNX requires past 2 GB.
    """
    path = Path(path)
    external = model_bytes(model) > _INLINE_LIMIT_BYTES
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".edgelr-") as tmp:
        tmp_model = Path(tmp) / path.name
        try:
            # weights stream out to a data file one at a time; a single-file model is then packed from
            # it, so memory holds the output once (plus its bytes), never the graph's copy as well
            ir.save(model, tmp_model, external_data=data_name)
            release_mapped(model)
            if not external:
                _inline(tmp_model, Path(tmp) / data_name)
        except OSError as exc:
            raise EdgelrError(f"{path}: could not write the model ({exc.strerror or exc})") from None
        if external:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    return path


@contextlib.contextmanager
def ort_session(model: ir.Model | str | os.PathLike, threads: int = 0):
    """An ONNX Runtime CPU session for a model in memory or on disk, whatever its size."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors reach the user once, as edgelr's own line
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if not isinstance(model, ir.Model):
        if Path(model).stat().st_size > _LAZY_BYTES:  # prepacking would hold a second copy of the weights
            opts.add_session_config_entry("session.disable_prepacking", "1")
        yield ort.InferenceSession(str(model), opts, providers=providers)
    elif model_bytes(model) <= _LAZY_BYTES and _inline_bytes(model) == model_bytes(model):
        yield ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=providers)
    else:  # through a file: no second in-memory copy, and ORT maps the external weights
        opts.add_session_config_entry("session.disable_prepacking", "1")
        with tempfile.TemporaryDirectory(prefix="edgelr-") as tmp:
            file = Path(tmp) / "model.onnx"
            ir.save(model, file, external_data="model.onnx.data")
            release_mapped(model)
            yield ort.InferenceSession(str(file), opts, providers=providers)


def infer_shapes(model: ir.Model) -> None:
    """Fill in intermediate shapes where ONNX shape inference can (best effort: FLOPs need them)."""
    from onnx_ir.passes.common import ShapeInferencePass

    quiet = logging.getLogger("onnx_ir")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the pass logs a traceback when inference fails; we carry on
    try:
        ShapeInferencePass(strict_mode=False)(model)
    finally:
        quiet.setLevel(level)
