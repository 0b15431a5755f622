"""One self-contained HTML page for a folder of edgelr JSON outputs.

    write_html_report(Path("run"), Path("report.html"))

RUN_DIR holds what `edgelr compress --report R.json` and `edgelr profile A --vs B --json P.json`
wrote. The page has no external resources and no JavaScript: inline CSS, plots as inline SVG.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path

from edgelr.errors import EdgelrError
from edgelr.report.tables import human, write_own_files

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
#summary{background:#eef4fb;border:1px solid #c9d8ec;border-radius:6px;padding:2px 14px 10px;margin:12px 0 8px}
#summary h2{margin-top:8px;border:0}#summary table{background:#fff}
#summary td{white-space:normal;vertical-align:top;text-align:left;min-width:90px}#summary th{text-align:left}
#summary .note{display:block}
details>summary{cursor:pointer}details>summary h2{display:inline-block;border:0;margin-bottom:0}
"""


# ---------------------------------------------------------------- reading the run folder

def _kind(data) -> str | None:
    if not isinstance(data, dict):
        return None
    if data.get("written_by") == WRITTEN_BY:
        return "page data"
    # layers and totals only come with a factorize pass; a prune- or quantize-only run is a compress report too
    if all(k in data for k in ("source", "output", "output_error")):
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
        elif kind != "page data":  # an earlier report's data (-o inside the run folder) is output, not input
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


@dataclass(frozen=True)
class Speed:
    """How fast a compressed model runs against its original, and where that was found out."""

    ratio: float     # latency after / before (below 1: faster)
    measured: bool   # False: the FLOPs ratio stands in for a measurement
    source: str      # what the number is, e.g. "measured (latency round 3)"
    where: str       # where it was timed, in words ("" when not measured)


_ORT_TABLE = re.compile(r"ort-(?P<version>[^-]+)-cpu-t(?P<threads>\d+)")
# compress's own warning when it timed on a machine that is not the target; the report JSON has no
# structured field for the host, so the page quotes what compress said (and falls back to the table's key)
_HOST_WARNING = re.compile(r"latency timed on this machine \((?P<host>[^)]*)\), not on (?P<target>[^:]*)")


def _plural(n, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _compress_timing(report: dict) -> Speed | None:
    """The latency search's kept round, timed by compress on the machine it ran on."""
    lat = report.get("latency") if isinstance(report.get("latency"), dict) else {}
    rounds = [r for r in lat.get("rounds") or [] if isinstance(r, dict) and _num(r.get("measured_ratio")) is not None]
    if not rounds:
        return None
    kept = next((r for r in rounds if r.get("round") == lat.get("kept_round")), rounds[-1])
    for warning in report.get("warnings") or []:
        said = _HOST_WARNING.search(str(warning))
        if said:
            where = f"timed on the machine that ran compress ({said['host']}), not on {said['target']}"
            break
    else:
        table = _ORT_TABLE.match(str(lat.get("target", "")))
        runtime = (f"ONNX Runtime {table['version']} CPU, {_plural(table['threads'], 'thread')}" if table
                   else "ONNX Runtime CPU")
        where = f"timed on the machine that ran compress ({runtime})" + (
            f", with {report['target']}'s settings" if report.get("target") else "")
    if isinstance(lat.get("device"), dict):  # compress --on: the search timed on the device itself
        where = _profiled_where(lat["device"])
    return Speed(_num(kept["measured_ratio"]), True, f"measured (latency round {kept.get('round', '?')})", where)


def _profile_timing(output: str, profiles: list[tuple[str, dict]]) -> tuple[Speed, bool] | None:
    """(p50 of the profile that timed OUTPUT as its B, whether it ran on a device over SSH)."""
    for pname, prof in profiles:
        a, b = prof.get("A"), prof.get("B")
        if not (output and isinstance(a, dict) and isinstance(b, dict) and Path(str(b.get("model", ""))).name == output):
            continue
        ratio = _num(prof.get("ratio_p50"))
        if ratio is None:
            ratio = _ratio((b.get("latency_ms") or {}).get("p50"), (a.get("latency_ms") or {}).get("p50"))
        if ratio is None:
            continue
        return Speed(ratio, True, f"measured ({pname}, p50)", _profiled_where(b)), bool(b.get("host"))
    return None


def _profiled_where(timed: dict) -> str:
    """Where a profile's model was timed: on a device over SSH (--on), or on the machine that ran profile."""
    runtime = f"ONNX Runtime {timed.get('onnxruntime', '?')}, {_plural(timed.get('threads', '?'), 'thread')}"
    if timed.get("host"):
        return f"timed on {timed['host']} over SSH ({runtime})"
    return f"timed on the machine that ran profile ({runtime})" + (
        f", with {timed['target']}'s settings, not over SSH on the device" if timed.get("target") else "")


def speed(report: dict, profiles: list[tuple[str, dict]]) -> Speed | None:
    """The best evidence of a compressed model's speed: a profile on the device, else compress's own latency
    rounds, else a profile on this host, else the FLOPs ratio (a proxy, said so)."""
    profiled = _profile_timing(Path(str(report.get("output", ""))).name, profiles)
    if profiled is not None and profiled[1]:
        return profiled[0]
    timed = _compress_timing(report)
    if timed is not None:
        return timed
    if profiled is not None:
        return profiled[0]
    if report.get("pruned") or report.get("quantized"):  # the FLOPs of factorized layers miss what these did
        return None
    totals = report.get("totals") or {}
    ratio = _ratio(totals.get("flops_after"), totals.get("flops_before"))
    return None if ratio is None else Speed(ratio, False, "FLOPs ratio (proxy, not measured)", "")


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
    factorize = isinstance(report.get("layers"), list)  # no factorize pass: prune or quantize alone
    facts = [("model", f"{escape(str(report.get('source', '?')))} → {escape(str(report.get('output', '?')))}")]
    if factorize:
        facts += [("budget", budget + ("" if report.get("budget_reached", True) else " (not reached)")),
                  ("SVD", "data-aware (whitened)" if report.get("data_aware") else "plain (no calibration data)"),
                  ("kept", f"{_fmt(pr, '.3f') or '?'} of the params, {_fmt(fr, '.3f') or '?'} of the FLOPs of these layers")]
    pruned, quantized = report.get("pruned"), report.get("quantized")
    if isinstance(pruned, dict):
        facts.append(("pruned", (f"{_fmt(pruned.get('ratio'), 'g')} of the channels in "
                                 f"{escape(str(pruned.get('groups_pruned', '?')))} of {escape(str(pruned.get('groups', '?')))} groups")))
    if isinstance(quantized, dict):
        facts.append(("quantized", (f"{escape(str(quantized.get('scheme', '?')))}, "
                                    f"{escape(str(quantized.get('nodes_quantized', '?')))} nodes")))
    facts += [
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
                kept = " (kept)" if r.get("round") == lat.get("kept_round") else ""
                facts.append((f"latency round {escape(str(r.get('round', '?')))}",
                              f"predicted {_fmt(r.get('predicted_ratio'), '.3f')}, measured {_fmt(r.get('measured_ratio'), '.3f')} of the original{kept}"))
    warnings = [w for w in report.get("warnings") or []]
    html = [f"<h3>{escape(name)}</h3>", _kv(facts)]
    if factorize:
        html.append(_table(["layer", "op", "form", "rank", "params", "→", "FLOPs", "→", "rel.err"], rows, 3, classes))
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
        err, fast = _whole_error(report), speed(report, profiles)
        if err is None or fast is None:
            rows.append([escape(name), "left out: " + ("no whole-model error" if err is None else "no latency or FLOPs ratio"), "", ""])
            continue
        points.append((fast.ratio, err, Path(name).stem, "measured" if fast.measured else "proxy"))
        rows.append([escape(name), escape(fast.source), f"{fast.ratio:.3f}", f"{err:.4f}"])
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
        facts = [("timed", escape(_profiled_where(a))),
                 ("onnxruntime", escape(str(a.get("onnxruntime", "?")))),
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
    searched = [(name, _compress_timing(report)) for name, report in compress]
    searched = [(f"{name} (latency rounds)", escape(timed.where)) for name, timed in searched if timed is not None]
    if searched:
        html.append(_kv(searched))
    if not html:
        return '<p class="muted">Nothing in this run was timed: no profile JSON, no <code>compress --latency</code>.</p>'
    return "".join(html)


# ---------------------------------------------------------------- the summary: what a reader wants first

def _on_disk(path_text: str, run_dir: Path) -> Path | None:
    """A model file a report names: its path is relative to where compress ran, usually the run folder's
    parent or the current folder."""
    path = Path(path_text)
    places = [path] if path.is_absolute() else [path, run_dir / path, run_dir.parent / path]
    return next((p for p in places if p.is_file()), None)


def _model_params(path: Path) -> int | None:
    """Weights in a model file: initializers and Constant tensors of the main graph (no external data read)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except (OSError, ValueError, DecodeError):  # not an ONNX file (any more): counted from the report instead
        return None
    tensors = list(graph.initializer) + [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return sum(math.prod(t.dims) for t in tensors)


def _worst_group(errors: dict) -> str:
    from edgelr.measure.verify import Verdict

    return Verdict({k: v for k, v in errors.items() if _num(v) is not None}, None, 0).worst_group


def summarise(name: str, report: dict, profiles: list[tuple[str, dict]], run_dir: Path) -> dict:
    """One compress run in the numbers a person asks for first (JSON-ready): speed, size, params, error, task."""
    files = [_on_disk(str(report.get(k, "")), run_dir) for k in ("source", "output")]
    params = [_model_params(f) if f is not None else None for f in files]
    if None in params:  # the files are not here: the layers edgelr factorized are what the report counts
        totals = report.get("totals") or {}
        params = [_num(totals.get("params_before")), _num(totals.get("params_after"))]
        counted = "factorizable layers" if None not in params else None
    else:
        counted = "whole model"
    errors = report.get("output_error") if isinstance(report.get("output_error"), dict) else {}
    task = report.get("task") if isinstance(report.get("task"), dict) else {}
    fast = speed(report, profiles)
    return {
        "report": name, "source": str(report.get("source", "?")), "output": str(report.get("output", "?")),
        "target": report.get("target"),
        "speed": asdict(fast) if fast is not None else None,
        "file_bytes": [f.stat().st_size for f in files] if None not in files else None,
        "params": {"before": params[0], "after": params[1], "counted": counted} if counted else None,
        "worst_error": None if _whole_error(report) is None else {
            "value": _whole_error(report), "output": _worst_group(errors), "judged_on": report.get("judged_on"),
            "ceiling": _num(report.get("max_output_error"))},
        "task": {k: task.get(k) for k in ("metric", "value", "floor", "passed", "samples")} if _num(task.get("value")) is not None else None,
    }


def _before_after(before, after, show) -> str:
    return f"{show(before)} → {show(after)} <span class=\"muted\">({after / before:.2f}×)</span>" if before else "?"


_TIME_IT = "time it with <code>compress --latency</code> or <code>edgelr profile --vs</code>"


def _summary_section(summaries: list[dict]) -> str:
    """One row per compress report; every cell says where its number came from."""
    rows = []
    for s in summaries:
        run = (f"<b>{escape(s['report'])}</b><br>{escape(Path(s['source']).name)} → {escape(Path(s['output']).name)}"
               + (f"<br><span class=\"note\">target {escape(str(s['target']))}</span>" if s["target"] else ""))
        fast = s["speed"]
        if fast is None:
            speed_cell = f'not measured <span class="note">({_TIME_IT})</span>'
        elif fast["measured"]:
            speed_cell = (f"<b>{1 / fast['ratio']:.2f}×</b> <span class=\"note\">{escape(fast['source'])}; "
                          f"{escape(fast['where'])}</span>")
        else:
            speed_cell = f"not measured <span class=\"note\">(FLOPs {fast['ratio']:.2f}× the original's, a proxy; {_TIME_IT})</span>"
        size = (_before_after(*s["file_bytes"], lambda n: human(n) + "B") if s["file_bytes"] else
                '<span class="muted">files not found here</span>')
        params = (_before_after(s["params"]["before"], s["params"]["after"], human)
                  + f' <span class="note">{escape(s["params"]["counted"])}</span>' if s["params"] else "?")
        worst = s["worst_error"]
        if worst is None:
            error = '<span class="muted">not measured (no calibration data)</span>'
        else:
            ceiling = f", ceiling {worst['ceiling']:g}" if worst["ceiling"] is not None else ""
            error = (f"<b>{worst['value']:.4f}</b> on {escape(worst['output'] or '?')} <span class=\"note\">"
                     f"relative, on the {escape(str(worst['judged_on'] or 'calibration'))} samples{ceiling}</span>")
        task = s["task"]
        task_cell = ('<span class="muted">none</span>' if task is None else
                     f"{escape(str(task['metric']))} <b>{_fmt(task['value'], '.3f')}</b> <span class=\"note\">floor "
                     f"{_fmt(task['floor'], '.2f')}{'' if task.get('passed', True) else ', not met'}"
                     + (f", {task['samples']} samples" if task.get("samples") else "") + "</span>")
        rows.append([run, speed_cell, size, params, error, task_cell])
    if not rows:
        return '<p class="muted">No compress report in this run: see the profiles below.</p>'
    headers = ["model → compressed", "speed-up", "file size", "parameters", "worst output error", "task metric"]
    return _table(headers, rows, 1)


# ---------------------------------------------------------------- the page

def render_html(run_dir: Path, compress: list[tuple[str, dict]], profiles: list[tuple[str, dict]], ignored: list[str],
                summaries: list[dict]) -> str:
    """Top-down: the summary, the compression tables, the plots, where things were timed, then the per-node
    detail folded away (a real model has hundreds of bars)."""
    title = f"edgelr report: {Path(run_dir).resolve().name}"
    body = [f"<h1>{escape(title)}</h1>",
            f'<p class="muted">{escape(str(run_dir))}: {len(compress)} compress report(s), {len(profiles)} profile(s)'
            + (f"; ignored {escape(', '.join(ignored))}" if ignored else "") + "</p>",
            f'<section id="summary"><h2>Summary</h2>{_summary_section(summaries)}</section>',
            "<h2>Compression</h2>"]
    body += [_compress_section(n, r) for n, r in compress] or ['<p class="muted">No compress report in this run.</p>']
    body += ["<h2>Latency vs error</h2>", _curve_section(compress, profiles) if compress else
             '<p class="muted">No compress report in this run.</p>',
             "<h2>Latency search</h2>", _front_section(compress),
             "<h2>Where it was timed</h2>", _target_section(compress, profiles),
             '<details id="per-layer"><summary><h2>Per-layer latency</h2> (per node; unfold)</summary>',
             _latency_section(compress, profiles), "</details>"]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">' + PAGE_MARK
            + f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


WRITTEN_BY = "edgelr report"
# How a later run knows a file at its paths is its own (and may be written again): the page carries a
# generator tag, its data a first key. Anything else there is the user's and is never overwritten.
PAGE_MARK = f'<meta name="generator" content="{WRITTEN_BY}">'
DATA_MARK = f'"written_by": "{WRITTEN_BY}"'


def page_data_path(out: Path) -> Path:
    """Where the page's data goes: beside it, under a name derived from the page's (report.html ->
    report.page.json) that no other edgelr command writes, so it does not land on the report.json of
    compress --report. No name is sure to be free, so a file there that edgelr report did not write is
    refused (write_own_files), as is one at OUT itself."""
    return out.with_name(out.stem + ".page.json")


def write_html_report(run_dir: Path, out: Path) -> tuple[Path, Path]:
    """Read every *.json in RUN_DIR and write one self-contained HTML page to OUT and its data as JSON beside
    it (page_data_path), together and atomically; either path may be new or hold what edgelr report wrote
    there before, nothing else. Returns (page, data file)."""
    run_dir, out = Path(run_dir), Path(out)
    compress, profiles, ignored = load_run(run_dir)
    summaries = [summarise(name, report, profiles, run_dir) for name, report in compress]
    page = render_html(run_dir, compress, profiles, ignored, summaries)
    data = {"written_by": WRITTEN_BY, "summary": summaries, "compress": dict(compress), "profiles": dict(profiles),
            "ignored": ignored}
    data_path = page_data_path(out)
    write_own_files([(data_path, json.dumps(data, indent=2) + "\n", DATA_MARK), (out, page, PAGE_MARK)])
    return out, data_path
