"""ONNX Runtime bundles: a model made for one device's onnxruntime, its runner, and reference data to check it.

    manifest = write_ort_bundle(Path("yolov8n.onnx"), load_target("rpi5"), Path(empty_dir), feed={"images": x})

writes into `dest`, an existing empty folder:

    model.ort                          format "ort": converted by the target's onnxruntime release
    model.required_operators.config      the operators a minimal (reduced) onnxruntime build needs
    BUILD.md                             the command that builds that minimal onnxruntime for the device
    model.onnx                         format "onnx": the model itself (weights beside it past 1 GB)
    run.py, runner.py                  check the outputs against reference.npz, time the model, print JSON
    reference.npz                      the inputs (`feed`, or random at edgelr.io.shapes' sizes) and outputs
    manifest.json                      target, versions, opset, input/output specs, checksums, tolerance

An ORT-format file is tied to the release that writes it: onnxruntime reads files from its own and older
releases, not newer ones ("We don't generally support forwards compatibility", microsoft/onnxruntime#20670),
and a minimal build must come from the release its operator config was made with. So the converter that runs
is the target's `runtime_version`: the installed onnxruntime when it is that release, else that release's wheel
for this Python, downloaded once into $EDGELR_CACHE/ort/VERSION and run in a subprocess. The finished bundle
is then checked here, by its own run.py under that same release.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.deploy.files import file_entry, whole_folder
from edgelr.deploy.targets import Target
from edgelr.errors import EdgelrError
from edgelr.io import model as model_io
from edgelr.io.cache import cache_root
from edgelr.io.shapes import ShapeRange, dims_text, input_feed
from edgelr.version import __version__

TOLERANCE = 1e-3  # relative output error (||a-b|| / ||b||, per output) the device's run must stay within
RUN_PY = Path(__file__).with_name("ort_run.py")
RUNNER_PY = Path(__file__).resolve().parents[1] / "measure" / "runner.py"
# The converter's own default. It leaves out the NCHWc layout for every platform but "amd64": NCHWc blocks
# channels by the x86 CPU's vector width, so such a file would not run on ARM (nor on every x86 CPU).
OPTIMIZATION_LEVEL = "all"
CONVERT_TIMEOUT_S = 3600

_NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(int16)": np.int16, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class OrtRuntime:
    """An onnxruntime release that runs here: the installed one (path None), or an unpacked wheel at `path`."""

    version: str
    path: Path | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.path is not None:  # first on the path: it shadows the installed onnxruntime
            env["PYTHONPATH"] = os.pathsep.join([str(self.path), *filter(None, [env.get("PYTHONPATH")])])
        return env


def write_ort_bundle(model_path: Path, target: Target, dest: Path, feed: dict[str, np.ndarray] | None = None,
                     *, shapes: dict[str, ShapeRange] | None = None, progress: bool = True) -> dict:
    """Write the bundle for `target` into the empty folder `dest`; returns the manifest (also manifest.json).

    feed: the reference inputs, one array per model input; without it, random inputs at the sizes `shapes`
    (--shapes) or the model's own metadata give (edgelr.io.shapes; one line naming --shapes if neither does).
    """
    model_path, dest = Path(model_path), Path(dest)
    _check_target(target)
    _check_dest(dest)
    with whole_folder(dest) as stage:  # DEST gets the whole bundle, checked, or stays empty
        return _write_bundle(model_path, target, stage, feed, shapes, progress)


def _write_bundle(model_path: Path, target: Target, dest: Path, feed: dict[str, np.ndarray] | None,
                  shapes: dict[str, ShapeRange] | None, progress: bool) -> dict:
    model = model_io.load(model_path)
    made_up = feed is None
    if made_up:  # before the conversion: a model without sizes fails in a moment
        feed = input_feed(model, shapes=shapes, where=model_path)
    runtime = ort_runtime(target.runtime_version, progress)
    where = model_path.name
    with tempfile.TemporaryDirectory(dir=dest, prefix=".edgelr-") as staging:
        if target.format == "ort":
            onnx_file = model_io.save(model, Path(staging) / "model.onnx")
            model_name, model_data = "model.ort", []
        else:
            onnx_file = model_io.save(model, dest / "model.onnx")
            model_name = "model.onnx"
            model_data = ["model.onnx.data"] if (dest / "model.onnx.data").exists() else []
        # the reference first: a bad feed fails in a moment, not after the conversion
        not_loadable = None
        try:
            inputs, outputs, arrays = _reference(onnx_file, feed, model, where, made_up)
        except _NotLoadable as exc:
            not_loadable = str(exc)  # reported after the target's onnxruntime has said what it makes of the model
        if target.format == "ort":
            if progress:
                print(f"converting {where} to ORT format with onnxruntime {runtime.version}", file=sys.stderr)
            _convert(onnx_file, dest, runtime, target, model, where)
        if not_loadable:
            raise EdgelrError(not_loadable)
    np.savez(dest / "reference.npz", **arrays)
    shutil.copyfile(RUN_PY, dest / "run.py")
    shutil.copyfile(RUNNER_PY, dest / "runner.py")
    if target.format == "ort":
        (dest / "BUILD.md").write_text(_build_md(target, runtime.version, dest), encoding="utf-8")

    manifest = {
        "bundle": 1,
        "target": {
            "name": target.name, "description": target.description, "arch": target.arch, "backend": target.backend,
            "precision": target.precision, "format": target.format, "runtime_version": target.runtime_version,
            "threads": target.threads, "providers": list(target.providers),
        },
        "edgelr": __version__,
        "source": {"file": model_path.name, "sha256": file_entry(model_path)["sha256"]},
        "model": model_name,
        "model_data": model_data,
        "onnxruntime": _runtime_info(target, runtime, dest / model_name, model),
        "opset": {domain or "ai.onnx": version for domain, version in sorted(model.opset_imports.items())},
        "inputs": inputs,
        "outputs": outputs,
        "parity": {"metric": "||a-b|| / ||b|| per output", "tolerance": TOLERANCE},
        "files": {},
    }
    manifest["files"] = {
        p.name: file_entry(p)
        for p in sorted(dest.iterdir()) if p.is_file() and p.name != "manifest.json"
    }
    _write_json(dest / "manifest.json", manifest)
    manifest["parity"]["checked"] = _check_bundle(dest, runtime, model, where, progress)
    _write_json(dest / "manifest.json", manifest)
    return manifest


def _runtime_info(target: Target, runtime: OrtRuntime, model_file: Path, model: ir.Model) -> dict:
    """Which onnxruntime the bundle is for, how it was made, and which releases run it (run.py's rule)."""
    major, minor = _version_key(runtime.version)[:2]
    info = {"runtime_version": runtime.version, "reference_outputs_from": _installed_version()}
    if target.format == "ort":  # newer releases read older ORT-format files, older ones do not
        info.update(
            compatible=f"onnxruntime>={major}.{minor},<{major + 1}",
            converted_with=runtime.version,
            ort_format_version=_ort_format_version(model_file),
            optimization=(f"level {OPTIMIZATION_LEVEL} without NCHWc, style Fixed"
                          + (", target_platform arm" if target.arch == "aarch64" else "")),
        )
    else:  # an ONNX file runs on any release that knows its opset (onnxruntime checks that itself)
        info["compatible"] = f"onnxruntime>={major},<{major + 1} that supports opset {model.opset_imports.get('', '?')}"
    return info


# --- the target's onnxruntime ----------------------------------------------------------------------------
def ort_runtime(version: str, progress: bool = True) -> OrtRuntime:
    """The onnxruntime release `version` ("installed", or e.g. "1.19.2") as something that runs here."""
    installed = _installed_version()
    if version == "installed" or _version_key(version) == _version_key(installed):
        return OrtRuntime(installed)
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", version):
        raise EdgelrError(f"runtime_version '{version}' is not an onnxruntime release such as 1.19.2 (or 'installed')")
    return OrtRuntime(version, _unpacked_wheel(version, progress))


def ort_cache_dir() -> Path:
    return cache_root() / "ort"


def _unpacked_wheel(version: str, progress: bool) -> Path:
    """onnxruntime==version for this Python, unpacked in the cache (downloaded the first time only)."""
    folder = ort_cache_dir() / version
    if (folder / "onnxruntime" / "__init__.py").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"downloading onnxruntime {version} for this Python (once; kept in {folder})", file=sys.stderr)
    python = f"Python {sys.version_info.major}.{sys.version_info.minor}"
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{version}-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", "--dest", tmp, f"onnxruntime=={version}"]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
            reason = _pip_reason(proc.stderr, proc.returncode)
        except subprocess.TimeoutExpired:
            reason, proc = "pip took more than 15 minutes", None
        wheels = sorted(Path(tmp).glob("onnxruntime-*.whl"))
        if proc is None or proc.returncode or not wheels:
            raise EdgelrError(
                f"onnxruntime {version}: pip could not download its wheel for {python} ({reason}); check the network "
                f"and pip's index, or set the target's runtime_version to a release that has a wheel for {python}"
            )
        unpacked = Path(tmp) / "unpacked"
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                wheel.extractall(unpacked)
        except (zipfile.BadZipFile, OSError) as exc:
            raise EdgelrError(f"onnxruntime {version}: the downloaded wheel cannot be unpacked ({exc}); try again") from None
        try:
            os.replace(unpacked, folder)
        except OSError:  # another process unpacked it at the same time: theirs is as good
            if not (folder / "onnxruntime" / "__init__.py").is_file():
                raise
    return folder


def _pip_reason(stderr: str, status: int) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")] or lines
    if not errors:
        return f"pip exited with status {status}"
    return re.sub(r"\s*\(from versions:.*?\)", "", errors[0].removeprefix("ERROR:").strip())[:300]


def _installed_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _version_key(text: str) -> tuple[int, ...]:
    key = [int(m.group()) if (m := re.match(r"\d+", part)) else 0 for part in text.split("+")[0].split(".")[:3]]
    return tuple(key + [0] * (3 - len(key)))


# --- conversion and its failures ----------------------------------------------------------------------------
def _convert(onnx_file: Path, dest: Path, runtime: OrtRuntime, target: Target, model: ir.Model, where: str) -> None:
    """model.ort and model.required_operators.config into `dest`, written by the target's onnxruntime."""
    out = onnx_file.parent / "converted"
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(onnx_file),
           "--output_dir", str(out), "--optimization_style", "Fixed"]
    if target.arch == "aarch64":
        cmd += ["--target_platform", "arm"]  # keeps QDQ int8 as int8 (ARM kernels take it; x86 turns it into uint8)
    env = runtime.env()
    env["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = OPTIMIZATION_LEVEL
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise EdgelrError(f"{where}: conversion to ORT format took more than {CONVERT_TIMEOUT_S} s; gave up") from None
    ort_file, config = out / "model.ort", out / "model.required_operators.config"
    if proc.returncode or not ort_file.is_file() or not config.is_file():
        raise EdgelrError(f"{where}: {_explain(proc.stdout + proc.stderr, model, runtime.version)}")
    os.replace(ort_file, dest / "model.ort")
    # the converter lists the absolute path it wrote to (a temporary folder): name the bundle's file instead
    text = config.read_text(encoding="utf-8")
    (dest / config.name).write_text(re.sub(r"(?m)^# - .*$", "# - model.ort", text), encoding="utf-8")


def _explain(text: str, model: ir.Model, version: str) -> str:
    """One line from what onnxruntime said when it could not load or convert the model, naming the node."""
    fix = "pick a target whose runtime_version supports it, or change the model"
    found = re.search(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'", text)
    if found:
        op, since, name = found.groups()
        return f"node '{name}' (op {op}, opset {since}): not supported by onnxruntime {version}; {fix}"
    found = re.search(r"Opset (\d+) is under development.*?domain (\S+) is till opset (\d+)", text, re.DOTALL)
    if found:
        opset, domain, top = found.groups()
        return (f"the model's opset {opset} ({domain}) is newer than onnxruntime {version} supports (up to {top}); "
                f"export the model at opset {top} or lower, or pick a target with a newer runtime_version")
    found = re.search(r"([\w.]*):(\w+)\((-?\d+)\) is not a registered function/op", text)
    if found:
        domain, op = found.group(1), found.group(2)
        nodes = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == op and n.domain == domain]
        opset = model.opset_imports.get(domain, "?")
        name = f"'{nodes[0].name}'" if nodes and nodes[0].name else "(unnamed)"
        more = f" and {len(nodes) - 1} more node(s)" if len(nodes) > 1 else ""
        qualified = f"{domain}.{op}" if domain else op
        return (f"node {name}{more} (op {qualified}, opset {opset}): not supported by onnxruntime {version} "
                f"(no such operator); {fix}")
    found = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", text)
    if found:
        have, top = found.groups()
        return (f"the model's IR version {have} is newer than onnxruntime {version} reads (up to {top}); "
                f"save the model with ir_version {top}, or pick a target with a newer runtime_version")
    found = re.search(r"Type '([^']+)' of input parameter \(([^)]*)\) of operator \((\w+)\) in node \(([^)]*)\) is invalid",
                      text)
    if found:
        kind, value, op, name = found.groups()
        return f"node '{name}' (op {op}): its input '{value}' is a {kind}, which {op} does not take; the model is not valid ONNX"
    return f"onnxruntime {version} cannot load or convert the model: {_ort_message(text)}"


def _ort_message(text: str) -> str:
    """The informative line of an ORT failure (a subprocess's traceback ends with it), without the prefixes."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    tagged = [line for line in lines if "[ONNXRuntimeError]" in line] or lines or ["no detail"]
    line = re.sub(r"^.*?\[ONNXRuntimeError\] : \d+ : \w+ : ", "", tagged[-1])
    return re.sub(r"^Load model from .*? failed:", "", line)[:300]  # a temporary path, of no use to the user


# --- reference inputs and outputs ------------------------------------------------------------------------------
class _NotLoadable(Exception):
    """The installed onnxruntime cannot load the model (the message names the node, as EdgelrError's would)."""


def _reference(onnx_file: Path, feed: dict, model: ir.Model, where: str, made_up: bool = False) -> tuple[list, list, dict]:
    """Input/output specs, and reference.npz's arrays: the inputs and the ONNX model's outputs, run here."""
    try:
        with model_io.ort_session(onnx_file) as session:
            inputs = [_spec(arg) for arg in session.get_inputs()]
            outputs = [_spec(arg) for arg in session.get_outputs()]
            arrays = _check_feed(feed, inputs, where)
            try:
                results = session.run([o["name"] for o in outputs], arrays)
            except Exception as exc:  # noqa: BLE001  (ORT raises its own types for inputs it cannot run)
                sizes = ", ".join(f"{k} {dims_text(v.shape)}" for k, v in arrays.items())
                given = f"random inputs ({sizes})" if made_up else "the given inputs"
                advice = "; give the sizes it takes with --shapes, or real inputs with --calib" if made_up else ""
                raise EdgelrError(f"{where}: ONNX Runtime cannot run the model on {given}: "
                                  f"{_ort_message(str(exc))}{advice}") from None
    except EdgelrError:
        raise
    except Exception as exc:  # noqa: BLE001  (the installed onnxruntime cannot load it)
        raise _NotLoadable(f"{where}: {_explain(str(exc), model, _installed_version())}") from None
    stored = {}
    for i, spec in enumerate(inputs):
        spec["reference"], spec["reference_shape"] = f"input_{i}", list(arrays[spec["name"]].shape)
        stored[spec["reference"]] = arrays[spec["name"]]
    for i, (spec, value) in enumerate(zip(outputs, results)):
        if not isinstance(value, np.ndarray):
            raise EdgelrError(f"{where}: output '{spec['name']}' is a {spec['type']}, not a tensor; "
                              "bundles check tensor outputs only")
        spec["reference"], spec["reference_shape"] = f"output_{i}", list(value.shape)
        stored[spec["reference"]] = value
    return inputs, outputs, stored


def _spec(arg) -> dict:
    dtype = _NUMPY_TYPES.get(arg.type)
    return {
        "name": arg.name,
        "type": arg.type,
        "dtype": np.dtype(dtype).name if dtype is not None else None,
        "shape": [d if isinstance(d, int) and d >= 0 else str(d or "?") for d in arg.shape],
    }


def _check_feed(feed, specs: list[dict], where: str) -> dict[str, np.ndarray]:
    if not isinstance(feed, dict):
        raise EdgelrError(f"{where}: feed must map input names to arrays, not {type(feed).__name__}")
    names = [s["name"] for s in specs]
    missing, extra = [n for n in names if n not in feed], [n for n in feed if n not in names]
    if missing or extra:
        said = "; ".join(filter(None, [missing and f"no array for {', '.join(map(repr, missing))}",
                                       extra and f"{', '.join(map(repr, extra))} is not an input"]))
        raise EdgelrError(f"{where}: feed: {said}; the model's inputs are {', '.join(names)}")
    out = {}
    for spec in specs:
        name, shape = spec["name"], spec["shape"]
        array = np.asarray(feed[name])
        if spec["dtype"] is None:
            raise EdgelrError(f"{where}: input '{name}' is a {spec['type']}; bundles take tensor inputs numpy can hold")
        if array.dtype != np.dtype(spec["dtype"]):
            raise EdgelrError(f"{where}: feed['{name}'] is {array.dtype}; the model takes {spec['dtype']} "
                              f"(convert it with .astype(np.{spec['dtype']}))")
        if array.ndim != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(shape, array.shape)):
            raise EdgelrError(f"{where}: feed['{name}'] has shape {list(array.shape)}; the model takes "
                              f"[{', '.join(map(str, shape))}]")
        out[name] = np.ascontiguousarray(array)
    return out


# --- checking the finished bundle --------------------------------------------------------------------------------
def _check_bundle(dest: Path, runtime: OrtRuntime, model: ir.Model, where: str, progress: bool) -> dict:
    """Run the bundle's own run.py here, under the target's onnxruntime release: it must load and match."""
    if progress:
        print(f"checking the bundle with onnxruntime {runtime.version}", file=sys.stderr)
    cmd = [sys.executable, str(dest / "run.py"), "--runs", "0", "--threads", "1"]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=runtime.env(), timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise EdgelrError(f"{where}: checking the bundle took more than {CONVERT_TIMEOUT_S} s; gave up") from None
    report = last_json(proc.stdout)
    if report is None:
        raise EdgelrError(f"{where}: the bundle's run.py failed under onnxruntime {runtime.version} here "
                          f"({_ort_message(proc.stderr)})")
    if "error" in report:
        detail = report["error"]
        if "cannot load it" in detail:
            detail = _explain(detail, model, runtime.version)
        raise EdgelrError(f"{where}: the bundle does not run under onnxruntime {runtime.version} here: {detail}")
    parity = report["parity"]
    if not parity["passed"]:
        raise EdgelrError(f"{where}: the {report['model']} outputs under onnxruntime {runtime.version} differ from the "
                          f"ONNX model's by {parity['max_rel_error']:.3g} (relative) > {parity['tolerance']:g}")
    return {"onnxruntime": report["onnxruntime"], "machine": report["machine"],
            "max_rel_error": parity["max_rel_error"], "rel_error": parity["rel_error"]}


def last_json(stdout: str) -> dict | None:
    """The last line of `stdout` that is a JSON object (run.py prints exactly one)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


# --- files -----------------------------------------------------------------------------------------------------
def _check_target(target: Target) -> None:
    if target.backend != "onnxruntime" or target.format not in ("ort", "onnx"):
        raise EdgelrError(f"target {target.name}: backend {target.backend}, format {target.format} is not an ONNX "
                          "Runtime bundle (backend onnxruntime, format ort or onnx)")


def _check_dest(dest: Path) -> None:
    if not dest.is_dir():
        raise EdgelrError(f"{dest}: not a folder; the bundle goes into an existing empty folder")
    if any(dest.iterdir()):
        raise EdgelrError(f"{dest}: not empty; the bundle goes into an empty folder")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _ort_format_version(path: Path) -> str | None:
    """The ORT format version the file declares (what a runtime checks first), or None if unreadable."""
    try:
        from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import (
            InferenceSession,
        )

        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            root = getattr(InferenceSession, "GetRootAs", None) or InferenceSession.GetRootAsInferenceSession
            version = root(buf, 0).OrtVersion()
        return version.decode() if version else None
    except Exception:  # noqa: BLE001  (informative only: a layout this onnxruntime does not know)
        return None


def _build_md(target: Target, version: str, dest: Path) -> str:
    config = "model.required_operators.config"
    ml_ops = "ai.onnx.ml" in (dest / config).read_text(encoding="utf-8")
    major, minor = _version_key(version)[:2]
    return f"""# A minimal ONNX Runtime for this model ({target.name}, {target.arch})

`model.ort` was converted by onnxruntime {version}, the release this target runs. Any full build of
onnxruntime>={major}.{minor},<{major + 1} runs it too (`pip install onnxruntime=={version}`; `python3 run.py` checks it).

A minimal build runs ORT-format models only, with only the operators listed in `{config}`:
a much smaller library. Build it from the same release (the config and the .ort file are tied to it), on
the device itself or on any {target.arch} Linux machine with the device's Python version, in the bundle
folder (`../{config}` and `../run.py` below are the bundle's files):

```bash
sudo apt-get install -y build-essential git python3-dev python3-venv
python3 -m venv ~/ort-build && . ~/ort-build/bin/activate
pip install cmake numpy packaging setuptools wheel     # pip's CMake: newer than some distributions ship
git clone --recursive --depth 1 --branch v{version} https://github.com/microsoft/onnxruntime
cd onnxruntime
./build.sh --config MinSizeRel --minimal_build --include_ops_by_config ../{config} \\
    --skip_tests{'' if ml_ops else ' --disable_ml_ops'} --build_wheel --parallel --compile_no_warning_as_error
pip install build/Linux/MinSizeRel/dist/onnxruntime-*.whl
python3 ../run.py
```

`--skip_tests` is required with a reduced operator set; `--minimal_build` rules out ONNX files and
runtime graph optimizations (the converter already applied them). XNNPACK is not part of this build: to try
it, build without the minimal options and with `--use_xnnpack` (a full build runs model.ort too); run.py uses
XNNPACK whenever the installed onnxruntime offers it.
"""
