"""Distributed distillation (edgelr.train.parallel, .loop): torchrun with 2 CPU processes (gloo) reaches the
weights one process reaches with the same global batch, resumes bit-identically, and bad settings give one
clear line; DistillConfig's serialisation and field errors.

Real components: torchrun (`python -m torch.distributed.run --standalone`), gloo, ONNX Runtime, onnx2torch,
on the tiny teacher/student pair of test_distill. Run as a script (under torchrun), this file is a worker
that calls `distill` with a DistillConfig given as JSON, optionally dying mid-run (a crash to resume from).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # a torchrun worker: this checkout's edgelr and test helpers
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("needs onnx2torch (pip install onnx2torch --no-deps)", allow_module_level=True)
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

from test_distill import _images, _perturbed, _tiny, _weights

from edgelr.errors import EdgelrError
from edgelr.train.distill import ConfigFieldError, DistillConfig, distill

# 6 steps of a global batch of 4 (2 samples per process), aligning an intermediate tensor (its variance is
# the global batch's, summed over the processes)
CONFIG = {"steps": 6, "batch": 4, "lr": 1e-3, "features": [["a2", "a2"]], "device": "cpu"}
FLAGS = ["--steps", "6", "--batch", "4", "--lr", "1e-3", "--feature", "a2"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    teacher = _tiny(rng)
    onnx.save(teacher, tmp / "teacher.onnx")
    onnx.save(_perturbed(teacher, rng), tmp / "student.onnx")
    np.savez(tmp / "data.npz", x=_images(rng, 24))
    return tmp


def _env() -> dict:
    # one thread per process on a 2-core machine; this checkout's edgelr in the workers
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)


def _cli(pair: Path, out: str, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "edgelr", "-q", "distill", str(pair / "teacher.onnx"), str(pair / "student.onnx"),
               "--data", str(pair / "data.npz"), "-o", str(pair / out), *flags]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)


def _relative(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The worst relative difference of any tensor: max |a - b| / max |a|."""
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-30)) for k in a)


@pytest.fixture(scope="module")
def two_processes(pair):
    """The run under torchrun (2 processes, the edgelr command), with a checkpoint; its output."""
    done = _torchrun("-m", "edgelr", "-q", "distill", str(pair / "teacher.onnx"), str(pair / "student.onnx"),
                     "--data", str(pair / "data.npz"), "-o", str(pair / "ddp.onnx"), *FLAGS,
                     "--checkpoint", str(pair / "ddp.ckpt"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one(pair, two_processes):
    assert two_processes.stdout.count("wrote ") == 1 and "(2 processes)" in two_processes.stdout  # rank 0 alone prints
    one = distill(pair / "teacher.onnx", pair / "student.onnx", pair / "data.npz", pair / "single.onnx",
                  DistillConfig.from_dict({**CONFIG, "checkpoint": str(pair / "single.ckpt")}), progress=False)
    assert one["world_size"] == 1 and one["steps"] == 6
    single, ddp, start = (_weights(pair / f"{k}.onnx") for k in ("single", "ddp", "student"))
    assert _relative(single, start) > 1e-2  # trained: the weights moved far more than the tolerance below
    assert _relative(single, ddp) <= 1e-5
    # the checkpoints (rank 0's): the same state and the same loss history
    a, b = (torch.load(pair / f"{k}.ckpt", weights_only=True) for k in ("single", "ddp"))
    assert a["world_size"] == 1 and b["world_size"] == 2 and a["meta"] == b["meta"]
    assert a["module"].keys() == b["module"].keys()
    for key, value in a["module"].items():
        assert torch.allclose(value, b["module"][key], rtol=1e-5, atol=1e-7), key
    assert np.allclose([x[1] for x in a["losses"]], [x[1] for x in b["losses"]], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_quantization_aware_share_the_ranges(pair):
    """QAT's running input ranges are the global batch's min..max (a max over the processes). Its rounding
    is a step function, so float noise can flip a value to the next level: the weights agree less tightly."""
    flags = ["--steps", "3", "--batch", "4", "--lr", "1e-3", "--quantization-aware"]
    done = _torchrun("-m", "edgelr", "-q", "distill", str(pair / "teacher.onnx"), str(pair / "student.onnx"),
                     "--data", str(pair / "data.npz"), "-o", str(pair / "qat2.onnx"), *flags,
                     "--checkpoint", str(pair / "qat2.ckpt"))
    assert done.returncode == 0, done.stderr[-3000:]
    distill(pair / "teacher.onnx", pair / "student.onnx", pair / "data.npz", pair / "qat1.onnx",
            DistillConfig(steps=3, batch=4, lr=1e-3, quantization_aware=True, device="cpu",
                          checkpoint=pair / "qat1.ckpt"), progress=False)
    a, b = (torch.load(pair / f"qat{k}.ckpt", weights_only=True)["module"] for k in (1, 2))
    ranges = [k for k in a if k.endswith("edgelr_input_range")]
    assert len(ranges) == 3  # the three Conv layers
    for key in ranges:
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-7), key
    assert _relative(_weights(pair / "qat1.onnx"), _weights(pair / "qat2.onnx")) <= 1e-4


@pytest.mark.slow
def test_two_processes_resume_bit_identically(pair, two_processes):
    """Die during step 5 (after the checkpoint at step 3), resume with `--nproc 2`: the uninterrupted run's bits."""
    config = {**CONFIG, "checkpoint": str(pair / "crash.ckpt"), "checkpoint_every": 3}
    died = _torchrun(__file__, str(pair), json.dumps(config), "4")
    assert died.returncode != 0 and not (pair / "crash.onnx").exists()
    assert torch.load(pair / "crash.ckpt", weights_only=True)["step"] == 3
    resumed = _cli(pair, "crash.onnx", *FLAGS, "--checkpoint", str(pair / "crash.ckpt"), "--resume", "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(pair / "ddp.onnx"), _weights(pair / "crash.onnx")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    first, second = (torch.load(pair / f"{k}.ckpt", weights_only=True) for k in ("ddp", "crash"))
    for key, value in first["module"].items():
        assert torch.equal(value, second["module"][key]), key
    assert first["losses"] == second["losses"]


class _Crash(Exception):
    pass


def test_one_process_resumes_bit_identically(pair, tmp_path):
    """Stop after 2 of 5 steps with a checkpoint (a crash), resume: the uninterrupted run's bits."""
    def run(out, crash_after=None, resume=False):
        calls = [0]

        def hook(outputs, indices):
            calls[0] += 1
            if crash_after is not None and calls[0] > crash_after:
                raise _Crash
            return outputs["logits"].sum() * 0.0

        config = DistillConfig(steps=5, batch=4, lr=1e-3, device="cpu", augment="none", checkpoint_every=2,
                               checkpoint=tmp_path / f"{out}.ckpt", resume=resume)
        return distill(pair / "teacher.onnx", pair / "student.onnx", pair / "data.npz", tmp_path / f"{out}.onnx",
                       config, progress=False, task_loss=hook)

    run("a")
    with pytest.raises(_Crash):
        run("b", crash_after=3)
    assert torch.load(tmp_path / "b.ckpt", weights_only=True)["step"] == 2
    assert run("b", resume=True)["resumed_from"] == 2
    a, b = _weights(tmp_path / "a.onnx"), _weights(tmp_path / "b.onnx")
    assert all(np.array_equal(a[k], b[k]) for k in a)


# --- bad settings: one line ------------------------------------------------------------------------------
def test_batch_that_does_not_split_over_the_processes(pair, monkeypatch):
    done = _cli(pair, "bad.onnx", "--steps", "2", "--batch", "3", "--nproc", "2")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "--batch 3" in done.stderr and "--nproc 2" in done.stderr and "Traceback" not in done.stderr
    assert not (pair / "bad.onnx").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun starts each process: the library says it of the field
    with pytest.raises(ConfigFieldError, match=r"DistillConfig.batch \(3\) must be a multiple of the 2 processes") as e:
        distill(pair / "teacher.onnx", pair / "student.onnx", pair / "data.npz", pair / "bad.onnx",
                DistillConfig(steps=2, batch=3, device="cpu"), progress=False)
    assert "\n" not in str(e.value) and e.value.field == "batch" and not (pair / "bad.onnx").exists()


@pytest.mark.slow
def test_a_failing_run_under_nproc_says_one_line(pair):
    (pair / "empty").mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "edgelr", "-q", "distill", str(pair / "teacher.onnx"),
                           str(pair / "student.onnx"), "--data", str(pair / "empty"), "-o", str(pair / "bad.onnx"),
                           "--steps", "2", "--batch", "4", "--nproc", "2"],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "no images" in done.stderr, done.stderr
    assert not (pair / "bad.onnx").exists()


# --- DistillConfig ----------------------------------------------------------------------------------------
def test_config_round_trips_and_names_unknown_fields():
    from edgelr.train.data import Augment

    config = DistillConfig(steps=100, batch=16, features="factorized", freeze=["*dfl*"], lr_scale={"*lowrank*": 1.0, "*": 0.1},
                           augment=Augment(tint=0.2), train_precision="bf16", scores=[4, None], checkpoint=Path("x.ckpt"))
    data = config.to_dict()
    assert data["_type"] == "distill" and data["_version"] == 1 and "lr" not in data  # defaults left out
    assert data["lr_scale"] == [["*lowrank*", 1.0], ["*", 0.1]] and data["checkpoint"] == "x.ckpt"
    assert json.loads(json.dumps(data)) == data
    assert DistillConfig.from_dict(json.loads(json.dumps(data))) == config
    assert DistillConfig(steps=3, augment=True).augment == "light" and DistillConfig(steps=3, augment=False).augment == "none"

    with pytest.raises(EdgelrError, match="distill has no field 'bach'") as e:
        DistillConfig.from_dict({"_type": "distill", "steps": 3, "bach": 4})
    assert "\n" not in str(e.value) and "batch" in str(e.value)  # the fields it has
    with pytest.raises(EdgelrError, match="version"):
        DistillConfig.from_dict({"_type": "distill", "_version": 2, "steps": 3})
    with pytest.raises(EdgelrError, match="augment"):
        DistillConfig.from_dict({"steps": 3, "augment": {"_type": "augment", "tilt": 0.1}})
    for kwargs, field in [({"steps": 3, "batch": 0}, "batch"), ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"),
                          ({"steps": 3, "lr": -1}, "lr"), ({"steps": 3, "train_precision": "fp16"}, "train_precision"),
                          ({"steps": 3, "resume": "yes"}, "resume"), ({"steps": 3, "seed": -1}, "seed")]:
        with pytest.raises(ConfigFieldError, match=rf"^DistillConfig\.{field} ") as e:
            DistillConfig(**kwargs)
        assert e.value.field == field and "\n" not in str(e.value)
    with pytest.raises(EdgelrError, match="DistillConfig.batch must be >= 1"):
        DistillConfig(steps=3, batch=0)


# --- the worker ---------------------------------------------------------------------------------------
def _worker(folder: Path, config: dict, crash_after: int) -> None:
    """distill under torchrun with CONFIG; with CRASH_AFTER > 0, die in the forward after that many (as a
    kill would: every process at once, no output written)."""
    calls = [0]

    def hook(outputs, indices):
        calls[0] += 1
        if crash_after and calls[0] > crash_after:
            raise SystemExit(3)
        return outputs["logits"].sum() * 0.0  # adds exactly nothing

    out = Path(config.pop("checkpoint")).with_suffix(".onnx")
    distill(folder / "teacher.onnx", folder / "student.onnx", folder / "data.npz", out,
            DistillConfig.from_dict({**config, "checkpoint": str(out.with_suffix(".ckpt"))}), progress=False,
            task_loss=hook)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]))
