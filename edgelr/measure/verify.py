"""Verification: the compressed model against the original on the same inputs, by the objective
(edgelr.core.objective): each output and each channel group within it on its own scale."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.core.objective import SCALE_SAMPLES, ErrorMeter, Objective
from edgelr.io.model import ort_session
from edgelr.io.samples import Samples
from edgelr.measure.task import Task, TaskScore, task_score


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

    @property
    def passed(self) -> bool:
        return self.score is None or self.score.passed

    def to_json(self) -> dict:
        data = {"samples": self.samples}
        if self.score is not None:
            data |= {"metric": self.score.metric, "value": self.score.value, "floor": self.score.floor,
                     "passed": self.score.passed, "checks": self.score.checks, **self.score.details}
        return data


def judge(original: ir.Model | Path, compressed: ir.Model | Path, samples: Samples, task: Task | None = None,
          references: list[dict[str, np.ndarray]] | None = None, objective: Objective | None = None) -> Verdict:
    """Both models on every sample, once: the objective's errors and, with a task, its metric."""
    runs: list | None = [] if task is not None else None
    meter = compare_outputs(original, compressed, samples, references, objective, keep=runs)
    score = task_score(task, [a for a, _ in runs], [b for _, b in runs]) if task is not None else None
    return Verdict(meter.errors(), score, len(samples))
