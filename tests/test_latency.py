"""The latency-driven search: tables measured once and cached, rounds reported, bad input refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

import edgelr.measure.latency as timing
import edgelr.search.latency as search
from edgelr import FactorizeConfig, compress
from edgelr.demo import synthetic_images
from edgelr.errors import EdgelrError
from edgelr.search.latency import LATENCY_ROUNDS
from edgelr.search.tables import LatencyTable


def timed_compress(*args, **kwargs):
    """compress with a latency budget; a machine too busy to time on (the refusal issue 20 asks for) skips the
    test rather than failing it: what these tests check needs timings the search trusts."""
    try:
        return compress(*args, **kwargs)
    except EdgelrError as exc:
        if "unstable" in str(exc):
            pytest.skip(f"this machine is too busy to time on now: {exc}")
        raise

UNSTABLE = "timings on this machine are unstable"


@pytest.mark.slow
def test_latency_budget_measures_tables_once_and_reports_rounds(demo):
    config = FactorizeConfig(latency=0.8)
    first = timed_compress(demo / "m.onnx", demo / "a.onnx", config, calib=demo / "calib.npz", progress=False)
    assert first.latency["layer_timings"] > 0
    assert (demo / "cache" / "latency").is_dir() and list((demo / "cache" / "latency").glob("*.json"))
    rounds = first.latency["rounds"]
    assert 1 <= len(rounds) <= LATENCY_ROUNDS
    assert all(0 < r["predicted_ratio"] <= 1.2 and r["measured_ratio"] > 0 for r in rounds)
    rows = [r for r in first.result.layers if r.latency_before is not None]
    assert rows and all(r.latency_after <= r.latency_before for r in rows if r.form != "dense")
    second = timed_compress(demo / "m.onnx", demo / "b.onnx", config, calib=demo / "calib.npz", progress=False)
    # every table entry came from the cache, but those timed while the machine was busy (issue 20)
    assert second.latency["layer_timings"] == first.latency["unstable_layer_timings"]


@pytest.mark.slow
def test_a_budget_out_of_reach_under_the_ceiling_is_refused_with_what_was_reachable(demo):
    """Issue 19: a latency budget is never bought with a broken output. Under a ceiling no round can keep,
    the run refuses in one line that says what each round measured and what to pass, and writes nothing."""
    run = subprocess.run(
        [sys.executable, "-m", "edgelr", "-q", "compress", str(demo / "m.onnx"), "-o", str(demo / "o.onnx"),
         "--latency", "0.5", "--calib", str(demo / "calib.npz"), "--max-output-error", "0.01"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip() and "\r" not in line]
    assert len(lines) == 1 and "latency budget 0.5 not reachable with every output error <= 0.01" in lines[0], run.stderr
    assert "--max-output-error" in lines[0].split("would need")[1]  # what to pass to go further
    assert not (demo / "o.onnx").exists() and not [p for p in demo.iterdir() if p.suffix == ".onnx" and p.name != "m.onnx"]


def test_latency_without_calibration_is_refused(demo):
    run = subprocess.run(
        [sys.executable, "-m", "edgelr", "-q", "compress", str(demo / "m.onnx"), "-o", str(demo / "o.onnx"),
         "--latency", "0.8"],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "--latency 0.8 needs --calib" in run.stderr
    assert not (demo / "o.onnx").exists()


def test_latency_and_params_together_are_refused(demo):
    run = subprocess.run(
        [sys.executable, "-m", "edgelr", "compress", str(demo / "m.onnx"), "-o", str(demo / "o.onnx"),
         "--latency", "0.8", "--params", "0.5"],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr and not (demo / "o.onnx").exists()


def test_a_corrupt_cache_is_ignored(demo):
    from edgelr.search.tables import LatencyTable

    table = LatencyTable(cache=demo / "cache")
    table.path.parent.mkdir(parents=True, exist_ok=True)
    table.path.write_text("{not json")
    assert LatencyTable(cache=demo / "cache").entries == {}


def test_calibration_and_spectra_are_cached_by_content(demo, monkeypatch):
    """A second run with the same model and samples calibrates and probes nothing and decomposes only the
    chosen layers; another budget reuses them too; changed samples are a different entry."""
    import sys

    import edgelr.calibration.grams as calibrate

    analysis = sys.modules["edgelr.calibration.analysis"]

    first = compress(demo / "m.onnx", demo / "a.onnx", FactorizeConfig(params=0.5), calib=demo / "calib.npz", progress=False)
    assert len(list((demo / "cache" / "calibration").glob("*.npz"))) == 1
    assert len(list((demo / "cache" / "spectra").glob("*.npz"))) == 1

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again although the cache holds this model and these samples")

    with monkeypatch.context() as patch:
        patch.setattr(calibrate, "collect_grams", no_calibration)
        patch.setattr(analysis, "layer_sensitivity", no_calibration)
        again = compress(demo / "m.onnx", demo / "b.onnx", FactorizeConfig(params=0.5), calib=demo / "calib.npz",
                         progress=False)
        assert [(r.form, r.rank) for r in again.result.layers] == [(r.form, r.rank) for r in first.result.layers]
        assert again.output_error == pytest.approx(first.output_error)
        compress(demo / "m.onnx", demo / "c.onnx", FactorizeConfig(params=0.3), calib=demo / "calib.npz", progress=False)

    np.savez(demo / "other.npz", image=synthetic_images(8, seed=2))
    compress(demo / "m.onnx", demo / "d.onnx", FactorizeConfig(params=0.5), calib=demo / "other.npz", progress=False)
    assert len(list((demo / "cache" / "calibration").glob("*.npz"))) == 2


def test_a_corrupt_calibration_entry_is_recomputed(demo):
    compress(demo / "m.onnx", demo / "a.onnx", FactorizeConfig(params=0.5), calib=demo / "calib.npz", progress=False)
    for entry in (demo / "cache").glob("*/*.npz"):
        entry.write_bytes(entry.read_bytes()[:100])  # truncated, as after a crash or a full disk
    done = compress(demo / "m.onnx", demo / "b.onnx", FactorizeConfig(params=0.5), calib=demo / "calib.npz", progress=False)
    assert done.output_error["worst"] > 0
    assert all(e.stat().st_size > 100 for e in (demo / "cache").glob("*/*.npz"))


@pytest.mark.slow
def test_latency_report_has_the_search_front_and_measured_layers(demo):
    import json

    from edgelr.report.html import write_html_report

    run = demo / "run"
    run.mkdir()
    timed_compress(demo / "m.onnx", run / "a.onnx", FactorizeConfig(latency=0.8), calib=demo / "calib.npz",
             report=run / "a.json", progress=False)
    data = json.loads((run / "a.json").read_text())
    front = data["latency"]["front"]
    assert len(front) >= 3
    ratios = [p["predicted_ratio"] for p in front]
    errors = [p["predicted_error"] for p in front]
    assert ratios == sorted(ratios, reverse=True) and errors == sorted(errors)  # slower is more accurate
    assert ratios[0] == pytest.approx(1.0, abs=0.05) and errors[0] == pytest.approx(0.0)  # all dense: the original
    measured = [r for r in data["layers"] if r["measured_ms_before"] is not None]
    assert len(measured) == len(data["layers"])
    assert all(r["measured_ms_after"] > 0 for r in measured)
    html = write_html_report(run, run / "r.html")[0].read_text()
    assert "predicted front" in html and "measured per layer" in html


@pytest.mark.slow
def test_latency_budget_with_quantize_measures_the_quantized_model(demo):
    """--latency with --quantize: quantization alone is measured first (the floor), every round's model is
    quantized before it is timed, beside the quantized original (the floor is the median of those
    measurements), and the output is the quantized model."""
    done = timed_compress(demo / "m.onnx", demo / "q.onnx", FactorizeConfig(latency=0.8), calib=demo / "calib.npz",
                    progress=False, quantize="int8")
    assert done.quantized["scheme"] == "int8"
    assert 0 < done.latency["quantized_only_ratio"] < 3
    assert all(r["measured_ratio"] > 0 and r["quantized_only_ratio"] > 0 for r in done.latency["rounds"])
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(demo / "q.onnx").graph.node}
    assert sorted(p.name for p in demo.iterdir() if p.suffix == ".onnx") == ["m.onnx", "q.onnx"]  # no leftovers


def test_the_search_leaves_a_layer_in_float_where_its_int8_error_costs_more_than_its_time(demo):
    """LatencyBudget.float_layers: (seconds added, error^2 removed) per layer, measured on the whole model
    by compress; the allocation weighs them against the ranks on one budget."""
    from edgelr.core.costs import LatencyBudget
    from edgelr.graph.layers import find_layers
    from edgelr.io.model import load
    from edgelr.passes.factorize import factorize
    from edgelr.search.tables import LatencyTable

    def run(float_layers):
        model = load(demo / "m.onnx")
        layers, _ = find_layers(model)
        from edgelr.calibration.grams import observe_shapes
        from edgelr.io.samples import load_samples

        observe_shapes(model, layers, load_samples(demo / "calib.npz", model))
        table = LatencyTable(cache=demo / "cache")
        budget = LatencyBudget(table, 0.0, {layer.name: float_layers for layer in layers[:1]})
        return layers[0], factorize(model, FactorizeConfig(latency=0.9), layers=layers, progress=False, latency=budget)

    layer, worth_it = run((1e-6, 1.0))  # a microsecond for a whole relative error
    assert worth_it.keep_float == [use.node.name for use in layer.uses]
    row = next(r for r in worth_it.layers if r.name == layer.name)
    assert row.form == "dense" and "float" in row.note and row.latency_after > row.latency_before
    _, not_worth_it = run((1.0, 1e-9))  # a second for nothing
    assert not_worth_it.keep_float == []


def _cached(demo) -> dict:
    """What the latency cache of the demo holds, merged over its tables."""
    return {k: v for path in (demo / "cache" / "latency").glob("*.json") for k, v in json.loads(path.read_text()).items()}


def test_an_unstable_timing_is_never_cached(demo, monkeypatch):
    """Issue 20: an entry recorded unstable is used but never saved, so never read back; a layer really timed
    while no timing can be stable (SPREAD_LIMIT 0: real runs always spread) is measured again by the next table."""
    from edgelr.calibration.grams import observe_shapes
    from edgelr.graph.layers import find_layers
    from edgelr.io.model import load
    from edgelr.io.samples import load_samples

    table = LatencyTable(cache=demo / "cache")
    table.record("steady", 1.0, stable=True)
    table.record("busy", 2.0, stable=False)
    assert table.entries == {"steady": 1.0, "busy": 2.0}  # the run that took it uses it
    table.save()
    assert LatencyTable(cache=demo / "cache").entries == {"steady": 1.0}

    model = load(demo / "m.onnx")
    layers, _ = find_layers(model)
    observe_shapes(model, layers, load_samples(demo / "calib.npz", model))
    monkeypatch.setattr(timing, "SPREAD_LIMIT", 0.0)
    monkeypatch.setattr(timing, "BACKOFF_S", 0.0)
    busy = LatencyTable(cache=demo / "cache")
    assert busy.cost(layers[0], None, 0, []) > 0 and busy.unstable
    busy.save()
    again = LatencyTable(cache=demo / "cache")
    assert again.entries == {"steady": 1.0}
    again.cost(layers[0], None, 0, [])
    assert again.measured == len(layers[0].uses)


def test_a_search_on_unstable_timings_is_refused_and_writes_nothing(demo, monkeypatch):
    """Issue 20: when no whole-model timing is stable the run says so in one line; no output, nothing cached."""
    monkeypatch.setattr(timing, "SPREAD_LIMIT", 0.0)
    monkeypatch.setattr(timing, "BACKOFF_S", 0.0)
    with pytest.raises(EdgelrError, match=f"{UNSTABLE} \\(runs of one model spread .*--flops F"):
        compress(demo / "m.onnx", demo / "o.onnx", FactorizeConfig(latency=0.8), calib=demo / "calib.npz", progress=False)
    assert not (demo / "o.onnx").exists() and not any(k.startswith("saving|") for k in _cached(demo))


def test_a_round_measured_far_from_its_prediction_is_refused_not_kept(demo, monkeypatch):
    """Issue 20: a round whose measured ratio is further from the tables' prediction than PREDICTION_TOLERANCE,
    twice, is not accepted (a tolerance below zero makes every round so); no output, no layer timing cached."""
    monkeypatch.setattr(search, "PREDICTION_TOLERANCE", -1.0)
    with pytest.raises(EdgelrError, match=f"{UNSTABLE} \\(a round predicted at .* measured .*, twice\\)"):
        compress(demo / "m.onnx", demo / "o.onnx", FactorizeConfig(latency=0.8), calib=demo / "calib.npz", progress=False)
    assert not (demo / "o.onnx").exists() and _cached(demo) == {}


HOG_TOLERANCE = 0.1  # of the original's latency: issue 20's mistake was 0.3; the search's window is 0.015


@pytest.mark.slow
def test_a_search_beside_busy_processes_matches_a_quiet_one_or_says_it_cannot(demo, tmp_path, monkeypatch):
    """Issue 20's acceptance: two busy processes on the cores while the search times everything afresh (its
    own cold cache). Either its model, timed interleaved with the quiet run's after they stop, is within
    HOG_TOLERANCE of it in latency, or the run says the timings were unstable and writes nothing. The demo
    runs for 0.3 ms, under a scheduler slice, so it is usually the first (a model of a few milliseconds on a
    busy 2-core machine spreads over SPREAD_LIMIT even without the busy processes: the run is refused)."""
    config = FactorizeConfig(latency=0.8)
    try:
        compress(demo / "m.onnx", demo / "quiet.onnx", config, calib=demo / "calib.npz", progress=False)
    except EdgelrError as exc:
        pytest.skip(f"no quiet reference on this machine now: {exc}")
    cold = tmp_path / "busy-cache"
    monkeypatch.setenv("EDGELR_CACHE", str(cold))  # the busy run times every layer afresh
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)  # both running before the search starts
        run = subprocess.run(
            [sys.executable, "-m", "edgelr", "-q", "compress", str(demo / "m.onnx"), "-o", str(demo / "busy.onnx"),
             "--latency", "0.8", "--calib", str(demo / "calib.npz")],
            check=False, capture_output=True, text=True, timeout=300,
        )
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert "Traceback" not in run.stderr, run.stderr
    if run.returncode != 0:
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and UNSTABLE in lines[0], run.stderr
        assert not (demo / "busy.onnx").exists()
        cached = [json.loads(p.read_text()) for p in cold.glob("latency/*.json")]
        assert not any(k.startswith("saving|") for entries in cached for k in entries)
        return
    seconds = timing.interleaved_timing({"original": demo / "m.onnx", "quiet": demo / "quiet.onnx",
                                         "busy": demo / "busy.onnx"}, {"image": synthetic_images(1, seed=1)}).seconds
    quiet, busy = seconds["quiet"] / seconds["original"], seconds["busy"] / seconds["original"]
    assert abs(busy - quiet) <= HOG_TOLERANCE, (quiet, busy)
