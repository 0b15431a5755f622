"""Interleaved timing of whole models: median seconds per run, A B C A B C, so drift hits all alike."""

from __future__ import annotations

import numpy as np

from edgelr.measure import runner


def interleaved_latency(models: dict, feed: dict, threads: int = 1, rounds: int = 30, per_round: int = 3,
                        warmup: int = 5) -> dict[str, float]:
    """Median seconds per run of each model (a path), timed A B C A B C ... so drift hits all alike."""
    sessions = {name: runner.session(path, threads) for name, path in models.items()}
    times = runner.time_runs(sessions, feed, rounds * per_round, warmup)
    return {name: float(np.median(t)) for name, t in times.items()}
