"""The objective every stage optimises and reports: each output's error on its own scale, and within an
output each group of channels of one scale on its own; the run is judged by the worst group.

One relative error ||y - y'|| / ||y|| over a whole output cannot see a part of it that is small: a
YOLO head [N, 4 + C, A] holds box pixels (0..320) and class scores (0..1) on one channel axis, and
an error that wipes out every class score moves that number by under 0.1 (issue 18). So a channel
axis is split where the channels' scales jump: the channels' RMS over the reference outputs, sorted,
break into groups wherever one is more than GROUP_GAP times the next. Channels of one kind (classes
lit more or less often, feature maps) spread in small steps and stay one group; quantities of
different units (pixels beside probabilities) fall apart.

The groups' relative errors are what is reported, the worst of them is what gates, and the sum of
their squares is what the allocation and the searches add up (it bounds the worst from above and is
additive over layers to first order: edgelr.calibration.sensitivity).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# Neighbouring channel scales further apart than this are different quantities. YOLOv8n's box channels
# sit at RMS 77-183 and its 18 class channels at 2e-5..1e-2, in steps of at most 2.5x (sorted), so the
# gap between the two kinds (8000x) is the only one over 10.
GROUP_GAP = 10.0
MAX_CHANNELS = 1024  # a longer axis is not a channel axis (anchors, tokens, pixels): no split
SCALE_SAMPLES = 8  # the reference outputs the channel scales are read from


@dataclass(frozen=True)
class Group:
    """Channels `channels` of axis `axis` of output `output` (axis None: the whole output)."""

    output: str
    axis: int | None = None
    channels: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        if self.axis is None:
            return self.output
        first, last = self.channels[0], self.channels[-1]
        if self.channels == tuple(range(first, last + 1)):
            return f"{self.output}[{first}:{last + 1}]"
        return f"{self.output}[{len(self.channels)} channels]"

    def take(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if self.axis is None:
            return array
        return np.take(array, self.channels, axis=self.axis)


@dataclass(frozen=True)
class Objective:
    """The channel groups of a model's float outputs, each measured on its own scale."""

    groups: tuple[Group, ...]

    @classmethod
    def of(cls, references: Sequence[Mapping[str, np.ndarray]]) -> Objective:
        """From the original's outputs (per sample, name -> array): each float output, split where its
        channels' scales jump."""
        picked = list(references[:SCALE_SAMPLES])
        groups: list[Group] = []
        for name in picked[0] if picked else ():
            arrays = [np.asarray(r[name]) for r in picked]
            if arrays[0].dtype.kind != "f":
                continue
            groups += _split(name, arrays)
        return cls(tuple(groups))

    @property
    def key(self) -> str:
        """What the groups are, for cache keys (a sensitivity measured on other groups is not reused)."""
        text = repr([(g.output, g.axis, g.channels) for g in self.groups])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def meter(self) -> ErrorMeter:
        return ErrorMeter(self)

    def errors(self, expected: Iterable[Mapping[str, np.ndarray]], got: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
        meter = self.meter()
        for a, b in zip(expected, got):
            meter.add(a, b)
        return meter.errors()


@dataclass
class ErrorMeter:
    """Sums of squared errors and squared references per group, sample by sample."""

    objective: Objective
    num: np.ndarray = field(init=False)
    den: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.num = np.zeros(len(self.objective.groups))
        self.den = np.zeros(len(self.objective.groups))

    def add(self, expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> None:
        for i, group in enumerate(self.objective.groups):
            a = group.take(expected[group.output]).astype(np.float64)
            b = group.take(got[group.output]).astype(np.float64)
            self.num[i] += float(np.sum((a - b) ** 2))
            self.den[i] += float(np.sum(a * a))

    def relative2(self) -> np.ndarray:
        """Each group's relative error squared (absolute where the reference is all zeros)."""
        return np.where(self.den > 0, self.num / np.maximum(self.den, 1e-300), self.num)

    def total2(self) -> float:
        """The sum of the groups' relative errors squared: what the allocation adds up."""
        return float(self.relative2().sum())

    def worst(self) -> float:
        return float(np.sqrt(self.relative2().max())) if len(self.num) else 0.0

    def errors(self) -> dict[str, float]:
        """Group name -> relative error; each output -> its worst group; 'worst' -> the worst of all."""
        errors: dict[str, float] = {}
        for group, e2 in zip(self.objective.groups, self.relative2()):
            errors[group.name] = max(errors.get(group.name, 0.0), math.sqrt(e2))
            errors[group.output] = max(errors.get(group.output, 0.0), math.sqrt(e2))
        if errors:
            errors["worst"] = self.worst()
        return errors


def _split(name: str, arrays: list[np.ndarray]) -> list[Group]:
    """The output's groups: one, unless its channel axis holds channels of very different scales."""
    shape = arrays[0].shape
    axis = channel_axis(shape)
    if axis is None or any(a.shape != shape for a in arrays):
        return [Group(name)]  # a dynamic axis (a count of detections, a length): no channel axis to read
    others = tuple(i for i in range(len(shape)) if i != axis)
    rms = np.sqrt(sum(np.sum(a.astype(np.float64) ** 2, axis=others) for a in arrays))
    order = np.argsort(rms, kind="stable")
    lit = rms[order] > 0
    breaks = [i for i in range(1, len(order)) if lit[i - 1] and rms[order[i]] > GROUP_GAP * rms[order[i - 1]]]
    if not breaks:
        return [Group(name)]
    # channels that are all zeros in the references join the smallest group (their scale is unknown)
    parts = sorted(tuple(sorted(int(c) for c in part)) for part in np.split(order, breaks))
    return [Group(name, axis, part) for part in parts]


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """Axis 1 of [N, C, ...] (or the last of a transposed [N, A, C] head, where C < A), None for vectors.

    A vector of class scores, logits or an embedding is one quantity: a class no input lit would be a group
    of its own, measured on a scale of nothing (a 2-class NSFW classifier's unlit class: relative error
    1.0 for an unchanged decision). Rows of a probability map [N, 1, H, W] are not channels either."""
    if len(shape) < 3:
        return None
    axes = [1, 2] if len(shape) == 3 else [1]
    axes = [i for i in axes if 2 <= shape[i] <= MAX_CHANNELS]
    return min(axes, key=lambda i: shape[i]) if axes else None
