"""Does `edgelr profile --vs` reproduce a separate speed measurement? YOLOv8n (nudenet), --params 0.5.

    python tools/bench_profile.py --json docs/bench_profile.json

Compresses the detector, then measures original vs compressed twice in one process: once with the
plain interleaved timer that the benchmarks use, once with `edgelr profile`'s comparison (which also
collects ORT's per-node table). Prints both ratios, how far apart they are, and the node-table size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgelr import (
    FactorizeConfig,  # noqa: E402
    compress,
)
from edgelr.measure.latency import interleaved_latency  # noqa: E402
from edgelr.measure.profile import compare_models  # noqa: E402
from models.data import (  # noqa: E402
    CALIBRATION,
    HELD_OUT,
    samples,
    yolo_path,  # noqa: E402
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--json")
    args = parser.parse_args()
    source = yolo_path()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "calib.npz", images=samples(CALIBRATION, 320, 3, seed=0))
        small = tmp / "small.onnx"
        compress(source, small, FactorizeConfig(params=0.5), calib=tmp / "calib.npz", progress=False)
        feed = {"images": samples(HELD_OUT[:1], 320, 0, seed=1)[:1]}
        separate = interleaved_latency({"a": source, "b": small}, feed, rounds=args.runs // 3)
        profiled = compare_models({"A": source, "B": small}, feed, runs=args.runs, warmup=5)
    ratio_separate = separate["b"] / separate["a"]
    ratio_profile = profiled["B"].latency_ms["p50"] / profiled["A"].latency_ms["p50"]
    result = {
        "ratio_separate": ratio_separate,
        "ratio_profile_vs": ratio_profile,
        "relative_difference": abs(ratio_profile - ratio_separate) / ratio_separate,
        "node_rows": {"original": len(profiled["A"].nodes), "compressed": len(profiled["B"].nodes)},
        "p50_ms": {"original": profiled["A"].latency_ms["p50"], "compressed": profiled["B"].latency_ms["p50"]},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
