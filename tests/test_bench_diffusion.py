"""tools/bench_diffusion.py on a tiny DDPM (models/diffusion_tiny.py, random weights, 1x32x32 so the digit
classifier applies): every flow and the distilled one are in the JSON with sane measures, and the grid is
written. Tiny settings: a few steps and images; the numbers only have to be sane, not good."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from models import diffusion_tiny
from tools import bench_diffusion

FLOWS = ["blocks=1", "params=0.5>int8-tf"]


def test_bench_diffusion_on_the_tiny_pipeline(tmp_path, torch_one_thread):
    pipeline = tmp_path / "tiny"
    diffusion_tiny.ddpm(sample_size=32, in_channels=1, out_channels=1).save_pretrained(pipeline)
    out, grid = tmp_path / "bench.json", tmp_path / "grid.png"
    argv = [str(pipeline), "--work", str(tmp_path / "work"), "--steps", "3", "--images", "6", "--batch", "4",
            "--calib-seeds", "1", "--calib-samples", "6", "--judge-images", "1", "--distill", "blocks=1",
            "--distill-seeds", "2", "--distill-samples", "6", "--distill-minutes", "0.05",
            "--rounds", "3", "--pipeline-rounds", "1", "--grid-images", "4", "--json", str(out), "--grid", str(grid)]
    for flow in FLOWS:
        argv += ["--flow", flow]
    assert bench_diffusion.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["steps"] == 3 and report["images"] == 6 and report["scheduler"] == "DDPMScheduler"
    assert report["command"].startswith("python tools/bench_diffusion.py ")
    assert len(report["load_average"]["timing"]) == 3
    assert [r["flow"] for r in report["flows"]] == FLOWS
    assert [r["flow"] for r in report["distilled"]] == ["blocks=1 +distill"]
    original = report["original"]
    assert original["per_step_ratio"] == 1.0 and original["ssim_mean"] == 1.0
    assert original["seconds_per_step"] > 0 and original["pipeline_seconds"] > 0
    assert original["classifier_summary"]["images"] == 6
    for row in report["flows"] + report["distilled"]:
        assert "error" not in row, row
        assert 0 < row["per_step_ratio"] < 20 and 0 < row["pipeline_ratio"] < 20
        assert row["seconds_per_step"] > 0 and row["pipeline_seconds"] > row["seconds_per_step"]
        psnr = float(row["psnr_mean"])
        assert 5 < psnr and (psnr < 100 or math.isinf(psnr))
        assert -1 < row["ssim_mean"] <= 1
        c = row["classifier"]
        assert 0 <= c["agreement_points"] <= 100 and 0 <= c["histogram_tv_points"] <= 100
        assert c["worst_points"] >= c["histogram_tv_points"] and sum(c["histogram_counts"]) == 6
        assert set(row["bars_met"]) == {"per_step_ratio", "pipeline_ratio", "psnr_mean", "ssim_mean", "classifier_points"}
    by_flow = {r["flow"]: r for r in report["flows"]}
    assert len(by_flow["blocks=1"]["blocks_removed"]) == 1 and by_flow["blocks=1"]["passes"] == ["remove_blocks"]
    chained = by_flow["params=0.5>int8-tf"]  # factorized, then that pipeline quantized with its time embedding float
    assert chained["passes"][:2] == ["factorize", "refit"] and "quantize" in chained["passes"][2:]
    assert len(chained["stage_seconds"]) == 2 and chained["kept_float"] == ["/unet/time_proj/Mul"]
    d = report["distilled"][0]
    assert d["passes"] == ["remove_blocks", "distill"] and len(d["blocks_removed"]) == 1
    assert d["distill"]["steps"] > 0 and d["distill"]["data"]["train"]["samples"] == 6
    assert grid.stat().st_size > 0
