"""Issue 20, item 7: the small things that make a first run feel broken. -q after the verb, no progress-bar
fragments when stderr is a log, profile sized by --shapes alone, tools/photos.py saying what it wrote."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgelr.io import progress

REPO = Path(__file__).resolve().parents[1]


def _edgelr(*args, **env) -> subprocess.CompletedProcess:
    """The real command, stderr piped (not a terminal), with ENV on top of this process's."""
    return subprocess.run([sys.executable, "-m", "edgelr", *map(str, args)], check=False, capture_output=True,
                          timeout=600, env={k: v for k, v in (os.environ | env).items() if v is not None})


def test_compress_bars_only_where_they_redraw_and_never_with_q_after_the_verb(demo):
    compress = ["compress", demo / "m.onnx", "--params", "0.5", "--calib", demo / "calib.npz"]
    # a cold cache each, so every run has the same stages (and bars) to go through
    drawn = _edgelr(*compress, "-o", demo / "a.onnx", EDGELR_PROGRESS="bars", EDGELR_CACHE=str(demo / "c1"))
    assert drawn.returncode == 0 and b"\r" in drawn.stderr and b"%|" in drawn.stderr  # what a terminal gets
    quiet = _edgelr(*compress, "-o", demo / "b.onnx", "-q", EDGELR_PROGRESS="bars", EDGELR_CACHE=str(demo / "c2"))
    assert quiet.returncode == 0 and b"%|" not in quiet.stderr and b"\r" not in quiet.stderr, quiet.stderr
    logged = _edgelr(*compress, "-o", demo / "c.onnx", EDGELR_PROGRESS=None, EDGELR_CACHE=str(demo / "c3"))
    assert logged.returncode == 0 and b"\r" not in logged.stderr, logged.stderr  # a short run: not a line of bar
    assert b"%|" not in logged.stderr and b"wrote" in logged.stdout


def test_a_long_bar_on_a_log_writes_whole_lines_now_and_then(monkeypatch, capsys):
    monkeypatch.delenv(progress.MODE_VARIABLE, raising=False)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.05)
    assert progress.progress_mode() == "lines"  # pytest's captured stderr is no terminal
    bar = progress.progress_bar(total=20, desc="distilling", unit="step")
    for step in range(20):
        time.sleep(0.01)
        bar.update()
        bar.set_postfix(loss=step)  # asks for a redraw every step; the log gets one per LINE_EVERY_S
    bar.close()
    for _ in progress.progress_bar(range(3), desc="short", unit="layer"):  # over before LINE_EVERY_S: silent
        pass
    for _ in progress.progress_bar(range(3), desc="hidden", unit="layer", show=False):
        time.sleep(0.06)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and 1 < len(lines) < 10, err
    assert all(line.startswith("distilling: ") for line in lines), err
    assert re.match(r"distilling: 100%\| 20/20 \[.*loss=19\]$", lines[-1]), err  # and where it ended


def test_profile_sizes_a_dynamic_input_by_shapes_without_calib(demo):
    run = _edgelr("profile", demo / "m.onnx", "--shapes", "image=2x3x32x32", "--runs", 3, "--warmup", 1)
    assert run.returncode == 0, run.stderr
    assert "inputs: image 2x3x32x32 (--shapes)" in run.stdout.decode()


def test_photos_says_what_it_wrote(tmp_path):
    pytest.importorskip("skimage")  # scikit-image's own photos: offline
    calib, heldout = tmp_path / "calib.npz", tmp_path / "heldout.npz"
    command = [sys.executable, REPO / "tools" / "photos.py", "--size", 32, "--crops", 1, "--out", calib, "--heldout", heldout]
    run = subprocess.run(list(map(str, command)), check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for path, line in zip((calib, heldout), run.stdout.splitlines(), strict=True):
        images = np.load(path)["images"]
        assert re.fullmatch(rf"wrote {re.escape(str(path))}: {len(images)} samples of \d+ photos, "
                            rf"'images' \[{len(images)}, 3, 32, 32\]", line), line
