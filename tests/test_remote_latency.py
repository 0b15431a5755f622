"""`compress --latency F --on USER@HOST`: the latency search timed on a device, against a real sshd on 127.0.0.1
(the `sshd` fixture in conftest.py). The device's Python is this one, or the emulated aarch64 Python of
tools/aarch64_env.py (a Raspberry Pi OS userland under qemu-aarch64 with onnxruntime 1.19.2: its timings mean
nothing, the path is the real one). Its tables are keyed by what the device says it is, and a second run reuses them.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

import edgelr.measure.latency as timing
import edgelr.search.latency as search
from edgelr.cli import main
from edgelr.deploy.targets import load_target
from edgelr.errors import EdgelrError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/
from tools.aarch64_env import QEMU, ensure_env


@pytest.fixture(scope="session")
def emulated_python(tmp_path_factory) -> Path:
    """A script that runs the emulated aarch64 Python (assembled once per session, in the session's cache)."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"the emulated aarch64 device needs {QEMU} (apt-get install -y qemu-user-static); "
                    "the variant with this machine's Python ran instead")
    with pytest.MonkeyPatch.context() as patch:  # the cache the autouse fixture gives every test of the session
        patch.setenv("EDGELR_CACHE", str(tmp_path_factory.getbasetemp() / "edgelr-cache"))
        try:
            env = ensure_env(load_target("rpi5").runtime_version, progress=False)
        except EdgelrError as exc:
            pytest.skip(f"no emulated aarch64 Python here ({exc}); the variant with this machine's Python ran instead")
    script = tmp_path_factory.mktemp("aarch64") / "python3"
    exports = " ".join(f"{k}='{v}'" for k, v in env.env().items() if k != "PATH")
    script.write_text(f"#!/bin/sh\nexec env {exports} {' '.join(env.command())} \"$@\"\n")
    script.chmod(0o755)
    return script


def _args(sshd, demo: Path, out: str, python, *extra: str) -> list[str]:
    kw = sshd["kw"]
    return ["-q", "compress", str(demo / "m.onnx"), "-o", str(demo / out), "--calib", str(demo / "calib.npz"),
            "--on", sshd["host"], "--port", str(kw["port"]), "--identity", str(kw["identity"]),
            "--known-hosts", str(kw["known_hosts"]), "--python", str(python), "--timeout", "300", *extra]


def _compress(sshd, demo: Path, out: str, python, *extra: str, timeout: float = 900) -> tuple[int, str, str]:
    """The edgelr command in a process of its own: (exit status, stdout, stderr)."""
    run = subprocess.run([sys.executable, "-m", "edgelr", *_args(sshd, demo, out, python, *extra)],
                         capture_output=True, text=True, timeout=timeout, check=False)
    return run.returncode, run.stdout, run.stderr


def _pi_one_thread(folder: Path) -> Path:
    """rpi5 with one thread: four ONNX Runtime threads on this 2-core machine beside other work spread too widely
    for the search to trust (and took 6 minutes a run under emulation)."""
    target = folder / "rpi5-1t.toml"
    target.write_text(load_target("rpi5").path.read_text().replace("threads = 4", "threads = 1"))
    return target


def _device_search(compress, sshd, demo: Path, budget: str, machine: str, *extra: str) -> None:
    """Two runs of the same search on the device: the first builds its tables there, the second times no layer."""
    target = str(_pi_one_thread(demo))
    status, out, err = compress("a.onnx", "--latency", budget, "--target", target, "--report", str(demo / "a.json"),
                                *extra)
    assert status == 0, err
    report = json.loads((demo / "a.json").read_text())["latency"]
    device = report["device"]
    assert device["host"] == sshd["host"] and device["machine"] == machine and device["threads"] == 1
    assert report["layer_timings"] > 0 and device["batches"] >= 2  # the layers and the rounds, in a few batches
    table = Path(report["table"])
    assert table.parent == demo / "cache" / "latency" and table.name.startswith("device-")
    assert json.loads(table.read_text())["device"]["machine"] == machine  # what the table's timings belong to
    assert f"timed on {sshd['host']} over SSH: {machine}" in out
    kept = next(r for r in report["rounds"] if r["round"] == report["kept_round"])
    assert kept["measured_ratio"] <= float(budget) + 0.01  # within the budget (its timing noise)
    assert ("not on rpi5" in err) == (machine != "aarch64")  # a device unlike the target is said to be

    status, out, err = compress("b.onnx", "--latency", budget, "--target", target, "--report", str(demo / "b.json"),
                                *extra)
    assert status == 0, err
    again = json.loads((demo / "b.json").read_text())["latency"]
    assert again["table"] == report["table"]
    assert again["layer_timings"] == report["unstable_layer_timings"] == 0, (report, again)
    # each round is one batch in both runs (the second may take more rounds: they follow the timings); the first
    # also sent its layers
    beyond_rounds = again["device"]["batches"] - len(again["rounds"]), device["batches"] - len(report["rounds"])
    assert beyond_rounds[0] < beyond_rounds[1] and (demo / "b.onnx").is_file(), beyond_rounds


@pytest.mark.slow
def test_latency_tables_built_on_an_emulated_aarch64_device_and_reused(sshd, demo, emulated_python, monkeypatch,
                                                                      capsys):
    """The command, run in this process: its timings mean nothing under qemu (an op costs what its translation
    costs, not what the layer's kernel does: a round missed the tables' prediction by 0.3, and runs spread past
    the limit on this busy machine), so the search's trust in timings, tested in test_latency.py, is switched
    off; what is tested is the path. The issue's command, --latency 0.5: on this small demo model that budget sits
    at the default error ceiling (0.2; the fastest round within it measured 0.54 once, and the search rightly
    refused), so the test loosens the ceiling as a user would, to 0.3."""
    monkeypatch.setattr(timing, "SPREAD_LIMIT", math.inf)
    monkeypatch.setattr(search, "PREDICTION_TOLERANCE", math.inf)
    monkeypatch.setattr(search, "DRIFT_LIMIT", math.inf)

    def compress(out: str, *extra: str) -> tuple[int, str, str]:
        status = main(_args(sshd, demo, out, emulated_python, *extra))
        said = capsys.readouterr()
        return status, said.out, said.err

    _device_search(compress, sshd, demo, "0.5", "aarch64", "--max-output-error", "0.3")


@pytest.mark.slow
def test_latency_tables_built_on_a_device_and_reused(sshd, demo):
    """At --latency 0.5 the demo model sits at the edge of the error ceiling (CI once measured the fastest round
    that kept it at 0.54, and the search rightly refused): 0.7 is well inside it."""
    _device_search(lambda out, *extra: _compress(sshd, demo, out, sys.executable, *extra), sshd, demo, "0.7",
                   platform.machine())


def test_on_without_a_latency_budget_is_refused(sshd, demo):
    status, _, err = _compress(sshd, demo, "o.onnx", sys.executable, "--params", "0.5", timeout=120)
    assert status != 0 and err.strip().splitlines() == [
        "edgelr compress: error: --on times a latency search on the device: give --latency F too"]
    assert not (demo / "o.onnx").exists()


def test_an_unreachable_device_is_one_line_and_writes_nothing(sshd, demo):
    status, _, err = _compress(sshd, demo, "o.onnx", sys.executable, "--latency", "0.8", "--port", str(free_port()),
                               timeout=120)
    lines = err.strip().splitlines()
    assert status != 0 and len(lines) == 1 and "unreachable while asking the device what it is" in lines[0], err
    assert not (demo / "o.onnx").exists() and not list((demo / "cache").glob("latency/*"))


def test_a_device_without_onnxruntime_is_one_line_and_writes_nothing(sshd, demo, tmp_path):
    bare = tmp_path / "bare python"  # this interpreter without site-packages: no numpy, no onnxruntime
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    status, _, err = _compress(sshd, demo, "o.onnx", bare, "--latency", "0.8", timeout=120)
    lines = err.strip().splitlines()
    assert status != 0 and len(lines) == 1 and "there has no numpy; install it on the device" in lines[0], err
    assert not (demo / "o.onnx").exists()
