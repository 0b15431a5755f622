"""What factorization reads before it chooses: each layer's input Gram, its whitened error-by-rank
curves and its measured sensitivity, computed once per model and samples and cached.

Calibration statistics (the Grams, the model's own outputs) are cached by the content of the model
and the samples (edgelr.calibration.grams); the spectra and sensitivities, which also depend on the
damping, beside them (`~/.cache/edgelr/spectra`), so another budget on the same model skips to the search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.calibration.grams import Grams, cached_grams
from edgelr.calibration.sensitivity import PROBE_SAMPLES, layer_sensitivity
from edgelr.core.lowrank import FEW_ROWS
from edgelr.core.objective import Objective
from edgelr.graph.layers import Layer
from edgelr.io import model as model_io
from edgelr.io.cache import ArrayCache, content_key
from edgelr.io.samples import Samples

SENSITIVITY_MAX_BYTES = 256 << 20  # larger models: no measured layer sensitivities, no refit


@dataclass
class Analysis:
    key: str | None  # the content of the model and the samples, and the damping rule (None without samples)
    grams: Grams | None  # layer name -> input Gram, with its input rows
    references: list | None  # the model's outputs on the samples
    spectra: dict  # (layer, form) -> error-by-rank curve; factorize fills in what it computes
    sensitivity: dict | None  # layer name -> whole-model error^2 per unit of its own
    damping: float
    objective: Objective | None = None  # the output groups errors are measured by (None without samples)
    warnings: list[str] = field(default_factory=list)
    _known: tuple = ()

    def keep(self, layers: list[Layer]) -> None:
        """Cache what was computed since `analyse` (the spectra factorize filled in, a new sensitivity)."""
        if self.key is not None and (len(self.spectra), self.sensitivity is not None) != self._known:
            ArrayCache("spectra").put(self._cache_key(), _pack_analysis(self.spectra, self.sensitivity, layers))

    def _cache_key(self) -> str:
        return _spectra_key(self.key, self.damping, self.objective)


def analyse(path: Path, model: ir.Model, layers: list[Layer], samples: Samples | None, calib: Path | None,
            damping: float, sensitivity: bool = True, progress: bool = True,
            objective: Objective | None = None, adapt_damping: bool = False) -> Analysis:
    """The model at PATH (loaded as MODEL) and its layers on the samples; sensitivities are probed only
    when `sensitivity` is asked for and not cached. `objective`: the output groups to measure by (by
    default read from the model's own outputs on the samples). `adapt_damping`: as FactorizeConfig's."""
    key = content_key(path, model, Path(calib)) if samples is not None else None
    grams, references = cached_grams(model, layers, samples, key, progress) if samples is not None else (None, None)
    if objective is None and references:
        objective = Objective.of(references)
    if key is not None:  # what is cached downstream (spectra, search memos, refits) depends on the rule
        key += "-adapted" if adapt_damping else "-fixed"
    spectra, measured = _cached_analysis(key, layers, damping, objective)
    done = Analysis(key, grams, references, spectra, measured, damping, objective,
                    _known=(len(spectra), measured is not None))
    if grams:
        done.warnings.extend(filter(None, [few_rows_warning(layers, grams, adapt_damping)]))
    if samples is not None and sensitivity and measured is None:
        if model_io.model_bytes(model) <= SENSITIVITY_MAX_BYTES:
            try:
                done.sensitivity = layer_sensitivity(path, layers, grams, spectra, damping, samples, objective, progress,
                                                     grams.rows if adapt_damping else None)
            except Exception as exc:  # noqa: BLE001  (a refinement: a model ORT cannot probe is still compressed)
                done.warnings.append(f"layer sensitivity not measured ({model_io.first_line(exc)}): "
                                     "layers' errors are weighed alike")
        else:  # probing copies every layer's weight into a second model: too much memory and time here
            done.warnings.append(f"layer sensitivity not measured (the model is over {SENSITIVITY_MAX_BYTES >> 20} MB): "
                                 "layers' errors are weighed alike")
    return done


def few_rows_warning(layers: list[Layer], grams: Grams, adapted: bool = False) -> str | None:
    """One line when some layers' Grams saw fewer input rows than FEW_ROWS times their width, naming
    the worst (fewest rows per input); None when the samples determine every layer's statistics."""
    few = [layer for layer in layers
           if layer.name in grams.rows and grams.rows[layer.name] < FEW_ROWS * layer.in_features]
    if not few:
        return None
    worst = min(few, key=lambda layer: grams.rows[layer.name] / layer.in_features)
    count = f"{len(few)} layer{'s' if len(few) > 1 else ''} saw"
    return (f"{count} fewer input rows than {FEW_ROWS}x their width (worst: {worst.name}, "
            f"{grams.rows[worst.name]} rows for {worst.in_features} inputs): the whitening is fit to these samples"
            f"{' (damped towards plain SVD)' if adapted else ''}; give more --calib samples")


def _cached_analysis(key: str | None, layers: list, damping: float, objective: Objective | None) -> tuple[dict, dict | None]:
    """From an earlier run on the same model, samples and damping: (layer, form) -> error-by-rank curve,
    and the layers' sensitivities (None if not measured)."""
    hit = ArrayCache("spectra").get(_spectra_key(key, damping, objective)) if key is not None else None
    if hit is None or hit.get("layers") is None or hit["layers"].tolist() != [layer.name for layer in layers]:
        return {}, None
    spectra = {(layers[int(i)].name, form): curve for name, curve in hit.items() if name[0].isdigit()
               for i, form in [name.split("_", 1)]}
    sensitivity = hit.get("sensitivity")
    if sensitivity is not None:
        sensitivity = {layer.name: float(v) for layer, v in zip(layers, sensitivity) if np.isfinite(v)}
    return spectra, sensitivity


def _spectra_key(key: str, damping: float, objective: Objective | None) -> str:
    # sensitivities probed otherwise, or measured by other output groups, are not reused
    return f"{key}-damping{damping:g}-probe{PROBE_SAMPLES}-objective{objective.key if objective else ''}"


def _pack_analysis(spectra: dict, sensitivity: dict | None, layers: list) -> dict:
    index = {layer.name: i for i, layer in enumerate(layers)}
    arrays = {"layers": np.array(list(index))} | {f"{index[name]}_{form}": c for (name, form), c in spectra.items()}
    if sensitivity is not None:
        arrays["sensitivity"] = np.array([sensitivity.get(layer.name, np.nan) for layer in layers])
    return arrays

