"""Reports of a compression run: a per-layer table for people, JSON for machines."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgelr.errors import EdgelrError
from edgelr.graph.layers import Layer, Skipped
from edgelr.passes.factorize import FactorizeResult


def human(n: float | None) -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A plain-text table; `align` has one char per column, 'l' or 'r' (default: first left, rest right)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(values):
        return "  ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(values, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _ratio(after: int | None, before: int | None) -> str:
    return f"{after / before:.3f}" if after is not None and before else "?"


def compression_table(result: FactorizeResult) -> str:
    rows = [
        [
            r.name,
            r.op,
            r.form if r.form != "dense" else f"dense{' (' + r.note + ')' if r.note else ''}",
            r.rank or "",
            human(r.params_before),
            human(r.params_after),
            human(r.flops_before),
            human(r.flops_after),
            f"{r.error:.4f}" if r.form != "dense" else "",
        ]
        for r in result.layers
    ]
    p0, p1 = result.total("params_before"), result.total("params_after")
    f0, f1 = result.total("flops_before"), result.total("flops_after")
    rows.append(["total", "", f"{len(result.factorized)} factorized", "", human(p0), human(p1), human(f0), human(f1), ""])
    headers = ["layer", "op", "form", "rank", "params", "->", "FLOPs", "->", "rel.err"]
    text = table(headers, rows, "lllrrrrrr")
    text += f"\nkept {_ratio(p1, p0)} of the params, {_ratio(f1, f0)} of the FLOPs of these layers"
    return text


def inspect_table(layers: list[Layer], skipped: list[Skipped]) -> str:
    rows = []
    for layer in layers:
        shape = "x".join(str(d) for d in layer.weight_array().shape)
        inputs = ", ".join(_shape(u.input_shape) for u in layer.uses)
        rows.append([layer.name, layer.op, shape, inputs, "/".join(layer.forms()), human(layer.dense_params()), human(layer.dense_flops())])
    total_p = sum(layer.dense_params() for layer in layers)
    flops = [layer.dense_flops() for layer in layers]
    total_f = None if any(f is None for f in flops) else sum(flops)
    rows.append(["total", "", "", "", f"{len(layers)} layers", human(total_p), human(total_f)])
    text = table(["layer", "op", "weight", "input", "forms", "params", "FLOPs"], rows, "lllllrr")
    uncalibrated = [[layer.name, layer.op, layer.uncalibrated] for layer in layers if layer.uncalibrated]
    if uncalibrated:
        text += "\n\nfactorized data-free (plain SVD), calibration does not reach them:\n"
        text += table(["layer", "op", "why"], uncalibrated, "lll")
    if skipped:
        text += "\n\nleft alone:\n" + table(["node", "op", "why"], [[s.name, s.op, s.reason] for s in skipped], "lll")
    return text


def _shape(shape) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join(str(d) if isinstance(d, int) or len(str(d)) <= 8 else "?" for d in shape) + "]"


def result_json(result: FactorizeResult) -> dict:
    return {
        "metric": result.metric,
        "fraction": result.fraction,
        "budget_reached": result.budget_reached,
        "data_aware": result.data_aware,
        "warnings": result.warnings,
        "layers": [asdict(r) for r in result.layers],
        "skipped": [asdict(s) for s in result.skipped],
        "search_front": [{"cost": c, "predicted_error": math.sqrt(e2)} for c, e2 in result.front],
        "dense_cost": result.dense_cost,
        "kept_float": result.keep_float,
        "refit": result.refit,
        "totals": {
            key: result.total(key) for key in ("params_before", "params_after", "flops_before", "flops_after")
        },
    }


def plain_json(data):
    """DATA as plain JSON can hold it: numpy scalars as Python numbers, infinite and NaN floats (the PSNR of
    identical images) as strings, tuples as lists."""
    if isinstance(data, (np.floating, np.integer)):
        data = data.item()
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {k: plain_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [plain_json(v) for v in data]
    return data


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write JSON atomically (a complete file or none)."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically, with the permissions a plain open() would give it."""
    path = Path(path)
    tmp = _staged(path, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _staged(path: Path, text: str) -> Path:
    """TEXT in a hidden temporary file beside PATH (same filesystem: it can be moved into place whole)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".edgelr-", suffix=".tmp")  # a short name, whatever PATH's
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


MARK_BYTES = 4096  # a marker is looked for this far into a file, so a huge file the user names is not read


def has_mark(path: Path, mark: str) -> bool:
    """Whether PATH is a regular file (not a link) with MARK near its start: a file edgelr wrote."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        with open(path, "rb") as f:
            return mark.encode() in f.read(MARK_BYTES)
    except OSError:
        return False


def write_own_files(files: list[tuple[Path, str, str]]) -> list[Path]:
    """Write each (path, text, mark) where the path is new or holds a file with that mark (one edgelr wrote
    before); anything else there is the user's and is refused, before anything is written. Every text
    carries its mark within MARK_BYTES, so the next run recognises it. The files are staged beside their
    paths and moved into place together; a failure removes the ones this call created."""
    for path, text, mark in files:
        assert mark in text[:MARK_BYTES], mark
        if not path.parent.is_dir():
            raise EdgelrError(f"{path}: folder {path.parent} does not exist")
        if os.path.lexists(path) and not has_mark(path, mark):
            what = "a link" if path.is_symlink() else "a folder" if path.is_dir() else "a file edgelr did not write"
            raise EdgelrError(f"{path}: exists and is {what}; it is not overwritten: pick another name or remove it")
    staged, created, path = [], [], files[0][0]
    try:
        for path, text, _mark in files:
            staged.append(_staged(path, text))
        for (path, _text, _mark), tmp in zip(files, staged):
            if _place(tmp, path):
                created.append(path)
    except BaseException as exc:  # whole or nothing: an interrupted or failed write takes back what it created
        for done in created:
            done.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise EdgelrError(f"{path}: cannot write ({exc.strerror}); the report was not written") from None
        raise
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
    return [path for path, _text, _mark in files]


def _place(tmp: Path, path: Path) -> bool:
    """Move TMP to PATH; True when PATH is new. A new path is taken with a hard link, which fails rather
    than replace a file that appeared since the check (os.replace would silently destroy it)."""
    if os.path.lexists(path):
        os.replace(tmp, path)  # checked above: a file this command wrote
        return False
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise EdgelrError(f"{path}: appeared while the report was written; it is not overwritten") from None
    except OSError:  # a filesystem without hard links: the check above is all there is
        os.replace(tmp, path)
    return True
