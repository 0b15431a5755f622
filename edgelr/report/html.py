"""One self-contained HTML page for a folder of edgelr JSON outputs.

    write_html_report(Path("run"), Path("report.html"))

RUN_DIR holds what `edgelr compress --report R.json` and `edgelr profile A --vs B --json P.json`
wrote. The page has no external resources and no JavaScript: inline CSS, plots as inline SVG.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from edgelr.errors import EdgelrError
from edgelr.report.tables import human, write_json, write_text

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;margin:24px auto;max-width:1100px;padding:0 16px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d8dde6;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.muted{color:#5b6677}.note{color:#5b6677;font-size:13px}
table{border-collapse:collapse;margin:6px 0 4px;font-variant-numeric:tabular-nums}
th,td{padding:3px 10px;border-bottom:1px solid #e6e9ef;text-align:right;white-space:nowrap}
th{background:#f3f5f9;font-weight:600}td.l,th.l{text-align:left}
tr.total td{font-weight:600;border-top:2px solid #aab3c2}tr.dense td{color:#6b7585}
dl.kv{display:grid;grid-template-columns:max-content auto;gap:2px 16px;margin:6px 0}dl.kv dt{color:#5b6677}dl.kv dd{margin:0}
svg{display:block;margin:6px 0}svg text{font:12px system-ui,sans-serif;fill:#1d2430}
.bar-a{fill:#8da2c0}.bar-b{fill:#e0793a}.axis{stroke:#6b7585;stroke-width:1}.grid{stroke:#e6e9ef;stroke-width:1}
.curve{fill:none;stroke:#3465a4;stroke-width:2}.point{fill:#3465a4}.point.proxy{fill:#fff;stroke:#3465a4;stroke-width:2}
.point.original{fill:#1d2430}
"""


# ---------------------------------------------------------------- reading the run folder

def _kind(data) -> str | None:
    if not isinstance(data, dict):
        return None
    if all(k in data for k in ("layers", "totals", "output_error")):
        return "compress"
    if isinstance(data.get("A"), dict) and "latency_ms" in data["A"]:
        return "profile"
    return None


def load_run(run_dir: Path) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]], list[str]]:
    """(compress reports, profiles, ignored file names), each as (file name, data), sorted by name."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EdgelrError(f"{run_dir}: no such folder (pass the folder that holds the run's JSON files)")
    compress, profiles, ignored = [], [], []
    for path in sorted(run_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise EdgelrError(f"{path}: not readable JSON ({reason})") from None
        kind = _kind(data)
        if kind == "compress":
            compress.append((path.name, data))
        elif kind == "profile":
            profiles.append((path.name, data))
        else:
            ignored.append(path.name)
    if not compress and not profiles:
        raise EdgelrError(
            f"{run_dir}: no compress report or profile JSON in it "
            "(write them with `edgelr compress ... --report R.json` and `edgelr profile ... --json P.json`)"
        )
    return compress, profiles, ignored


# ---------------------------------------------------------------- numbers

def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _whole_error(report: dict) -> float | None:
    errors = report.get("output_error") or {}
    if not isinstance(errors, dict):
        return None
    if _num(errors.get("worst")) is not None:
        return _num(errors["worst"])
    values = [_num(v) for v in errors.values() if _num(v) is not None]
    return max(values) if values else None


def _fmt(x, spec: str = ".4f") -> str:
    v = _num(x)
    return "" if v is None else format(v, spec)


def _ratio(after, before) -> float | None:
    a, b = _num(after), _num(before)
    return a / b if a is not None and b else None


def _latency_point(name: str, report: dict, profiles: list[tuple[str, dict]]) -> tuple[float, str] | None:
    """(latency ratio, how it was obtained) for one compress report."""
    rounds = (report.get("latency") or {}).get("rounds") if isinstance(report.get("latency"), dict) else None
    if isinstance(rounds, list):
        measured = [_num(r.get("measured_ratio")) for r in rounds if isinstance(r, dict)]
        measured = [m for m in measured if m is not None]
        if measured:
            return measured[-1], "measured (latency rounds)"
    output = Path(str(report.get("output", ""))).name
    for _pname, prof in profiles:
        b = prof.get("B")
        a = prof.get("A")
        if output and isinstance(b, dict) and isinstance(a, dict) and Path(str(b.get("model", ""))).name == output:
            ratio = _num(prof.get("ratio_p50"))
            if ratio is None:
                ratio = _ratio((b.get("latency_ms") or {}).get("p50"), (a.get("latency_ms") or {}).get("p50"))
            if ratio is not None:
                return ratio, "measured (profile p50)"
    totals = report.get("totals") or {}
    ratio = _ratio(totals.get("flops_after"), totals.get("flops_before"))
    if ratio is not None:
        return ratio, "FLOPs ratio (proxy, not measured)"
    return None


def _nice_ticks(hi: float, n: int = 5) -> list[float]:
    if hi <= 0:
        return [0.0]
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(hi / step + 1e-9) + 1)]


def _tick(v: float) -> str:
    return f"{v:.4g}"


# ---------------------------------------------------------------- SVG plots

def bar_chart(rows: list[tuple[str, float, float]], label_a: str, label_b: str, unit: str = "ms") -> str:
    """Horizontal grouped bars: per row (label, A value, B value)."""
    label_w, plot_w, right = 190, 600, 80
    bar_h, gap, top = 11, 10, 34
    width = label_w + plot_w + right
    height = top + len(rows) * (2 * bar_h + gap) + 28
    hi = max([max(a, b) for _, a, b in rows] + [1e-12])
    ticks = _nice_ticks(hi)
    hi = max(hi, ticks[-1])
    x = lambda v: label_w + plot_w * v / hi
    parts = [(f'<svg class="bars" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label_a)} vs {escape(label_b)}">')]
    parts.append(f'<rect class="bar-a" x="{label_w}" y="8" width="14" height="10"/>'
                 f'<text x="{label_w + 20}" y="17">{escape(label_a)}</text>'
                 f'<rect class="bar-b" x="{label_w + 260}" y="8" width="14" height="10"/>'
                 f'<text x="{label_w + 280}" y="17">{escape(label_b)}</text>')
    bottom = height - 22
    for t in ticks:
        parts.append(f'<line class="grid" x1="{x(t):.1f}" y1="{top - 4}" x2="{x(t):.1f}" y2="{bottom}"/>'
                     f'<text x="{x(t):.1f}" y="{bottom + 15}" text-anchor="middle">{_tick(t)}</text>')
    parts.append(f'<text x="{label_w + plot_w + 8}" y="{bottom + 15}">{escape(unit)}</text>')
    for i, (label, a, b) in enumerate(rows):
        y = top + i * (2 * bar_h + gap)
        short = label if len(label) <= 28 else "…" + label[-27:]
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h + 4}" text-anchor="end"><title>{escape(label)}</title>{escape(short)}</text>')
        for j, (cls, v) in enumerate((("bar-a", a), ("bar-b", b))):
            yy = y + j * bar_h
            w = max(plot_w * v / hi, 0.5)
            parts.append(f'<rect class="bar {cls}" x="{label_w}" y="{yy}" width="{w:.1f}" height="{bar_h - 1}">'
                         f'<title>{escape(label)}: {v:.4g} {escape(unit)}</title></rect>'
                         f'<text x="{label_w + w + 4:.1f}" y="{yy + bar_h - 2}" font-size="10">{v:.3g}</text>')
    parts.append(f'<line class="axis" x1="{label_w}" y1="{top - 4}" x2="{label_w}" y2="{bottom}"/></svg>')
    return "".join(parts)


_LEGEND = (("point", "measured latency"), ("point proxy", "FLOPs ratio (proxy)"), ("point original", "original"))


def scatter(points: list[tuple[float, float, str, str]], line: list[tuple[float, float]] | None = None,
            legend=_LEGEND, y_label: str = "whole-model relative output error") -> str:
    """Latency ratio (x) vs error (y); points are (x, y, label, 'original'|'measured'|'proxy'). The curve
    joins the points, or follows `line` (e.g. a search's predicted front) when given."""
    left, right, top, bottom_pad = 64, 200, 16, 46
    plot_w, plot_h = 560, 300
    width, height = left + plot_w + right, top + plot_h + bottom_pad
    line = line or []
    x_hi = max([p[0] for p in points] + [x for x, _ in line] + [1.0]) * 1.05
    y_hi = max([p[1] for p in points] + [y for _, y in line] + [1e-6]) * 1.15
    xt, yt = _nice_ticks(x_hi), _nice_ticks(y_hi)
    x_hi, y_hi = max(x_hi, xt[-1]), max(y_hi, yt[-1])
    sx = lambda v: left + plot_w * v / x_hi
    sy = lambda v: top + plot_h - plot_h * v / y_hi
    parts = [(f'<svg class="curve-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="latency vs error">')]
    for t in xt:
        parts.append(f'<line class="grid" x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{top + plot_h}"/>'
                     f'<text x="{sx(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_tick(t)}</text>')
    for t in yt:
        parts.append(f'<line class="grid" x1="{left}" y1="{sy(t):.1f}" x2="{left + plot_w}" y2="{sy(t):.1f}"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_tick(t)}</text>')
    parts.append(f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/>'
                 f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>'
                 f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">latency relative to the original (lower is faster)</text>'
                 f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>')
    ordered = sorted(points, key=lambda p: (p[0], p[1]))
    curve = sorted(line) if line else [(p[0], p[1]) for p in ordered]
    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(curve))
    parts.append(f'<path class="curve" d="{path}"/>')
    for x, y, label, kind in ordered:
        cls = {"original": "point original", "proxy": "point proxy"}.get(kind, "point")
        parts.append(f'<circle class="{cls}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5">'
                     f'<title>{escape(label)}: latency {x:.3f}, error {y:.4f}</title></circle>'
                     f'<text x="{sx(x) + 8:.1f}" y="{sy(y) - 7:.1f}" font-size="11">{escape(label)}</text>')
    lx = left + plot_w + 16
    for k, (cls, text) in enumerate(legend):
        y = top + 10 + 20 * k
        mark = (f'<line class="curve" x1="{lx - 6}" y1="{y}" x2="{lx + 6}" y2="{y}"/>' if cls == "curve" else
                f'<circle class="{cls}" cx="{lx}" cy="{y}" r="5"/>')
        parts.append(f'{mark}<text x="{lx + 10}" y="{y + 4}">{escape(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------- HTML sections

def _table(headers: list[str], rows: list[list[str]], left: int = 3, row_classes: list[str] | None = None) -> str:
    """Cells are already-escaped strings; the first `left` columns are left-aligned."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(headers))
    body = []
    for k, row in enumerate(rows):
        cls = (row_classes or [""] * len(rows))[k]
        cells = "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(row))
        body.append(f'<tr class="{cls}">{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _compress_section(name: str, report: dict) -> str:
    rows, classes = [], []
    for r in report.get("layers") or []:
        if not isinstance(r, dict):
            continue
        form = str(r.get("form", "?"))
        dense = form == "dense"
        if dense and r.get("note"):
            form += f" ({r['note']})"
        rows.append([escape(str(r.get("name", "?"))), escape(str(r.get("op", ""))), escape(form),
                     escape(str(r.get("rank") or "")),
                     escape(human(_num(r.get("params_before")))), escape(human(_num(r.get("params_after")))),
                     escape(human(_num(r.get("flops_before")))), escape(human(_num(r.get("flops_after")))),
                     "" if dense else _fmt(r.get("error"))])
        classes.append("dense" if dense else "")
    totals = report.get("totals") or {}
    factorized = sum(1 for r in report.get("layers") or [] if isinstance(r, dict) and r.get("form") != "dense")
    rows.append(["total", "", f"{factorized} factorized", "",
                 escape(human(_num(totals.get("params_before")))), escape(human(_num(totals.get("params_after")))),
                 escape(human(_num(totals.get("flops_before")))), escape(human(_num(totals.get("flops_after")))), ""])
    classes.append("total")
    pr = _ratio(totals.get("params_after"), totals.get("params_before"))
    fr = _ratio(totals.get("flops_after"), totals.get("flops_before"))
    err = _whole_error(report)
    budget = f"{escape(str(report.get('metric', '?')))} {escape(_fmt(report.get('fraction'), 'g'))}"
    facts = [
        ("model", f"{escape(str(report.get('source', '?')))} → {escape(str(report.get('output', '?')))}"),
        ("budget", budget + ("" if report.get("budget_reached", True) else " (not reached)")),
        ("SVD", "data-aware (whitened)" if report.get("data_aware") else "plain (no calibration data)"),
        ("kept", f"{_fmt(pr, '.3f') or '?'} of the params, {_fmt(fr, '.3f') or '?'} of the FLOPs of these layers"),
        ("output error", "not measured (no calibration data)" if err is None else
         f"worst {err:.4f} relative (each output and channel group on its own scale), on the "
         f"{escape(str(report.get('judged_on', 'calibration')))} samples"
         + "".join(f"; {escape(str(k))}: {_fmt(v)}" for k, v in (report.get("output_error") or {}).items() if k != "worst")),
    ]
    task = report.get("task")
    if isinstance(task, dict) and _num(task.get("value")) is not None:
        facts.append(("task metric", f"{escape(str(task.get('metric', '?')))} {_fmt(task.get('value'), '.3f')} against "
                                     f"the original (floor {_fmt(task.get('floor'), '.2f')})"
                      + "".join(f"; {escape(k.replace('_', ' '))} {_fmt(task.get(k), '.3f')}"
                                for k in ("top_class_agreement", "detections_kept", "class_score_error") if k in task)))
    lat = report.get("latency")
    if isinstance(lat, dict):
        for r in lat.get("rounds") or []:
            if isinstance(r, dict):
                facts.append((f"latency round {escape(str(r.get('round', '?')))}",
                              f"predicted {_fmt(r.get('predicted_ratio'), '.3f')}, measured {_fmt(r.get('measured_ratio'), '.3f')} of the original"))
    warnings = [w for w in report.get("warnings") or []]
    html = [f"<h3>{escape(name)}</h3>", _kv(facts),
            _table(["layer", "op", "form", "rank", "params", "→", "FLOPs", "→", "rel.err"], rows, 3, classes)]
    if warnings:
        html.append("<ul class=\"note\">" + "".join(f"<li>{escape(str(w))}</li>" for w in warnings) + "</ul>")
    skipped = [s for s in report.get("skipped") or [] if isinstance(s, dict)]
    if skipped:
        html.append('<p class="note">left alone: ' + "; ".join(
            f"{escape(str(s.get('name', '?')))} ({escape(str(s.get('reason', '')))})" for s in skipped[:20]) + "</p>")
    return "".join(html)


def _kv(pairs: list[tuple[str, str]]) -> str:
    """Values are already escaped."""
    return '<dl class="kv">' + "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def _latency_section(compress: list[tuple[str, dict]], profiles: list[tuple[str, dict]]) -> str:
    html = []
    for name, prof in profiles:
        layers = [r for r in prof.get("layers") or [] if isinstance(r, dict)]
        rows = [(str(r.get("layer", "?")), _num(r.get("a_ms")), _num(r.get("b_ms"))) for r in layers]
        rows = [(n, a, b) for n, a, b in rows if a is not None and b is not None]
        if not rows or not isinstance(prof.get("B"), dict):
            continue
        a_model = Path(str(prof["A"].get("model", "A"))).name
        b_model = Path(str(prof["B"].get("model", "B"))).name
        html.append(f"<h3>{escape(name)}: measured per layer (ONNX Runtime profiler, mean ms per run)</h3>")
        html.append(bar_chart(rows, f"A: {a_model}", f"B: {b_model}"))
        ratio = _num(prof.get("ratio_p50"))
        if ratio is not None:
            html.append(f'<p class="note">B / A end to end (p50): {ratio:.3f} (B is {1 / ratio:.2f}× the speed of A)</p>')
    for name, report in compress:
        layers = [r for r in report.get("layers") or [] if isinstance(r, dict)]
        for before, after, scale, title in (("latency_before", "latency_after", 1e3, "predicted per layer (latency tables, ms)"),
                                            ("measured_ms_before", "measured_ms_after", 1.0,
                                             "measured per layer (ONNX Runtime profiler, mean ms per run)")):
            rows = [(str(r.get("name", "?")), r[before] * scale, r[after] * scale) for r in layers
                    if _num(r.get(before)) is not None and _num(r.get(after)) is not None]
            if rows:
                html.append(f"<h3>{escape(name)}: {title}</h3>")
                html.append(bar_chart(rows, "dense", "after compression"))
    if not html:
        return '<p class="muted">No per-layer latency in this run: profile with <code>edgelr profile A.onnx --vs B.onnx --json P.json</code>, or compress with <code>--latency</code>.</p>'
    return "".join(html)


def _curve_section(compress: list[tuple[str, dict]], profiles: list[tuple[str, dict]]) -> str:
    points, rows = [(1.0, 0.0, "original", "original")], []
    for name, report in compress:
        err = _whole_error(report)
        lat = _latency_point(name, report, profiles)
        if err is None or lat is None:
            rows.append([escape(name), "left out: " + ("no whole-model error" if err is None else "no latency or FLOPs ratio"), "", ""])
            continue
        ratio, how = lat
        points.append((ratio, err, Path(name).stem, "proxy" if how.startswith("FLOPs") else "measured"))
        rows.append([escape(name), escape(how), f"{ratio:.3f}", f"{err:.4f}"])
    if len(points) == 1:
        return '<p class="muted">No compress report with both a whole-model error and a latency ratio.</p>' + (
            _table(["report", "latency from", "latency ratio", "error"], rows, 2) if rows else "")
    return scatter(points) + _table(["report", "latency from", "latency ratio", "error"], rows, 2) + \
        '<p class="note">Hollow points use the FLOPs ratio as a stand-in for latency; it is not a measurement.</p>'


def _front_section(compress: list[tuple[str, dict]]) -> str:
    """For each --latency run: the trade-offs the search weighed (predicted) and where its rounds landed."""
    html = []
    for name, report in compress:
        lat = report.get("latency") if isinstance(report.get("latency"), dict) else {}
        front = [(_num(p.get("predicted_ratio")), _num(p.get("predicted_error"))) for p in lat.get("front") or []
                 if isinstance(p, dict)]
        front = [(x, y) for x, y in front if x is not None and y is not None]
        if not front:
            continue
        points = [(1.0, 0.0, "original", "original")]
        for r in [r for r in lat.get("rounds") or [] if isinstance(r, dict)]:
            x, e2 = _num(r.get("measured_ratio")), _num(r.get("predicted_error2"))
            if x is not None and e2 is not None:
                points.append((x, e2**0.5, f"round {r.get('round', '?')}", "measured"))
        legend = (("curve", "predicted front"), ("point", "round: measured latency"), ("point original", "original"))
        html.append(f"<h3>{escape(name)}</h3>" + scatter(points, front, legend, "predicted output error (weighted layer errors, summed)"))
    if not html:
        return '<p class="muted">No <code>compress --latency</code> report in this run.</p>'
    return "".join(html) + ('<p class="note">The curve is every allocation the search could pick, from the latency '
                            'tables and the whitened spectra; each point is a round of the search, at the latency measured '
                            'for the whole compressed model.</p>')


def _target_section(compress: list[tuple[str, dict]], profiles: list[tuple[str, dict]]) -> str:
    html = []
    for name, prof in profiles:
        a = prof["A"]
        facts = [("onnxruntime", escape(str(a.get("onnxruntime", "?")))),
                 ("threads", escape(str(a.get("threads", "?")))),
                 ("runs", f"{escape(str(a.get('runs', '?')))} timed after {escape(str(a.get('warmup', '?')))} warm-up"),
                 ("peak memory", f"{_fmt(a.get('peak_rss_mb'), '.0f')} MB resident")]
        html.append(f"<h3>{escape(name)}</h3>" + _kv(facts))
        rows = []
        for key in ("A", "B"):
            p = prof.get(key)
            if isinstance(p, dict):
                ms = p.get("latency_ms") or {}
                rows.append([key, escape(str(p.get("model", "?")))] + [_fmt(ms.get(k), ".3f") for k in ("min", "p50", "p90", "p99", "mean")]
                            + [_fmt(p.get("throughput_per_s"), ".1f")])
        html.append(_table(["", "model", "min ms", "p50 ms", "p90 ms", "p99 ms", "mean ms", "runs/s"], rows, 2))
    targets = sorted({str(r["latency"].get("target")) for _, r in compress
                      if isinstance(r.get("latency"), dict) and r["latency"].get("target")})
    if targets:
        html.append(_kv([("latency tables", escape(", ".join(targets)))]))
    if not html:
        return '<p class="muted">No profile JSON in this run: the target and versions are unknown.</p>'
    return "".join(html)


def render_html(run_dir: Path, compress: list[tuple[str, dict]], profiles: list[tuple[str, dict]], ignored: list[str]) -> str:
    title = f"edgelr report: {Path(run_dir).resolve().name}"
    body = [f"<h1>{escape(title)}</h1>",
            f'<p class="muted">{escape(str(run_dir))}: {len(compress)} compress report(s), {len(profiles)} profile(s)'
            + (f"; ignored {escape(', '.join(ignored))}" if ignored else "") + "</p>",
            "<h2>Target and versions</h2>", _target_section(compress, profiles),
            "<h2>Latency vs error</h2>", _curve_section(compress, profiles) if compress else
            '<p class="muted">No compress report in this run.</p>',
            "<h2>Latency search</h2>", _front_section(compress),
            "<h2>Per-layer latency</h2>", _latency_section(compress, profiles),
            "<h2>Compression</h2>"]
    body += [_compress_section(n, r) for n, r in compress] or ['<p class="muted">No compress report in this run.</p>']
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


WRITTEN_BY = "edgelr report"  # in the page's JSON: a file with it is ours to write again


def page_data_path(out: Path) -> Path:
    """Where the page's data goes: beside it, under a name of its own (report.html -> report.page.json),
    so that it never lands on a report.json that compress --report wrote."""
    return out.with_name(out.stem + ".page.json")


def write_html_report(run_dir: Path, out: Path) -> tuple[Path, Path]:
    """Read every *.json in RUN_DIR and write one self-contained HTML page to OUT, and the same data as
    JSON beside it (page_data_path), both atomically. An existing data file that this command did not
    write is refused, before anything is written. Returns (page, data file)."""
    run_dir, out = Path(run_dir), Path(out)
    compress, profiles, ignored = load_run(run_dir)
    if not out.parent.is_dir():
        raise EdgelrError(f"{out}: folder {out.parent} does not exist")
    data_path = page_data_path(out)
    if data_path.exists() and not _ours(data_path):
        raise EdgelrError(f"{data_path}: exists and edgelr report did not write it; it is not overwritten: "
                          "pick another -o name")
    page = render_html(run_dir, compress, profiles, ignored)
    curve = []
    for name, report in compress:
        point = _latency_point(name, report, profiles)
        if point is not None:
            curve.append({"report": name, "latency_ratio": point[0], "latency_from": point[1],
                          "output_error": _whole_error(report)})
    data = {"written_by": WRITTEN_BY, "compress": dict(compress), "profiles": dict(profiles),
            "latency_vs_error": curve, "ignored": ignored}
    write_json(data, data_path)
    return write_text(out, page), data_path


def _ours(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("written_by") == WRITTEN_BY
