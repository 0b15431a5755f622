"""edgelr: low-rank factorization, compression and deployment of ONNX models for edge devices."""

__version__ = "0.1.0"

from edgelr.calibrate import Samples, collect_grams, load_samples  # noqa: E402
from edgelr.compress import CompressReport, compress  # noqa: E402
from edgelr.errors import EdgelrError  # noqa: E402
from edgelr.factorize import FactorizeConfig, FactorizeResult, factorize  # noqa: E402
from edgelr.layers import find_layers  # noqa: E402
from edgelr.model_io import load, save  # noqa: E402
from edgelr.verify import output_error  # noqa: E402

__all__ = [
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
