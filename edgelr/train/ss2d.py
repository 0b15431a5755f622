"""VMamba's SS2D block in plain torch, with a selective scan that exports to a small ONNX graph and cannot overflow.

    block = SS2D(d_model=96, d_state=16)            # VMamba's semantics, no CUDA extension
    y = block(x)                                    # x: (batch, height, width, d_model), channels last
    export_onnx(block, "ss2d.onnx", (x,))           # edgelr.train.lowrank.export_onnx: checked in ONNX Runtime

The block (VMamba's SS2D, forward_type v0): in_proj splits into x and a gate z; x goes through a depthwise 3x3
conv and SiLU, is scanned in four directions (rows, columns, and both reversed), each direction with its own
x_proj -> (delta rank R, B, C) and dt_proj (+ bias, softplus); A = -exp(A_logs) per channel and state, a D skip;
the four directions are merged back by sum, normalised (LayerNorm), gated by SiLU(z) and projected by out_proj.

The scan, per direction k, channel d and state n, over tokens t:
    h[t] = exp(delta[t] * A) * h[t-1] + delta[t] * B[t] * x[t]        y[t] = sum_n C[t] * h[t] + D * x[t]
`sequential_scan` is that loop, the reference. `chunked_scan` is what exports: the tokens are cut into chunks;
each chunk's end state is a sum weighted by exp(S_end - S_s) (S the running sum of delta * A within the chunk,
so every exponent is <= 0 and nothing can overflow, for any delta); the chunk end states are carried across
chunks by the recurrence itself; then one unrolled pass over the chunk's positions, all chunks at once, gives
every output. Only decays in (0, 1] are ever multiplied. The closed form h = e^S * cumsum(e^-S * u), which is
what the usual chunked scans export, overflows fp32 to NaN once a chunk's sum of |delta * A| passes ~88.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

DIRECTIONS = 4  # rows, columns, rows reversed, columns reversed


def sequential_scan(x, delta, A, B, C, D):
    """The reference: one token at a time. x, delta: (b, k, d, t); A: (k, d, n); B, C: (b, k, n, t); D: (k, d)."""
    b, k, d, t = x.shape
    h = x.new_zeros(b, k, d, A.shape[-1])
    ys = []
    for i in range(t):
        dt = delta[..., i].unsqueeze(-1)                                  # (b, k, d, 1)
        h = torch.exp(dt * A) * h + dt * x[..., i].unsqueeze(-1) * B[..., i].unsqueeze(2)
        ys.append((h * C[..., i].unsqueeze(2)).sum(-1))
    return torch.stack(ys, -1) + D.unsqueeze(-1) * x


def chunk_length(tokens: int) -> int:
    """The chunk that makes the fewest unrolled steps (positions within a chunk, plus chunks): a divisor of
    tokens near sqrt(tokens), so that nothing is padded (a prime count scans as one chunk per token)."""
    return min((length for length in range(1, tokens + 1) if tokens % length == 0),
               key=lambda length: length + tokens // length)


def chunked_scan(x, delta, A, B, C, D, chunk: int | None = None, per_state: bool = False):
    """The same result as sequential_scan, in about 2*sqrt(t) unrolled steps, each over whole tensors.
    per_state: each state's own part of y, C[t, n] * h[t, n], as (b, k, d, n, t), without the D skip (the modes
    of a diagonal A never mix, so y is exactly their sum)."""
    b, k, d, t = x.shape
    n = A.shape[-1]
    length = chunk or chunk_length(t)
    if t % length:
        raise ValueError(f"the scan's {t} tokens do not split into chunks of {length}")
    chunks = t // length

    def by_position(v):  # (b, k, c, t) -> (length, b, k, chunks, c): a position's slice is contiguous
        return v.reshape(b, k, v.shape[2], chunks, length).permute(4, 0, 1, 3, 2)

    dt = by_position(delta).unsqueeze(-1)                                # (L, b, k, chunks, d, 1)
    decay_log = dt * A[None, None, :, None]                              # (L, b, k, chunks, d, n), <= 0
    inflow = (dt * by_position(x).unsqueeze(-1)) * by_position(B).unsqueeze(-2)
    Cp = by_position(C).unsqueeze(-2)                                    # (L, b, k, chunks, 1, n)

    # each chunk's own end state (from a zero start): weights exp(S_end - S_s) <= 1
    running = torch.cumsum(decay_log, 0)
    end_state = (torch.exp(running[-1:] - running) * inflow).sum(0)      # (b, k, chunks, d, n)
    chunk_decay = torch.exp(running[-1])                                 # (b, k, chunks, d, n)

    # the state entering each chunk, chunk by chunk
    h = x.new_zeros(b, k, d, n)
    entering = []
    for c in range(chunks):
        entering.append(h)
        h = chunk_decay[:, :, c] * h + end_state[:, :, c]
    h = torch.stack(entering, 2)                                         # (b, k, chunks, d, n)

    # every position, all chunks at once
    ys = []  # unbind, not [i]: under autograd each index would fill a whole zero gradient in the backward pass
    for decay, inflow_i, C_i in zip(torch.exp(decay_log).unbind(0), inflow.unbind(0), Cp.unbind(0)):
        h = decay * h + inflow_i
        ys.append(h * C_i if per_state else (h * C_i).sum(-1))          # (b, k, chunks, d[, n])
    if per_state:
        return torch.stack(ys, -1).permute(0, 1, 3, 4, 2, 5).reshape(b, k, d, n, t)
    y = torch.stack(ys, -1).permute(0, 1, 3, 2, 4).reshape(b, k, d, t)
    return y + D.unsqueeze(-1) * x


def cross_scan(x):
    """(b, d, h, w) -> (b, 4, d, h*w): rows, columns, rows reversed, columns reversed."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], 1)


def cross_merge(y, height: int, width: int):
    """(b, 4, d, h*w) -> (b, d, h*w): each direction back in row order, summed."""
    b, _, d, t = y.shape
    rows = y[:, 0] + y[:, 2].flip(-1)
    cols = y[:, 1] + y[:, 3].flip(-1)
    return rows + cols.reshape(b, d, width, height).transpose(2, 3).reshape(b, d, t)


class SS2D(nn.Module):
    """VMamba's 2-D selective-scan block; input and output (batch, height, width, d_model)."""

    def __init__(self, d_model: int, d_state: int = 16, expand: float = 2.0, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 0.1, scan: str = "chunked"):
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.scan = scan
        d, n, r, k = self.d_inner, d_state, self.dt_rank, DIRECTIONS
        self.in_proj = nn.Linear(d_model, 2 * d, bias=False)
        self.conv2d = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.x_proj_weight = nn.Parameter(torch.randn(k, r + 2 * n, d) / math.sqrt(d))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d, r).uniform_(-r ** -0.5, r ** -0.5))
        # delta starts log-uniform in [dt_min, dt_max]: the bias is softplus's inverse of it (VMamba's init)
        dt = torch.exp(torch.rand(k, d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(k, d, 1))
        self.Ds = nn.Parameter(torch.ones(k, d))
        # which of the original block's inner channels these are: slice_channels narrows it, distillation reads it
        self.register_buffer("channel_origin", torch.arange(d))
        self.scan_output = nn.Identity()  # a place to hook the scan's output (b, k, d, t): distillation aligns it
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d_model, bias=False)

    def scan_inputs(self, x):
        """x (b, h, w, d_model) -> the scan's (x, delta, A, B, C, D) and the gate z."""
        xz = self.in_proj(x)
        x, z = xz.chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))
        xs = cross_scan(x)                                                         # (b, k, d, t)
        n, r = self.d_state, self.dt_rank
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        delta = F.softplus(dts + self.dt_projs_bias.unsqueeze(-1))
        return (xs, delta, -torch.exp(self.A_logs), Bs, Cs, self.Ds), z

    def forward(self, x):
        _, height, width, _ = x.shape
        args, z = self.scan_inputs(x)
        y = self.scan_output((sequential_scan if self.scan == "sequential" else chunked_scan)(*args))
        y = cross_merge(y, height, width).transpose(1, 2).reshape(x.shape[0], height, width, -1)
        return self.out_proj(self.out_norm(y) * F.silu(z))


# --- reductions: fewer states, a narrower inner width ------------------------------------------------
@torch.no_grad()
def state_energy(block: SS2D, x: torch.Tensor) -> torch.Tensor:
    """(directions, d_state): how much of the scan's output each direction's state carries on samples x, the
    mean square of C[t, n] * h[t, n] over samples, channels and tokens."""
    args, _ = block.scan_inputs(x)
    return chunked_scan(*args, per_state=True).pow(2).mean(dim=(0, 2, 4))


@torch.no_grad()
def channel_energy(block: SS2D, x: torch.Tensor) -> torch.Tensor:
    """(d_inner,): each inner channel's share of the block's output: the mean square of what out_proj reads from
    it (normalised scan output times the gate) times the squared norm of out_proj's column for it."""
    _, height, width, _ = x.shape
    args, z = block.scan_inputs(x)
    y = cross_merge(chunked_scan(*args), height, width).transpose(1, 2).reshape(x.shape[0], height, width, -1)
    feeds = (block.out_norm(y) * F.silu(z)).pow(2).mean(dim=(0, 1, 2))
    return feeds * block.out_proj.weight.pow(2).sum(0)


@torch.no_grad()
def keep_states(block: SS2D, keep: int, x: torch.Tensor) -> torch.Tensor:
    """Keep each direction's `keep` states that carry the most output on samples x (each direction its own);
    B's and C's rows of x_proj and A's columns go with them. The block is changed in place; returns the
    kept indices (directions, keep)."""
    if not 0 < keep <= block.d_state:
        raise ValueError(f"keep {keep} states: must be in 1..{block.d_state}")
    kept = state_energy(block, x).topk(keep, dim=1).indices.sort(dim=1).values     # (k, keep)
    slice_states(block, kept)
    return kept


@torch.no_grad()
def slice_states(block: SS2D, kept: torch.Tensor) -> None:
    """Keep the states KEPT (directions, keep) of each direction, in place."""
    keep, r, n = kept.shape[1], block.dt_rank, block.d_state
    w = block.x_proj_weight.data                                                  # (k, r + 2n, d)
    rows = torch.cat([torch.arange(r).expand(len(kept), r), r + kept, r + n + kept], 1)
    block.x_proj_weight = nn.Parameter(torch.stack([w[i, rows[i]] for i in range(len(kept))]))
    block.A_logs = nn.Parameter(torch.stack([block.A_logs.data[i][:, kept[i]] for i in range(len(kept))]))
    block.d_state = keep


@torch.no_grad()
def keep_channels(block: SS2D, keep: int, x: torch.Tensor) -> torch.Tensor:
    """Keep the `keep` inner channels that feed out_proj the most on samples x: their rows of in_proj (x and
    gate), depthwise conv filters, scan parameters, norm and out_proj columns. In place; returns the kept
    indices. The norm now averages over fewer channels: distillation restores what that moves."""
    if not 0 < keep <= block.d_inner:
        raise ValueError(f"keep {keep} channels: must be in 1..{block.d_inner}")
    kept = channel_energy(block, x).topk(keep).indices.sort().values
    slice_channels(block, kept)
    return kept


@torch.no_grad()
def slice_channels(block: SS2D, kept: torch.Tensor) -> None:
    """Keep the inner channels KEPT, in place."""
    keep, d = len(kept), block.d_inner
    block.in_proj = _linear_rows(block.in_proj, torch.cat([kept, d + kept]))
    conv = nn.Conv2d(keep, keep, 3, padding=1, groups=keep)
    conv.weight.data, conv.bias.data = block.conv2d.weight.data[kept].clone(), block.conv2d.bias.data[kept].clone()
    block.conv2d = conv
    block.x_proj_weight = nn.Parameter(block.x_proj_weight.data[:, :, kept].clone())
    block.dt_projs_weight = nn.Parameter(block.dt_projs_weight.data[:, kept].clone())
    block.dt_projs_bias = nn.Parameter(block.dt_projs_bias.data[:, kept].clone())
    block.A_logs = nn.Parameter(block.A_logs.data[:, kept].clone())
    block.Ds = nn.Parameter(block.Ds.data[:, kept].clone())
    norm = nn.LayerNorm(keep, eps=block.out_norm.eps)
    norm.weight.data, norm.bias.data = block.out_norm.weight.data[kept].clone(), block.out_norm.bias.data[kept].clone()
    block.out_norm = norm
    out = nn.Linear(keep, block.d_model, bias=block.out_proj.bias is not None)
    out.weight.data = block.out_proj.weight.data[:, kept].clone()
    if out.bias is not None:
        out.bias.data = block.out_proj.bias.data.clone()
    block.out_proj = out
    block.d_inner = keep
    block.channel_origin = block.channel_origin[kept]


def _linear_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    kept = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None)
    kept.weight.data = linear.weight.data[rows].clone()
    if linear.bias is not None:
        kept.bias.data = linear.bias.data[rows].clone()
    return kept
