"""What distillation lowers: the student's distance to the teacher, output by output, plus aligned features.

Loss. For each float output, the squared error is normalised by the teacher's own scale, so outputs
(and parts of outputs) of very different magnitude count alike. The scale is that of each channel group
of the objective every stage optimises (edgelr.core.objective): a YOLO head [N, 4 + classes, anchors]
is two groups, box pixels (0..320) and class scores (0..1), each divided by the teacher's RMS of that
group over the batch, so the class head weighs as much as the boxes. An output of one scale (logits,
a feature map, a probability map) is one group. The groups are read once, from the teacher's outputs
on the first samples of the data (`groups`), so every step and every resumed run splits alike.
A group, not a channel, is the unit: a channel the batch never lights up (a class absent from it, RMS
3e-5 on YOLOv8n against a median of 4e-4) scaled on its own is blown up into noise, and Adam drove all
class scores towards 0 when that was tried.
The loss is the mean of these over the groups: about the mean squared relative error of the student.
`scores`: channels holding probabilities are compared by the binary KL divergence instead.
Feature alignment (PELA-style, pairs (teacher_tensor, student_tensor)): MSE between the two
intermediate tensors divided by the teacher tensor's variance, added with `feature_weight`.
`factorized_features` aligns every factorized pair with the layer it replaced (DLRMamba-style).

Scales and feature variances are statistics of the whole (global) batch. A distributed run computes
them from sums that every process adds up (the `reduce` argument: a sum over the processes), so each
process's slice is weighed exactly as one process weighs the whole batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from edgelr.core.objective import Group
from edgelr.errors import EdgelrError
from edgelr.graph.lowrank_pair import find_pairs

try:
    import torch
except ImportError:  # torch is only needed for training
    torch = None  # type: ignore[assignment]

# features="factorized": each pair's weight. Its normalised error starts near its relative error^2 (0.01-0.1),
# the outputs' near the model's (0.002 on YOLOv8n), so the pairs lead: on YOLOv8n 0.01 did better than
# 0.002 (held-out error 0.0344 against 0.0361 after 20 minutes, docs/benchmarks.md), and 0.03 no better.
FACTORIZED_FEATURE_WEIGHT = 0.01

Reduce = Callable[[np.ndarray], np.ndarray]  # float64 array -> its elementwise sum over the processes


def output_scales(teacher: list[list[np.ndarray]], groups: Sequence[Sequence[Group]] | None,
                  scores: tuple[int, int | None] | None = None, reduce: Reduce | None = None) -> list[np.ndarray | None]:
    """Per float output: what its error is divided by (see the module docstring); None for non-float outputs.
    TEACHER: per chunk (one model run), the teacher's outputs. GROUPS: per output, its channel groups
    (edgelr.core.objective; None: each output whole). SCORES (channels [a, b) of axis 1 holding
    probabilities) are left out of an output's scale. REDUCE: sums the statistics over the processes."""
    sums: list[tuple[np.ndarray, float] | None] = []
    layouts = []  # per output: (shape of its scale, channel -> group index) for a split output
    for k in range(len(teacher[0])):
        arrays = [np.asarray(chunk[k]) for chunk in teacher]
        split = groups[k] if groups is not None and k < len(groups) else ()
        layouts.append(None)
        if arrays[0].dtype.kind != "f":
            sums.append(None)
            continue
        a = [x.astype(np.float64) for x in arrays]
        if len(split) > 1:
            axis = split[0].axis
            member = np.zeros(a[0].shape[axis], np.int64)
            for g, group in enumerate(split):
                member[list(group.channels)] = g
            others = tuple(i for i in range(a[0].ndim) if i != axis)
            sq = np.bincount(member, sum(np.sum(x * x, axis=others) for x in a), minlength=len(split))
            count = np.bincount(member, minlength=len(split)) * sum(x.size // x.shape[axis] for x in a)
            layouts[-1] = (tuple(-1 if i == axis else 1 for i in range(a[0].ndim)), member)
            sums.append((sq, count))
        else:
            if scores is not None and a[0].ndim >= 3:
                keep = np.ones(a[0].shape[1], bool)
                keep[slice(*scores)] = False
                a = [x[:, keep] for x in a]
            total = sum(float(np.sum(x * x)) for x in a)
            sums.append((np.asarray(total, np.float64), np.asarray(sum(x.size for x in a), np.float64)))
    if reduce is not None:
        sums = _reduced(sums, reduce)
    scales = []
    for entry, layout in zip(sums, layouts):
        if entry is None:
            scales.append(None)
            continue
        sq, count = entry
        rms = np.maximum(np.sqrt(sq / np.maximum(count, 1)), 1e-12)
        if layout is not None:  # each channel divided by its group's RMS, each group weighing alike in the mean
            shape, member = layout
            share = np.bincount(member) / len(member)
            rms = (rms * np.sqrt(len(share) * share))[member].reshape(shape)
        scales.append(np.asarray(rms, np.float32))
    return scales


def _reduced(sums: list, reduce: Reduce) -> list:
    """SUMS with every (sum, count) added up over the processes, in one reduction."""
    flat = [np.concatenate([np.ravel(sq), np.ravel(count)]) for sq, count in (s for s in sums if s is not None)]
    if not flat:
        return sums
    total = reduce(np.concatenate(flat))
    out, at = [], 0
    for entry in sums:
        if entry is None:
            out.append(None)
            continue
        size = entry[0].size
        out.append((total[at : at + size].reshape(entry[0].shape), total[at + size : at + 2 * size].reshape(entry[0].shape)))
        at += 2 * size
    return out


def output_loss(student, teacher, scale, scores: tuple[int, int | None] | None = None, score_weight: float = 1.0):
    """Squared error / scale^2, averaged; with SCORES, those channels of an [N, C, ...] output are compared
    as probabilities instead, by the binary KL divergence (teacher || student), times score_weight."""
    if scores is None or student.dim() < 3:
        return torch.mean(((student - teacher) / scale) ** 2)
    channels = slice(*scores)
    keep = torch.ones(student.shape[1], dtype=torch.bool, device=student.device)
    keep[channels] = False
    box = ((student[:, keep] - teacher[:, keep]) / (scale[:, keep] if scale.dim() else scale)) ** 2
    return torch.mean(box) + score_weight * binary_kl(teacher[:, channels], student[:, channels])


def binary_kl(p, q, eps: float = 1e-6):
    """Mean binary KL divergence KL(Bernoulli(p) || Bernoulli(q)) of probabilities p (teacher), q (student):
    its gradient in q's logit is q - p, the logit's natural distance, where squared error vanishes."""
    p = p.clamp(eps, 1 - eps)
    q = q.clamp(eps, 1 - eps)
    return torch.mean(p * (torch.log(p) - torch.log(q)) + (1 - p) * (torch.log1p(-p) - torch.log1p(-q)))


def feature_loss(student, teacher, variance=None):
    """MSE between two intermediate tensors over the teacher tensor's variance (VARIANCE, where the
    variance is of more than this tensor: the global batch of a distributed run)."""
    if variance is None:
        variance = teacher.var(unbiased=False)
    return torch.mean((student - teacher) ** 2) / (variance + 1e-12)


def feature_variances(features: list[np.ndarray], reduce: Reduce) -> list[float]:
    """Each teacher feature tensor's variance over all the processes' slices (two-pass, in float64)."""
    if not features:
        return []
    a = [np.asarray(f, np.float64) for f in features]
    firsts = reduce(np.array([v for x in a for v in (float(np.sum(x)), float(x.size))]))
    means = [firsts[2 * i] / max(firsts[2 * i + 1], 1.0) for i in range(len(a))]
    seconds = reduce(np.array([float(np.sum((x - m) ** 2)) for x, m in zip(a, means)]))
    return [float(s / max(firsts[2 * i + 1], 1.0)) for i, s in enumerate(seconds)]


@dataclass(frozen=True)
class Objective:
    """The loss of one forward of the student: its outputs against the teacher's, aligned features, and
    an optional task loss. `outputs` are the graph's outputs (names), then the aligned student features."""

    outputs: tuple[str, ...]
    n_features: int = 0
    groups: tuple[tuple[Group, ...], ...] | None = None  # per output, its channel groups (output_scales)
    scores: tuple[int, int | None] | None = None
    score_weight: float = 1.0
    feature_weight: float = 1.0
    task_loss: Callable | None = None  # task_loss(student outputs by name, data indices) -> scalar tensor
    task_weight: float = 1.0

    def scales(self, teacher: list[list[np.ndarray]], reduce: Reduce | None = None) -> list[np.ndarray | None]:
        """The output scales of a batch (TEACHER: per chunk, the teacher's outputs and features)."""
        return output_scales([t[: len(self.outputs)] for t in teacher], self.groups, self.scores, reduce)

    def variances(self, target: list[np.ndarray], reduce: Reduce) -> list[float]:
        """The teacher features' variances over the global batch (TARGET: one chunk, a process's slice)."""
        return feature_variances(list(target[len(self.outputs) :]), reduce)

    def __call__(self, student: tuple, target: list[np.ndarray], scales: list, indices: np.ndarray, device,
                 variances: list[float] | None = None):
        """The loss of STUDENT's outputs (tensors) against TARGET (the teacher's, numpy) for the samples INDICES."""
        n = len(self.outputs)
        parts = []
        for k, scale in enumerate(scales):
            if scale is not None:
                t = torch.from_numpy(np.asarray(target[k])).to(device)
                parts.append(output_loss(student[k], t, torch.from_numpy(scale).to(device), self.scores,
                                         self.score_weight))
        loss = torch.stack(parts).mean() if parts else student[0].new_zeros(())
        for j in range(self.n_features):
            t = torch.from_numpy(np.asarray(target[n + j])).to(device)
            variance = None if variances is None else torch.tensor(variances[j], dtype=t.dtype, device=device)
            loss = loss + self.feature_weight * feature_loss(student[n + j], t, variance)
        if self.task_loss is not None:
            named = dict(zip(self.outputs, student[:n]))
            loss = loss + self.task_weight * self.task_loss(named, indices)
        return loss


# ---------------------------------------------------------------------------------------------------
# factorized pairs


def factorized_features(s_model: ir.Model, student) -> list[tuple[str, str]]:
    """features="factorized": (tensor, tensor) for the output of every factorized pair of an
    `edgelr compress` student (the pair keeps the output name of the layer it replaced)."""
    pairs = [(pair.up.outputs[0].name,) * 2 for pair in find_pairs(s_model.graph)]
    if not pairs:
        raise EdgelrError(f"{student}: no factorized pairs to align (features='factorized' wants a student from "
                          "edgelr compress); name the tensors instead")
    return pairs


def weights_outside_pairs(student: str | os.PathLike) -> list[str]:
    """The initializers of an `edgelr compress` student that are not factorized-pair weights (theirs are
    named `*lowrank*`): for `freeze` (train only the pairs) or `lr_scale` (train the rest slower)."""
    graph = onnx.load(str(student), load_external_data=False).graph
    return [t.name for t in graph.initializer if "lowrank" not in t.name]
