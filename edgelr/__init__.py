"""edgelr: low-rank factorization, compression and deployment of ONNX models for edge devices."""

from edgelr.api import CompressReport, compress  # noqa: E402
from edgelr.calibration.grams import collect_grams  # noqa: E402
from edgelr.errors import EdgelrError  # noqa: E402
from edgelr.graph.layers import find_layers  # noqa: E402
from edgelr.io.model import load, save  # noqa: E402
from edgelr.io.samples import Samples, load_samples
from edgelr.measure.verify import output_error  # noqa: E402
from edgelr.passes.factorize import FactorizeConfig, FactorizeResult, factorize  # noqa: E402
from edgelr.version import __version__  # noqa: E402

__all__ = [
    "__version__",
    "CompressReport",
    "EdgelrError",
    "FactorizeConfig",
    "FactorizeResult",
    "Samples",
    "collect_grams",
    "compress",
    "factorize",
    "find_layers",
    "load",
    "load_samples",
    "output_error",
    "save",
]
