"""The PyTorch side of low-rank factorization: the same forms, factors and rank allocation as the ONNX pass.

    report = factorize_module(model, params=0.5, samples=images)   # model is changed in place
    export_onnx(model, "small.onnx", (images[:1],))                 # checked in ONNX Runtime

Everything numerical is the ONNX pass's own code: each nn.Linear / nn.Conv2d is described to it as an
edgelr.layers.Layer (a thin adapter: its weight as a constant ONNX value, its calls as Uses with the conv
geometry and input shape), its input Gram is edgelr.calibration.grams's (rows for a Linear, im2col patches for a
Conv2d), and the whitening, spectra, choices, budget and factor layouts are edgelr.passes.factorize's and
edgelr.core.allocate's. So a torch model and its ONNX export get the same ranks and the same factor weights.

Forms (those the ONNX pass emits):
    Linear in -> out         svd:     Linear(in -> r, no bias), then Linear(r -> out, bias)
    Conv2d kh x kw, C -> N   channel: Conv2d(kh x kw, C -> r, stride/padding/dilation), then Conv2d(1 x 1, r -> N, bias)
                             spatial: Conv2d(kh x 1, C -> r, the height part), then Conv2d(1 x kw, r -> N, the width
                                      part, bias); only when kh > 1 and kw > 1
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from threadpoolctl import threadpool_limits
from torch import nn
from torch.nn import functional as F

from edgelr.calibration.grams import input_gram
from edgelr.calibration.spectra import whitening
from edgelr.core import lowrank
from edgelr.errors import EdgelrError
from edgelr.graph.layers import ConvGeometry, Layer, Use
from edgelr.graph.lowrank_pair import factor_weights
from edgelr.io.progress import progress_bar
from edgelr.passes.factorize import (
    FactorizeConfig,
    LayerResult,
    budget_split,
    choose_ranks,
    cost_function,
    layer_options,
    measured_error,
    pays,
)

DEFAULT_DAMPING = 0.1  # FactorizeConfig's default: the ONNX pass and the torch side whiten alike
CONV_FORMS = ("channel", "spatial")


# --- modules ------------------------------------------------------------------------------------
class _LowRankPair(nn.Module):
    """down, then up (which carries the bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias


class LowRankLinear(_LowRankPair):
    """Linear(in -> rank, no bias) then Linear(rank -> out, bias): the ONNX pass's 'svd' form."""

    form = "svd"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not 0 < rank:
            raise EdgelrError(f"rank {rank}: must be a positive number")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def dense(self) -> torch.Tensor:
        """The equivalent (out x in) dense weight."""
        return self.up.weight @ self.down.weight

    @classmethod
    def from_dense(cls, module: nn.Linear, rank: int, form: str = "svd", gram: np.ndarray | torch.Tensor | None = None,
                   damping: float = DEFAULT_DAMPING) -> LowRankLinear:
        """The best rank-`rank` factorization of a Linear, whitened by its input Gram (sum of x x^T over the
        input rows, in x in) when given, plain SVD otherwise."""
        if not isinstance(module, nn.Linear):
            raise EdgelrError(f"LowRankLinear.from_dense needs an nn.Linear, got {type(module).__name__}")
        if form != "svd":
            raise EdgelrError(f"form '{form}': a Linear layer has one low-rank form, 'svd'")
        layer = _layer(module, "linear")
        factors = _factors(layer, form, rank, gram, damping)
        return _linear_from(module, layer, factors)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankConv2d(_LowRankPair):
    """A Conv2d as two thinner convs, in one of the ONNX pass's forms:

    channel: Conv2d(kh x kw, C -> rank, the layer's stride/padding/dilation, no bias), Conv2d(1 x 1, rank -> N, bias)
    spatial: Conv2d(kh x 1, C -> rank, (sh, 1), (ph, 0), (dh, 1), no bias), Conv2d(1 x kw, rank -> N, (1, sw),
             (0, pw), (1, dw), bias)
    padding_mode (reflect, replicate, circular) splits the same way: padding is separable per axis.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, form: str = "channel",
                 stride=1, padding=0, dilation=1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None):
        super().__init__()
        kh, kw = _pair(kernel_size)
        if form not in CONV_FORMS:
            raise EdgelrError(f"conv form '{form}' is not one of {', '.join(CONV_FORMS)}")
        if form == "spatial" and min(kh, kw) < 2:
            raise EdgelrError(f"the spatial form splits a kh x kw kernel with kh, kw > 1; this one is {kh}x{kw}")
        if not 0 < rank:
            raise EdgelrError(f"rank {rank}: must be a positive number")
        self.in_channels, self.out_channels, self.rank, self.form = in_channels, out_channels, rank, form
        self.kernel_size = (kh, kw)
        (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
        self.stride, self.dilation, self.padding, self.padding_mode = (sh, sw), (dh, dw), padding, padding_mode
        kw_args = {"device": device, "dtype": dtype, "padding_mode": padding_mode}
        if form == "channel":
            self.down = nn.Conv2d(in_channels, rank, (kh, kw), (sh, sw), padding, (dh, dw), bias=False, **kw_args)
            self.up = nn.Conv2d(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)
            return
        if isinstance(padding, str):  # 'same' (stride 1) and 'valid' split exactly per axis
            first_pad = second_pad = padding
        else:
            ph, pw = _pair(padding)
            first_pad, second_pad = (ph, 0), (0, pw)
        self.down = nn.Conv2d(in_channels, rank, (kh, 1), (sh, 1), first_pad, (dh, 1), bias=False, **kw_args)
        self.up = nn.Conv2d(rank, out_channels, (1, kw), (1, sw), second_pad, (1, dw), bias=bias, **kw_args)

    def dense(self) -> torch.Tensor:
        """The equivalent dense weight (N, C, kh, kw)."""
        n, c, r, (kh, kw) = self.out_channels, self.in_channels, self.rank, self.kernel_size
        if self.form == "channel":
            return (self.up.weight.reshape(n, r) @ self.down.weight.reshape(r, -1)).reshape(n, c, kh, kw)
        return torch.einsum("nrj,rci->ncij", self.up.weight.reshape(n, r, kw), self.down.weight.reshape(r, c, kh))

    @classmethod
    def from_dense(cls, module: nn.Conv2d, rank: int, form: str = "channel",
                   gram: np.ndarray | torch.Tensor | None = None, damping: float = DEFAULT_DAMPING) -> LowRankConv2d:
        """The best rank-`rank` factorization of a Conv2d (groups 1) in a form, whitened by the Gram of its
        im2col input patches (C*kh*kw square, columns ordered (c, i, j), as edgelr.calibration.grams builds it) when
        given, plain SVD otherwise. The spatial form whitens with lowrank.spatial_gram of that Gram."""
        if not isinstance(module, nn.Conv2d):
            raise EdgelrError(f"LowRankConv2d.from_dense needs an nn.Conv2d, got {type(module).__name__}")
        if module.groups != 1:
            raise EdgelrError(f"a grouped or depthwise Conv2d (groups={module.groups}) has no low-rank form here")
        if form not in CONV_FORMS:
            raise EdgelrError(f"conv form '{form}' is not one of {', '.join(CONV_FORMS)}")
        layer = _layer(module, "conv")
        if form not in layer.forms():
            raise EdgelrError(f"the spatial form splits a kh x kw kernel with kh, kw > 1; this one is "
                              f"{'x'.join(map(str, layer.kernel))}")
        factors = _factors(layer, form, rank, gram, damping)
        return _conv_from(module, layer, form, factors)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"form={self.form}")


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


# --- the adapter to the ONNX pass's Layer -------------------------------------------------------
def _layer(module: nn.Module, name: str, input_shapes: Sequence[tuple[int, ...]] = ()) -> Layer:
    """The module as the ONNX pass sees a layer: its weight as a constant value in (out x in) layout (a
    Gemm with transB=1 for a Linear, a Conv's OIHW for a Conv2d), one Use per call with its input shape
    (batch 1) and conv geometry, so Layer's matrices, forms, params and FLOPs apply unchanged."""
    w = module.weight.detach().cpu()
    array = w.numpy() if w.dtype != torch.bfloat16 else w.float().numpy()
    value = ir.Value(name=f"{name}.weight", shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array))
    if isinstance(module, nn.Linear):
        layer = Layer(name, "Gemm", value, out_features=module.out_features, in_features=module.in_features,
                      transposed_weight=False)
        geometry = None
    else:
        kernel = tuple(module.kernel_size)
        layer = Layer(name, "Conv", value, out_features=module.out_channels,
                      in_features=module.in_channels * math.prod(kernel), kernel=kernel)
        geometry = _geometry(module)
    for shape in input_shapes or [None]:
        layer.uses.append(Use(node=None, input=None, geometry=geometry, input_shape=shape))
    return layer


def _geometry(module: nn.Conv2d, padded: bool = False) -> ConvGeometry:
    """The ONNX Conv attributes of a Conv2d; `padded`: of its input once padding_mode has padded it."""
    kernel = tuple(module.kernel_size)
    if padded:
        pads, auto_pad = (0, 0, 0, 0), "NOTSET"
    elif isinstance(module.padding, str):  # torch 'same' puts the odd pixel at the end: SAME_UPPER (stride 1)
        pads, auto_pad = (0, 0, 0, 0), "SAME_UPPER" if module.padding == "same" else "VALID"
    else:
        ph, pw = module.padding
        pads, auto_pad = (ph, pw, ph, pw), "NOTSET"
    return ConvGeometry(kernel=kernel, strides=tuple(module.stride), dilations=tuple(module.dilation),
                        pads=pads, auto_pad=auto_pad)


def _factors(layer: Layer, form: str, rank: int, gram, damping: float) -> lowrank.Factors:
    top = layer.max_rank(form)
    if not isinstance(rank, (int, np.integer)) or not 0 < rank <= top:
        raise EdgelrError(f"rank {rank} for a {layer.out_features}x{layer.in_features} layer in form '{form}': "
                          f"must be in 1..{top}")
    if damping < 0:
        raise EdgelrError(f"damping {damping}: must be >= 0")
    gram = _gram_array(gram, layer.in_features)
    with threadpool_limits(limits=1, user_api="blas"):
        w, chol = whitening(layer, form, gram, damping)
        return lowrank.decompose(w, chol, keep=int(rank))[1]


def _gram_array(gram, size: int) -> np.ndarray | None:
    if gram is None:
        return None
    if isinstance(gram, torch.Tensor):
        gram = gram.detach().cpu().double().numpy()
    gram = np.asarray(gram)
    if gram.shape != (size, size):
        raise EdgelrError(f"the Gram matrix is {gram.shape}, the layer's input needs ({size}, {size})")
    return gram


def _linear_from(module: nn.Linear, layer: Layer, factors: lowrank.Factors) -> LowRankLinear:
    w = module.weight
    new = LowRankLinear(module.in_features, module.out_features, factors.rank, module.bias is not None,
                        device=w.device, dtype=w.dtype)
    first, second = factor_weights(layer, "svd", factors)  # (in x rank), (rank x out): ONNX layout
    _load(new, first.T, second.T, module.bias)
    return new


def _conv_from(module: nn.Conv2d, layer: Layer, form: str, factors: lowrank.Factors) -> LowRankConv2d:
    w = module.weight
    new = LowRankConv2d(module.in_channels, module.out_channels, module.kernel_size, factors.rank, form,
                        module.stride, module.padding, module.dilation, module.bias is not None,
                        module.padding_mode, device=w.device, dtype=w.dtype)
    first, second = factor_weights(layer, form, factors)  # the ONNX pass's conv weights, OIHW
    _load(new, first, second, module.bias)
    return new


def _load(new: nn.Module, first: np.ndarray, second: np.ndarray, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        for target, array in ((new.down.weight, first), (new.up.weight, second)):
            target.copy_(torch.from_numpy(np.ascontiguousarray(array)).to(target.dtype))
        if bias is not None:
            new.up.bias.copy_(bias.detach())
    new.train(False)


# --- factorizing a whole module -----------------------------------------------------------------
def factorize_module(
    module: nn.Module,
    *,
    params: float | None = None,
    flops: float | None = None,
    samples: torch.Tensor | tuple | list | Mapping | None = None,
    damping: float = DEFAULT_DAMPING,
    progress: bool = True,
    max_error: float | None = None,
    ranks: Mapping[str, int] | None = None,
    conv_form: str = "auto",
    batch_size: int = 16,
) -> dict:
    """Replace, in place, the nn.Linear and nn.Conv2d (groups 1) submodules of `module` that pay off by
    their low-rank modules, keeping `params` (or `flops`) of those layers' total, with the ONNX pass's
    allocation. `samples`: model inputs, samples on axis 0 (a tensor, a tuple of positional inputs or a
    dict of keyword inputs), run through in batches of `batch_size` to collect each layer's input Gram
    (whitened SVD); without them the SVD is plain. `max_error`, `ranks` (by module name) and `conv_form`
    mean what FactorizeConfig's do. Returns a report: per layer, form, rank, params and FLOPs before and
    after, and the relative output error on the Grams."""
    for flag, value in (("params", params), ("flops", flops)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise EdgelrError(f"{flag}={value!r}: the fraction to keep must be in (0, 1]")
    if params is not None and flops is not None:
        raise EdgelrError("give one budget: params=F or flops=F, not both")
    if params is None and flops is None and max_error is None and not ranks:
        raise EdgelrError("say how far to compress: params=F, flops=F, max_error=E or ranks={name: rank}")
    if not isinstance(module, nn.Module):
        raise EdgelrError(f"factorize_module needs a torch.nn.Module, got {type(module).__name__}")
    if flops is not None and samples is None:
        raise EdgelrError("flops=F needs each layer's input size: pass samples")
    config = FactorizeConfig(params=params, flops=flops, max_error=max_error, ranks=ranks, conv_form=conv_form,
                                damping=damping, sensitivity=False)

    candidates, skipped = _candidates(module)
    if not candidates:
        why = f" ({'; '.join(f'{n}: {r}' for n, r in skipped[:3])})" if skipped else ""
        raise EdgelrError(f"{type(module).__name__} has no factorizable nn.Linear or nn.Conv2d (groups 1){why}")
    grams, shapes = _collect(module, candidates, samples, batch_size, progress) if samples is not None else ({}, {})
    if samples is not None:
        for name in [n for n in candidates if n not in grams]:
            skipped.append((name, "not called on the samples"))
            del candidates[name]
        if not candidates:
            raise EdgelrError("none of the nn.Linear / nn.Conv2d layers ran on the samples: nothing to factorize")
    layers = [_layer(m, name, shapes.get(name, ())) for name, m in candidates.items()]
    if ranks:
        unknown = sorted(set(ranks) - set(candidates))
        if unknown:
            raise EdgelrError(f"ranks given for unknown layers {unknown}; factorizable: {sorted(candidates)}")

    cost = cost_function(config, None)
    with threadpool_limits(limits=1, user_api="blas"):
        spectra: dict = {}
        bar = progress_bar(layers, desc="analysing", unit="layer", show=progress)
        options = [layer_options(layer, config, grams.get(layer.name), cost, spectra) for layer in bar]
        allocation = choose_ranks(layers, options, config, cost, None)
        rows = [_replace(module, candidates[layer.name], layer, choice, opts, config, cost, grams.get(layer.name))
                for layer, choice, opts in zip(layers, allocation.choices, options)]
    warnings_ = []
    if not allocation.reached:
        fixed, total = budget_split(layers, config, cost)
        kept = (allocation.cost - fixed) / max(total, 1e-12)
        why = "the max_error gate" if max_error is not None else "break-even"
        warnings_.append(f"budget not reached: {why} keeps {kept:.2f} of the {config.metric}, not {config.fraction}")

    def total(key):
        values = [r[key] for r in rows]
        return None if any(v is None for v in values) else sum(values)

    return {
        "layers": rows,
        "skipped": [{"name": n, "reason": r} for n, r in skipped],
        "metric": config.metric,
        "fraction": config.fraction,
        "budget_reached": allocation.reached,
        "data_aware": bool(grams),
        "params_before": total("params_before"),
        "params_after": total("params_after"),
        "flops_before": total("flops_before"),
        "flops_after": total("flops_after"),
        "warnings": warnings_,
    }


def _candidates(module: nn.Module) -> tuple[dict[str, nn.Module], list[tuple[str, str]]]:
    """Module name -> each nn.Linear / nn.Conv2d the pass can rewrite, and (name, reason) for those it cannot."""
    found, skipped = {}, []
    owners: dict[int, list[str]] = {}
    attention: list[str] = []  # nn.MultiheadAttention reads its projections' weights directly
    for name, m in module.named_modules():
        if any(name.startswith(a + ".") or not a for a in attention):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                skipped.append((name, "inside nn.MultiheadAttention, which reads its weight directly"))
            continue
        if isinstance(m, nn.MultiheadAttention):
            attention.append(name)
            continue
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            skipped.append((name, f"grouped or depthwise conv (groups={m.groups})"))
            continue
        if not m.weight.is_floating_point():
            skipped.append((name, f"weight is {m.weight.dtype}, not floating point"))
            continue
        owners.setdefault(id(m.weight), []).append(name)
        found[name] = m
    for names in owners.values():
        if len(names) > 1:  # a tied weight must stay for its other user: factorizing saves nothing
            for name in names:
                skipped.append((name, f"weight shared with {', '.join(n for n in names if n != name)}"))
                del found[name]
    if "" in found:  # the module itself is a bare Linear / Conv2d: nothing to replace it in
        why = "the module itself is the layer: factorize a model that contains it, or use from_dense"
        skipped.append(("", why))
        del found[""]
    return found, skipped


def _batches(samples, batch_size: int):
    """(args, kwargs) per batch of samples on axis 0."""
    if isinstance(samples, torch.Tensor):
        args, kwargs = (samples,), {}
    elif isinstance(samples, Mapping):
        args, kwargs = (), dict(samples)
    elif isinstance(samples, (tuple, list)) and samples:
        args, kwargs = tuple(samples), {}
    else:
        raise EdgelrError("samples: give a tensor, a tuple of positional input tensors or a dict of keyword inputs, "
                          "samples on axis 0")
    tensors = [*args, *kwargs.values()]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise EdgelrError("samples: every input must be a torch.Tensor with the samples on axis 0")
    counts = {len(t) if t.dim() else 0 for t in tensors}
    if len(counts) != 1 or 0 in counts:
        raise EdgelrError(f"samples: every input must hold the same number (>0) of samples on axis 0, got {sorted(counts)}")
    count = counts.pop()
    for start in range(0, count, max(1, batch_size)):
        part = slice(start, start + max(1, batch_size))
        yield tuple(a[part] for a in args), {k: v[part] for k, v in kwargs.items()}


def _collect(module: nn.Module, candidates: dict[str, nn.Module], samples, batch_size: int, progress: bool):
    """Layer name -> input Gram (float32, edgelr.calibration.grams's: rows of a Linear's input, im2col patches of a
    Conv2d's), and layer name -> per-call input shapes (batch 1) from the first batch."""
    grams: dict[str, np.ndarray] = {}
    shapes: dict[str, list[tuple[int, ...]]] = {}
    first = [True]

    def hook(name: str, m: nn.Module):
        plain = Use(node=None, input=None)

        def fn(_mod, inputs, _output):
            x = inputs[0].detach()
            if isinstance(m, nn.Conv2d):
                if x.dim() == 3:  # unbatched (C, H, W)
                    x = x.unsqueeze(0)
                if m.padding_mode != "zeros":
                    x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
                use = Use(node=None, input=None, geometry=_geometry(m, padded=m.padding_mode != "zeros"))
            else:
                use = plain
            array = x.to(torch.float32).cpu().numpy()
            gram = input_gram(array, use)
            grams[name] = grams[name] + gram if name in grams else gram
            if first[0]:
                shapes.setdefault(name, []).append((1, *inputs[0].shape[1:]))
        return fn

    handles = [m.register_forward_hook(hook(name, m)) for name, m in candidates.items()]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), threadpool_limits(limits=1, user_api="blas"):
            batches = list(_batches(samples, batch_size))
            for i, (args, kwargs) in enumerate(progress_bar(batches, desc="calibrating", unit="batch", show=progress)):
                try:
                    module(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001  (the user's model rejects the samples)
                    raise EdgelrError(f"samples batch {i} does not run through the module: {_first_line(exc)}") from None
                first[0] = False
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return grams, shapes


def _replace(root: nn.Module, module: nn.Module, layer: Layer, choice, opts, config, cost, gram) -> dict:
    row = LayerResult(
        name=layer.name, op=type(module).__name__, weight_shape=tuple(module.weight.shape), form="dense", rank=0,
        params_before=layer.dense_params(), params_after=layer.dense_params(), flops_before=layer.dense_flops(),
        flops_after=layer.dense_flops(), predicted_error=0.0, error=0.0,
    )
    if choice.form is None:
        if len(opts) == 1 and not config.ranks:
            row.note = "over the error gate" if pays(layer, config, cost) else "below break-even"
        return asdict(row)
    w, chol = whitening(layer, choice.form, gram, config.damping)
    factors = lowrank.decompose(w, chol, keep=choice.rank)[1]
    row.predicted_error = math.sqrt(choice.error2)
    row.error = measured_error(layer, choice.form, factors, gram)
    if config.max_error is not None and row.error > config.max_error and not config.ranks:
        row.note = f"error {row.error:.3f} over the gate"
        return asdict(row)
    new = (_linear_from(module, layer, factors) if choice.form == "svd"
           else _conv_from(module, layer, choice.form, factors))
    new.train(module.training)
    parent_name, _, child = layer.name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, new)
    row.form, row.rank = choice.form, choice.rank
    row.params_after = layer.params(choice.form, choice.rank)
    row.flops_after = layer.flops(choice.form, choice.rank)
    return asdict(row)


# --- export -------------------------------------------------------------------------------------
def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | tuple,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    tolerance: float = 1e-4,
    opset: int = 17,
) -> dict:
    """Export with torch's TorchScript exporter (dynamo=False), run the file in ONNX Runtime on
    `example_inputs` (positional) and compare with torch: the largest absolute difference over the largest
    absolute torch output, per output, must be <= tolerance, else EdgelrError and no file is left.
    Returns {"path", "parity"}."""
    import onnxruntime as ort

    path = Path(path)
    if not path.parent.is_dir():
        raise EdgelrError(f"{path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise EdgelrError(f"{path}: is a folder; give a file name such as model.onnx")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise EdgelrError("example_inputs: give a tensor or a tuple of tensors (positional inputs)")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            expected = _flatten(module(*args))
        in_names = list(input_names) if input_names else (["input"] if len(args) == 1 else
                                                         [f"input_{i}" for i in range(len(args))])
        out_names = list(output_names) if output_names else (["output"] if len(expected) == 1 else
                                                            [f"output_{i}" for i in range(len(expected))])
        if len(in_names) != len(args) or len(out_names) != len(expected):
            raise EdgelrError(f"{len(in_names)} input names for {len(args)} inputs, {len(out_names)} output names "
                              f"for {len(expected)} outputs: give one name each")
        axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.onnx", dir=path.parent)
        os.close(fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
                try:
                    torch.onnx.export(module, args, tmp, dynamo=False, opset_version=opset, input_names=in_names,
                                      output_names=out_names, dynamic_axes=axes, do_constant_folding=True)
                except EdgelrError:
                    raise
                except Exception as exc:  # noqa: BLE001  (torch's exporter: unsupported op, bad input...)
                    raise EdgelrError(f"torch.onnx.export failed: {_first_line(exc)}") from None
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
            feed = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
            got = session.run(None, feed)
            parity = 0.0
            for name, want, have in zip(out_names, expected, got):
                want = want.detach().cpu().to(torch.float64).numpy()
                have = np.asarray(have, dtype=np.float64)
                if want.shape != have.shape:
                    raise EdgelrError(f"{path}: output '{name}' has shape {have.shape} in ONNX Runtime, "
                                      f"{want.shape} in torch")
                scale = float(np.max(np.abs(want))) if want.size else 0.0
                diff = float(np.max(np.abs(want - have))) if want.size else 0.0
                parity = max(parity, diff / scale if scale > 0 else diff)
            if not parity <= tolerance:
                raise EdgelrError(f"{path}: ONNX Runtime's outputs differ from torch's by {parity:.3g} (relative), "
                                  f"over the tolerance {tolerance:g}; nothing written")
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    finally:
        module.train(was_training)
    return {"path": str(path), "parity": parity}


def _flatten(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _flatten(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _flatten(v)]
    raise EdgelrError(f"the module returns a {type(output).__name__}; export needs tensors (in tuples, lists, dicts)")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
