"""Loading and saving ONNX models (through onnx-ir, so external data stays lazy), and ORT sessions."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import signal
import tempfile
import weakref
from pathlib import Path
from typing import Self

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
    except Exception as exc:  # noqa: BLE001  (onnx/protobuf raise many types for corrupt input)
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


def check_output_folder(out_dir: str | os.PathLike, *inputs: str | os.PathLike | None, what: str = "bundle",
                        manifest: str = "manifest.json") -> Path:
    """Fail early if OUT_DIR cannot take an edgelr folder (a bundle, an exported pipeline): it may be new, empty,
    or an earlier edgelr folder (one with MANIFEST, replaced whole); never an input, a folder holding one or
    inside one, and never anything else. WHAT names the folder in errors."""
    out_dir = Path(out_dir)
    if not out_dir.parent.exists():
        raise EdgelrError(f"{out_dir}: folder '{out_dir.parent}' does not exist; create it or pick another path")
    for src in inputs:
        if src is None:
            continue
        src, out = Path(src).resolve(), out_dir.resolve()
        if src.is_relative_to(out) or out.is_relative_to(src):
            raise EdgelrError(f"{out_dir}: is, holds, or is inside the input {src}; edgelr never overwrites its input, "
                              "pick another folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise EdgelrError(f"{out_dir}: is a file; give a folder for the {what}")
        if any(out_dir.iterdir()) and not (out_dir / manifest).is_file():
            raise EdgelrError(f"{out_dir}: not empty and not an edgelr {what}; pick a new folder (nothing was written)")
    if not os.access(out_dir.parent, os.W_OK):
        raise EdgelrError(f"{out_dir}: cannot write in '{out_dir.parent}' (permission denied)")
    return out_dir


def remove(path: Path) -> None:
    """Delete a model file and its external data file, if there."""
    path.unlink(missing_ok=True)
    _data_file(path).unlink(missing_ok=True)


def _data_file(path: Path) -> Path:
    return Path(str(path) + ".data")


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write the model atomically: a complete file (and its external data) or nothing.

    For edgelr's own working files: a model the user gets goes through `deliver`/`Delivery`, which also
    runs it before it is moved into place. Large models go to external data beside the file
    (`NAME.onnx.data`), as ONNX requires past 2 GB.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".edgelr-") as tmp:
        _move_into_place(_write(model, Path(tmp) / path.name, path), path)
    return path


def _write(model: ir.Model, file: Path, where: Path) -> Path:
    """The model as FILE (and FILE.data past the inline limit), in a folder of edgelr's own; errors name WHERE."""
    remove(file)  # written before under this name (e.g. with external data): nothing stale may move with it
    data, inline = _data_file(file), model_bytes(model) <= _INLINE_LIMIT_BYTES
    try:
        # weights stream out to a data file one at a time; a single-file model is then packed from
        # it, so memory holds the output once (plus its bytes), never the graph's copy as well
        ir.save(model, file, external_data=data.name)
        release_mapped(model)
        if inline:
            _inline(file, data)
    except OSError as exc:
        raise EdgelrError(f"{where}: could not write the model ({exc.strerror or exc})") from None
    return file


def _move_into_place(staged: Path, path: Path) -> None:
    """STAGED (and its data file) to PATH. The old model goes first and the data comes before the model, so
    a kill between the moves leaves at most a data file without a model, never a model with wrong weights."""
    if _data_file(staged).exists():
        path.unlink(missing_ok=True)
        os.replace(_data_file(staged), _data_file(path))
        os.replace(staged, path)
    else:
        os.replace(staged, path)
        _data_file(path).unlink(missing_ok=True)  # the weights of the model just replaced


# The test hook of tests/test_writes.py: EDGELR_TEST_KILL_AT=STAGE kills the process at that checkpoint.
KILL_AT = "EDGELR_TEST_KILL_AT"


def checkpoint(stage: str) -> None:
    """A named point in writing a result ("after-factorize", "model-written", "judging", "model-ran",
    "folder-written"). Does nothing, unless EDGELR_TEST_KILL_AT names it: then the process dies at once,
    as under kill -9, so a test can check that no broken or unverified output is left behind."""
    if os.environ.get(KILL_AT) == stage:
        os.kill(os.getpid(), signal.SIGKILL)


class Delivery:
    """Models for the user's paths: each is written into a hidden folder beside its destination, loaded and
    run once in ONNX Runtime, and only then moved into place. A user's path holds a model that ran, or none.

        with Delivery(feed) as delivery:
            staged = delivery.write(model, "out.onnx")   # judge `staged` here: an error leaves nothing
        # out.onnx (and out.onnx.data) are in place now

    feed: inputs to run each model on once; None: random inputs at the sizes the model's fixed dims or
    metadata give (edgelr.io.shapes.input_feed), else (dynamic dims, nothing sizes them) ORT only loads it.
    Leaving the block with an error, or a kill, moves nothing (a kill leaves the hidden `.edgelr-*` folder).
    """

    def __init__(self, feed: dict | None = None):
        self._feed = feed
        self._folders: dict[Path, Path] = {}  # destination folder -> its hidden staging folder
        self._staged: dict[Path, tuple[Path, dict | None]] = {}  # destination -> (staged file, feed)
        self._ran: set[Path] = set()

    def write(self, model: ir.Model, path: str | os.PathLike) -> Path:
        """Write MODEL for PATH into the staging folder; returns the staged file (read it, not PATH)."""
        path = Path(path)
        folder = self._folders.get(path.parent.resolve())
        if folder is None:
            folder = self._folders[path.parent.resolve()] = Path(tempfile.mkdtemp(dir=path.parent, prefix=".edgelr-"))
        feed = self._feed if self._feed is not None else made_up_feed(model, path)
        staged = _write(model, folder / path.name, path)
        self._staged[path] = (staged, feed)
        self._ran.discard(staged)
        checkpoint("model-written")
        return staged

    def ran(self, staged: Path) -> None:
        """The caller ran STAGED in ONNX Runtime itself (e.g. judged it on every sample): no need to again."""
        self._ran.add(staged)

    def commit(self) -> None:
        """Run each staged model not run yet, then move them all into place."""
        for path, (staged, feed) in self._staged.items():
            if staged not in self._ran:
                run_once(staged, feed, path)
        checkpoint("model-ran")
        for path, (staged, _) in self._staged.items():
            _move_into_place(staged, path)
        self._staged.clear()

    def discard(self) -> None:
        for folder in self._folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._folders.clear()
        self._staged.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None:
                self.commit()
        finally:
            self.discard()


def deliver(model: ir.Model, path: str | os.PathLike, feed: dict | None = None) -> Path:
    """Write MODEL to PATH for the user: atomically, and only once ONNX Runtime has loaded and run it (Delivery)."""
    with Delivery(feed) as delivery:
        delivery.write(model, path)
    return Path(path)


def made_up_feed(model: ir.Model, where: Path) -> dict | None:
    """Random inputs at the sizes the model's fixed dims or metadata give; None where nothing sizes them."""
    from edgelr.io.shapes import input_feed

    try:
        return input_feed(model, where=where)
    except EdgelrError:  # dynamic dims nothing sizes, or inputs edgelr cannot make up: ORT only loads it
        return None


def run_once(file: Path, feed: dict | None, where: Path) -> None:
    """Load FILE in ONNX Runtime and run it on FEED (None: only load it); EdgelrError naming WHERE if it fails."""
    doing = "load"
    try:
        with ort_session(file) as session:
            if feed is not None:
                doing = "run"
                session.run(None, {arg.name: feed[arg.name] for arg in session.get_inputs()})
    except Exception as exc:  # noqa: BLE001  (ORT raises its own types)
        raise EdgelrError(f"{where}: not written: ONNX Runtime cannot {doing} the model ({first_line(exc)})") from None


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
