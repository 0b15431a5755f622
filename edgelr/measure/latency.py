"""Interleaved timing of whole models: median seconds per run, A B C A B C, so drift hits all alike; and
how far each timing can be trusted (its spread), re-measured while it cannot.

On a machine doing other work some runs are preempted: a model that runs longer than a scheduler slice
is hit on many runs, a short one on few, so their medians move apart and the ratio between them lies.
The interquartile range over the median shows it. The demo model against itself (the true ratio is 1),
20 x 3 runs each, on 2 cores already loaded 4x, with 0 or 2 more busy processes, batch 1 and 16
(`python tools/bench_timing_spread.py --trials 15`):

    spread      measurements  worst |ratio - 1|
    0.00-0.10              7  0.008
    0.10-0.20             16  0.033
    0.20-0.30              6  0.024
    0.30-0.50             16  0.273
    0.50-                 15  0.369

Past 0.3 a quarter of the runs or more were preempted and the ratio is anyone's guess: SPREAD_LIMIT is
0.2, with a margin. A layer timed alone runs for microseconds, where the interpreter's own jitter is a
larger share (spreads up to 0.4 on a quiet machine, no wider beside two busy processes, whose slices
rarely land inside so short a run): its limit is LAYER_LEEWAY times wider.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgelr.measure import runner

SPREAD_LIMIT = 0.2  # interquartile range over median, per model: over it a timing is not trusted (above)
LAYER_LEEWAY = 2.0
RETRIES = 4  # measurements again while the spread stays over the limit: a burst of other work passes
BACKOFF_S = 0.05  # before the first of them, doubling: a layer's timing lasts milliseconds, a burst longer


@dataclass(frozen=True)
class Timing:
    seconds: dict[str, float]  # median seconds per run, per model
    spread: float  # the widest interquartile range over median among the models
    leeway: float = 1.0  # times SPREAD_LIMIT that this kind of timing may spread (LAYER_LEEWAY)

    @property
    def limit(self) -> float:
        return SPREAD_LIMIT * self.leeway

    @property
    def stable(self) -> bool:
        return self.spread <= self.limit


def spread(times) -> float:
    """Interquartile range over median: the share of a timing that other work on the machine can move."""
    q1, q2, q3 = np.percentile(times, [25, 50, 75])
    return float((q3 - q1) / q2)


def steadiest(measure: Callable[[], Timing], retries: int = RETRIES) -> Timing:
    """`measure()`, again up to `retries` times while it is not stable: the attempt with the least spread."""
    best = measure()
    for attempt in range(retries):
        if best.stable:
            break
        time.sleep(BACKOFF_S * 2**attempt)
        best = min(best, measure(), key=lambda timing: timing.spread)
    return best


def interleaved_timing(models: dict, feed: dict, threads: int = 1, rounds: int = 30, per_round: int = 3,
                       warmup: int = 5, retries: int = RETRIES) -> Timing:
    """Each model (a path) timed A B C A B C ..., re-measured while the spread is over SPREAD_LIMIT."""
    sessions = {name: runner.session(path, threads) for name, path in models.items()}

    def once() -> Timing:
        times = runner.time_runs(sessions, feed, rounds * per_round, warmup)
        return Timing({name: float(np.median(t)) for name, t in times.items()}, max(spread(t) for t in times.values()))

    return steadiest(once, retries)


def interleaved_latency(models: dict, feed: dict, threads: int = 1, rounds: int = 30, per_round: int = 3,
                        warmup: int = 5) -> dict[str, float]:
    """Median seconds per run of each model (a path), timed A B C A B C ... so drift hits all alike."""
    return interleaved_timing(models, feed, threads, rounds, per_round, warmup, retries=0).seconds
