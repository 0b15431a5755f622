"""The recipes in models/ run end to end on their real model (a few steps: the numbers are in docs)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_yolov8n_recipe_compresses_distills_quantizes_and_verifies(tmp_path):
    pytest.importorskip("nudenet")
    if importlib.util.find_spec("onnx2torch") is None:  # not imported here: edgelr.train.distill imports it past torchvision
        pytest.skip("needs onnx2torch (pip install onnx2torch --no-deps)")
    pytest.importorskip("skimage")
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "models" / "yolov8n.py"), "--params", "0.6", "--quantize", "int8",
           "--steps", "2", "--rounds", "2", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((out / "recipe.json").read_text())
    assert report["distillation"]["steps"] == 2
    for name in ("int8_only", "post_training", "distilled"):
        row = report["models"][name]
        # the worst channel group's error (the class scores, on their own scale): under 1, what zeros would score
        assert 0 < row["heldout_error"] < 1.0 and 0 <= row["value"] <= 1 and row["speedup_over_fp32"] > 0
        assert row["metric"] == "mAP50 agreement" and row["samples"] > 0 and "top_class_agreement" in row
    assert (out / "distilled.int8.onnx").is_file() and (out / "student.float.onnx").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)  # the folder is not empty now
    assert again.returncode != 0 and "not empty" in again.stderr
