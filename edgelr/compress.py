"""The whole compression job: load, calibrate, factorize, save, verify, report.

    report = edgelr.compress("model.onnx", "small.onnx", FactorizeConfig(params=0.5), calib="data.npz")
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from edgelr import model_io
from edgelr.calibrate import collect_grams, load_samples
from edgelr.errors import EdgelrError
from edgelr.factorize import FactorizeConfig, FactorizeResult, factorize
from edgelr.layers import find_layers
from edgelr.report import result_json, write_json
from edgelr.verify import output_error


@dataclass
class CompressReport:
    source: Path
    output: Path
    result: FactorizeResult
    output_error: dict[str, float]  # whole-model relative error on the calibration samples
    seconds: float

    def to_json(self) -> dict:
        data = {"source": str(self.source), "output": str(self.output), "seconds": round(self.seconds, 3)}
        data.update(result_json(self.result))
        data["output_error"] = self.output_error
        return data


def compress(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: FactorizeConfig,
    calib: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    progress: bool = True,
) -> CompressReport:
    """Factorize SOURCE into OUTPUT; with CALIB the SVD is data-aware and the result is verified on it."""
    start = time.perf_counter()
    source = Path(source)
    output = model_io.check_output_path(output, source, calib)
    if report is not None:
        report = model_io.check_output_path(report, source, calib)
        if report.resolve() == output.resolve():
            raise EdgelrError(f"{report}: the report and the model cannot be the same file")
    model = model_io.load(source)
    samples = load_samples(calib, model) if calib is not None else None
    layers, skipped = find_layers(model)
    if not layers:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
        raise EdgelrError(
            f"{source}: no factorizable MatMul, Gemm or Conv node with a constant weight"
            + (f" ({reasons})" if reasons else "")
        )
    grams = collect_grams(model, layers, samples, progress) if samples is not None else None
    result = factorize(model, config, grams, layers=layers, progress=progress)
    result.skipped = skipped
    model_io.save(model, output)
    del model, grams  # verification below loads both files in ONNX Runtime; free the graph first
    try:
        errors = output_error(source, output, samples) if samples is not None else {}
    except Exception:
        _remove_model(output)  # a model ONNX Runtime cannot run is no result
        raise
    done = CompressReport(source, output, result, errors, time.perf_counter() - start)
    if report is not None:
        write_json(done.to_json(), report)
    return done


def _remove_model(path: Path) -> None:
    path.unlink(missing_ok=True)
    Path(str(path) + ".data").unlink(missing_ok=True)
