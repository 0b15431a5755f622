"""2:4 structured sparsity: in every four consecutive weights along a layer's input dimension, the two
smallest in magnitude are zeroed (the pattern NVIDIA's sparse tensor cores skip). No fine-tuning: the
error it costs is measured and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from edgelr.errors import EdgelrError
from edgelr.graph.layers import find_layers
from edgelr.passes.base import EdgelrPass, PassConfig, PassDetails, register_pass


@dataclass(frozen=True)
class SparsityConfig(PassConfig):
    """pattern: "2:4", the only one (TensorRT's)."""

    kind: ClassVar[str] = "sparsity"
    pattern: str = "2:4"

    def __post_init__(self):
        if self.pattern != "2:4":
            raise EdgelrError(f"pattern {self.pattern!r}: the sparsity pattern is 2:4 (TensorRT's sparse tensor cores)")


@register_pass(SparsityConfig)
class SparsityPass(EdgelrPass):
    def call(self, model: ir.Model) -> PassDetails:
        done = sparsify_2_4(model, self.context.source)
        return PassDetails(model, done["layers"] > 0, done)


def sparsify_2_4(model: ir.Model, where: object = "the model") -> dict:
    """Zero, in place, the two smallest-magnitude weights of every four along the input dimension of each
    Conv, MatMul and Gemm whose input dimension is a multiple of 4 (TensorRT's 2:4 pattern).
    Returns {"pattern", "layers", "skipped"}; `where` names the model in errors."""
    layers, _ = find_layers(model)
    pruned, skipped = 0, 0
    for layer in layers:
        w = layer.weight_array()
        if layer.is_conv:  # (N, C/groups, *kernel): groups of four input channels at each kernel tap
            rows = np.moveaxis(w, 1, -1)
        else:  # MatMul and Gemm(transB=0) store (in x out), Gemm(transB=1) (out x in)
            rows = w.T if layer.transposed_weight else w
        if rows.shape[-1] % 4 or w.dtype.kind != "f":
            skipped += 1
            continue
        groups = rows.reshape(*rows.shape[:-1], -1, 4)
        smallest = np.argsort(np.abs(groups), axis=-1)[..., :2]
        groups = groups.copy()
        np.put_along_axis(groups, smallest, 0, axis=-1)
        rows = groups.reshape(rows.shape)
        sparse = np.moveaxis(rows, -1, 1) if layer.is_conv else (rows.T if layer.transposed_weight else rows)
        tensor = ir.tensor(np.ascontiguousarray(sparse), name=layer.weight.name)
        if layer.weight.const_value is not None:
            layer.weight.const_value = tensor
        else:  # a Constant node's output
            layer.weight.producer().attributes["value"] = ir.AttrTensor("value", tensor)
        pruned += 1
    if not pruned:
        raise EdgelrError(f"{where}: no Conv, MatMul or Gemm weight has an input dimension divisible by 4; "
                          "2:4 sparsity does not apply to this model")
    return {"pattern": "2:4", "layers": pruned, "skipped": skipped}
