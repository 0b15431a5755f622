"""Input sizes (`edgelr.io.shapes`): --shapes texts, the model's own metadata, the one-line hint, made-up feeds;
and every command that needs sizes (inspect, profile, export to an ONNX Runtime and a TensorRT target) on a
small model with dynamic dims, with and without them. Real ONNX Runtime sessions, real TensorRT-RTX builds.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgelr.errors import EdgelrError
from edgelr.io.samples import samples_from_arrays
from edgelr.io.shapes import (
    SizesUnknown,
    input_feed,
    metadata_sizes,
    parse_shapes,
    random_feed,
    resolve_shapes,
    shape_texts,
)

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None


# --- models -------------------------------------------------------------------------------------------------
def conv_model(folder: Path, name: str = "conv.onnx", dims=("N", 3, "H", "W"), metadata: dict | None = None) -> Path:
    """x [dims] -> 3x3 Conv (padded) 3->4 -> y: any H, W from 1 up."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    kernel = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "K")
    node = helper.make_node("Conv", ["x", "K"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    proto = helper.make_model(helper.make_graph([node], "conv", [x], [y], [kernel]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    path = folder / name
    onnx.save(proto, path)
    return path


def two_inputs(folder: Path) -> Path:
    """a [N, 4] float, ids [N, T] int64, mask [N] bool -> y = a (Identity; the others only have to be fed)."""
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"]),
              helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N"])]
    nodes = [helper.make_node("Identity", ["a"], ["y"]), helper.make_node("Identity", ["ids"], ["i"]),
             helper.make_node("Identity", ["mask"], ["m"])]
    outputs = [helper.make_tensor_value_info(n, t, None) for n, t in (("y", 1), ("i", 7), ("m", 9))]
    proto = helper.make_model(helper.make_graph(nodes, "two", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8)
    path = folder / "two.onnx"
    onnx.save(proto, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("shapes")
    return {
        "dynamic": conv_model(d),
        "batch_only": conv_model(d, "batch.onnx", ("N", 3, 8, 8)),
        "static": conv_model(d, "static.onnx", (1, 3, 8, 8)),
        "ultralytics": conv_model(d, "ultra.onnx", ("batch", 3, "height", "width"),
                                  {"imgsz": "[16, 24]", "batch": "1", "author": "Ultralytics"}),
        "square": conv_model(d, "square.onnx", ("batch", 3, "height", "width"), {"imgsz": "32"}),
        "junk_metadata": conv_model(d, "junk.onnx", ("batch", 3, "height", "width"), {"imgsz": "big", "batch": "x"}),
        "two": two_inputs(d),
    }


def load(path: Path) -> ir.Model:
    return ir.load(path)


def edgelr(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelr", "-q", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, check=False)


def one_error_line(run: subprocess.CompletedProcess, *words: str) -> str:
    assert run.returncode == 1, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- parsing ------------------------------------------------------------------------------------------------
def test_parse_fixed_and_range_forms():
    got = parse_shapes(["images=1x3x320x320", " mask = 2X5 ", "x=1x3x8x8:2x3x16x16:4x3x32x32"])
    assert got == {
        "images": ((1, 3, 320, 320),) * 3,
        "mask": ((2, 5),) * 3,
        "x": ((1, 3, 8, 8), (2, 3, 16, 16), (4, 3, 32, 32)),
    }
    assert shape_texts(got) == ["images=1x3x320x320", "mask=2x5", "x=1x3x8x8:2x3x16x16:4x3x32x32"]
    assert parse_shapes([]) == {} and parse_shapes(None) == {}


@pytest.mark.parametrize("text, words", [
    ("x", ["write NAME=DIMS or NAME=MIN:OPT:MAX", "e.g. x=1x3x640x640"]),
    ("=1x3x8x8", ["write NAME=DIMS"]),
    ("x=", ["write NAME=DIMS"]),
    ("x=1x3xax8", ["'x=1x3xax8'", "e.g. x=1x3x640x640"]),
    ("x=1x0x8x8", ["e.g. x=1x3x640x640"]),
    ("x=1x3x8x8:2x3x8x8", ["NAME=MIN:OPT:MAX"]),
    ("x=1x3x8x8:1x3x8:1x3x8x8", ["same number of dims"]),
    ("x=1x3x8x8:1x3x4x4:1x3x8x8", ["min <= opt <= max"]),
])
def test_bad_shapes_text_is_one_line_with_the_models_own_example(models, text, words):
    with pytest.raises(EdgelrError) as caught:
        parse_shapes([text], load(models["dynamic"]))
    assert "\n" not in str(caught.value) and "--shapes" in str(caught.value)
    for word in words:
        assert word in str(caught.value)


def test_bad_text_example_uses_the_model_file_or_the_metadata(models):
    with pytest.raises(EdgelrError, match=r"e\.g\. x=1x3x16x24$"):
        parse_shapes(["images:1x3x8x8"], models["ultralytics"])  # a path: read only to write the example
    with pytest.raises(EdgelrError, match=r"e\.g\. x=1x3x640x640$"):
        parse_shapes(["x"], models["dynamic"])
    with pytest.raises(EdgelrError, match="given twice"):
        parse_shapes(["x=1x3x8x8", "x=1x3x9x9"])


# --- metadata and resolution ------------------------------------------------------------------------------------
def test_ultralytics_metadata_sizes_the_image_input(models):
    assert metadata_sizes(load(models["ultralytics"])) == {"x": (1, 3, 16, 24)}
    assert metadata_sizes(load(models["square"])) == {"x": (1, 3, 32, 32)}  # one number: square; batch 1
    assert metadata_sizes(load(models["junk_metadata"])) == {}
    assert metadata_sizes(load(models["dynamic"])) == {}


def test_resolution_order_calib_then_shapes_then_metadata(models):
    model = load(models["ultralytics"])
    sizes = resolve_shapes(model)
    assert sizes.ranges == {"x": ((1, 3, 16, 24),) * 3} and sizes.sources == {"x": "metadata"}
    assert "x 1x3x16x24 (the model's metadata: imgsz, batch)" == sizes.describe()
    shapes = parse_shapes(["x=1x3x8x8"])
    assert resolve_shapes(model, shapes=shapes).fixed() == {"x": (1, 3, 8, 8)}
    samples = samples_from_arrays({"x": np.zeros((2, 1, 3, 12, 12), np.float32)}, model)
    assert resolve_shapes(model, samples=samples).fixed() == {"x": (1, 3, 12, 12)}
    # with both: the shapes set the range, the samples must fall inside it
    wide = parse_shapes(["x=1x3x8x8:1x3x12x12:2x3x16x16"])
    assert resolve_shapes(model, samples=samples, shapes=wide).ranges["x"] == wide["x"]
    with pytest.raises(EdgelrError, match=r"--calib's 'x' samples are 1x3x12x12, outside --shapes x=1x3x8x8"):
        resolve_shapes(model, samples=samples, shapes=shapes)
    assert resolve_shapes(load(models["static"])).sources == {"x": "static"}


def test_no_size_anywhere_is_one_line_naming_shapes(models):
    for key, example in (("dynamic", "x=1x3x640x640"), ("batch_only", "x=1x3x8x8"), ("junk_metadata", "x=1x3x640x640")):
        with pytest.raises(SizesUnknown) as caught:
            resolve_shapes(load(models[key]), where=models[key])
        message = str(caught.value)
        assert message.startswith(f"{models[key]}: input 'x' has dynamic dims [")
        assert message.endswith(f"; give --shapes {example} (or --calib DATA.npz)") and "\n" not in message
    with pytest.raises(SizesUnknown, match=r"inputs 'a' \[N, 4\], 'ids' \[N, T\], 'mask' \[N\] have dynamic dims; "
                                           r"give --shapes a=1x4 --shapes ids=1x640 --shapes mask=1 \(or"):
        resolve_shapes(load(models["two"]))


def test_shapes_that_do_not_fit_the_model(models):
    model = load(models["dynamic"])
    for text, message in (("x=1x3x8", "has 3 dims; the input has 4 ([N, 3, H, W])"),
                          ("x=1x4x8x8", "has 4 in dim 1, which the model fixes at 3"),
                          ("y=1x3x8x8", "--shapes given for 'y', which the model does not have; its inputs: x")):
        with pytest.raises(EdgelrError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]")):
            resolve_shapes(model, shapes=parse_shapes([text]))


def test_made_up_feeds_run_in_onnxruntime(models):
    import onnxruntime as ort

    model = load(models["two"])
    feed = input_feed(model, shapes=parse_shapes(["a=2x4", "ids=2x7", "mask=2"]))
    assert feed["a"].dtype == np.float32 and feed["a"].shape == (2, 4) and (0 <= feed["a"]).all() and (feed["a"] < 1).all()
    assert feed["ids"].dtype == np.int64 and set(np.unique(feed["ids"])) <= {0, 1}
    assert feed["mask"].dtype == np.bool_
    again = random_feed(model, {"a": (2, 4), "ids": (2, 7), "mask": (2,)})
    assert all(np.array_equal(feed[k], again[k]) for k in feed)  # deterministic
    session = ort.InferenceSession(str(models["two"]), providers=["CPUExecutionProvider"])
    assert session.run(["y"], feed)[0].shape == (2, 4)


# --- every command that needs sizes, through the CLI -------------------------------------------------------------
HINT = "input 'x' has dynamic dims [N, 3, H, W]; give --shapes x=1x3x640x640 (or --calib DATA.npz)"


@pytest.mark.parametrize("model, args, hint", [
    ("dynamic", ["profile", "--runs", 1], HINT),
    ("dynamic", ["export", "--target", "rpi5", "-o", "{out}"], HINT),
    ("dynamic", ["export", "--target", "rtx", "-o", "{out}"], HINT),
    ("batch_only", ["export", "--target", "x86-cpu", "-o", "{out}"], "give --shapes x=1x3x8x8 (or --calib DATA.npz)"),
], ids=["profile", "export-rpi5", "export-rtx", "export-batch-only"])
def test_without_sizes_a_command_says_shapes_in_one_line(models, tmp_path, model, args, hint):
    args = [str(a).format(out=tmp_path / "out") for a in args]
    one_error_line(edgelr(args[0], models[model], *args[1:]), "--shapes", hint)
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging folder left


def test_inspect_without_sizes_prints_the_table_and_how_to_get_flops(models):
    run = edgelr("inspect", models["dynamic"])
    assert run.returncode == 0, run.stderr
    conv = next(line for line in run.stdout.splitlines() if line.startswith("conv "))
    assert conv.split()[-1] == "?" and f"FLOPs need the input sizes: {HINT}" in run.stdout


@pytest.mark.parametrize("text, words", [
    ("x", ["--shapes 'x': write NAME=DIMS or NAME=MIN:OPT:MAX, e.g. x=1x3x640x640"]),
    ("x=1x3x8x8:1x3x8x8", ["NAME=MIN:OPT:MAX", "e.g. x=1x3x640x640"]),
    ("x=1x3xbigx8", ["'x=1x3xbigx8'", "e.g. x=1x3x640x640"]),
    ("x=1x3x8", ["has 3 dims; the input has 4"]),
    ("images=1x3x8x8", ["--shapes given for 'images'", "its inputs: x"]),
])
def test_bad_shapes_through_the_cli(models, text, words):
    one_error_line(edgelr("profile", models["dynamic"], "--shapes", text, "--runs", 1), *words)


@pytest.mark.parametrize("command, text, words", [
    ("inspect", "x=1x3", ["has 2 dims; the input has 4"]),
    ("inspect", "x=1x3x8x8:9", ["e.g. x=1x3x640x640"]),
    ("export", "x=1x3", ["has 2 dims; the input has 4"]),
    ("export", "x=1x3x8x8:9", ["e.g. x=1x3x640x640"]),
])
def test_bad_shapes_mean_the_same_in_inspect_and_export(models, tmp_path, command, text, words):
    extra = ["--target", "x86-cpu", "-o", tmp_path / "b"] if command == "export" else []
    one_error_line(edgelr(command, models["dynamic"], "--shapes", text, *extra), *words)
    assert not (tmp_path / "b").exists()


def test_profile_with_shapes(models, tmp_path):
    run = edgelr("profile", models["dynamic"], "--shapes", "x=1x3x8x8", "--runs", 2, "--json", tmp_path / "p.json")
    assert run.returncode == 0, run.stderr
    assert "inputs: x 1x3x8x8 (--shapes)" in run.stdout
    assert json.loads((tmp_path / "p.json").read_text())["A"]["latency_ms"]["p50"] > 0
    # a range: ONNX Runtime runs at OPT
    run = edgelr("profile", models["dynamic"], "--shapes", "x=1x3x4x4:1x3x6x6:1x3x8x8", "--runs", 1)
    assert run.returncode == 0 and "x 1x3x4x4:1x3x6x6:1x3x8x8 (--shapes)" in run.stdout, run.stderr


def test_export_and_inspect_with_shapes(models, tmp_path):
    run = edgelr("export", models["dynamic"], "--target", "x86-cpu", "-o", tmp_path / "b", "--shapes", "x=2x3x5x7",
                 "--threads", 3)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["inputs"][0]["reference_shape"] == [2, 3, 5, 7] and manifest["target"]["threads"] == 3
    run = edgelr("inspect", models["dynamic"], "--shapes", "x=1x3x8x8")
    conv = next(line for line in run.stdout.splitlines() if line.startswith("conv "))
    assert run.returncode == 0 and "[1,3,8,8]" in conv and conv.split()[-1] != "?", run.stdout + run.stderr


def test_metadata_sizes_a_model_without_flags(models, tmp_path):
    run = edgelr("profile", models["ultralytics"], "--runs", 2)
    assert run.returncode == 0, run.stderr
    assert "inputs: x 1x3x16x24 (the model's metadata: imgsz, batch)" in run.stdout
    run = edgelr("export", models["ultralytics"], "--target", "x86-cpu", "-o", tmp_path / "b")
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["inputs"][0]["reference_shape"] == [1, 3, 16, 24]


@pytest.mark.skipif(not HAS_RTX, reason="needs TensorRT for RTX: pip install -e .[trt]")
def test_tensorrt_profile_from_shapes_and_metadata(models, tmp_path):
    run = edgelr("export", models["dynamic"], "--target", "rtx", "-o", tmp_path / "range",
                 "--shapes", "x=1x3x8x8:2x3x16x16:4x3x32x32")
    assert run.returncode == 0, run.stderr
    profile = json.loads((tmp_path / "range" / "manifest.json").read_text())["profile"]
    assert profile == {"x": {"min": [1, 3, 8, 8], "opt": [2, 3, 16, 16], "max": [4, 3, 32, 32]}}
    assert "GPU parity" in run.stdout  # skipped, and why, where no GPU is
    run = edgelr("export", models["ultralytics"], "--target", "rtx", "-o", tmp_path / "meta")
    assert run.returncode == 0, run.stderr
    profile = json.loads((tmp_path / "meta" / "manifest.json").read_text())["profile"]
    assert profile == {"x": {"min": [1, 3, 16, 24], "opt": [1, 3, 16, 24], "max": [1, 3, 16, 24]}}
    one_error_line(edgelr("export", models["dynamic"], "--target", "rtx", "-o", tmp_path / "t", "--shapes", "x=1x3x8x8",
                          "--threads", 2), "--threads 2", "TensorRT")
