"""The latency search: factorize, time the whole model, correct the budget, again (and, for INT8,
which layers stay in float). It runs a factorize config with a latency budget (FactorizeConfig(latency=F)).
"""

from __future__ import annotations

import functools
import math
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.calibration.analysis import Analysis
from edgelr.core.costs import LatencyBudget
from edgelr.errors import EdgelrError
from edgelr.graph.layers import Layer, find_layers
from edgelr.io import model as model_io
from edgelr.io.progress import progress_bar
from edgelr.measure.latency import Timing, interleaved_timing
from edgelr.measure.verify import (
    Verdict,
    compare_outputs,
    judge,
    rounded_down,
    rounded_up,
)
from edgelr.passes.base import register_pass
from edgelr.passes.factorize import (
    FactorizeConfig,
    FactorizePass,
    FactorizeResult,
    factorize,
)
from edgelr.passes.quantize import QuantizeConfig
from edgelr.passes.quantize import quantize as quantize_model
from edgelr.search.tables import LatencyTable

LATENCY_ROUNDS = 6  # most end in 1-2; a search that keeps landing just outside its window needs the rest
MEASURE_ROUNDS = 20  # x 3 runs of each model, interleaved, per measurement
LATENCY_SLACK = 0.01  # the search aims this far below the target: one model's ratio moves this much between runs
FLOAT_CANDIDATES = 6
GATE_ROUNDS = 4  # with a task metric or an error ceiling: more rounds, to back off from a saving that broke it
# the original's own median may move this much between the measurements of one run (the layer tables are
# timed between them): on 2 cores loaded 4x it moved 0.3 between trusted measurements (tools/bench_timing_spread.py),
# which shifts a prediction by under 0.05 and the correction absorbs; a machine half again as fast or slow
# between rounds is not the one the tables were timed on
DRIFT_LIMIT = 0.5
# of the original's latency: honest misses of the tables' prediction reach 0.13 (a graph's fusions, float
# kernels timed for an INT8 model: docs/benchmarks.md); one timed under load missed by 0.3 (issue 20)
PREDICTION_TOLERANCE = 0.15
GATE_RESOLUTION = 0.02  # of the original's latency: closer than this to a breaking saving is close enough  # with a static int8 quantize pass after it: layers measured for staying in float


@register_pass(FactorizeConfig, when=lambda config: config.latency is not None)
class LatencySearchPass(FactorizePass):
    def allocate(self, model: ir.Model, layers: list[Layer], analysis: Analysis) -> tuple[ir.Model, list[Layer], FactorizeResult]:
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
        predicted error among the hits or rounds below them (the fastest if none is). With a quantize pass after this one, each round's model is quantized before it is measured, and the original
        quantized alone (the floor: how far quantization alone gets) is timed in the same interleaved runs:
        the floor is the median of every such measurement, and the budget holds beside it, for what will run.
        Every whole-model measurement must be trusted (_Clock) or the run is refused; nothing is cached
        before the last round, and the settled saving only when every timing it rests on was stable.
        """
        ctx, config = self.context, self.config
        source, samples, progress, key = ctx.path, ctx.samples, ctx.progress, analysis.key
        quantizing = ctx.following(QuantizeConfig)
        quantize = quantizing.scheme if quantizing else None
        activations = quantizing.activations_on(ctx.target) if quantizing else "uint8"
        device = ctx.device  # an edgelr.measure.device.DeviceTimer: layers and rounds timed there; None: here
        threads, elsewhere = device.settings(ctx.target) if device is not None else _threads(ctx.target)
        table = LatencyTable(threads=threads, quantize=quantize, activations=activations, timer=device)
        interleaved = device.interleaved_timing if device is not None else interleaved_timing
        feed = samples.feed(0)
        target = config.latency
        sensitivity = analysis.sensitivity if config.sensitivity else None
        # the saving an earlier identical run settled on: its correction rounds need not be repeated
        memo = f"saving|{key}|{target}|{config.max_error}|{config.damping}|{config.conv_form}|{config.sensitivity}|{quantize}"
        float_layers = None
        if quantize == "int8" and len(samples) >= 2:  # which layers to quantize is part of the search (LatencyBudget)
            float_layers = _float_layers(source, model, layers, samples, key, sensitivity, table, activations, progress,
                                         analysis.objective, interleaved)
            memo += "|float-choice"

        def allocation(saving: float) -> tuple[ir.Model, list[Layer], FactorizeResult]:
            """A fresh copy of the model factorized to save `saving` seconds (the pass's own model stays untouched)."""
            fresh, fresh_layers = _reload(source, layers)
            budget = LatencyBudget(table, saving, float_layers)
            return fresh, fresh_layers, factorize(fresh, config, analysis.grams, layers=fresh_layers, progress=progress,
                                                  latency=budget, spectra=analysis.spectra, sensitivity=sensitivity)

        aim = target - LATENCY_SLACK
        task, ceiling = ctx.task, ctx.ceiling
        gated = (task is not None or ceiling is not None) and ctx.judged is not None
        memo += f"|{task.kind}>={task.floor}" if task is not None else ""
        memo += f"|error<={ceiling}" if ceiling is not None else ""

        def holds(path: Path) -> Verdict | None:
            """The round's model judged against the original: the task metric and the error ceiling."""
            if not gated:
                return None
            known = analysis.references if ctx.judged is ctx.samples and ctx.pristine else None  # not run again
            return judge(ctx.source, path, ctx.judged, task, known, ctx.objective, ceiling)

        with tempfile.TemporaryDirectory(prefix="edgelr-rounds-", dir=ctx.workdir) as tmp:
            timed = {"original": source}
            if quantize:
                timed["quantized"] = Path(tmp) / "quantized.onnx"
                quantize_model(source, timed["quantized"], quantize, samples, activations=activations, progress=False)
            floors = []  # the quantized original's latency ratio, per measurement
            clock = _Clock(timed, feed, threads, interleaved, f"on {device.device.host}" if device else "on this machine")
            remembered = memo in table.entries
            if remembered:  # it settled there: only a miss of the budget (not a faster landing) is searched again
                saving = table.entries[memo]
            else:  # the tables time the layers as they will run (quantized too), so seconds add up directly
                start = clock.measure().seconds
                floors += [start["quantized"] / start["original"]] if quantize else []
                saving = max((floors[0] if quantize else 1.0) - aim, 0.0) * start["original"]
            rounds, kept, asked = [], [], []
            broke = None  # the least saving whose model fell under the task metric's floor
            for i in range(LATENCY_ROUNDS + (GATE_ROUNDS if gated else 0)):
                if i >= LATENCY_ROUNDS and broke is None:  # the extra rounds are for backing off from a break
                    break
                candidate, _, result = table.batched(functools.partial(allocation, saving))
                timed["compressed"] = Path(tmp) / "round.onnx"
                model_io.save(candidate, timed["compressed"])
                if quantize:
                    quantize_model(timed["compressed"], Path(tmp) / "round.q.onnx", quantize, samples, activations=activations,
                                   progress=False, keep_float=result.keep_float)
                    timed["compressed"] = Path(tmp) / "round.q.onnx"
                predicted = sum(r.latency_before - r.latency_after for r in result.layers)

                def expected(seconds: dict[str, float], predicted: float = predicted, floors: list = floors) -> float:
                    """The ratio the tables predict, beside the floor with this measurement in it."""
                    here = [seconds["quantized"] / seconds["original"]] if quantize else []
                    return (float(np.median(floors + here)) if quantize else 1.0) - predicted / seconds["original"]

                timing = clock.measure(expected)
                measured = timing.seconds
                ratio = measured["compressed"] / measured["original"]
                predicted_ratio = expected(measured)
                floors += [measured["quantized"] / measured["original"]] if quantize else []
                floor = float(np.median(floors)) if quantize else 1.0
                error = result.predicted_error2
                verdict = holds(timed["compressed"])
                held = verdict is None or verdict.passed
                rounds.append({"round": i + 1, "saving_asked_s": saving, "predicted_ratio": predicted_ratio,
                               "measured_ratio": ratio, "timing_spread": timing.spread,
                               "quantized_only_ratio": floors[-1] if quantize else None,
                               "predicted_error2": error, "task_held": held} | _judged(verdict))
                high = aim + LATENCY_SLACK / 2
                kept.append((held, ratio <= high, ratio <= target, error, ratio, i, saving))
                if not held:  # too far: back off halfway towards the most a round saved within the floor
                    broke = saving if broke is None else min(broke, saving)
                    safe = max((k[6] for k in kept if k[0]), default=0.0)
                    if broke - safe < GATE_RESOLUTION * measured["original"]:
                        break
                    saving = (safe + broke) / 2
                    continue
                low = 0.0 if remembered and i == 0 else aim - LATENCY_SLACK
                asked.append(saving / measured["original"])
                if low <= ratio <= high or not result.budget_reached or saving <= 0:
                    break
                delivered = sum(floor - r["measured_ratio"] for r in rounds if r["task_held"]) / sum(asked)
                if delivered <= 0:
                    break
                saving = (floor - aim) / delivered * measured["original"]
                if broke is not None and saving >= broke:  # the budget lies past the floor: close in on it
                    if broke - asked[-1] * measured["original"] < GATE_RESOLUTION * measured["original"]:
                        break
                    saving = (asked[-1] * measured["original"] + broke) / 2
        # the kept round: held the floor; then within the window; then the least predicted error, else the fastest
        held, _, within, _, _, best, saving = min(kept, key=lambda k: (not k[0], not k[1], k[3] if k[1] else k[4]))
        # the kept round again, on the pass's own model (deterministic: the same allocation and factors)
        result = factorize(model, config, analysis.grams, layers=layers, progress=progress,
                           latency=LatencyBudget(table, saving, float_layers), spectra=analysis.spectra,
                           sensitivity=sensitivity)
        table.record(memo, saving, stable=not table.unstable)  # a saving settled on unstable tables is not remembered
        table.save()
        if not held or rounds[best]["measured_ratio"] > target + LATENCY_SLACK:  # missed by more than timing noise
            raise EdgelrError(_unreachable(target, rounds, best, task, ceiling, quantize))
        t_original = measured["original"]
        front = [{"predicted_ratio": 1 - (result.dense_cost - cost) / t_original, "predicted_error": math.sqrt(e2)}
                 for cost, e2 in result.front]
        result.warnings.extend([elsewhere] if elsewhere else [])
        if table.unstable:
            result.warnings.append(f"{len(table.unstable)} layer timings spread too widely to cache (the machine was "
                                   "busy): they were used, and will be measured again")
        ctx.latency = {"target": table.target, "front": front, "quantized_only_ratio": floor if quantize else None,
                       "table": str(table.path), "layer_timings": table.measured,
                       "unstable_layer_timings": len(table.unstable), "rounds": rounds,
                       "kept_round": best + 1, "within_budget": within,
                       "device": device.record(threads) if device is not None else None}
        return model, layers, result


class _Clock:
    """The search's whole-model timings, each one trusted or refused: its spread within Timing.limit (re-measured
    while over it), the original's own median within DRIFT_LIMIT of every earlier measurement of the run, and a
    round's ratio within PREDICTION_TOLERANCE of the tables' prediction. A measurement in doubt is taken once
    more; in doubt again, the run stops (EdgelrError): a round accepted on such a timing is a model that was
    sold as fast and is not, and its saving would be remembered."""

    def __init__(self, models: dict, feed: dict, threads: int, interleaved=interleaved_timing,
                 where: str = "on this machine"):
        self.models, self.feed, self.threads = models, feed, threads
        self.interleaved = interleaved  # interleaved_timing here, or a device's (DeviceTimer.interleaved_timing)
        self.where = where  # what a refusal names
        self.originals: list[float] = []  # the original's median seconds, per trusted measurement

    def measure(self, expected: Callable[[dict[str, float]], float] | None = None) -> Timing:
        """The models timed interleaved; `expected(seconds)`: the ratio the tables predict for "compressed"."""
        for _ in range(2):
            timing = self.interleaved(self.models, self.feed, threads=self.threads, rounds=MEASURE_ROUNDS)
            doubt = self._doubt(timing, expected)
            if doubt is None:
                self.originals.append(timing.seconds["original"])
                return timing
        raise _unstable(doubt, self.where)

    def _doubt(self, timing: Timing, expected) -> str | None:
        """Why this measurement cannot be trusted, or None."""
        if not timing.stable:
            return _spread(timing)
        seen = self.originals + [timing.seconds["original"]]
        if max(seen) > (1 + DRIFT_LIMIT) * min(seen):
            return f"the original model measured {min(seen) * 1e3:.3g} to {max(seen) * 1e3:.3g} ms in one run"
        if expected is not None:
            ratio, predicted = timing.seconds["compressed"] / timing.seconds["original"], expected(timing.seconds)
            if abs(ratio - predicted) > PREDICTION_TOLERANCE:
                return f"a round predicted at {predicted:.2f} of the latency measured {ratio:.2f}, twice"
        return None


def _spread(timing: Timing) -> str:
    return f"runs of one model spread {timing.spread:.0%} of their median, over {timing.limit:.0%}"


def _unstable(doubt: str, where: str = "on this machine") -> EdgelrError:
    return EdgelrError(f"timings {where} are unstable ({doubt}): close other work and run again, or pass "
                       "--flops F instead of --latency F (it times nothing)")


def _judged(verdict: Verdict | None) -> dict:
    """What a latency round records of its verdict."""
    if verdict is None:
        return {"task_metric": None, "task_failed_checks": [], "worst_error": None}
    failed = (verdict.score.failed_checks if verdict.score is not None else []) + (
        ["max_output_error"] if verdict.over_ceiling else [])
    return {"task_metric": verdict.score.value if verdict.score is not None else None, "task_failed_checks": failed,
            "worst_error": verdict.errors.get("worst")}


def _unreachable(target: float, rounds: list[dict], best: int, task, ceiling: float | None,
                 quantize: str | None = None) -> str:
    """One line: why the latency budget was not met, what was reachable, and what to pass to go further."""
    held = [r for r in rounds if r["task_held"]]
    broke = [r for r in rounds if not r["task_held"]]
    reached = f"pass --latency {rounded_up(rounds[best]['measured_ratio'])}"
    if not broke:
        return (f"latency budget {target:g} not reachable: the fastest factorization measured "
                f"{rounds[best]['measured_ratio']:.2f} of the latency (more does not pay on these kernels); {reached}"
                + ("" if quantize else ", or quantize as well (--quantize int8)"))
    bars = ([f"{task.kind} >= {task.floor:g}"] if task is not None else []) + (
        [f"every output error <= {ceiling:g}"] if ceiling is not None else [])
    fastest = min(broke, key=lambda r: r["measured_ratio"])
    further = []
    if task is not None and fastest["task_metric"] is not None and not fastest["task_metric"] >= task.floor:
        further.append(f"--floor {rounded_down(fastest['task_metric'])}")
    if ceiling is not None and "max_output_error" in fastest["task_failed_checks"]:
        further.append(f"--max-output-error {rounded_up(fastest['worst_error'])}")
    further += [f"checks {', '.join(c for c in fastest['task_failed_checks'] if c != 'max_output_error')}"] if any(
        c != "max_output_error" for c in fastest["task_failed_checks"]) else []
    go = (f"; round {fastest['round']} measured {fastest['measured_ratio']:.2f} and would need "
          f"{' and '.join(further)}, or distillation (edgelr distill)")
    if not held:
        return f"latency budget {target:g} not reachable with {' and '.join(bars)}: no round kept it{go}"
    return (f"latency budget {target:g} not reachable with {' and '.join(bars)}: the fastest that kept it measured "
            f"{rounds[best]['measured_ratio']:.2f} of the latency (round {best + 1}); {reached}{go}")


def _threads(target) -> tuple[int, str | None]:
    """The thread count to time with, and a warning when the tables cannot be the target's own: ONNX Runtime
    CPU is timed here, so a target of another architecture or runtime gets this machine's timings (1 thread)."""
    if target is None:
        return 1, None
    if target.is_tensorrt or target.arch != platform.machine():
        return 1, (f"latency timed on this machine ({platform.machine()}, ONNX Runtime CPU, 1 thread), not on "
                   f"{target.name} ({target.arch}, {target.backend}): its ranks suit this machine's kernels")
    return target.threads, None


def _float_layers(source: Path, model, layers: list, samples, key: str, sensitivity: dict | None,
                  table: LatencyTable, activations: str, progress: bool, objective,
                  interleaved=interleaved_timing) -> dict[str, tuple[float, float]]:
    """Layer name -> (seconds added, error^2 removed) by leaving that layer in float in the INT8 model,
    for the FLOAT_CANDIDATES layers whose INT8 error, measured alone and weighed by sensitivity, is
    largest; each measured on the whole model (quantized without it, its error on the calibration
    samples, its time interleaved with the all-INT8 model's). Cached with the latency tables."""
    from edgelr.passes.svdquant import int8_errors

    memo = f"float|{key}|{objective.key if objective else ''}|"
    known = {layer.name: table.entries.get(memo + layer.name) for layer in layers}
    if not any(known.values()):
        own = int8_errors(model, layers, samples, progress=progress)
        weight = sensitivity or {}
        score = {name: e * weight.get(name, 1.0) for name, e in own.items() if e > 0}
        chosen = sorted(score, key=score.get, reverse=True)[:FLOAT_CANDIDATES]
        known = _measure_float_layers(source, [layer for layer in layers if layer.name in chosen], samples,
                                       activations, progress, objective, interleaved)
        table.entries.update({memo + name: list(v) for name, v in known.items()})
        table.save()
    return {name: tuple(v) for name, v in known.items() if v and v[1] > 0}


def _measure_float_layers(source: Path, layers: list, samples, activations: str, progress: bool,
                          objective, interleaved=interleaved_timing) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="edgelr-float-") as tmp:
        models = {}
        bar = progress_bar(layers, desc="float layers", unit="model", show=progress)
        for name, keep in [("", [])] + [(layer.name, [use.node.name for use in layer.uses]) for layer in bar]:
            models[name] = Path(tmp) / f"{len(models)}.onnx"
            quantize_model(source, models[name], "int8", samples, activations=activations, progress=False, keep_float=keep)
        error2 = {name: compare_outputs(source, path, samples, objective=objective).total2() for name, path in models.items()}
        timing = interleaved(models, samples.feed(0), rounds=MEASURE_ROUNDS)
    if not timing.stable:
        raise _unstable(_spread(timing))
    times = timing.seconds
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
