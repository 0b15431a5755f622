"""Interleaved latency measurement of ONNX models in ONNX Runtime (ratios from the same run)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def interleaved_latency(models: dict[str, str | Path], feed: dict, rounds: int = 30, per_round: int = 3,
                        warmup: int = 5, threads: int = 1) -> dict[str, float]:
    """Median seconds per run of each model, measured A B C A B C ... so drift hits all alike."""
    sessions = {name: session(path, threads) for name, path in models.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(per_round):
                start = time.perf_counter()
                s.run(None, feed)
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}
