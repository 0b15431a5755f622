"""`edgelr profile`: end-to-end statistics, ORT's per-node table, interleaved comparison, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgelr import FactorizeConfig, compress
from edgelr.demo import build_model, synthetic_images
from edgelr.errors import EdgelrError
from edgelr.measure.profile import (
    RunSettings,
    compare_models,
    host_arch,
    per_layer_ratios,
    profile_model,
    run_settings,
    sample_feed,
)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgelr", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profile")
    onnx.save(build_model(), folder / "m.onnx")
    np.savez(folder / "calib.npz", image=synthetic_images(8, seed=1))
    compress(folder / "m.onnx", folder / "small.onnx", FactorizeConfig(params=0.5), calib=folder / "calib.npz", progress=False)
    return folder


def test_profile_gives_statistics_and_a_node_table(demo):
    p = profile_model(demo / "m.onnx", sample_feed(demo / "m.onnx", demo / "calib.npz"), runs=10, warmup=2)
    s = p.latency_ms
    assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] and s["std"] >= 0
    assert p.throughput_per_s > 0 and p.peak_rss_mb > 0
    assert len(p.nodes) >= 7  # at least the convs, the Gemm and the MatMul
    assert abs(sum(r["share"] for r in p.nodes) - 1) < 1e-6
    assert {"Conv", "Gemm"} & {r["op"] for r in p.nodes}


def test_vs_compares_interleaved_and_maps_factorized_pairs_to_their_layer(demo):
    feed = sample_feed(demo / "m.onnx", demo / "calib.npz")
    both = compare_models({"A": demo / "m.onnx", "B": demo / "small.onnx"}, feed, runs=10, warmup=2)
    layers = per_layer_ratios(both["A"], both["B"])
    assert layers and all(r["a_ms"] > 0 and r["b_ms"] > 0 for r in layers)


def test_cli_profile_writes_json(demo):
    out = demo / "p.json"
    run = _cli("profile", demo / "m.onnx", "--vs", demo / "small.onnx", "--calib", demo / "calib.npz", "--runs", 5,
               "--json", out)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert data["A"]["latency_ms"]["p50"] > 0 and data["ratio_p50"] > 0 and data["layers"]


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "no such file"),
    (["{m}", "--runs", "0"], "need runs >= 1"),
    (["{m}"], "dynamic dims"),  # the demo's batch dim is symbolic: random inputs cannot be made
])
def test_profile_bad_input(demo, args, message):
    args = [a.format(m=demo / "m.onnx") if "{m}" in a else (demo / a if a.endswith(".onnx") else a) for a in args]
    if "--runs" in args:
        args += ["--calib", demo / "calib.npz"]
    run = _cli("profile", *args)
    assert run.returncode == 1 and "Traceback" not in run.stderr and message in run.stderr


@pytest.fixture(scope="module")
def yolo() -> Path:
    nudenet = pytest.importorskip("nudenet")
    return Path(nudenet.__file__).parent / "320n.onnx"


def test_cli_profiles_yolo_without_calib(yolo, tmp_path):
    """As a newcomer types it: the size comes from the model's own metadata (Ultralytics' imgsz, batch)."""
    run = _cli("profile", yolo, "--runs", 3, "--warmup", 1, "--json", tmp_path / "p.json")
    assert run.returncode == 0, run.stderr
    assert "inputs: images 1x3x320x320 (the model's metadata: imgsz, batch)" in run.stdout
    data = json.loads((tmp_path / "p.json").read_text())["A"]
    assert data["runs"] == 3 and data["threads"] == 1 and data["latency_ms"]["p50"] > 0 and len(data["nodes"]) >= 30


def test_cli_profile_takes_the_targets_threads_and_says_whose_timings_they_are(demo, tmp_path):
    calib = ["--calib", demo / "calib.npz", "--runs", 2, "--warmup", 0, "--json", tmp_path / "p.json"]
    run = _cli("profile", demo / "m.onnx", "--target", "rpi5", *calib)
    assert run.returncode == 0, run.stderr
    data = json.loads((tmp_path / "p.json").read_text())["A"]
    assert data["threads"] == 4 and data["target"] == "rpi5"  # targets/rpi5.toml: threads = 4
    assert "note: target 'rpi5' is aarch64 and this host is" in run.stdout or host_arch() == "aarch64"
    assert "XNNPACKExecutionProvider" in run.stdout  # the target's preferred provider: used, or why not
    run = _cli("profile", demo / "m.onnx", "--target", "rpi5", "--threads", 2, *calib)
    assert run.returncode == 0 and json.loads((tmp_path / "p.json").read_text())["A"]["threads"] == 2, run.stderr
    run = _cli("profile", demo / "m.onnx", "--target", "rtx", *calib)
    assert run.returncode == 0, run.stderr
    assert "note: target 'rtx' runs tensorrt-rtx on its GPU; these are ONNX Runtime CPU timings on this host" in run.stdout
    run = _cli("profile", demo / "m.onnx", "--target", "x86-cpu", *calib)
    assert run.returncode == 0 and ("note:" not in run.stdout) == (host_arch() == "x86_64"), run.stdout


def test_run_settings():
    from edgelr.deploy.targets import load_target

    assert run_settings() == RunSettings(1)
    assert run_settings(threads=3).threads == 3
    rpi5 = run_settings(load_target("rpi5"))
    assert rpi5.threads == 4 and rpi5.target == "rpi5" and rpi5.providers == ("CPUExecutionProvider",)
    assert run_settings(load_target("rpi5"), remote="pi@raspberrypi").notes == rpi5.notes[1:] or host_arch() == "aarch64"
    with pytest.raises(EdgelrError, match="--threads 0"):
        run_settings(threads=0)


@pytest.mark.slow
def test_yolo_profile_has_a_full_node_table(tmp_path):
    nudenet = pytest.importorskip("nudenet")
    model = Path(nudenet.__file__).parent / "320n.onnx"
    feed = {"images": np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)}
    p = profile_model(model, feed, runs=5, warmup=1)
    assert p.latency_ms["p50"] > 0 and len(p.nodes) >= 30
