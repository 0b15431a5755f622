"""ONNX Runtime bundles (`edgelr.deploy.ort_bundle`) for the Raspberry Pi and x86 CPU targets.

A small CNN and the YOLOv8n detector `nudenet` ships (original and factorized, fed a real photo): the
bundle's model loads here and matches the ONNX model, the manifest's checksums match the files, and the
bundle's run.py passes its parity check, fails on a tampered reference, refuses an onnxruntime older than the
one the bundle was made for, and names the node an onnxruntime release cannot run. The slow test runs the
rpi5 bundles' run.py on an emulated aarch64 Python (tools/aarch64_env.py; needs qemu-user-static, and root
or arm64 enabled in apt the first time).
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import convnet, make_model, value_info
from onnx import TensorProto, helper, numpy_helper

from edgelr import FactorizeConfig, compress
from edgelr.deploy.ort_bundle import TOLERANCE, ort_runtime, write_ort_bundle
from edgelr.deploy.targets import load_target
from edgelr.errors import EdgelrError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/
from tools.aarch64_env import QEMU, run_bundle  # noqa: E402

RPI_RUNTIME = load_target("rpi5").runtime_version
BUNDLE_FILES = {"model.ort", "model.required_operators.config", "BUILD.md", "run.py", "runner.py", "reference.npz",
                "manifest.json"}


# --- helpers -----------------------------------------------------------------------------------------------
def make_bundle(model: Path, target, folder: Path, feed=None, shapes=None) -> tuple[Path, dict]:
    folder.mkdir()
    return folder, write_ort_bundle(model, load_target(target) if isinstance(target, str) else target, folder,
                                    feed, shapes=shapes, progress=False)


CONVNET_SIZE = {"x": ((1, 3, 9, 8),) * 3}  # convnet's batch is dynamic, and it has no size metadata


def run_py(bundle: Path, *args, pythonpath: Path | None = None) -> tuple[int, dict]:
    """The bundle's run.py in a fresh interpreter: its exit status and its one JSON object."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run([sys.executable, str(bundle / "run.py"), *map(str, args)], check=False, capture_output=True,
                          text=True, env=env, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"run.py must print one JSON object, printed: {proc.stdout!r} {proc.stderr[-500:]!r}"
    return proc.returncode, json.loads(lines[0])


def outputs(model: Path, feed: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference(bundle: Path, manifest: dict) -> tuple[dict, list]:
    with np.load(bundle / "reference.npz") as z:
        feed = {spec["name"]: z[spec["reference"]] for spec in manifest["inputs"]}
        expected = [z[spec["reference"]] for spec in manifest["outputs"]]
    return feed, expected


def check_bundle(bundle: Path, manifest: dict, source: Path) -> None:
    """What every bundle must hold: files as listed, a model that matches the source ONNX model here."""
    on_disk = {p.name for p in bundle.iterdir()}
    assert set(manifest["files"]) | {"manifest.json"} == on_disk
    for name, entry in manifest["files"].items():
        data = (bundle / name).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (entry["sha256"], entry["bytes"]), name
    assert json.loads((bundle / "manifest.json").read_text()) == manifest
    feed, expected = reference(bundle, manifest)
    from_onnx = outputs(source, feed)
    from_bundle = outputs(bundle / manifest["model"], feed)
    for want, got_here, got_bundle in zip(expected, from_onnx, from_bundle):
        assert rel(want, got_here) <= 1e-5  # the reference is the ONNX model's output
        assert rel(got_bundle, got_here) <= TOLERANCE
    assert manifest["parity"]["tolerance"] == TOLERANCE
    assert manifest["parity"]["checked"]["max_rel_error"] <= TOLERANCE


def small_model(tmp: Path, name: str = "convnet.onnx") -> Path:
    path = tmp / name
    onnx.save(convnet(np.random.default_rng(0)).proto, path)
    return path


def single_node_model(tmp: Path, name: str, node, opset: int = 17, domains=(), ir_version: int = 8) -> Path:
    proto = helper.make_model(
        helper.make_graph([node], "g", [value_info("x", np.float32, (1, 2, 5, 5))],
                          [value_info("y", np.float32, (1, 2, 3, 3))],
                          [numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w"),
                           numpy_helper.from_array(np.zeros((1, 18, 3, 3), np.float32), "offset")]),
        opset_imports=[helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)],
        ir_version=ir_version,
    )
    path = tmp / name
    onnx.save(proto, path)
    return path


# --- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yolo() -> Path:
    nudenet = pytest.importorskip("nudenet")
    return Path(nudenet.__file__).parent / "320n.onnx"


@pytest.fixture(scope="module")
def photo() -> dict[str, np.ndarray]:
    pytest.importorskip("skimage")
    from models.data import samples

    return {"images": samples(["astronaut"], 320, crops=0)}  # (1, 3, 320, 320) float32, a real photograph


@pytest.fixture(scope="module")
def yolo_models(yolo, tmp_path_factory) -> dict[str, Path]:
    factorized = tmp_path_factory.mktemp("lr") / "yolov8n.lr.onnx"
    compress(yolo, factorized, FactorizeConfig(params=0.5), progress=False)
    return {"original": yolo, "factorized": factorized}


@pytest.fixture(scope="module")
def yolo_bundles(yolo_models, photo, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("yolo-bundles")
    return {kind: make_bundle(path, "rpi5", root / kind, photo) for kind, path in yolo_models.items()}


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> tuple[Path, dict, Path]:
    root = tmp_path_factory.mktemp("small")
    source = small_model(root)
    bundle, manifest = make_bundle(source, "rpi5", root / "bundle", shapes=CONVNET_SIZE)
    return bundle, manifest, source


# --- fast tier ----------------------------------------------------------------------------------------------
def test_small_model_rpi5_bundle(small_bundle):
    bundle, manifest, source = small_bundle
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES
    check_bundle(bundle, manifest, source)
    assert manifest["target"]["name"] == "rpi5" and manifest["target"]["threads"] == 4
    assert manifest["onnxruntime"]["runtime_version"] == manifest["onnxruntime"]["converted_with"] == RPI_RUNTIME
    assert manifest["onnxruntime"]["reference_outputs_from"] == ort.__version__
    assert manifest["opset"] == {"ai.onnx": 17}
    # no feed: a random input at the size given as shapes
    assert manifest["inputs"][0]["shape"] == ["N", 3, 9, 8] and manifest["inputs"][0]["reference_shape"] == [1, 3, 9, 8]
    assert manifest["outputs"][0]["name"] == "y" and manifest["outputs"][0]["dtype"] == "float32"
    config = (bundle / "model.required_operators.config").read_text()
    assert "Conv" in config and "/tmp" not in config
    build = (bundle / "BUILD.md").read_text()
    for flag in (f"--branch v{RPI_RUNTIME}", "--minimal_build", "--include_ops_by_config ../model.required_operators.config",
                 "--config MinSizeRel", "--build_wheel", "--skip_tests", "--disable_ml_ops"):
        assert flag in build
    for script in ("run.py", "runner.py"):  # the device's Python may be older than this one
        ast.parse((bundle / script).read_text(), feature_version=(3, 8))


def test_run_py_passes_with_the_installed_onnxruntime(small_bundle):
    """The installed onnxruntime is newer than 1.19.2, and reads the ORT format 1.19.2 wrote."""
    bundle, manifest, _ = small_bundle
    status, report = run_py(bundle, "--runs", 3, "--warmup", 1, "--threads", 1)
    assert status == 0 and report["ok"] is True, report
    assert report["onnxruntime"] == ort.__version__ and report["made_for"] == RPI_RUNTIME
    assert report["parity"]["passed"] and report["parity"]["max_rel_error"] <= TOLERANCE
    assert report["latency_ms"]["p50"] > 0 and report["latency_ms"]["p90"] >= report["latency_ms"]["p50"]
    assert report["providers"][-1] == "CPUExecutionProvider" and report["threads"] == 1
    wanted_xnnpack = "XNNPACKExecutionProvider" in manifest["target"]["providers"]
    has_xnnpack = "XNNPACKExecutionProvider" in ort.get_available_providers()
    assert ("XNNPACKExecutionProvider" in report["providers_unavailable"]) == (wanted_xnnpack and not has_xnnpack)


@pytest.mark.parametrize("kind", ["original", "factorized"])
def test_yolo_rpi5_bundle(kind, yolo_bundles, yolo_models, photo):
    bundle, manifest = yolo_bundles[kind]
    check_bundle(bundle, manifest, yolo_models[kind])
    feed, _ = reference(bundle, manifest)
    np.testing.assert_array_equal(feed["images"], photo["images"])  # the real photo, not a made-up input
    assert manifest["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert manifest["outputs"][0]["reference_shape"] == [1, 22, 2100]
    assert manifest["onnxruntime"]["ort_format_version"]
    status, report = run_py(bundle, "--runs", 2, "--warmup", 1, "--threads", 1)
    assert status == 0 and report["parity"]["passed"], report


def test_factorized_bundle_is_smaller(yolo_bundles):
    sizes = {kind: manifest["files"]["model.ort"]["bytes"] for kind, (_, manifest) in yolo_bundles.items()}
    assert sizes["factorized"] < 0.75 * sizes["original"]


def test_onnx_bundle_for_x86_keeps_external_weights(tmp_path):
    source = tmp_path / "src" / "model.onnx"
    source.parent.mkdir()
    onnx.save(convnet(np.random.default_rng(1)).proto, source, save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    bundle, manifest = make_bundle(source, "x86-cpu", tmp_path / "bundle", shapes=CONVNET_SIZE)
    assert manifest["model"] == "model.onnx" and "BUILD.md" not in manifest["files"]
    assert manifest["onnxruntime"]["runtime_version"] == ort.__version__  # "installed"
    check_bundle(bundle, manifest, source)
    shutil.rmtree(source.parent)  # the bundle stands alone
    status, report = run_py(bundle, "--runs", 1, "--warmup", 0)
    assert status == 0 and report["ok"], report


def test_tampered_reference_fails(small_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle[0], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    with np.load(bundle / "reference.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["output_0"] = arrays["output_0"] * 1.01  # 1% off: ten times the tolerance
    np.savez(bundle / "reference.npz", **arrays)

    status, report = run_py(bundle, "--runs", 1)
    assert status == 2 and not report["ok"]
    assert "reference.npz" in report["error"] and "checksum" in report["error"]

    data = (bundle / "reference.npz").read_bytes()  # the same edit, with the manifest updated to match
    manifest["files"]["reference.npz"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    status, report = run_py(bundle, "--runs", 1)
    assert status == 1 and report["ok"] is False and report["parity"]["passed"] is False
    assert report["parity"]["max_rel_error"] == pytest.approx(0.01 / 1.01, rel=1e-3)


def test_older_onnxruntime_is_refused(tmp_path):
    """An ORT-format bundle made for the installed (newer) onnxruntime, run by 1.19.2: a clear error."""
    target = tmp_path / "pi-new-ort.toml"
    target.write_text('description = "a Pi with the newest onnxruntime"\narch = "aarch64"\nbackend = "onnxruntime"\n'
                      'precision = "fp32"\nformat = "ort"\nruntime_version = "installed"\n')
    bundle, manifest = make_bundle(small_model(tmp_path), load_target(target), tmp_path / "bundle", shapes=CONVNET_SIZE)
    assert manifest["onnxruntime"]["runtime_version"] == ort.__version__
    older = ort_runtime(RPI_RUNTIME, progress=False)
    status, report = run_py(bundle, pythonpath=older.path)
    assert status == 2 and report["onnxruntime"] == RPI_RUNTIME
    assert report["error"].startswith(f"onnxruntime {RPI_RUNTIME} is installed, but this bundle's model.ort was made "
                                      f"for onnxruntime {ort.__version__}")


@pytest.mark.parametrize("case, expected", [
    ("custom", f"node 'my_bar' (op com.example.Bar, opset 1): not supported by onnxruntime {RPI_RUNTIME}"),
    ("deformconv", f"node 'dcn' (op DeformConv, opset 19): not supported by onnxruntime {RPI_RUNTIME}"),
    ("opset22", f"opset 22 (ai.onnx) is newer than onnxruntime {RPI_RUNTIME} supports (up to 21)"),
])
def test_unsupported_op_names_the_node(case, expected, tmp_path):
    if case == "custom":
        model = single_node_model(tmp_path, "custom.onnx", helper.make_node("Bar", ["x", "w"], ["y"], name="my_bar",
                                                                            domain="com.example"), domains=["com.example"])
    elif case == "deformconv":  # standard ONNX since opset 19; onnxruntime has it from 1.20 on
        model = single_node_model(tmp_path, "deform.onnx", helper.make_node("DeformConv", ["x", "w", "offset"], ["y"],
                                                                            name="dcn"), opset=19, ir_version=9)
    else:
        model = single_node_model(tmp_path, "new.onnx", helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
                                  opset=22, ir_version=10)
    dest = tmp_path / "bundle"
    dest.mkdir()
    with pytest.raises(EdgelrError) as caught:
        write_ort_bundle(model, load_target("rpi5"), dest, progress=False)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert not any(dest.iterdir())  # nothing left behind


def test_bad_inputs_are_one_line_errors(small_bundle, tmp_path):
    source = small_bundle[2]
    rpi5 = load_target("rpi5")
    good = np.zeros((1, 3, 9, 8), np.float32)

    folders = itertools.count()

    def error(feed=None, model=source, target=rpi5, dest=None, shapes=CONVNET_SIZE) -> str:
        if dest is None:
            dest = tmp_path / f"bundle{next(folders)}"
            dest.mkdir()
        with pytest.raises(EdgelrError) as caught:
            write_ort_bundle(model, target, dest, feed, shapes=shapes if model == source else None, progress=False)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert "no array for 'x'; 'images' is not an input; the model's inputs are x" in error({"images": good})
    assert "'extra' is not an input" in error({"x": good, "extra": good})
    assert "is float64; the model takes float32" in error({"x": good.astype(np.float64)})
    assert "has shape [1, 3, 9]; the model takes [N, 3, 9, 8]" in error({"x": good[..., 0]})
    assert "has shape [1, 3, 8, 8]" in error({"x": good[..., :8, :]})
    assert "no such file" in error(model=tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert "not a readable ONNX model" in error(model=tmp_path / "junk.onnx")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    assert "not empty" in error(dest=full)
    assert "not an ONNX Runtime bundle" in error(target=load_target("jetson-orin"))
    bad_version = tmp_path / "bad-version.toml"
    bad_version.write_text(load_target("rpi5").path.read_text().replace('"1.19.2"', '"0.0.1"'))
    assert "onnxruntime 0.0.1: pip could not download its wheel" in error(target=load_target(bad_version))

    text_model = tmp_path / "text.onnx"  # a string input: nothing edgelr can make up
    onnx.save(make_model([helper.make_node("Identity", ["s"], ["t"])],
                         [helper.make_tensor_value_info("s", TensorProto.STRING, [2])],
                         [helper.make_tensor_value_info("t", TensorProto.STRING, [2])]), text_model)
    assert "input 's' is a tensor(string), which edgelr cannot make up; pass real inputs (--calib DATA.npz)" in \
        error(model=text_model, target=load_target("x86-cpu"))
    assert "input 'x' has dynamic dims [N, 3, 9, 8]; give --shapes x=1x3x9x8 (or --calib DATA.npz)" in error(shapes=None)


def test_random_inputs_the_model_cannot_run_say_what_to_give(yolo, tmp_path):
    """YOLOv8n's height and width are dynamic: a 1x1 image is not one the model can run."""
    with pytest.raises(EdgelrError, match=r"cannot run the model on random inputs \(images 1x3x1x1\): .*; give the sizes "
                                          r"it takes with --shapes, or real inputs with --calib$"):
        write_ort_bundle(yolo, load_target("rpi5"), tmp_path, shapes={"images": ((1, 3, 1, 1),) * 3}, progress=False)
    assert not any(tmp_path.iterdir())


def test_run_py_reports_bad_options_as_json(small_bundle):
    status, report = run_py(small_bundle[0], "--runs", -1)
    assert status == 2 and "need runs >= 0" in report["error"]
    status, report = run_py(small_bundle[0], "--frobnicate")
    assert status == 2 and "unrecognized arguments: --frobnicate" in report["error"]


# --- slow tier: the Pi's CPU architecture, emulated ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["original", "factorized"])
def test_yolo_rpi5_bundle_under_aarch64_emulation(kind, yolo_bundles):
    if shutil.which(QEMU) is None:
        pytest.skip(f"needs {QEMU} (apt-get install -y qemu-user-static)")
    bundle, _ = yolo_bundles[kind]
    done = run_bundle(bundle, ["--runs", "1", "--warmup", "0"], progress=False)
    report = done.report
    assert done.returncode == 0 and report["ok"], report
    assert report["machine"] == "aarch64" and report["onnxruntime"] == RPI_RUNTIME
    assert report["parity"]["max_rel_error"] <= TOLERANCE
