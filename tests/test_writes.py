"""Nothing broken is ever written: each model edgelr gives the user is loaded and run in ONNX Runtime before
it is moved into place, and a job killed at any stage leaves no output behind, only hidden `.edgelr-*` scratch.

The kills are real: the CLI runs in a subprocess with EDGELR_TEST_KILL_AT=STAGE, and edgelr.io.model.checkpoint
sends the process SIGKILL when it reaches that stage.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import graphs as G
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from edgelr.errors import EdgelrError
from edgelr.io import model as model_io

INPUTS = {"mlp.onnx", "calib.npz"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    built = G.mlp(rng, width=64)
    onnx.save(built.proto, folder / "mlp.onnx")
    np.savez(folder / "calib.npz", **built.inputs(rng, count=8))
    return folder


@pytest.fixture
def work(inputs, tmp_path) -> Path:
    for name in INPUTS:
        shutil.copy(inputs / name, tmp_path / name)
    return tmp_path


def edgelr(folder: Path, *args, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != model_io.KILL_AT}
    if kill_at is not None:
        env[model_io.KILL_AT] = kill_at
    return subprocess.run([sys.executable, "-m", "edgelr", *args], check=False, cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_killed_leaving_nothing(result: subprocess.CompletedProcess, folder: Path, before: set[str]) -> None:
    assert result.returncode == -signal.SIGKILL, f"the stage was never reached (exit {result.returncode}):\n{result.stderr}"
    new = {p.name for p in folder.iterdir()} - before
    assert all(name.startswith(".") and "edgelr-" in name for name in new), f"left behind: {sorted(new)}"


COMPRESS = ("compress", "mlp.onnx", "-o", "out.onnx", "--params", "0.9", "--calib", "calib.npz", "--quantize", "int8",
            "--float-output", "float.onnx", "--report", "report.json")


@pytest.mark.parametrize("stage", ["after-factorize", "after-quantize", "after-refit", "model-written", "judging",
                                   "model-ran"])
def test_a_kill_at_any_stage_of_compress_leaves_no_output(work, stage):
    assert_killed_leaving_nothing(edgelr(work, *COMPRESS, kill_at=stage), work, INPUTS)


def test_a_kill_after_running_an_uncalibrated_output_leaves_none(work):
    """Without samples the output is run on made-up inputs, beside OUT, before it moves."""
    result = edgelr(work, "compress", "mlp.onnx", "-o", "out.onnx", "--params", "0.9", kill_at="model-ran")
    assert_killed_leaving_nothing(result, work, INPUTS)


def test_the_same_compress_unkilled_writes_everything_and_no_scratch(work):
    """The control: the stages above lie on the way of a run that succeeds."""
    result = edgelr(work, *COMPRESS)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in work.iterdir()} == INPUTS | {"out.onnx", "float.onnx", "report.json"}


@pytest.mark.slow  # three runs of torch training
def test_a_kill_while_distilling_leaves_no_output(work):
    shutil.copy(work / "mlp.onnx", work / "student.onnx")
    args = ("-q", "distill", "mlp.onnx", "student.onnx", "--data", "calib.npz", "-o", "tuned.onnx", "--steps", "2",
            "--batch", "4")
    for stage in ("model-written", "model-ran"):
        assert_killed_leaving_nothing(edgelr(work, *args, kill_at=stage), work, INPUTS | {"student.onnx"})
    done = edgelr(work, *args)
    assert done.returncode == 0 and (work / "tuned.onnx").is_file(), done.stderr


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_kill_while_exporting_leaves_no_folder_and_an_earlier_bundle_whole(work):
    args = ("export", "mlp.onnx", "--target", "x86-cpu", "--calib", "calib.npz", "-o", "bundle")
    assert_killed_leaving_nothing(edgelr(work, *args, kill_at="folder-written"), work, INPUTS)
    done = edgelr(work, *args)
    assert done.returncode == 0, done.stderr
    earlier = _digests(work / "bundle")
    assert "model.onnx" in earlier and "manifest.json" in earlier
    assert_killed_leaving_nothing(edgelr(work, *args, kill_at="folder-written"), work, INPUTS | {"bundle"})
    assert _digests(work / "bundle") == earlier


# --- the one way a model reaches the user: Delivery / deliver ---------------------------------------------------
def _reshape_to(shape: list[int], batch: int | str) -> ir.Model:
    """x [batch, 16] reshaped to SHAPE: ONNX Runtime loads it, and a run fails when the sizes do not fit."""
    graph = h.make_graph([h.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
                         [h.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                         [nh.from_array(np.array(shape, dtype=np.int64), "shape")])
    return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8))


def test_a_model_onnx_runtime_cannot_run_is_not_written(tmp_path):
    out = tmp_path / "out.onnx"
    with pytest.raises(EdgelrError, match=r"out\.onnx: not written: ONNX Runtime cannot run"):
        model_io.deliver(_reshape_to([5, 7], "N"), out, feed={"x": np.ones((2, 16), np.float32)})
    assert list(tmp_path.iterdir()) == []


def test_without_a_feed_a_model_is_run_on_made_up_inputs_at_its_fixed_sizes(tmp_path):
    with pytest.raises(EdgelrError, match="cannot run"):
        model_io.deliver(_reshape_to([5, 7], 2), tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []
    model_io.deliver(_reshape_to([4, 8], 2), tmp_path / "out.onnx")  # 2x16 fits 4x8
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_a_model_onnx_runtime_cannot_load_is_not_written(tmp_path):
    model = _reshape_to([4, 8], 2)
    model.graph.node(0).op_type = "NoSuchOp"
    with pytest.raises(EdgelrError, match="cannot load"):
        model_io.deliver(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_dynamic_sizes_and_no_feed_still_load_it(tmp_path):
    """Nothing says how big N is: the model is loaded, not run (a run needs inputs nobody can make up)."""
    model_io.deliver(_reshape_to([-1, 8], "N"), tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").is_file()


def test_an_error_inside_the_block_moves_nothing(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"the user's earlier result")
    with pytest.raises(RuntimeError), model_io.Delivery() as delivery:
        staged = delivery.write(_reshape_to([4, 8], 2), out)
        assert staged.parent.parent == tmp_path and staged.parent.name.startswith(".edgelr-")
        raise RuntimeError("the judge refused it")
    assert out.read_bytes() == b"the user's earlier result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_external_data_moves_with_its_model_and_a_stale_one_goes(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    monkeypatch.setattr(model_io, "_INLINE_LIMIT_BYTES", 1)
    model_io.deliver(_reshape_to([4, 8], 2), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    monkeypatch.undo()
    model_io.deliver(_reshape_to([8, 4], 2), out)  # inline now: the earlier weights are no one's
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert nh.to_array(onnx.load(out).graph.initializer[0]).tolist() == [8, 4]
