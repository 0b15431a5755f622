"""SS2D (edgelr.train.ss2d): the exportable scan against the sequential reference, at small and large delta, in
torch and in ONNX Runtime; the block's export stays small."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import pytest
import torch

from edgelr.io.model import ort_session
from edgelr.train.lowrank import export_onnx
from edgelr.train.ss2d import (
    SS2D,
    chunk_length,
    chunked_scan,
    cross_merge,
    cross_scan,
    keep_channels,
    keep_states,
    sequential_scan,
    slice_states,
    state_energy,
)


def _scan_args(tokens: int, delta_scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, k, d, n = 2, 4, 6, 5
    A = -torch.exp(torch.randn(k, d, n, generator=g))  # |A| from ~0.1 to ~10
    return (torch.randn(b, k, d, tokens, generator=g), torch.rand(b, k, d, tokens, generator=g) * delta_scale, A,
            torch.randn(b, k, n, tokens, generator=g), torch.randn(b, k, n, tokens, generator=g), torch.randn(k, d, generator=g))


@pytest.mark.parametrize("delta_scale", [1e-3, 0.1, 1.0, 10.0, 1000.0])
@pytest.mark.parametrize("tokens", [1, 7, 36, 60])
def test_chunked_scan_is_the_sequential_scan_for_any_delta(tokens, delta_scale):
    """Chunks of any length agree with the one-token-at-a-time loop (in float64), and nothing overflows: at
    delta 10 a chunk's sum of |delta * A| is in the thousands, where e^-S would be inf."""
    args = _scan_args(tokens, delta_scale)
    reference = sequential_scan(*(a.double() for a in args))
    for chunk in {chunk_length(tokens), 1, tokens}:
        got = chunked_scan(*args, chunk=chunk)
        assert torch.isfinite(got).all()
        assert (got.double() - reference).abs().max() <= 1e-5 * reference.abs().max(), chunk


def test_chunk_length_splits_the_tokens_evenly():
    assert chunk_length(1600) == 40 and chunk_length(36) == 6 and chunk_length(7) in (1, 7)
    for tokens in (1, 2, 12, 97, 400, 1024):
        assert tokens % chunk_length(tokens) == 0
    with pytest.raises(ValueError, match="do not split"):
        chunked_scan(*_scan_args(10, 1.0), chunk=3)


def test_cross_merge_undoes_cross_scan():
    """Each direction, read back in row order, is the input: merging four copies gives 4x."""
    x = torch.randn(2, 3, 5, 4)
    assert torch.allclose(cross_merge(cross_scan(x), 5, 4), 4 * x.flatten(2))


def _large_delta_block(delta: float) -> SS2D:
    torch.manual_seed(0)
    block = SS2D(16, d_state=4).eval()
    with torch.no_grad():  # softplus(bias) = delta: every token's step is about `delta`
        block.dt_projs_bias.fill_(delta + math.log(-math.expm1(-delta)))
        block.dt_projs_weight.mul_(1e-3)
    return block


@pytest.mark.parametrize("delta", [0.01, 1.0, 10.0])
def test_exported_block_matches_the_sequential_reference(tmp_path, delta):
    """The block exported with its chunked scan, run in ONNX Runtime, against the torch block with the sequential
    scan: <= 1e-4 relative, finite, for delta up to 10."""
    block = _large_delta_block(delta)
    x = torch.randn(2, 6, 10, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes read as numbers: the export is fixed-size
        export_onnx(block, tmp_path / "b.onnx", (x,), dynamic_batch=False)
    with ort_session(tmp_path / "b.onnx") as ort:
        got = ort.run(None, {"input": x.numpy()})[0]
    block.scan = "sequential"
    with torch.no_grad():
        reference = block.double()(x.double()).numpy()
    assert np.isfinite(got).all()
    assert np.abs(got - reference).max() <= 1e-4 * np.abs(reference).max()


def test_block_at_40x40_exports_to_under_2000_nodes(tmp_path):
    block = SS2D(96, d_state=16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(block, tmp_path / "b.onnx", (torch.randn(1, 40, 40, 96),), dynamic_batch=False)
    nodes = onnx.load(tmp_path / "b.onnx").graph.node
    assert len(nodes) < 2000 and not {"Loop", "Scan"} & {n.op_type for n in nodes}  # unrolled, and small


def test_per_state_parts_sum_to_the_scan():
    args = _scan_args(12, 1.0)
    parts = chunked_scan(*args, per_state=True)
    x, D = args[0], args[5]
    assert parts.shape == (2, 4, 6, 5, 12)
    assert torch.allclose(parts.sum(3) + D.unsqueeze(-1) * x, chunked_scan(*args), atol=1e-5)


def _block_and_samples(seed=0):
    torch.manual_seed(seed)
    block = SS2D(16, d_state=8).eval()
    with torch.no_grad():  # delta 0.05..1: states that carry the output unevenly
        block.dt_projs_bias.copy_(torch.linspace(-3, 0.5, block.dt_projs_bias.numel()).reshape(block.dt_projs_bias.shape))
    return block, torch.randn(6, 6, 5, 16)


def test_keeping_every_state_or_channel_changes_nothing():
    block, x = _block_and_samples()
    with torch.no_grad():
        before = block(x)
        keep_states(block, 8, x)
        keep_channels(block, block.d_inner, x)
        assert torch.allclose(block(x), before, atol=1e-6)


def test_states_are_dropped_by_what_they_carry():
    """keep_states keeps each direction's strongest states; dropping those instead moves the output more."""
    block, x = _block_and_samples()
    order = state_energy(block, x).argsort(dim=1)
    with torch.no_grad():
        before = block(x)
    errors = {}
    for name, kept in (("weakest dropped", None), ("strongest dropped", order[:, :4].sort(dim=1).values)):
        reduced, _ = _block_and_samples()
        if kept is None:
            assert torch.equal(keep_states(reduced, 4, x), order[:, 4:].sort(dim=1).values)
        else:
            slice_states(reduced, kept)
        with torch.no_grad():
            errors[name] = ((reduced(x) - before).norm() / before.norm()).item()
    assert errors["weakest dropped"] < errors["strongest dropped"]


def test_reduced_block_exports_and_is_smaller(tmp_path):
    block, x = _block_and_samples()
    before = sum(p.numel() for p in block.parameters())
    keep_states(block, 4, x)
    keep_channels(block, 20, x)
    assert (block.d_state, block.d_inner) == (4, 20) and sum(p.numel() for p in block.parameters()) < 0.7 * before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(block, tmp_path / "r.onnx", (x[:1],), dynamic_batch=False)
    with pytest.raises(ValueError, match="keep 0 states"):
        keep_states(block, 0, x)
