"""Quantization-aware training: the student learns weights whose activations survive static INT8.

The input of every Conv and Linear is rounded to QUANT_LEVELS steps over the min..max it has reached so
far in training (as ONNX Runtime's MinMax calibration sets its uint8 range), with straight-through
gradients. The range is a buffer of the layer, so a checkpoint keeps it. In a distributed run the
range is the min..max over every process's slice (`reduce_max`), as one process sees the whole batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from edgelr.errors import EdgelrError
from edgelr.train.convert import onnx_info

try:
    import torch
    from torch import nn
except ImportError:  # torch is only needed for training
    torch = None  # type: ignore[assignment]

QUANT_LEVELS = 256  # uint8 activations, as edgelr.passes.quantize's static INT8


def fake_quantize_inputs(module, reduce_max: Callable | None = None) -> list:
    """Round each Conv/Linear input of MODULE to QUANT_LEVELS steps over its running min..max,
    straight-through in the backward pass. REDUCE_MAX(tensor) takes the elementwise max over the
    processes of a distributed run, in place. Returns the hooks, to remove."""
    hooks = []
    hook = round_input if reduce_max is None else functools.partial(round_input, reduce_max=reduce_max)
    for sub in module.modules():
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            sub.register_buffer("edgelr_input_range", torch.tensor([0.0, 0.0], device=next(sub.parameters()).device))
            hooks.append(sub.register_forward_pre_hook(hook))
    if not hooks:
        try:
            where = onnx_info(module).path
        except EdgelrError:  # a module of the user's own
            where = type(module).__name__
        raise EdgelrError(f"{where}: quantization_aware needs a Conv or Gemm layer to round the "
                          "inputs of, and the student has none; train without it")
    return hooks


def round_input(sub, args, reduce_max: Callable | None = None):
    """A forward pre-hook: widen SUB's input range by this input, then round the input in it."""
    x, *rest = args
    seen = sub.edgelr_input_range
    with torch.no_grad():  # the range includes 0, as ORT's does (zero must be exact)
        if reduce_max is None:
            seen[0] = torch.minimum(seen[0], x.min().float())
            seen[1] = torch.maximum(seen[1], x.max().float())
        else:
            bounds = torch.stack([-x.min().float(), x.max().float()])
            reduce_max(bounds)
            seen[0] = torch.minimum(seen[0], -bounds[0])
            seen[1] = torch.maximum(seen[1], bounds[1])
    low, step = seen[0], (seen[1] - seen[0]).clamp_min(1e-8) / (QUANT_LEVELS - 1)
    zero = torch.round(-low / step)
    rounded = (torch.clamp(torch.round(x.float() / step) + zero, 0, QUANT_LEVELS - 1) - zero) * step
    return (x + (rounded.to(x.dtype) - x).detach(), *rest)
