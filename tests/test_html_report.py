"""The HTML run report: built from a real run on the demo model, rendered in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgelr import FactorizeConfig, compress
from edgelr.demo import build_model, synthetic_images
from edgelr.errors import EdgelrError
from edgelr.report.html import write_html_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc", "head"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as a user would make it: two compress reports and a profile JSON from the CLI."""
    work = tmp_path_factory.mktemp("html-work")
    run = tmp_path_factory.mktemp("html-run")
    onnx.save(build_model(), work / "demo.onnx")
    np.savez(work / "calib.npz", image=synthetic_images(16, seed=1))
    for name, config in (("params50", FactorizeConfig(params=0.5)), ("flops30", FactorizeConfig(flops=0.3))):
        compress(work / "demo.onnx", work / f"{name}.onnx", config, calib=work / "calib.npz",
                 report=run / f"{name}.json", progress=False)
    done = subprocess.run(
        [sys.executable, "-m", "edgelr", "profile", work / "demo.onnx", "--vs", work / "params50.onnx",
         "--calib", work / "calib.npz", "--runs", "5", "--json", run / "profile.json"],
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (run / "notes.json").write_text(json.dumps({"something": "else"}))  # not ours: ignored, named
    return run


@pytest.fixture(scope="module")
def page(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("html-out") / "report.html"
    assert write_html_report(run_dir, out) == (out, out.with_name("report.page.json"))
    return out


def test_page_is_self_contained_and_complete(page):
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script|<link|src=|https?://(?!www\.w3\.org/2000/svg)", html)  # nothing external
    assert not list(page.parent.glob(".edgelr-*"))  # no temp file left behind
    for layer in LAYERS:
        assert f">{layer}<" in html
    assert "params50.json" in html and "flops30.json" in html and "profile.json" in html
    assert "onnxruntime" in html and "FLOPs ratio (proxy" in html and "measured (profile p50)" in html
    assert "ignored notes.json" in html


def _chromium(*args, user_data: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={user_data}", *args],
        capture_output=True, text=True, check=False, timeout=90,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_page_renders_in_a_headless_browser(page, tmp_path):
    from PIL import Image

    url = page.resolve().as_uri()
    dom = _chromium("--dump-dom", url, user_data=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert text.count("<table") >= 4  # target, curve, two compression tables
    for layer in LAYERS:
        assert re.search(rf"<td[^>]*>{layer}</td>", text), layer
    assert text.count("<svg") >= 2
    assert len(re.findall(r'<rect class="bar bar-a"', text)) >= 5
    assert len(re.findall(r'<rect class="bar bar-b"', text)) >= 5
    assert len(re.findall(r'<circle class="point[^"]*" cx=', text)) >= 3 + 3  # original + 2 reports + legend

    shot = tmp_path / "shot.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1200,2400", url, user_data=tmp_path / "profile-shot")
    assert done.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, done.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (2400, 1200)
    assert image.std() > 10  # not a blank page
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # text, bars in two colours, lines
    ink = (image < 200).any(axis=2).mean()
    assert 0.01 < ink < 0.6
    orange = ((image[..., 0] > 200) & (image[..., 1] > 100) & (image[..., 1] < 140) & (image[..., 2] < 90)).sum()
    assert orange > 200  # the B bars (#e0793a) are drawn


def test_empty_folder_is_one_line_error(tmp_path):
    out = tmp_path / "r.html"
    with pytest.raises(EdgelrError) as err:
        write_html_report(tmp_path, out)
    assert "no compress report or profile JSON" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(EdgelrError):
        write_html_report(tmp_path, out)
    assert not out.exists()
    with pytest.raises(EdgelrError, match="no such folder"):
        write_html_report(tmp_path / "missing", out)


def test_broken_json_is_named(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "zz-broken.json").write_text('{"layers": [')
    out = tmp_path / "r.html"
    with pytest.raises(EdgelrError, match="zz-broken.json") as err:
        write_html_report(run, out)
    assert "\n" not in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".edgelr-*"))


def test_text_is_escaped_and_minimal_reports_render(tmp_path):
    report = {
        "source": "<b>a.onnx", "output": "b&c.onnx", "metric": "params", "fraction": 0.5,
        "layers": [{"name": "<script>alert(1)</script>", "op": "Gemm", "form": "svd", "rank": 8,
                    "params_before": 100, "params_after": 40, "flops_before": 200, "flops_after": 80, "error": 0.1}],
        "totals": {"params_before": 100, "params_after": 40, "flops_before": 200, "flops_after": 80},
        "output_error": {},  # no calibration data: no point on the curve, no crash
    }
    (tmp_path / "r.json").write_text(json.dumps(report))
    before = (tmp_path / "r.json").read_text()
    html = write_html_report(tmp_path, tmp_path / "r.html")[0].read_text()
    assert (tmp_path / "r.json").read_text() == before  # the page's data went beside it, not over the report
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;a.onnx" in html and "b&amp;c.onnx" in html
    assert "no whole-model error" in html


def test_report_never_overwrites_a_file_it_did_not_write(run_dir, tmp_path):
    out = tmp_path / "report.html"
    mine = tmp_path / "report.page.json"
    mine.write_text('{"my": "notes"}')
    with pytest.raises(EdgelrError, match="did not write it"):
        write_html_report(run_dir, out)
    assert mine.read_text() == '{"my": "notes"}' and not out.exists()
    mine.unlink()
    write_html_report(run_dir, out)
    first = mine.read_text()
    write_html_report(run_dir, out)  # its own file: written again
    assert json.loads(mine.read_text())["written_by"] == "edgelr report" and mine.read_text() == first
