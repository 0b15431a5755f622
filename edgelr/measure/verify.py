"""Verification: the compressed model against the original on the same inputs, by the objective
(edgelr.core.objective): each output and each channel group within it on its own scale."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.core.objective import SCALE_SAMPLES, ErrorMeter, Objective
from edgelr.io.model import ort_session
from edgelr.io.samples import Samples
from edgelr.measure.task import Task, TaskScore, task_score

# The most any output group's error may be on the judged samples when no task metric judges the result
# (--max-output-error). On the corpus (docs/corpus.md), models that keep their answers sit at 0.03-0.10,
# classifiers that flip 6 % of their decisions at 0.20-0.24, and broken ones (text recognisers reading
# 11-17 % of lines right, a text map at IoU 0.70) at 0.40 and over.
MAX_OUTPUT_ERROR = 0.2


def rounded_up(x: float) -> str:
    """X rounded up to two significant figures (a ceiling, or a budget, that lets it through)."""
    if not x > 0:
        return f"{x:g}"
    scale = 10.0 ** (1 - math.floor(math.log10(x)))
    return f"{math.ceil(x * scale - 1e-9) / scale:g}"


def rounded_down(x: float) -> str:
    """X rounded down to two decimals (a floor that lets it through)."""
    return f"{math.floor(x * 100 + 1e-9) / 100:g}"


def ceiling_for(task: Task | None, given: float | None) -> float | None:
    """The output-error ceiling a result is held to: the one given, else the default where no task metric
    judges the result (a task metric says better than any error what still does the job)."""
    return given if given is not None else MAX_OUTPUT_ERROR if task is None else None


def output_error(original: ir.Model | Path, compressed: ir.Model | Path, samples: Samples,
                 references: list[dict[str, np.ndarray]] | None = None,
                 objective: Objective | None = None) -> dict[str, float]:
    """Relative error ||y - y'|| / ||y|| of each channel group of each float output over all samples,
    each output's worst group under its name, and 'worst' over all groups (ErrorMeter.errors).
    `references`: the original's outputs per sample, when calibration kept them (the original is not rerun).
    `objective`: the groups (by default read from the original's outputs on the first samples)."""
    return compare_outputs(original, compressed, samples, references, objective).errors()


def compare_outputs(original: ir.Model | Path, compressed: ir.Model | Path, samples: Samples,
                    references: list[dict[str, np.ndarray]] | None = None,
                    objective: Objective | None = None, keep: list | None = None) -> ErrorMeter:
    """Both models on every sample, the errors summed per group. `keep`: a list to append each sample's
    (reference outputs, compressed outputs) to, for a task metric read from the same runs."""
    with contextlib.ExitStack() as stack:
        new = stack.enter_context(ort_session(compressed))
        names = [o.name for o in new.get_outputs()]
        if not references:
            ref = stack.enter_context(ort_session(original))

        def expected(i: int) -> dict[str, np.ndarray]:
            return dict(references[i]) if references else dict(zip(names, ref.run(names, samples.feed(i))))

        if objective is None:
            objective = Objective.of([expected(i) for i in range(min(SCALE_SAMPLES, len(samples)))])
        meter = objective.meter()
        for i in range(len(samples)):
            a = expected(i)
            b = dict(zip(names, new.run(names, samples.feed(i))))
            meter.add(a, b)
            if keep is not None:
                keep.append((a, b))
    return meter


@dataclass
class Verdict:
    """The compressed model judged against the original: the objective's errors, and the task metric."""

    errors: dict[str, float]
    score: TaskScore | None
    samples: int
    ceiling: float | None = None  # the most the worst output group's error may be

    @property
    def over_ceiling(self) -> bool:
        return self.ceiling is not None and not self.errors.get("worst", 0.0) <= self.ceiling  # nan is over

    @property
    def passed(self) -> bool:
        return (self.score is None or self.score.passed) and not self.over_ceiling

    @property
    def worst_group(self) -> str:
        """The name of the output group with the worst error (the longest name of that value: a group's)."""
        worst = self.errors.get("worst")
        return max((k for k, v in self.errors.items() if k != "worst" and v == worst), key=len, default="")

    def line(self) -> str:
        """What judged it, in one line: the task metric, and the worst error against the ceiling."""
        said = [self.score.line()] if self.score is not None else []
        if self.ceiling is not None:
            said.append(f"worst output error {self.errors.get('worst', 0.0):.3g} ({self.worst_group}), "
                        f"{'over' if self.over_ceiling else 'within'} the ceiling {self.ceiling:g}")
        return "; ".join(said)

    def to_json(self) -> dict:
        data = {"samples": self.samples}
        if self.ceiling is not None:
            data |= {"max_output_error": self.ceiling, "within_ceiling": not self.over_ceiling}
        if self.score is not None:
            data |= {"metric": self.score.metric, "value": self.score.value, "floor": self.score.floor,
                     "passed": self.score.passed, "checks": self.score.checks, **self.score.details}
        return data


def judge(original: ir.Model | Path, compressed: ir.Model | Path, samples: Samples, task: Task | None = None,
          references: list[dict[str, np.ndarray]] | None = None, objective: Objective | None = None,
          ceiling: float | None = None) -> Verdict:
    """Both models on every sample, once: the objective's errors and, with a task, its metric; CEILING: the
    most the worst group's error may be."""
    runs: list | None = [] if task is not None else None
    meter = compare_outputs(original, compressed, samples, references, objective, keep=runs)
    score = task_score(task, [a for a, _ in runs], [b for _, b in runs]) if task is not None else None
    return Verdict(meter.errors(), score, len(samples), ceiling)
