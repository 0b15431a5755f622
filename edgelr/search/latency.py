"""The latency search: factorize, time the whole model, correct the budget, again (and, for INT8, which layers stay in float)."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from edgelr.core.costs import LatencyBudget
from edgelr.graph.layers import find_layers
from edgelr.io import model as model_io
from edgelr.io.cache import ArrayCache
from edgelr.measure.latency import interleaved_latency
from edgelr.measure.verify import output_error
from edgelr.passes.factorize import FactorizeConfig, FactorizeResult, factorize
from edgelr.passes.quantize import quantize as quantize_model
from edgelr.passes.refit import apply_state, refit, refit_state
from edgelr.search.tables import LatencyTable

LATENCY_ROUNDS = 6  # most end in 1-2; a search that keeps landing just outside its window needs the rest


MEASURE_ROUNDS = 20  # x 3 runs of each model, interleaved, per measurement


LATENCY_SLACK = 0.01  # the search aims this far below the target: one model's ratio moves this much between runs


FLOAT_CANDIDATES = 6  # with --quantize int8 --latency: layers measured for staying in float


def latency_rounds(source, output, model, layers, grams, config, samples, progress, analysis, key, quantize,
                    float_output=None):
    """Search against measured latency: factorize, measure the whole model, correct, again.

    The layer tables predict what factorizing saves; the graph around the layers (fusions, memory
    traffic) makes the real saving differ, so each round rescales the seconds the layers must save by
    how much of the predicted saving the last round really delivered: up when it fell short, down
    when it overshot (overshooting spends accuracy nobody asked for). The budget is a ceiling, and the
    same model measures up to about one LATENCY_SLACK apart at different times (docs/benchmarks.md), so
    the search aims one slack below it and a round is a hit only up to half a slack above that aim (a
    round measured just under the budget would be over it as often as not when measured again), or one
    slack below it. The correction pools the rounds (what they delivered over what they asked), so it
    does not chase the noise of the last measurement. The kept round is the one with the least
    predicted error among the hits or rounds below them (the fastest if none is). With `quantize`, each round's model is quantized before it is measured, and the original
    quantized alone (the floor: how far quantization alone gets) is timed in the same interleaved runs:
    the floor is the median of every such measurement, and the budget holds beside it, for what will run.
    """
    table = LatencyTable(threads=1, quantize=quantize)
    feed = samples.feed(0)
    target = config.latency
    # the saving an earlier identical run settled on: its correction rounds need not be repeated
    memo = f"saving|{key}|{target}|{config.max_error}|{config.damping}|{config.conv_form}|{config.sensitivity}|{quantize}"
    float_layers = None
    if quantize == "int8" and len(samples) >= 2:  # which layers to quantize is part of the search (LatencyBudget)
        float_layers = _float_layers(source, model, layers, samples, key, analysis["sensitivity"], table, progress)
        memo += "|float-choice"
    aim = target - LATENCY_SLACK
    with tempfile.TemporaryDirectory(prefix="edgelr-floor-") as tmp:
        timed = {"original": source}
        if quantize:
            timed["quantized"] = Path(tmp) / "quantized.onnx"
            quantize_model(source, timed["quantized"], quantize, samples, progress=False)
        floors = []  # the quantized original's latency ratio, per measurement
        remembered = memo in table.entries
        if remembered:  # it settled there: only a miss of the budget (not a faster landing) is searched again
            saving = table.entries[memo]
        else:  # the tables time the layers as they will run (quantized too), so seconds add up directly
            start = interleaved_latency(timed, feed, rounds=MEASURE_ROUNDS)
            floors += [start["quantized"] / start["original"]] if quantize else []
            saving = max((floors[0] if quantize else 1.0) - aim, 0.0) * start["original"]
        rounds, kept, asked = [], [], []
        for i in range(LATENCY_ROUNDS):
            if i:  # factorize works in place: start again from the original
                model, layers = _reload(source, layers)
            result = factorize(model, config, grams, layers=layers, progress=progress,
                               latency=LatencyBudget(table, saving, float_layers), **analysis)
            table.save()
            model_io.save(model, output)
            quantized = quantize_output(output, quantize, samples, False, float_output, result.keep_float) if quantize else None
            predicted = sum(r.latency_before - r.latency_after for r in result.layers)
            measured = interleaved_latency(timed | {"compressed": output}, feed, rounds=MEASURE_ROUNDS)
            ratio = measured["compressed"] / measured["original"]
            floors += [measured["quantized"] / measured["original"]] if quantize else []
            floor = float(np.median(floors)) if quantize else 1.0
            error = result.predicted_error2
            rounds.append({"round": i + 1, "saving_asked_s": saving,
                           "predicted_ratio": floor - predicted / measured["original"],
                           "measured_ratio": ratio, "quantized_only_ratio": floors[-1] if quantize else None,
                           "predicted_error2": error})
            high = aim + LATENCY_SLACK / 2
            kept.append((ratio <= high, ratio <= target, error, ratio, i, saving, result))
            low = 0.0 if remembered and i == 0 else aim - LATENCY_SLACK
            asked.append(saving / measured["original"])
            if low <= ratio <= high or not result.budget_reached or saving <= 0:
                break
            delivered = sum(floor - r["measured_ratio"] for r in rounds) / sum(asked)  # of what was asked, all rounds
            if delivered <= 0:
                break
            saving = (floor - aim) / delivered * measured["original"]
    _, within, _, _, best, saving, result = min(kept, key=lambda k: (not k[0], k[2] if k[0] else k[3]))
    if best != len(rounds) - 1:  # the output holds the last round: redo the kept one (deterministic)
        model, layers = _reload(source, layers)
        result = factorize(model, config, grams, layers=layers, progress=progress, latency=LatencyBudget(table, saving, float_layers),
                           **analysis)
    if best != len(rounds) - 1 or config.refit:  # refitting moves no latency: only the kept round's model
        quantized = write_result(source, output, model, layers, result, samples, config, grams, quantize, float_output,
                           progress, False, key)
    table.entries[memo] = saving
    table.save()
    t_original = measured["original"]
    front = [{"predicted_ratio": 1 - (result.dense_cost - cost) / t_original, "predicted_error": math.sqrt(e2)}
             for cost, e2 in result.front]
    info = {"target": table.target, "front": front, "quantized_only_ratio": floor if quantize else None,
            "table": str(table.path), "layer_timings": table.measured, "rounds": rounds,
            "kept_round": best + 1, "within_budget": within}
    return result, info, quantized


def _float_layers(source: Path, model, layers: list, samples, key: str, sensitivity: dict | None,
                  table: LatencyTable, progress: bool) -> dict[str, tuple[float, float]]:
    """Layer name -> (seconds added, error^2 removed) by leaving that layer in float in the INT8 model,
    for the FLOAT_CANDIDATES layers whose INT8 error, measured alone and weighed by sensitivity, is
    largest; each measured on the whole model (quantized without it, its error on the calibration
    samples, its time interleaved with the all-INT8 model's). Cached with the latency tables."""
    from edgelr.passes.svdquant import int8_errors

    memo = f"float|{key}|"
    known = {layer.name: table.entries.get(memo + layer.name) for layer in layers}
    if not any(known.values()):
        own = int8_errors(model, layers, samples, progress=progress)
        weight = sensitivity or {}
        score = {name: e * weight.get(name, 1.0) for name, e in own.items() if e > 0}
        chosen = sorted(score, key=score.get, reverse=True)[:FLOAT_CANDIDATES]
        known = _measure_float_layers(source, [layer for layer in layers if layer.name in chosen], samples, progress)
        table.entries.update({memo + name: list(v) for name, v in known.items()})
        table.save()
    return {name: tuple(v) for name, v in known.items() if v and v[1] > 0}


def _measure_float_layers(source: Path, layers: list, samples, progress: bool) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="edgelr-float-") as tmp:
        models = {}
        bar = tqdm(layers, desc="float layers", unit="model", disable=not progress, leave=False)
        for name, keep in [("", [])] + [(layer.name, [use.node.name for use in layer.uses]) for layer in bar]:
            models[name] = Path(tmp) / f"{len(models)}.onnx"
            quantize_model(source, models[name], "int8", samples, progress=False, keep_float=keep)
        error2 = {name: output_error(source, path, samples)["all"] ** 2 for name, path in models.items()}
        times = interleaved_latency(models, samples.feed(0), rounds=MEASURE_ROUNDS)
    return {layer.name: (times[layer.name] - times[""], error2[""] - error2[layer.name]) for layer in layers}


def _reload(source: Path, layers: list) -> tuple:
    """The original model again, with the input shapes calibration observed."""
    model = model_io.load(source)
    fresh, _ = find_layers(model)
    shapes = {layer.name: [u.input_shape for u in layer.uses] for layer in layers}
    for layer in fresh:
        for use, shape in zip(layer.uses, shapes.get(layer.name, [])):
            use.input_shape = shape
    return model, fresh


SENSITIVITY_MAX_BYTES = 256 << 20  # larger models: no measured layer sensitivities, no refit


def quantize_output(output: Path, scheme: str, samples, progress: bool, keep: Path | None = None,
              keep_float: list[str] = ()) -> dict:
    """Quantize the factorized OUTPUT in place (through a file beside it; nothing half-written); with
    `keep`, the float model moves there afterwards. `keep_float`: nodes to leave in float."""
    float_model = output.with_name(f".{output.stem}.float{output.suffix}")
    os.replace(output, float_model)
    try:
        done = quantize_model(float_model, output, scheme, samples, progress=progress, keep_float=keep_float)
        if keep is not None:
            model_io.save(model_io.load(float_model), keep)
        return done
    finally:
        remove_model(float_model)


def write_result(source: Path, output: Path, model, layers: list, result: FactorizeResult, samples, config: FactorizeConfig,
           grams: dict, scheme: str | None, float_output: Path | None, progress: bool, quantize_progress: bool,
           key: str | None = None) -> dict | None:
    """Refit the factorized pairs (edgelr.passes.refit), save OUTPUT, and quantize it with SCHEME. With static
    INT8 the refit waits for the quantized model and reads its inputs, so it also makes up for the
    quantization error upstream (a refit on float inputs alone made a small convnet's INT8 error worse,
    tests/test_refit.py); OUTPUT and FLOAT_OUTPUT are then rewritten with the new weights. With `key`
    (the model's and samples' content) the refit is cached by the allocation it refit."""
    refitting = _can_refit(model, result, samples, config)
    if refitting and scheme != "int8":
        result.refit = _cached_refit(key, config, scheme, model, None, layers, result, lambda: refit(
            model_io.load(source), model, layers, result, samples, config.damping, progress, grams, config.max_error))
    model_io.save(model, output)
    quantized = quantize_output(output, scheme, samples, quantize_progress, float_output, result.keep_float) if scheme else None
    if refitting and scheme == "int8":
        int8 = model_io.load(output)
        result.refit = _cached_refit(key, config, scheme, model, int8, layers, result, lambda: refit(
            model_io.load(source), model, layers, result, samples, config.damping, progress, grams, config.max_error,
            quantized=int8))
        if result.refit:
            model_io.save(int8, output)
            if float_output is not None:
                model_io.save(model, float_output)
    return quantized


def _cached_refit(key: str | None, config: FactorizeConfig, scheme: str | None, model, int8, layers: list,
                  result: FactorizeResult, run) -> list[str]:
    """`run()` (the refit), or what it left the last time on the same model, samples and allocation:
    the refit is most of a second run on the same model (about 70 s of YOLOv8n's 95 s on 2 cores)."""
    if key is None:
        return run()
    allocation = sorted((row.name, row.form, row.rank) for row in result.layers if row.rank)
    # the INT8 state holds scales from ONNX Runtime's quantizer: another version may calibrate differently
    what = repr((key, allocation, result.keep_float, config.damping, config.max_error, scheme, ort.__version__))
    name = hashlib.sha256(what.encode()).hexdigest()[:32]
    cache = ArrayCache("refit")
    state = cache.get(name)
    if state is not None and "refit" in state:
        try:
            return apply_state(model, int8, result, state)
        except (KeyError, ValueError):  # an entry that does not fit these models: refit again
            pass
    names = run()
    cache.put(name, refit_state(model, int8, layers, result, names))
    return names


def _can_refit(model, result: FactorizeResult, samples, config: FactorizeConfig) -> bool:
    if samples is None or not config.refit or not result.factorized:
        return False
    if model_io.model_bytes(model) > SENSITIVITY_MAX_BYTES:  # a run of both models per level: too slow here
        result.warnings.append(f"factorized pairs not refit (the model is over {SENSITIVITY_MAX_BYTES >> 20} MB)")
        return False
    return True


def remove_model(path: Path) -> None:
    path.unlink(missing_ok=True)
    Path(str(path) + ".data").unlink(missing_ok=True)
