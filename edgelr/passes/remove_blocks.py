"""Block removal: whole residual blocks left out, the least essential first (HierarchicalPrune).

A residual block y = x + f(x) left out becomes y = x (edgelr.graph.residual finds them in any ONNX graph).
Which to remove is measured, not guessed: each candidate is removed alone and the model judged (by default
the worst output group's error on the calibration samples; a pipeline may judge by what the model makes,
e.g. a diffusion model's generated images, through `Context.block_judge`), and the least sensitive go
first. The first `keep_first` of the blocks in graph order are never candidates: HierarchicalPrune found
that a diffusion model's early blocks lay down the image's structure and its late ones refine it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import onnx_ir as ir

from edgelr.errors import EdgelrError
from edgelr.graph.residual import ResidualBranch, remove_branches, residual_branches
from edgelr.io.progress import progress_bar
from edgelr.io.samples import Samples
from edgelr.measure.verify import output_error
from edgelr.passes.base import EdgelrPass, PassConfig, PassDetails, register_pass

SENSITIVITY_SAMPLES = 8  # samples each candidate is judged on (the removal is then verified on all)


@dataclass(frozen=True)
class RemoveBlocksConfig(PassConfig):
    """blocks: names of the blocks to remove (as `edgelr inspect --blocks` lists them); or count: remove this
    many, least sensitive first; or max_error: remove the least sensitive while the judged error stays within
    it. keep_first: the fraction of blocks, in graph order, never removed by count or max_error."""

    kind: ClassVar[str] = "remove_blocks"
    blocks: tuple[str, ...] = ()
    count: int | None = None
    max_error: float | None = None
    keep_first: float = 0.25

    def __post_init__(self):
        chosen = [bool(self.blocks), self.count is not None, self.max_error is not None]
        if sum(chosen) != 1:
            raise EdgelrError("remove_blocks: give exactly one of blocks (names), count or max_error")
        if self.count is not None and self.count < 1:
            raise EdgelrError(f"count {self.count}: the number of blocks to remove must be at least 1")
        if self.max_error is not None and not self.max_error > 0:
            raise EdgelrError(f"max_error {self.max_error}: must be above 0, e.g. 0.05")
        if not 0 <= self.keep_first < 1:
            raise EdgelrError(f"keep_first {self.keep_first}: the fraction of early blocks kept must be in [0, 1)")

    def needs_calibration(self) -> str | None:
        return None if self.blocks else "blocks are removed by measured sensitivity"


@dataclass
class RemoveBlocksResult:
    candidates: list[ResidualBranch]
    sensitivity: dict[str, float] = field(default_factory=dict)  # block name -> error with it removed alone
    removed: list[str] = field(default_factory=list)
    error: float | None = None  # the judged error with all of them removed
    params_removed: int = 0
    # removed block -> the tensor at its residual join: the Add's output, which the Identity left in its place
    # keeps by name, so the name is the same in the original and the result (distillation aligns them there)
    joins: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"candidates": [b.name for b in self.candidates], "sensitivity": self.sensitivity,
                "removed": self.removed, "error": self.error, "params_removed": self.params_removed,
                "joins": self.joins}


@register_pass(RemoveBlocksConfig)
class RemoveBlocksPass(EdgelrPass):
    def call(self, model: ir.Model) -> PassDetails:
        ctx = self.context
        judge = ctx.block_judge or (lambda candidate: _output_error(ctx.source, candidate, ctx.samples))
        result = remove_blocks(model, self.config, judge, progress=ctx.progress)
        ctx.blocks_removed = result.to_json()
        return PassDetails(model, bool(result.removed), result)


def remove_blocks(model: ir.Model, config: RemoveBlocksConfig, judge: Callable[[ir.Model], float] | None = None,
                  progress: bool = True) -> RemoveBlocksResult:
    """Remove blocks from MODEL in place as CONFIG says; JUDGE(model) -> error (lower is better) ranks them."""
    found = residual_branches(model)
    if not found:
        raise EdgelrError("no residual block (y = x + f(x)) found: block removal does not apply to this model")
    if config.blocks:
        by_name = {b.name: b for b in found}
        unknown = [name for name in config.blocks if name not in by_name]
        if unknown:
            raise EdgelrError(f"no residual block named {unknown[0]}; the blocks are: {', '.join(b.name for b in found)}")
        result = RemoveBlocksResult(found)
        _remove(model, [by_name[name] for name in config.blocks], result)
        return result
    candidates = found[math.ceil(len(found) * config.keep_first):]
    result = RemoveBlocksResult(candidates)
    for block in progress_bar(candidates, desc="block sensitivity", unit="block", show=progress):
        result.sensitivity[block.name] = _judged(judge, _without(model, [block]))
    ranked = sorted((b for b in candidates if math.isfinite(result.sensitivity[b.name])),
                    key=lambda b: (result.sensitivity[b.name], -b.add))  # ties: the later first
    if config.count is not None:
        if config.count > len(ranked):
            broken = len(candidates) - len(ranked)
            raise EdgelrError(f"count {config.count}: only {len(ranked)} blocks may be removed ({len(found)} found, "
                              f"the first {len(found) - len(candidates)} kept by keep_first"
                              + (f", {broken} the model does not run without)" if broken else ")"))
        chosen = _outermost(ranked[:config.count])
        _remove(model, chosen, result)
        result.error = judge(model)
        return result
    chosen: list[ResidualBranch] = []
    for block in ranked:  # greedy, judged together: errors of removed blocks do not simply add
        if any(b.contains(block) or block.contains(b) for b in chosen):
            continue
        error = _judged(judge, _without(model, [*chosen, block]))
        if error <= config.max_error:
            chosen.append(block)
            result.error = error
    _remove(model, chosen, result)
    return result


def _without(model: ir.Model, blocks: list[ResidualBranch]) -> ir.Model:
    """A copy of MODEL with BLOCKS removed (the copy keeps the node order the blocks are named by)."""
    trial = ir.from_proto(ir.to_proto(model))
    remove_branches(trial, _outermost(blocks))
    return trial


def _judged(judge: Callable[[ir.Model], float], candidate: ir.Model) -> float:
    """The judge's error, infinite for a model that does not run without the block (never chosen)."""
    try:
        return judge(candidate)
    except (EdgelrError, RuntimeError):  # ONNX Runtime raises RuntimeError subclasses for a graph it refuses
        return math.inf


def _remove(model: ir.Model, blocks: list[ResidualBranch], result: RemoveBlocksResult) -> None:
    outer = _outermost(blocks)
    nodes = list(model.graph)
    result.joins.update({block.name: nodes[block.add].outputs[0].name for block in outer})
    remove_branches(model, outer)
    result.removed += [block.name for block in outer]
    result.params_removed += sum(block.params for block in outer)


def _outermost(blocks: list[ResidualBranch]) -> list[ResidualBranch]:
    """The blocks not inside another of them (removing the outer one removes the inner)."""
    return [b for b in blocks if not any(o is not b and o.contains(b) for o in blocks)]


def _output_error(source, candidate: ir.Model, samples: Samples | None) -> float:
    if samples is None:
        raise EdgelrError("block removal by sensitivity needs calibration samples (--calib)")
    few = samples.split(min(SENSITIVITY_SAMPLES, len(samples)))[0]
    return output_error(source, candidate, few).get("worst", 0.0)
