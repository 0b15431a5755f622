"""`edgelr export`: the verb, its output folder, its bad inputs, and --to against a real sshd (conftest)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgelr.demo import build_model, synthetic_images


def _edgelr(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelr", "-q", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("export")
    proto = build_model()
    proto.ir_version = 8  # what the Pi's onnxruntime 1.19 reads
    onnx.save(proto, d / "m.onnx")
    np.savez(d / "calib.npz", image=synthetic_images(2, seed=3))
    return d / "m.onnx"


SIZE = ["--shapes", "image=1x3x32x32"]  # the demo model's batch is dynamic, and it has no size metadata


def _fails_cleanly(run: subprocess.CompletedProcess, *words: str) -> None:
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    for word in words:
        assert word in run.stderr, run.stderr


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_x86_bundle_and_a_second_export_replaces_it(model, tmp_path):
    out = tmp_path / "bundle"
    run = _edgelr("export", model, "--target", "x86-cpu", "-o", out, "--calib", model.with_name("calib.npz"))
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["name"] == "x86-cpu" and (out / "run.py").is_file()
    assert "wrote" in run.stdout and "model.onnx" in run.stdout
    (out / "stale.txt").write_text("from an earlier export")
    assert _edgelr("export", model, "--target", "x86-cpu", "-o", out, *SIZE).returncode == 0
    assert not (out / "stale.txt").exists()  # replaced whole, never merged
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_rtx_engine_from_the_command_line(model, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="needs TensorRT for RTX: pip install -e .[trt]")
    calib = model.with_name("calib.npz")
    run = _edgelr("export", model, "--target", "rtx", "-o", tmp_path / "e", "--calib", calib)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and (tmp_path / "e" / "model.engine").stat().st_size > 0
    run = _edgelr("export", model, "--target", "rtx", "-o", tmp_path / "q", "--precision", "int8", "--calib", calib)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["precision"] == "int8"
    _fails_cleanly(_edgelr("export", model, "--target", "rtx", "-o", tmp_path / "n", "--precision", "int8", *SIZE),
                   "calibration")
    assert not (tmp_path / "n").exists()


def test_a_user_target_file_works(model, tmp_path):
    mine = tmp_path / "mydevice.toml"
    mine.write_text((Path(__file__).parents[1] / "targets" / "x86-cpu.toml").read_text().replace("threads = 1", "threads = 3"))
    run = _edgelr("export", model, "--target", mine, "-o", tmp_path / "b", *SIZE)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["target"]["threads"] == 3


@pytest.mark.parametrize("text, words", [
    ("backend = [", ["not a valid TOML"]),
    ('description = "x"\narch = "x86_64"\nbackend = "onnxruntime"\nprecision = "fp32"\nformat = "onnx"\n', ["missing key", "runtime_version"]),
    ('description = "x"\narch = "x86_64"\nbackend = "openvino"\nprecision = "fp32"\nformat = "onnx"\nruntime_version = "1"\n',
     ["backend 'openvino'"]),
    ('description = "x"\narch = "x86_64"\nbackend = "onnxruntime"\nprecision = "fp32"\nformat = "engine"\nruntime_version = "1"\n',
     ["format 'engine'"]),
    ('description = "x"\narch = "x86_64"\nbackend = "onnxruntime"\nprecision = "fp32"\nformat = "onnx"\nruntime_version = "1"\n'
     'threads = "four"\n', ["'threads' must be a int"]),
    ('description = "x"\narch = "x86_64"\nbackend = "onnxruntime"\nprecision = "fp32"\nformat = "onnx"\nruntime_version = "1"\n'
     'colour = "red"\n', ["unknown key", "colour"]),
])
def test_a_bad_target_file_is_refused(model, tmp_path, text, words):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    _fails_cleanly(_edgelr("export", model, "--target", bad, "-o", tmp_path / "out"), str(bad), *words)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_write_nothing(model, tmp_path):
    _fails_cleanly(_edgelr("export", model, "--target", "pi9", "-o", tmp_path / "o"), "unknown target 'pi9'", "rpi5")
    _fails_cleanly(_edgelr("export", tmp_path / "none.onnx", "--target", "rpi5", "-o", tmp_path / "o"), "no such file")
    _fails_cleanly(_edgelr("export", model, "--target", "rpi5", "-o", tmp_path / "no" / "o"), "does not exist")
    (tmp_path / "file").write_text("x")
    _fails_cleanly(_edgelr("export", model, "--target", "rpi5", "-o", tmp_path / "file"), "is a file")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    _fails_cleanly(_edgelr("export", model, "--target", "x86-cpu", "-o", mine), "not an edgelr bundle")
    assert _snapshot(mine) == {"notes.txt": b"mine"}
    _fails_cleanly(_edgelr("export", model, "--target", "x86-cpu", "-o", tmp_path / "o", "--precision", "int8"),
                   "--precision int8")
    _fails_cleanly(_edgelr("export", model, "--target", "rtx", "-o", tmp_path / "o", "--shapes", "image=1x3:2x3"),
                   "NAME=MIN:OPT:MAX")
    _fails_cleanly(_edgelr("export", model, "--target", "x86-cpu", "-o", tmp_path / "o", "--to", "pi@host"),
                   "USER@HOST:PATH")
    _fails_cleanly(_edgelr("export", model, "--target", "x86-cpu", "-o", tmp_path / "o", "--to", "pi;rm@host:x"),
                   "not a valid host")
    assert not (tmp_path / "o").exists()


@contextlib.contextmanager
def _mount(where: Path, options: str):
    """A small tmpfs (a full disk, a read-only one): needs root; the test skips without it."""
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                           capture_output=True, check=False).returncode:
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_leaves_nothing(model, tmp_path):
    with _mount(tmp_path / "full", "size=256k") as full:
        _fails_cleanly(_edgelr("export", model, "--target", "x86-cpu", "-o", full / "b", *SIZE), "could not write", "space")
        assert list(full.iterdir()) == []


def test_a_read_only_destination_is_refused(model, tmp_path):
    with _mount(tmp_path / "ro", "size=1m,ro") as ro:
        run = _edgelr("export", model, "--target", "x86-cpu", "-o", ro / "b", *SIZE)
        _fails_cleanly(run, str(ro))
        assert list(ro.iterdir()) == []


def _ssh_flags(sshd) -> list:
    kw = sshd["kw"]
    return ["--port", kw["port"], "--identity", kw["identity"], "--known-hosts", kw["known_hosts"],
            "--python", kw["python"], "--timeout", 30]


@pytest.mark.parametrize("target", ["x86-cpu", "rpi5"])
def test_to_copies_the_bundle_and_runs_it_on_the_device(sshd, model, tmp_path, target):
    dest = tmp_path / "device" / "yolo"
    run = _edgelr("export", model, "--target", target, "-o", tmp_path / "b", "--to", f"{sshd['host']}:{dest}",
                  *_ssh_flags(sshd), *SIZE)
    assert run.returncode == 0, run.stderr
    assert _snapshot(dest) == _snapshot(tmp_path / "b")  # every file, byte for byte
    assert "parity passed" in run.stdout and "copied to" in run.stdout
    # again: the earlier bundle on the device is replaced
    assert _edgelr("export", model, "--target", target, "-o", tmp_path / "b", "--to", f"{sshd['host']}:{dest}",
                   *_ssh_flags(sshd), *SIZE).returncode == 0
    assert not list(dest.parent.glob("*partial*"))


def test_to_a_changed_bundle_is_refused_on_the_device(sshd, model, tmp_path):
    from edgelr.deploy.export import export
    from edgelr.errors import EdgelrError
    from edgelr.measure.remote import Device, copy_bundle, run_bundle

    done = export(model, "x86-cpu", tmp_path / "b", shapes={"image": ((1, 3, 32, 32),) * 3}, progress=False)
    kw = sshd["kw"]
    device = Device(sshd["host"], port=kw["port"], identity=kw["identity"], known_hosts=kw["known_hosts"], timeout=30)
    copy_bundle(device, done.out_dir, str(tmp_path / "dev"))
    assert run_bundle(device, str(tmp_path / "dev"), kw["python"], runs=2, warmup=0)["ok"] is True
    ref = dict(np.load(tmp_path / "dev" / "reference.npz"))
    np.savez(tmp_path / "dev" / "reference.npz", **{k: v + 1.0 for k, v in ref.items()})
    with pytest.raises(EdgelrError, match="checksum"):
        run_bundle(device, str(tmp_path / "dev"), kw["python"], runs=2, warmup=0)


def test_to_with_a_bad_host_key_or_port_writes_nothing(sshd, model, tmp_path):
    from conftest import free_port

    flags = _ssh_flags(sshd)
    wrong = [*flags[:4], "--known-hosts", sshd["dir"] / "wrong_known_hosts", *flags[6:]]
    _fails_cleanly(_edgelr("export", model, "--target", "x86-cpu", "-o", tmp_path / "b",
                           "--to", f"{sshd['host']}:{tmp_path / 'dev'}", *wrong, *SIZE), "host key does NOT match")
    other_port = [*flags[:0], "--port", free_port(), *flags[2:]]
    _fails_cleanly(_edgelr("export", model, "--target", "x86-cpu", "-o", tmp_path / "b",
                           "--to", f"{sshd['host']}:{tmp_path / 'dev'}", *other_port, *SIZE), "unreachable")
    assert not (tmp_path / "b").exists() and not (tmp_path / "dev").exists()


def test_to_a_full_or_forbidden_device_folder(sshd, model, tmp_path):
    flags = _ssh_flags(sshd)
    run = _edgelr("export", model, "--target", "x86-cpu", "-o", tmp_path / "b", "--to", f"{sshd['host']}:/sys/edgelr/b",
                  *flags, *SIZE)
    _fails_cleanly(run, "copying the bundle", "/sys/edgelr")
    with _mount(tmp_path / "full", "size=64k") as full:
        run = _edgelr("export", model, "--target", "x86-cpu", "-o", tmp_path / "b2", "--to", f"{sshd['host']}:{full / 'b'}",
                      *flags, *SIZE)
        _fails_cleanly(run, "No space left")
        assert list(full.iterdir()) == []  # the partial copy was removed


# --- a real detector, as a newcomer types it: no --calib, no --shapes (the size is in the model's metadata) ----------
@pytest.fixture(scope="module")
def yolo() -> Path:
    nudenet = pytest.importorskip("nudenet")
    return Path(nudenet.__file__).parent / "320n.onnx"


@pytest.mark.slow
def test_yolo_rpi5_bundle_without_calib(yolo, tmp_path):
    run = _edgelr("export", yolo, "--target", "rpi5", "-o", tmp_path / "pi")
    assert run.returncode == 0, run.stderr
    assert "inputs: images 1x3x320x320 (the model's metadata: imgsz, batch)" in run.stdout
    manifest = json.loads((tmp_path / "pi" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert manifest["inputs"][0]["reference_shape"] == [1, 3, 320, 320]
    assert manifest["outputs"][0]["reference_shape"] == [1, 22, 2100]
    assert manifest["parity"]["checked"]["max_rel_error"] <= manifest["parity"]["tolerance"]  # run.py under 1.19.2
    assert (tmp_path / "pi" / "model.ort").stat().st_size > 0


def test_yolo_rtx_engine_without_calib(yolo, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="needs TensorRT for RTX: pip install -e .[trt]")
    from edgelr.deploy.tensorrt import gpu_available

    run = _edgelr("export", yolo, "--target", "rtx", "-o", tmp_path / "e")
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and (tmp_path / "e" / "model.engine").stat().st_size > 0
    assert manifest["profile"] == {"images": {"min": [1, 3, 320, 320], "opt": [1, 3, 320, 320], "max": [1, 3, 320, 320]}}
    if not gpu_available():
        assert manifest["parity"] == "skipped: no GPU"
        assert "GPU parity check skipped: no GPU on this machine" in run.stdout


def test_yolo_without_size_metadata_gets_the_shapes_hint(yolo, tmp_path):
    proto = onnx.load(str(yolo))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, bare)
    for target in ("rpi5", "rtx"):
        _fails_cleanly(_edgelr("export", bare, "--target", target, "-o", tmp_path / target),
                       "input 'images' has dynamic dims [batch, 3, height, width]; "
                       "give --shapes images=1x3x640x640 (or --calib DATA.npz)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.onnx"]
