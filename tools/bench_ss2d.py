"""SS2D on ONNX Runtime: the scan's formulations, and what the reductions buy (issue 21).

    python tools/bench_ss2d.py --json docs/bench_ss2d.json

One VMamba SS2D block (edgelr.train.ss2d.SS2D: d_model 96, d_inner 192, d_state 16, 40 x 40 tokens), its
delta trained-looking (softplus bias set so that delta spans 0.01..1, as trained VMamba checkpoints reach).
1. Formulations, each exported (TorchScript exporter, fixed size) and run in ONNX Runtime CPU, 1 thread:
   edgelr's chunked scan, and the closed form h = e^S * cumsum(e^-S * u) in chunks of 40 (what chunked scans
   usually export). Nodes, error against the sequential scan in float64 torch, non-finite outputs, and time
   (interleaved, median of rounds).
2. Reductions (edgelr.train.ss2d.keep_states, keep_channels; the projections factorized by
   edgelr.train.lowrank.factorize_module), each chosen on 8 calibration inputs: parameters, time against the
   original block (interleaved, same run), and the output error on 8 other inputs. The block's weights are
   random (no trained VMamba checkpoint is at hand offline): the errors say what the reduction moves before
   distillation, not what a trained block keeps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgelr.io.model import ort_session
from edgelr.measure.latency import interleaved_latency
from edgelr.train import ss2d
from edgelr.train.lowrank import export_onnx, factorize_module

SIZE, D_MODEL, D_STATE = 40, 96, 16


def closed_form_scan(x, delta, A, B, C, D, chunk: int = 40):
    """The usual closed form within a chunk, state carried between chunks: overflows once a chunk's sum of
    |delta * A| passes ~88 (fp32)."""
    b, k, d, t = x.shape
    n, chunks = A.shape[-1], t // chunk
    dt = delta.reshape(b, k, d, chunks, chunk).unsqueeze(-1)
    running = torch.cumsum(dt * A[None, :, :, None, None, :], 4)                          # (b, k, d, c, L, n)
    u = dt * x.reshape(b, k, d, chunks, chunk).unsqueeze(-1) * \
        B.reshape(b, k, n, chunks, chunk).permute(0, 1, 3, 4, 2).unsqueeze(2)
    local = torch.exp(running) * torch.cumsum(torch.exp(-running) * u, 4)
    Cc = C.reshape(b, k, n, chunks, chunk).permute(0, 1, 3, 4, 2).unsqueeze(2)
    h, ys = x.new_zeros(b, k, d, n), []
    for c in range(chunks):
        states = local[:, :, :, c] + torch.exp(running[:, :, :, c]) * h.unsqueeze(3)
        ys.append((states * Cc[:, :, :, c]).sum(-1))
        h = states[:, :, :, -1]
    return torch.cat(ys, -1) + D.unsqueeze(-1) * x


def trained_looking(block: ss2d.SS2D, seed: int = 0) -> ss2d.SS2D:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dt = torch.exp(torch.rand(block.dt_projs_bias.shape, generator=g) * (math.log(1.0) - math.log(0.01)) + math.log(0.01))
        block.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    return block.eval()


def export(block, path: Path, x, checked: bool = True) -> int:
    """The block at batch 1 as ONNX; checked: by edgelr's export (ONNX Runtime against torch), else plain (the
    closed form's NaNs would fail that check: they are counted below instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if checked:
            export_onnx(block, path, (x[:1],), dynamic_batch=False)
        else:
            torch.onnx.export(block, (x[:1],), path, dynamo=False, opset_version=17, input_names=["input"])
    return len(onnx.load(path).graph.node)


def run(path: Path, x: np.ndarray) -> np.ndarray:
    with ort_session(path, threads=1) as ort:
        return np.concatenate([ort.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


def relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def params(block) -> int:
    return sum(p.numel() for p in block.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(16, SIZE, SIZE, D_MODEL)
    calib, held = x[:8], x[8:]
    block = trained_looking(ss2d.SS2D(D_MODEL, d_state=D_STATE))
    out = {"block": {"d_model": D_MODEL, "d_inner": block.d_inner, "d_state": D_STATE, "tokens": SIZE * SIZE}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        block.scan = "sequential"
        with torch.no_grad():
            reference = block.double()(held[:2].double()).numpy()
        block.float().scan = "chunked"

        # 1. formulations
        files, forms = {}, {}
        for name, scan in (("chunked (edgelr)", ss2d.chunked_scan), ("closed form, chunks of 40", closed_form_scan)):
            original, ss2d.chunked_scan = ss2d.chunked_scan, scan
            try:
                files[name] = tmp / f"{len(files)}.onnx"
                started = time.perf_counter()
                nodes = export(block, files[name], x, checked=name.startswith("chunked"))
                took = time.perf_counter() - started
            finally:
                ss2d.chunked_scan = original
            got = run(files[name], held[:2].numpy())
            finite = np.isfinite(got)
            forms[name] = {"nodes": nodes, "export_s": round(took, 1),
                           "non_finite": float(1 - finite.mean()),
                           "error_vs_sequential": relative(np.where(finite, got, 0), reference) if finite.all() else None}
        seconds = interleaved_latency(files, {"input": x[:1].numpy()}, rounds=args.rounds)
        for name, s in seconds.items():
            forms[name]["ms"] = round(s * 1e3, 2)
        out["formulations"] = forms

        # 2. reductions
        steps = {
            "original": lambda b: None,
            "states 16 -> 8": lambda b: ss2d.keep_states(b, 8, calib),
            "width 192 -> 128": lambda b: ss2d.keep_channels(b, 128, calib),
            "states 8, width 128": lambda b: (ss2d.keep_states(b, 8, calib), ss2d.keep_channels(b, 128, calib)),
            "states 8, width 128, projections at half": lambda b: (
                ss2d.keep_states(b, 8, calib), ss2d.keep_channels(b, 128, calib),
                factorize_module(b, params=0.5, samples=calib, progress=False)),
        }
        files, rows = {}, {}
        with torch.no_grad():
            expected = block(held).numpy()
        for name, reduce in steps.items():
            reduced = trained_looking(ss2d.SS2D(D_MODEL, d_state=D_STATE))
            reduced.load_state_dict(block.state_dict())
            reduce(reduced)
            files[name] = tmp / f"r{len(files)}.onnx"
            export(reduced, files[name], x)
            rows[name] = {"params": params(reduced), "d_state": reduced.d_state, "d_inner": reduced.d_inner,
                          "error": relative(run(files[name], held.numpy()), expected)}
        seconds = interleaved_latency(files, {"input": x[:1].numpy()}, rounds=args.rounds)
        for name, row in rows.items():
            row["ms"] = round(seconds[name] * 1e3, 2)
            row["speedup"] = round(seconds["original"] / seconds[name], 2)
            row["params_kept"] = round(row["params"] / rows["original"]["params"], 3)
        out["reductions"] = rows
    out["command"] = "python tools/bench_ss2d.py" + (f" --json {args.json}" if args.json else "")
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
