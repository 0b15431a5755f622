"""The whole compression job: load, calibrate, factorize, save, verify, report.

    report = edgelr.compress("model.onnx", "small.onnx", FactorizeConfig(params=0.5), calib="data.npz")
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelr.calibration.grams import cached_grams
from edgelr.calibration.sensitivity import PROBE_SAMPLES, layer_sensitivity
from edgelr.errors import EdgelrError
from edgelr.graph.layers import find_layers
from edgelr.io import model as model_io
from edgelr.io.cache import ArrayCache, content_key
from edgelr.io.samples import load_samples
from edgelr.measure.profile import (
    compare_models,
    layer_aliases,
    layer_times,
    sample_feed,
)
from edgelr.measure.verify import output_error
from edgelr.passes.factorize import FactorizeConfig, FactorizeResult, factorize
from edgelr.passes.quantize import SCHEMES
from edgelr.report.tables import result_json, write_json
from edgelr.search.latency import (
    SENSITIVITY_MAX_BYTES,
    latency_rounds,
    remove_model,
    write_result,
)


@dataclass
class CompressReport:
    source: Path
    output: Path
    result: FactorizeResult
    output_error: dict[str, float]  # whole-model relative error on the calibration samples
    seconds: float
    latency: dict | None = None  # with --latency: predicted vs measured per search round, table use
    quantized: dict | None = None  # with quantize: what edgelr.passes.quantize did
    pruned: dict | None = None  # with prune: what edgelr.passes.prune did

    def to_json(self) -> dict:
        data = {"source": str(self.source), "output": str(self.output), "seconds": round(self.seconds, 3)}
        data.update(result_json(self.result))
        data["output_error"] = self.output_error
        if self.latency is not None:
            data["latency"] = self.latency
        if self.quantized is not None:
            data["quantized"] = self.quantized
        if self.pruned is not None:
            data["pruned"] = self.pruned
        return data


def compress(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: FactorizeConfig,
    calib: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    progress: bool = True,
    quantize: str | None = None,
    prune: float | None = None,
    float_output: str | os.PathLike | None = None,
) -> CompressReport:
    """Factorize SOURCE into OUTPUT; with CALIB the SVD is data-aware and the result is verified on it.
    `prune` (a fraction of channels) first removes that fraction of every prunable channel group
    (edgelr.passes.prune; FactorizeConfig(ranks={}) then keeps every layer dense). `quantize` ("int8": static,
    calibrated on CALIB; "int8-lowrank"; "int8-dynamic") then quantizes the factorized model with
    ONNX Runtime's tools (edgelr.passes.quantize); `float_output` keeps the factorized model before quantization
    (what edgelr distill trains). The reported error is against the original."""
    start = time.perf_counter()
    source = Path(source)
    output = model_io.check_output_path(output, source, calib)
    if report is not None:
        report = model_io.check_output_path(report, source, calib)
        if report.resolve() == output.resolve():
            raise EdgelrError(f"{report}: the report and the model cannot be the same file")
    if quantize is not None and quantize not in SCHEMES:
        raise EdgelrError(f"--quantize {quantize}: unknown scheme; known schemes: {', '.join(SCHEMES)}")
    if quantize in ("int8", "int8-lowrank") and calib is None:
        raise EdgelrError(f"--quantize {quantize} calibrates activation ranges: pass --calib DATA.npz, "
                          "or use --quantize int8-dynamic, which needs none")
    if float_output is not None:
        if quantize is None:
            raise EdgelrError("--float-output keeps the model before quantization: it needs --quantize")
        float_output = model_io.check_output_path(float_output, source, calib)
        if float_output.resolve() == output.resolve():
            raise EdgelrError(f"{float_output}: the float model and the output cannot be the same file")
    if prune is None:
        return _compress(source, output, config, calib, report, progress, quantize, start, float_output=float_output)
    pruned = output.with_name(f".{output.stem}.pruned{output.suffix}")
    try:
        pruning = _prune(source, pruned, prune, calib, progress)
        done = _compress(pruned, output, config, calib, report, progress, quantize, start, original=source,
                         float_output=float_output)
    finally:
        remove_model(pruned)
    done.source, done.pruned = source, pruning
    if report is not None:
        write_json(done.to_json(), report)
    return done


def _prune(source: Path, out: Path, ratio: float, calib, progress: bool) -> dict:
    from edgelr.passes.prune import prune

    model = model_io.load(source)
    samples = load_samples(calib, model) if calib is not None else None
    result = prune(model, ratio, samples, progress=progress)
    model_io.save(model, out)
    return {"ratio": ratio, "groups_pruned": len(result.pruned), "groups": len(result.groups),
            "unprunable_groups": len(result.unprunable), "params_before": result.params_before,
            "params_after": result.params_after, "data_aware": result.data_aware}


def _compress(source: Path, output: Path, config: FactorizeConfig, calib, report, progress: bool, quantize,
              start: float, original: Path | None = None, float_output: Path | None = None) -> CompressReport:
    """compress() on SOURCE; `original` (when SOURCE is an intermediate model) is what the errors are
    measured against."""
    model = model_io.load(source)
    samples = load_samples(calib, model) if calib is not None else None
    layers, skipped = find_layers(model)
    if not layers:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
        raise EdgelrError(
            f"{source}: no factorizable MatMul, Gemm or Conv node with a constant weight"
            + (f" ({reasons})" if reasons else "")
        )
    aliases = layer_aliases(layers)  # before the pass replaces the nodes
    if config.metric == "latency" and samples is None:
        raise EdgelrError("--latency needs --calib DATA.npz: latency is measured on real inputs")
    key = content_key(source, model, Path(calib)) if samples is not None else None
    grams, references = cached_grams(model, layers, samples, key, progress) if samples is not None else (None, None)
    spectra, sensitivity = _cached_analysis(key, layers, config)
    cached = (len(spectra), sensitivity is not None)
    unweighted = None
    if samples is not None and config.sensitivity and sensitivity is None and config.ranks is None:
        if model_io.model_bytes(model) <= SENSITIVITY_MAX_BYTES:
            try:
                sensitivity = layer_sensitivity(source, layers, grams, spectra, config.damping, samples, progress)
            except Exception as exc:  # noqa: BLE001  (a refinement: a model ORT cannot probe is still compressed)
                unweighted = f"layer sensitivity not measured ({model_io.first_line(exc)}): layers' errors are weighed alike"
        else:  # probing copies every layer's weight into a second model: too much memory and time here
            unweighted = (f"layer sensitivity not measured (the model is over {SENSITIVITY_MAX_BYTES >> 20} MB): "
                          "layers' errors are weighed alike")
    analysis = {"spectra": spectra, "sensitivity": sensitivity if config.sensitivity else None}
    latency = None
    if config.metric == "latency":
        result, latency, quantized = latency_rounds(source, output, model, layers, grams, config, samples, progress,
                                                     analysis, key, quantize, float_output)
    else:
        result = factorize(model, config, grams, layers=layers, progress=progress, **analysis)
        quantized = write_result(source, output, model, layers, result, samples, config, grams, quantize, float_output,
                           progress, progress, key)
    if key is not None and (len(spectra), sensitivity is not None) != cached:  # something new to keep
        ArrayCache("spectra").put(_spectra_key(key, config), _pack_analysis(spectra, sensitivity, layers))
    result.skipped = skipped
    if unweighted:
        result.warnings.append(unweighted)
    del model, grams  # verification below loads both files in ONNX Runtime; free the graph first
    try:
        errors = (output_error(original or source, output, samples, None if original else references)
                  if samples is not None else {})
    except Exception:
        remove_model(output)  # a model ONNX Runtime cannot run is no result
        raise
    if report is not None:
        _measure_layers(source, output, result, aliases, samples)
    done = CompressReport(source, output, result, errors, time.perf_counter() - start, latency, quantized)
    if report is not None:
        write_json(done.to_json(), report)
    return done



def _measure_layers(source: Path, output: Path, result: FactorizeResult, aliases: dict, samples) -> None:
    """Each layer's measured ms per run before and after, from ONNX Runtime's profiler (for the report)."""
    try:
        feed = samples.feed(0) if samples is not None else sample_feed(source)
    except EdgelrError:
        return  # dynamic dims and no samples: nothing to run the models on
    found = compare_models({"original": source, "compressed": output}, feed, runs=20, warmup=3, threads=1)
    before, after = (layer_times(found[k], aliases) for k in ("original", "compressed"))
    for row in result.layers:
        row.measured_ms_before, row.measured_ms_after = before.get(row.name), after.get(row.name)


def _cached_analysis(key: str | None, layers: list, config: FactorizeConfig) -> tuple[dict, dict | None]:
    """From an earlier run on the same model, samples and damping: (layer, form) -> error-by-rank curve,
    and the layers' sensitivities (None if not measured)."""
    hit = ArrayCache("spectra").get(_spectra_key(key, config)) if key is not None else None
    if hit is None or hit.get("layers") is None or hit["layers"].tolist() != [layer.name for layer in layers]:
        return {}, None
    spectra = {(layers[int(i)].name, form): curve for name, curve in hit.items() if name[0].isdigit()
               for i, form in [name.split("_", 1)]}
    sensitivity = hit.get("sensitivity")
    if sensitivity is not None:
        sensitivity = {layer.name: float(v) for layer, v in zip(layers, sensitivity) if np.isfinite(v)}
    return spectra, sensitivity


def _spectra_key(key: str, config: FactorizeConfig) -> str:
    return f"{key}-damping{config.damping:g}-probe{PROBE_SAMPLES}"  # sensitivities probed otherwise are not reused


def _pack_analysis(spectra: dict, sensitivity: dict | None, layers: list) -> dict:
    index = {layer.name: i for i, layer in enumerate(layers)}
    arrays = {"layers": np.array(list(index))} | {f"{index[name]}_{form}": c for (name, form), c in spectra.items()}
    if sensitivity is not None:
        arrays["sensitivity"] = np.array([sensitivity.get(layer.name, np.nan) for layer in layers])
    return arrays




