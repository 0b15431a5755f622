"""How far an interleaved timing can be trusted at a given spread (issue 20): the demo model timed against
itself (the true ratio is 1), beside N busy processes, at a few batch sizes (a longer run is preempted more).

    python tools/bench_timing_spread.py --hogs 0 2 --batches 1 16 --trials 20

prints, per spread bucket (interquartile range over median, the widest of the two models), how many
measurements fell there and the worst |ratio - 1| among them; then, per setting, how far the model's own
median drifted between the measurements SPREAD_LIMIT trusts (max over min, minus 1).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgelr.demo import build_model, synthetic_images
from edgelr.measure import runner
from edgelr.measure.latency import SPREAD_LIMIT, spread

BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.5, np.inf]


def trials(path: Path, batch: int, hogs: int, count: int) -> list[tuple[float, float, float]]:
    feed = {"image": synthetic_images(batch, seed=1).astype(np.float32)}
    sessions = {"a": runner.session(path, 1), "b": runner.session(path, 1)}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        time.sleep(0.5)
        out = []
        for _ in range(count):
            times = runner.time_runs(sessions, feed, 60, 5)  # the search's measurement: 20 x 3 runs
            a, b = np.median(times["a"]), np.median(times["b"])
            out.append((max(spread(t) for t in times.values()), abs(b / a - 1), a))
        return out
    finally:
        for hog in busy:
            hog.kill()
            hog.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hogs", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(build_model(), path)
        runs = {(hogs, batch): trials(path, batch, hogs, args.trials) for hogs in args.hogs for batch in args.batches}
    rows = [r for setting in runs.values() for r in setting]
    low = 0.0
    print("spread        measurements  worst |ratio - 1|")
    for high in BUCKETS:
        errors = [e for s, e, _ in rows if low <= s < high]
        worst = f"{max(errors):.3f}" if errors else "-"
        print(f"{low:.2f}-{high:<8.2f}  {len(errors):>12}  {worst}")
        low = high
    print("\nhogs  batch  drift of the median among trusted measurements")
    for (hogs, batch), setting in runs.items():
        trusted = [a for s, _, a in setting if s <= SPREAD_LIMIT]
        drift = f"{max(trusted) / min(trusted) - 1:.3f} over {len(trusted)}" if trusted else "-"
        print(f"{hogs:>4}  {batch:>5}  {drift}")


if __name__ == "__main__":
    main()
