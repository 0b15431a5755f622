"""The `edgelr` command on bad input: one clear error line, a non-zero exit, nothing written, inputs untouched.

Every case runs the real CLI in a subprocess (`python -m edgelr ...`), with progress bars on as a user has
them. "One line" means what a terminal leaves visible: argparse's usage lines and progress bars that
overwrite themselves with \\r do not count; anything else on stderr (a traceback, a log line) does.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


# --- models and data ---------------------------------------------------------------------------
def _model(nodes, inputs, outputs, weights, name="g") -> onnx.ModelProto:
    inits = [numpy_helper.from_array(array, key) for key, array in weights.items()]
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, inits), opset_imports=OPSET)
    onnx.checker.check_model(model)
    return model


def _mlp(rng) -> onnx.ModelProto:
    """x [N,16] -> MatMul 16x32 -> Relu -> Gemm(transB=1) 32->8 -> y."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    weights = {
        "W1": rng.standard_normal((16, 32)).astype(np.float32),
        "W2": rng.standard_normal((8, 32)).astype(np.float32),
        "b2": rng.standard_normal(8).astype(np.float32),
    }
    return _model(nodes, [x], [y], weights, "mlp")


def _tokens(rng) -> onnx.ModelProto:
    """int64 ids [N,5] -> Gather(embedding) -> MatMul -> y [N,5,8]."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 8])
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "W"], ["y"], name="proj"),
    ]
    weights = {"E": rng.standard_normal((10, 16)).astype(np.float32), "W": rng.standard_normal((16, 8)).astype(np.float32)}
    return _model(nodes, [ids], [y], weights, "tokens")


def _conv(rng, pads=(1, 1, 1, 1)) -> onnx.ModelProto:
    """x [N,3,H,W] (dynamic spatial dims) -> Conv 3x3 3->16."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, "H2", "W2"])
    nodes = [helper.make_node("Conv", ["x", "K"], ["y"], name="conv", kernel_shape=[3, 3], pads=list(pads))]
    return _model(nodes, [x], [y], {"K": rng.standard_normal((16, 3, 3, 3)).astype(np.float32)}, "conv")


def _relu_add() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])]
    return _model(nodes, [x], [y], {}, "plain")


def _two_inputs(rng) -> onnx.ModelProto:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 16])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    nodes = [helper.make_node("MatMul", ["a", "W"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["y"])]
    return _model(nodes, [a, b], [y], {"W": rng.standard_normal((16, 8)).astype(np.float32)}, "two")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every input file the cases need, in one read-only-by-convention folder."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    f = {}

    def model(key, proto):
        f[key] = root / f"{key}.onnx"
        onnx.save(proto, f[key])

    def npz(key, **arrays):
        f[key] = root / f"{key}.npz"
        np.savez(f[key], **arrays)

    model("mlp", _mlp(rng))
    model("tokens", _tokens(rng))
    model("conv", _conv(rng))
    model("conv_nopad", _conv(rng, pads=(0, 0, 0, 0)))
    model("relu_add", _relu_add())
    model("two", _two_inputs(rng))
    data = f["mlp"].read_bytes()
    f["truncated"] = root / "truncated.onnx"
    f["truncated"].write_bytes(data[: len(data) // 2])
    f["text"] = root / "notes.onnx"
    f["text"].write_text("These are my notes about the model, not the model.\n" * 20)
    f["folder"] = root / "a_folder.onnx"
    f["folder"].mkdir()

    x = rng.standard_normal((6, 16)).astype(np.float32)
    npz("calib", x=x)
    npz("wrong_name", z=x)
    npz("wrong_rank", x=rng.standard_normal((6, 2, 2, 16)).astype(np.float32))
    npz("wrong_shape", x=rng.standard_normal((6, 15)).astype(np.float32))
    npz("int_for_float", x=rng.integers(0, 10, (6, 16)))
    npz("float_for_int", ids=rng.standard_normal((6, 5)))
    npz("empty")
    npz("counts", a=rng.standard_normal((6, 16)).astype(np.float32), b=rng.standard_normal((5, 8)).astype(np.float32))
    npz("too_small", x=rng.standard_normal((2, 3, 1, 1)).astype(np.float32))  # a 3x3 conv needs 3x3
    f["text_npz"] = root / "text.npz"
    f["text_npz"].write_text("x = 1, 2, 3\n")
    f["npy"] = root / "samples.npy"
    np.save(f["npy"], x)
    f["pickle"] = root / "samples.pkl"
    f["pickle"].write_bytes(pickle.dumps({"x": x}))
    return f


# --- running the CLI and judging what it printed -------------------------------------------------
def run_edgelr(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run the CLI; stdout/stderr decoded by hand, since text=True would turn progress bars' \r into \n."""
    result = subprocess.run([sys.executable, "-m", "edgelr", *map(str, args)], check=False, capture_output=True, cwd=cwd,
                            timeout=300, env=os.environ | {"EDGELR_PROGRESS": "bars"})  # the bars a terminal gets, piped
    result.stdout = result.stdout.decode("utf-8", "replace")
    result.stderr = result.stderr.decode("utf-8", "replace")
    return result


def visible_lines(stderr: str) -> list[str]:
    """Lines as a terminal shows them: a progress bar rewritten with \\r leaves only its last state."""
    lines = (line.rsplit("\r", 1)[-1].rstrip() for line in stderr.split("\n"))
    return [line for line in lines if line]


def error_lines(stderr: str) -> list[str]:
    """Visible lines, less argparse's usage block ('usage: ...' and its indented continuation)."""
    return [line for line in visible_lines(stderr) if not line.startswith(("usage:", " "))]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else f"<{path.exists()}>"


def assert_clean_failure(result, folder: Path, before: set[str], *fragments: str) -> str:
    """Non-zero exit, exactly one error line naming the problem, no traceback, nothing new in FOLDER."""
    assert result.returncode != 0, f"exit 0 on bad input; stdout:\n{result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, f"expected one error line, got {len(errors)}:\n" + "\n".join(errors)
    line = errors[0]
    assert line.startswith("edgelr") and "error:" in line, line
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
    after = {p.name for p in folder.iterdir()}
    assert after == before, f"files left behind: {sorted(after - before)}"
    assert not any(name.startswith(".edgelr-") for name in after)
    return line


# --- the cases -----------------------------------------------------------------------------------
# (id, command line built from `files` and the output folder, text the error line must contain).
# {out} is OUT.onnx in a fresh empty folder; {name} is files[name].
CASES = [
    # the model
    ("text-file", "compress {text} -o {out} --params 0.5", ["not a readable ONNX model"]),
    ("truncated", "compress {truncated} -o {out} --params 0.5", ["not a readable ONNX model"]),
    ("missing", "compress {missing} -o {out} --params 0.5", ["no such file"]),
    ("directory", "compress {folder} -o {out} --params 0.5", ["folder"]),
    ("nothing-to-factorize", "compress {relu_add} -o {out} --params 0.5", ["no factorizable"]),
    ("inspect-text-file", "inspect {text}", ["not a readable ONNX model"]),
    ("inspect-truncated", "inspect {truncated}", ["not a readable ONNX model"]),
    ("inspect-missing", "inspect {missing}", ["no such file"]),
    ("inspect-directory", "inspect {folder}", ["folder"]),
    # the calibration file
    ("calib-names", "compress {mlp} -o {out} --params 0.5 --calib {wrong_name}", ["'z'", "'x'"]),
    ("calib-rank", "compress {mlp} -o {out} --params 0.5 --calib {wrong_rank}", ["rank"]),
    ("calib-shape", "compress {mlp} -o {out} --params 0.5 --calib {wrong_shape}", ["(6, 15)", "16"]),
    ("calib-float-for-int64", "compress {tokens} -o {out} --params 0.5 --calib {float_for_int}", ["float64", "int64"]),
    ("calib-int-for-float", "compress {mlp} -o {out} --params 0.5 --calib {int_for_float}", ["int64", "float32"]),
    ("calib-text-file", "compress {mlp} -o {out} --params 0.5 --calib {text_npz}", ["npz"]),
    # np.load gives an ndarray for a .npy, which is no context manager: it must still be one clear line
    ("calib-npy-not-npz", "compress {mlp} -o {out} --params 0.5 --calib {npy}", ["npz"]),
    ("calib-pickle", "compress {mlp} -o {out} --params 0.5 --calib {pickle}", ["npz"]),
    ("calib-empty", "compress {mlp} -o {out} --params 0.5 --calib {empty}", ["'x'"]),
    ("calib-sample-counts", "compress {two} -o {out} --params 0.5 --calib {counts}", ["same number"]),
    ("calib-missing", "compress {mlp} -o {out} --params 0.5 --calib {missing_npz}", ["not found"]),
    # ONNX Runtime rejects the sample (1x1 image, 3x3 kernel): its own log line must not reach the user
    ("calib-does-not-run", "compress {conv_nopad} -o {out} --params 0.5 --calib {too_small}", ["sample 0"]),
    ("inspect-calib-names", "inspect {mlp} --calib {wrong_name}", ["'z'"]),
    # sizes: --shapes, and the one-line hint where a dynamic dim has no size (--calib, --shapes, model metadata)
    ("profile-no-sizes", "profile {conv} --runs 1", ["input 'x' has dynamic dims [N, 3, H, W]",
                                                     "give --shapes x=1x3x640x640 (or --calib DATA.npz)"]),
    ("export-no-sizes", "export {conv} --target x86-cpu -o {out}", ["give --shapes x=1x3x640x640"]),
    ("profile-shapes-text", "profile {conv} --shapes x:1x3x8x8", ["--shapes", "NAME=DIMS", "e.g. x=1x3x640x640"]),
    ("export-shapes-rank", "export {conv} --target x86-cpu -o {out} --shapes x=1x3x8", ["has 3 dims"]),
    ("inspect-shapes-name", "inspect {conv} --shapes y=1x3x8x8", ["--shapes", "'y'", "its inputs: x"]),
    ("profile-calib-outside-shapes", "profile {conv} --calib {too_small} --shapes x=1x3x8x8", ["--calib", "--shapes"]),
    ("profile-threads-0", "profile {mlp} --threads 0", ["--threads"]),
    ("export-threads-tensorrt", "export {mlp} --target rtx -o {out} --threads 2", ["--threads", "TensorRT"]),
    ("export-precision-ort", "export {mlp} --target x86-cpu -o {out} --precision int8", ["--precision int8"]),
    ("profile-unknown-target", "profile {mlp} --target pi9", ["unknown target 'pi9'"]),
    # the budget
    ("params-0", "compress {mlp} -o {out} --params 0", ["--params", "(0, 1]"]),
    ("params-1.5", "compress {mlp} -o {out} --params 1.5", ["--params", "(0, 1]"]),
    ("flops-negative", "compress {mlp} -o {out} --flops -1", ["--flops"]),
    ("params-abc", "compress {mlp} -o {out} --params abc", ["--params", "abc"]),
    ("params-and-flops", "compress {mlp} -o {out} --params 0.5 --flops 0.5", ["--params", "--flops"]),
    ("no-budget", "compress {mlp} -o {out}", ["--params", "--flops"]),
    ("max-error-0", "compress {mlp} -o {out} --max-error 0", ["--max-error"]),
    ("flops-dynamic-no-calib", "compress {conv} -o {out} --flops 0.5", ["--calib"]),
    # where things go
    ("output-missing-folder", "compress {mlp} -o {out_missing} --params 0.5", ["does not exist"]),
    ("report-missing-folder", "compress {mlp} -o {out} --params 0.5 --report {report_missing}", ["does not exist"]),
    ("report-is-the-model", "compress {mlp} -o {out} --params 0.5 --report {mlp}", ["input"]),
    ("output-is-a-folder", "compress {mlp} -o {outdir} --params 0.5", ["folder"]),
]


@pytest.mark.parametrize("case_id, template, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(files, tmp_path, case_id, template, fragments):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    names = dict(files)
    names.update(
        out=out_dir / "small.onnx",
        outdir=out_dir,
        out_missing=out_dir / "no_such_folder" / "small.onnx",
        report_missing=out_dir / "no_such_folder" / "report.json",
        missing=tmp_path / "no_such_model.onnx",
        missing_npz=tmp_path / "no_such_data.npz",
    )
    inputs = {key: digest(path) for key, path in files.items()}
    result = run_edgelr(*template.format(**names).split())
    assert_clean_failure(result, out_dir, set(), *fragments)
    assert {key: digest(path) for key, path in files.items()} == inputs, "an input file changed"


def test_output_equal_to_input_is_refused(files, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(files["mlp"], model)
    before = digest(model)
    for spelling in ("model.onnx", "./model.onnx", str(model)):
        result = run_edgelr("compress", "model.onnx", "-o", spelling, "--params", "0.5", cwd=tmp_path)
        assert_clean_failure(result, tmp_path, {"model.onnx"}, "input")
        assert digest(model) == before


@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_writing_over_the_calibration_file_is_refused(files, tmp_path, flag):
    """Neither the model nor the report may land on the user's calibration data."""
    calib = tmp_path / "data.npz"
    shutil.copy(files["calib"], calib)
    before = digest(calib)
    args = ["-o", calib] if flag == "-o" else ["-o", tmp_path / "small.onnx", "--report", calib]
    result = run_edgelr("compress", files["mlp"], *args, "--params", "0.5", "--calib", calib)
    assert digest(calib) == before, "the calibration file was overwritten"
    assert_clean_failure(result, tmp_path, {"data.npz"}, "data.npz")


def test_report_path_equal_to_output_is_refused(files, tmp_path):
    """`-o x.onnx --report x.onnx` would write the model and then overwrite it with the JSON."""
    out = tmp_path / "small.onnx"
    result = run_edgelr("compress", files["mlp"], "-o", out, "--params", "0.5", "--report", out)
    assert_clean_failure(result, tmp_path, set(), "small.onnx")


def test_calib_that_is_not_an_npz_says_so_without_numpy_advice(files, tmp_path):
    """numpy's 'load it unsafely using allow_pickle=' is advice a CLI user cannot follow."""
    for key in ("text_npz", "pickle"):
        result = run_edgelr("compress", files["mlp"], "-o", tmp_path / "o.onnx", "--params", "0.5", "--calib", files[key])
        line = assert_clean_failure(result, tmp_path, set(), "npz")
        assert "allow_pickle" not in line, line


# --- the happy path ------------------------------------------------------------------------------
def test_compress_writes_model_and_report(files, tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    before = digest(files["mlp"]), digest(files["calib"])
    result = run_edgelr("compress", files["mlp"], "-o", out, "--params", "0.5", "--calib", files["calib"], "--report", report,
                        "--max-output-error", "1")  # a random toy MLP at half its parameters is 0.23 off
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # only progress bars, which clear themselves, and the warning that 6 samples cannot determine a layer
    assert [line for line in error_lines(result.stderr) if "fewer input rows" not in line] == [], result.stderr
    assert (digest(files["mlp"]), digest(files["calib"])) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "small.onnx"]

    onnx.checker.check_model(onnx.load(out), full_check=True)
    data = json.loads(report.read_text())
    rows = {row["name"]: row for row in data["layers"]}
    assert set(rows) == {"fc1", "fc2"}
    for row in rows.values():
        for key in ("op", "form", "rank", "params_before", "params_after", "flops_before", "flops_after", "error"):
            assert key in row
    assert any(row["form"] != "dense" for row in rows.values())
    totals = data["totals"]
    assert totals["params_before"] == 16 * 32 + 8 * 32
    assert totals["params_after"] <= 0.5 * totals["params_before"] + 1e-9
    assert totals["flops_before"] is not None  # known from the calibration samples
    assert data["data_aware"] is True
    assert set(data["output_error"]) >= {"y", "worst"}
    assert 0 <= data["output_error"]["worst"] < 1
    assert "layer" in result.stdout and "total" in result.stdout and "fc1" in result.stdout
    assert "relative output error on the calibration samples" in result.stdout


def test_compress_quiet_without_calibration(files, tmp_path):
    out = tmp_path / "small.onnx"
    result = run_edgelr("-q", "compress", files["tokens"], "-o", out, "--params", "0.5")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == ["small.onnx"]
    assert "no calibration data" in result.stdout


def test_compress_with_int64_calibration(files, tmp_path):
    data = tmp_path / "tokens.npz"
    np.savez(data, ids=np.random.default_rng(1).integers(0, 10, (6, 5)))
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    result = run_edgelr("-q", "compress", files["tokens"], "-o", out, "--flops", "0.5", "--calib", data, "--report", report,
                        "--max-output-error", "1")  # a random toy model: its error is not what this tests
    assert result.returncode == 0, result.stderr
    rows = json.loads(report.read_text())["layers"]
    assert [r["name"] for r in rows] == ["proj"] and rows[0]["form"] == "svd"


def test_inspect_prints_a_table(files):
    result = run_edgelr("inspect", files["mlp"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["layer", "op", "weight", "input", "forms", "params", "FLOPs"]
    assert set(lines[1]) <= {"-", " "}
    body = {line.split()[0]: line.split() for line in lines[2:] if line.strip()}
    assert body["fc1"][1:3] == ["MatMul", "16x32"]
    assert body["fc2"][1:3] == ["Gemm", "8x32"]
    assert "total" in body


def test_inspect_with_calib_learns_dynamic_sizes(files, tmp_path):
    data = tmp_path / "images.npz"
    np.savez(data, x=np.zeros((2, 3, 8, 8), np.float32))
    plain = run_edgelr("inspect", files["conv"])
    seen = run_edgelr("inspect", files["conv"], "--calib", data)
    assert plain.returncode == seen.returncode == 0, plain.stderr + seen.stderr
    conv_plain = next(line for line in plain.stdout.splitlines() if line.startswith("conv "))
    conv_seen = next(line for line in seen.stdout.splitlines() if line.startswith("conv "))
    assert conv_plain.split()[-1] == "?"  # FLOPs unknown without sizes
    assert conv_seen.split()[-1] != "?" and "[1,3,8,8]" in conv_seen
