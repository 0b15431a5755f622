"""The latency-driven search: tables measured once and cached, rounds reported, bad input refused."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgelr import FactorizeConfig, compress
from edgelr.demo import build_model, synthetic_images


@pytest.fixture()
def demo(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELR_CACHE", str(tmp_path / "cache"))
    onnx.save(build_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", image=synthetic_images(8, seed=1))
    return tmp_path


@pytest.mark.slow
def test_latency_budget_measures_tables_once_and_reports_rounds(demo):
    config = FactorizeConfig(latency=0.8)
    first = compress(demo / "m.onnx", demo / "a.onnx", config, calib=demo / "calib.npz", progress=False)
    assert first.latency["layer_timings"] > 0
    assert (demo / "cache" / "latency").is_dir() and list((demo / "cache" / "latency").glob("*.json"))
    rounds = first.latency["rounds"]
    assert 1 <= len(rounds) <= 3
    assert all(0 < r["predicted_ratio"] <= 1.2 and r["measured_ratio"] > 0 for r in rounds)
    rows = [r for r in first.result.layers if r.latency_before is not None]
    assert rows and all(r.latency_after <= r.latency_before for r in rows if r.form != "dense")
    second = compress(demo / "m.onnx", demo / "b.onnx", config, calib=demo / "calib.npz", progress=False)
    assert second.latency["layer_timings"] == 0  # every table entry came from the cache


def test_latency_without_calibration_is_refused(demo):
    run = subprocess.run(
        [sys.executable, "-m", "edgelr", "-q", "compress", str(demo / "m.onnx"), "-o", str(demo / "o.onnx"),
         "--latency", "0.8"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "--latency needs --calib" in run.stderr
    assert not (demo / "o.onnx").exists()


def test_latency_and_params_together_are_refused(demo):
    run = subprocess.run(
        [sys.executable, "-m", "edgelr", "compress", str(demo / "m.onnx"), "-o", str(demo / "o.onnx"),
         "--latency", "0.8", "--params", "0.5"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr and not (demo / "o.onnx").exists()


def test_a_corrupt_cache_is_ignored(demo):
    from edgelr.latency import LatencyTable

    table = LatencyTable(cache=demo / "cache")
    table.path.parent.mkdir(parents=True, exist_ok=True)
    table.path.write_text("{not json")
    assert LatencyTable(cache=demo / "cache").entries == {}
