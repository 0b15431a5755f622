"""The HTML run report: built from a real run on the demo model, rendered in a real headless browser."""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgelr import FactorizeConfig, compress
from edgelr.demo import build_model, synthetic_images
from edgelr.errors import EdgelrError
from edgelr.report.html import write_html_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SUMMARY_TINT = (0xEE, 0xF4, 0xFB)  # #summary's background in html._CSS
LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc", "head"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as a user would make it: two compress reports and a profile JSON from the CLI."""
    work = tmp_path_factory.mktemp("html-work")
    run = tmp_path_factory.mktemp("html-run")
    onnx.save(build_model(), work / "demo.onnx")
    np.savez(work / "calib.npz", image=synthetic_images(16, seed=1))
    np.savez(work / "heldout.npz", image=synthetic_images(8, seed=2))
    compress(work / "demo.onnx", work / "params50.onnx", FactorizeConfig(params=0.5), calib=work / "calib.npz",
             heldout=work / "heldout.npz", report=run / "params50.json", progress=False)
    compress(work / "demo.onnx", work / "flops30.onnx", FactorizeConfig(flops=0.3), calib=work / "calib.npz",
             report=run / "flops30.json", progress=False)
    # timed by compress on this machine for a device of another architecture (when this one is x86_64)
    compress(work / "demo.onnx", work / "latency80.onnx", FactorizeConfig(latency=0.8), calib=work / "calib.npz",
             report=run / "latency80.json", progress=False, target="rpi5")
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
    assert "onnxruntime" in html and "FLOPs ratio (proxy" in html and "measured (profile.json, p50)" in html
    assert "ignored notes.json" in html


class Outline(HTMLParser):
    """The body's top-level elements in order, as [tag, id, text], and the text of the #summary section."""

    VOID = frozenset({"meta", "br", "hr", "img", "link", "input"})

    def __init__(self):
        super().__init__()
        self.top, self.open, self.summary = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        self.open.append(tag)
        if self.open[:2] == ["html", "body"] and len(self.open) == 3:
            self.top.append([tag, dict(attrs).get("id", ""), ""])

    def handle_startendtag(self, tag, attrs):  # <rect .../>: nothing opens
        pass

    def handle_endtag(self, tag):
        if tag not in self.VOID:
            self.open.pop()

    def handle_data(self, data):
        if len(self.open) >= 3 and self.open[1] == "body":
            self.top[-1][2] += data
            if self.top[-1][1] == "summary":
                self.summary.append(data)


def outline(html: str) -> Outline:
    parsed = Outline()
    parsed.feed(html)
    return parsed


def test_page_reads_top_down(page):
    """Summary first, then the compression tables, then the plots; the per-node bars folded away at the end."""
    top = outline(page.read_text()).top
    assert [t[0] for t in top[:3]] == ["h1", "p", "section"] and top[2][1] == "summary"
    headings = [t[2].strip() for t in top if t[0] == "h2"]
    assert headings == ["Compression", "Latency vs error", "Latency search", "Where it was timed"]
    assert top[-1][:2] == ["details", "per-layer"]  # the only folded part, and the last
    html = page.read_text()
    folded = html[html.index('<details id="per-layer">'):]
    assert html.count('<svg class="bars"') == folded.count('<svg class="bars"') >= 3  # every bar chart is folded
    assert "<details open" not in html


def test_summary_says_what_a_reader_asks_first(page, run_dir):
    """Per compress run: speed-up and where it was timed, file size, parameters, worst output error and on
    which output and samples; the same numbers in the page's JSON, checked against the files they describe."""
    text = " ".join(" ".join(outline(page.read_text()).summary).split())
    for header in ("speed-up", "file size", "parameters", "worst output error", "task metric"):
        assert header in text
    assert "demo.onnx → params50.onnx" in text and "on logits" in text
    assert "on the held-out samples" in text and "on the calibration samples" in text
    assert "timed on the machine that ran profile (ONNX Runtime" in text  # params50: the profile's p50
    assert "FLOPs" in text and "a proxy" in text  # flops30: not measured, said so
    assert "measured (latency round" in text and "timed on the machine that ran compress (" in text
    if platform.machine() == "x86_64":
        assert "not on rpi5" in text  # host timings are flagged as the host's

    summary = {s["report"]: s for s in json.loads(page.with_name("report.page.json").read_text())["summary"]}
    profile = json.loads((run_dir / "profile.json").read_text())
    assert summary["params50.json"]["speed"]["ratio"] == pytest.approx(profile["ratio_p50"])
    assert summary["flops30.json"]["speed"]["measured"] is False
    rounds = json.loads((run_dir / "latency80.json").read_text())["latency"]
    kept = next(r for r in rounds["rounds"] if r["round"] == rounds["kept_round"])
    assert summary["latency80.json"]["speed"]["ratio"] == pytest.approx(kept["measured_ratio"])
    for name, s in summary.items():
        source, output = (Path(s[k]) for k in ("source", "output"))
        assert s["file_bytes"] == [source.stat().st_size, output.stat().st_size], name
        assert s["params"]["counted"] == "whole model" and s["params"]["after"] < s["params"]["before"], name
        report = json.loads((run_dir / name).read_text())
        assert s["worst_error"]["value"] == report["output_error"]["worst"] and s["worst_error"]["output"] == "logits"


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

    unfolded = tmp_path / "unfolded.html"  # as after a click on "Per-layer latency"
    unfolded.write_text(page.read_text().replace('<details id="per-layer">', '<details id="per-layer" open>'))
    shot = tmp_path / "shot.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1200,6000", unfolded.as_uri(), user_data=tmp_path / "profile-shot")
    assert done.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, done.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (6000, 1200)
    assert image.std() > 10  # not a blank page
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # text, bars in two colours, lines
    ink = (image < 200).any(axis=2).mean()
    assert 0.01 < ink < 0.6
    orange = ((image[..., 0] > 200) & (image[..., 1] > 100) & (image[..., 1] < 140) & (image[..., 2] < 90)).sum()
    assert orange > 200  # the B bars (#e0793a) are drawn


# Measures the laid-out page in the browser; the page itself has no script, so this goes into a copy only.
_LAYOUT_PROBE = """<script>
const box = el => el.getBoundingClientRect();
const texts = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
let speed = null;
while (speed === null && texts.nextNode()) {
  if (texts.currentNode.nodeValue.includes("speed-up")) {
    const range = document.createRange(); range.selectNodeContents(texts.currentNode); speed = box(range).top;
  }
}
const compression = [...document.querySelectorAll("h2")].find(h => h.textContent === "Compression");
document.body.dataset.layout = JSON.stringify({summary: [box(summary).top, box(summary).bottom], speed,
  compression: box(compression).top, barsShown: document.querySelector("svg.bars").checkVisibility()});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_first_screen_shows_the_summary(page, tmp_path):
    """In a 1200x1000 window the summary, speed-up included, is on the first screen, above the compression
    table; the per-node bars are folded (hidden until unfolded)."""
    from PIL import Image

    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _LAYOUT_PROBE + "</body>"))
    dom = _chromium("--window-size=1200,1000", "--dump-dom", probe.as_uri(), user_data=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    layout = json.loads(unescape(re.search(r'data-layout="([^"]*)"', dom.stdout)[1]))
    top, bottom = layout["summary"]
    assert 0 < top < 600 and bottom < 1000  # the whole summary on the first screen
    assert top < layout["speed"] < 1000
    assert layout["compression"] > bottom  # the table comes after it
    assert layout["barsShown"] is False  # folded

    shot = tmp_path / "first-screen.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1200,1000", page.resolve().as_uri(),
                     user_data=tmp_path / "profile-shot")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    tint = (np.abs(image - SUMMARY_TINT).sum(axis=2) <= 6).any(axis=1)  # rows showing the summary's background
    rows = np.flatnonzero(tint)
    assert rows.size > 150 and rows[0] < 600  # drawn, and near the top


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
    with pytest.raises(EdgelrError, match="edgelr did not write"):
        write_html_report(run_dir, out)
    assert mine.read_text() == '{"my": "notes"}' and not out.exists()
    mine.unlink()
    write_html_report(run_dir, out)
    first = mine.read_text()
    write_html_report(run_dir, out)  # its own file: written again
    assert json.loads(mine.read_text())["written_by"] == "edgelr report" and mine.read_text() == first


@pytest.fixture()
def own_run(run_dir, tmp_path):
    """A copy of the run folder, for tests that point -o into it (the shared one must stay as it is)."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.parametrize("where", ["user-page", "compress-report", "folder", "link-to-own-page"])
def test_output_path_holding_anything_but_its_own_page_is_refused(own_run, tmp_path, where):
    """-o on an existing file edgelr report did not write (a page of the user's, the compress report the run
    reads), on a folder, or on a link is refused in one line before anything is written."""
    if where == "user-page":
        out = tmp_path / "mine.html"
        out.write_text("<!DOCTYPE html><html><body>my page</body></html>")
    elif where == "compress-report":
        out = own_run / "params50.json"
    elif where == "folder":
        out = own_run
    else:
        write_html_report(own_run, tmp_path / "real.html")
        out = tmp_path / "link.html"
        out.symlink_to(tmp_path / "real.html")
    before = {p: p.read_bytes() for p in [*tmp_path.rglob("*")] if p.is_file() and not p.is_symlink()}
    with pytest.raises(EdgelrError, match="is not overwritten") as err:
        write_html_report(own_run, out)
    assert "\n" not in str(err.value)
    after = {p: p.read_bytes() for p in [*tmp_path.rglob("*")] if p.is_file() and not p.is_symlink()}
    assert after == before  # nothing changed, nothing new (no data file, no temp file)
    assert out.is_symlink() == (where == "link-to-own-page")


def test_cli_refuses_a_users_file_in_one_line(own_run, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("my notes\n")
    done = subprocess.run([sys.executable, "-m", "edgelr", "report", own_run, "-o", out],
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 1 and out.read_text() == "my notes\n"
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"edgelr report: error: {out}: exists and is a file edgelr did not write")
    assert not (tmp_path / "report.page.json").exists()


def test_page_and_data_land_together_or_not_at_all(own_run, tmp_path):
    """The data file is placed first; when the page cannot be (here its name is too long for the filesystem)
    the data file this run created is taken back: no half-written report."""
    out = tmp_path / ("r." + "x" * 260)
    with pytest.raises(EdgelrError, match="cannot write") as err:
        write_html_report(own_run, out)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_report_inside_the_run_folder_is_written_again_and_not_read_back(own_run):
    """-o inside the run folder: the page's data lands there, is not taken for input next time, and both
    files are the report's own to rewrite."""
    page, data = write_html_report(own_run, own_run / "report.html")
    first = data.read_text()
    write_html_report(own_run, own_run / "report.html")
    assert data.read_text() == first and "ignored report.page.json" not in page.read_text()
    assert page.read_text().count('<meta name="generator" content="edgelr report">') == 1
