"""Structure-aware distillation of a reduced SS2D model towards its full teacher, in torch (DLRMamba's losses).

    config = StructuredDistillConfig(steps=2000, lr=1e-3)          # weights task 1.0, svd 0.5, state 0.1, feat 1.5
    report = distill_ss2d(teacher, student, batches, config, task_loss=lambda m, b: detection_loss(m, *b))

The student is the teacher with its SS2D blocks reduced (edgelr.train.ss2d: keep_states, keep_channels) and
Linears factorized (edgelr.train.lowrank.factorize_module); teacher and student modules are matched by
module path. The loss, L = task * L_task + svd * L_SVD + state * L_state + feat * L_feat:
- L_task: task_loss(student, batch), e.g. the detection loss on ground truth; skipped without task_loss.
- L_SVD: per low-rank pair (a module with `down` and `up` Linears where the teacher has an nn.Linear),
  ||up @ down - W_r||^2 / ||W_r||^2, W_r the teacher weight's rank-r truncated SVD; the mean over pairs. The
  product, not the factors: up and down are only defined up to an invertible r x r map between them. A pair
  inside a block whose inner width was reduced is compared with the teacher rows (in_proj) or columns
  (out_proj) of the channels it kept.
- L_state: per SS2D block, the student's scan output (b, k, d, t) (the block's `scan_output` hook) against a
  learned projection of the teacher's over the channel axis, d_teacher -> d_student, trained with the student.
  It starts as the identity where the widths are equal, as the selection of the kept channels where
  slice_channels reduced the width (SS2D.channel_origin), else as the least-squares map on
  the first batch. The mean over blocks of MSE / variance of the projected teacher output: that variance,
  not the raw teacher's, so that the projection cannot lower the term by shrinking both sides towards 0.
- L_feat: per SS2D block, its output, student against teacher, MSE / the teacher output's variance.
A term whose weight is 0 is not computed at all (no hooks, no projections).

The teacher runs frozen in eval mode, under no_grad. The student trains in train mode with its BatchNorm
statistics frozen: it is the teacher's own compressed copy, whose statistics fit it, and a copy of the
teacher then starts with every distillation term at 0 (small batches' statistics would move it off).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from edgelr.errors import EdgelrError
from edgelr.io.progress import progress_bar
from edgelr.train.lowrank import factorize_module
from edgelr.train.ss2d import SS2D, keep_channels, keep_states

TERMS = ("task", "svd", "state", "feat")
CLIP_NORM = 10.0
WARMUP_STEPS = 10
FINAL_LR = 0.05  # the cosine ends at this fraction of lr
REPORT_FRACTION = 0.1  # the report's first and last means are over this fraction of the steps


@dataclass(frozen=True)
class StructuredDistillConfig:
    """Steps (None: until time_limit), AdamW's learning rate, a time limit in seconds, and each term's weight
    (0 switches the term off)."""

    steps: int | None = 1000
    lr: float = 1e-3
    time_limit: float | None = None
    task: float = 1.0
    svd: float = 0.5
    state: float = 0.1
    feat: float = 1.5

    def __post_init__(self):
        if self.steps is None and self.time_limit is None:
            raise EdgelrError("StructuredDistillConfig: give steps, time_limit or both")
        if self.steps is not None and self.steps < 1:
            raise EdgelrError(f"steps {self.steps}: must be at least 1")
        if self.time_limit is not None and not self.time_limit > 0:
            raise EdgelrError(f"time_limit {self.time_limit}: must be > 0 seconds")
        if not self.lr > 0:
            raise EdgelrError(f"lr {self.lr}: must be > 0")
        for term, weight in self.weights.items():
            if not (weight >= 0 and math.isfinite(weight)):
                raise EdgelrError(f"weight {term}={weight}: must be a finite number >= 0 (0 switches the term off)")

    @property
    def weights(self) -> dict[str, float]:
        return {term: getattr(self, term) for term in TERMS}


# --- matching teacher and student -------------------------------------------------------------------
def ss2d_blocks(model: nn.Module) -> dict[str, SS2D]:
    """Module path -> every SS2D block of the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SS2D)}


def is_low_rank_pair(module: nn.Module) -> bool:
    """A module that applies `down`, then `up`, both nn.Linear (edgelr.train.lowrank.LowRankLinear's shape)."""
    return isinstance(getattr(module, "down", None), nn.Linear) and isinstance(getattr(module, "up", None), nn.Linear)


@torch.no_grad()
def recover_kept_channels(teacher_block: SS2D, student_block: SS2D) -> torch.Tensor | None:
    """The teacher's inner channels the student block's were sliced from, in the student's order, read from
    the channels' recorded origin (SS2D.channel_origin, which slice_channels narrows); None where a student
    channel is not one of the teacher's."""
    where = {int(c): i for i, c in enumerate(teacher_block.channel_origin)}
    kept = [where.get(int(c)) for c in student_block.channel_origin]
    return None if None in kept else torch.tensor(kept)


def _teacher_weight(path: str, linear: nn.Linear, pair: nn.Module, teacher_blocks: dict[str, SS2D],
                    kept: dict[str, torch.Tensor | None]) -> torch.Tensor | None:
    """The teacher weight a pair stands for (out x in): the Linear's, or, inside a block whose width was
    reduced, its rows (in_proj: x and gate) or columns (out_proj) of the kept channels. None if neither fits."""
    weight = linear.weight.detach()
    shape = (pair.up.out_features, pair.down.in_features)
    if tuple(weight.shape) == shape:
        return weight
    block, _, leaf = path.rpartition(".")
    channels = kept.get(block)
    if channels is None or leaf not in ("in_proj", "out_proj"):
        return None
    channels = channels.to(weight.device)
    if leaf == "in_proj":
        weight = weight[torch.cat([channels, teacher_blocks[block].d_inner + channels])]
    else:
        weight = weight[:, channels]
    return weight if tuple(weight.shape) == shape else None


def truncated_svd(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of a matrix (Eckart-Young), in the weight's dtype."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(weight.dtype)


def _model_inputs(batch) -> tuple[torch.Tensor, ...]:
    """A batch's positional model inputs: a tensor, or a tuple's / list's tensors (labels that are not tensors,
    as models.fusion_data's truths, are left out)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        inputs = tuple(x for x in batch if isinstance(x, torch.Tensor))
        if inputs:
            return inputs
    raise EdgelrError(f"a batch must be a tensor or a tuple of input tensors (labels may follow), got "
                      f"{type(batch).__name__}")


def _variance_scaled_mse(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (student - target).pow(2).mean() / target.var().clamp(min=1e-12)


# --- the student ------------------------------------------------------------------------------------
@torch.no_grad()
def reduced_copy(model: nn.Module, inputs: tuple[torch.Tensor, ...], states: int | None = None,
                 width: float | None = None, params: float | None = None) -> tuple[nn.Module, dict]:
    """A copy of the model with every SS2D block reduced on its own inputs from running `inputs` (positional
    model inputs) through the model: each direction's `states` strongest states (keep_states; all where the
    block has no more), the `width` fraction of its inner channels that feed out_proj the most
    (keep_channels), then in_proj and out_proj factorized to keep `params` of their parameters
    (factorize_module). Returns the copy, in the model's mode, and per block what was kept."""
    student = copy.deepcopy(model)
    blocks = ss2d_blocks(student)
    if not blocks:
        raise EdgelrError(f"{type(model).__name__} has no SS2D block to reduce")
    seen: dict[str, torch.Tensor] = {}
    handles = [block.register_forward_hook(lambda _m, args, _out, path=path: seen.setdefault(path, args[0].detach()))
               for path, block in blocks.items()]
    mode = student.training
    try:
        student.eval()
        student(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    report = {}
    for path, block in blocks.items():
        if path not in seen:
            raise EdgelrError(f"SS2D block {path} did not run on the inputs")
        x, row = seen[path], {"d_state": [block.d_state], "d_inner": [block.d_inner]}
        if states is not None and states < block.d_state:
            keep_states(block, states, x)
        if width is not None:
            keep_channels(block, max(1, round(width * block.d_inner)), x)
        if params is not None:
            done = factorize_module(block, params=params, samples=x, progress=False)
            row["ranks"] = {r["name"]: r["rank"] for r in done["layers"] if r["rank"]}
        row["d_state"].append(block.d_state)
        row["d_inner"].append(block.d_inner)
        report[path] = row
    student.train(mode)
    return student, report


# --- the loss ---------------------------------------------------------------------------------------
class StructureAwareLoss(nn.Module):
    """The weighted terms for one teacher and student (see the module docstring); its parameters are the
    state projections, one (d_student x d_teacher) matrix per block. Registers forward hooks on both models
    until close()."""

    def __init__(self, teacher: nn.Module, student: nn.Module, config: StructuredDistillConfig,
                 task_loss: Callable | None = None):
        super().__init__()
        self.config, self.task_loss = config, task_loss
        self._models = (teacher, student)  # a tuple: not submodules, so .parameters() is the projections alone
        self.weights = {t: w for t, w in config.weights.items() if w > 0 and (t != "task" or task_loss is not None)}
        if not self.weights:
            raise EdgelrError("every term is switched off (weights 0, or only task without a task_loss): nothing to lower")

        teacher_blocks, student_blocks = ss2d_blocks(teacher), ss2d_blocks(student)
        self.blocks = [path for path in student_blocks if path in teacher_blocks]
        if ("state" in self.weights or "feat" in self.weights) and not self.blocks:
            raise EdgelrError("the state and feat terms need SS2D blocks at the same module paths in teacher and "
                              f"student; the student has {len(student_blocks)}, the teacher {len(teacher_blocks)}, "
                              "none shared")
        kept = {p: recover_kept_channels(teacher_blocks[p], student_blocks[p]) for p in self.blocks}

        # L_SVD: each pair's target W_r, fixed
        self.pairs: list[tuple[str, nn.Module, torch.Tensor]] = []
        self.skipped_pairs: list[str] = []
        teacher_modules = dict(teacher.named_modules())
        if "svd" in self.weights:
            for path, module in student.named_modules():
                if not is_low_rank_pair(module) or not isinstance(teacher_modules.get(path), nn.Linear):
                    continue
                weight = _teacher_weight(path, teacher_modules[path], module, teacher_blocks, kept)
                if weight is None:
                    self.skipped_pairs.append(path)
                    continue
                self.pairs.append((path, module, truncated_svd(weight, module.down.out_features)))

        # L_state: the projections
        self.projections = nn.ParameterList()
        self.initialised: list[str] = []  # per block: identity, kept channels or least squares
        self._fitted: set[str] = set()  # the least-squares ones fitted (on the first batch)
        if "state" in self.weights:
            for path in self.blocks:
                d_teacher, d_student = teacher_blocks[path].d_inner, student_blocks[path].d_inner
                ref = student_blocks[path].x_proj_weight
                matrix = torch.zeros(d_student, d_teacher, dtype=ref.dtype, device=ref.device)
                if kept[path] is not None:
                    matrix[torch.arange(d_student), kept[path].to(ref.device)] = 1.0
                    self.initialised.append("identity" if d_student == d_teacher else "kept channels")
                else:
                    self.initialised.append("least squares")
                self.projections.append(nn.Parameter(matrix))

        # hooks: what each forward leaves behind, per model
        self._captured: tuple[dict, dict] = ({}, {})
        self._handles = []
        for model_blocks, store in ((teacher_blocks, self._captured[0]), (student_blocks, self._captured[1])):
            for path in self.blocks:
                if "feat" in self.weights:
                    self._handles.append(model_blocks[path].register_forward_hook(_keep(store, ("feat", path))))
                if "state" in self.weights:
                    scan = getattr(model_blocks[path], "scan_output", None)
                    if not isinstance(scan, nn.Module):
                        raise EdgelrError(f"SS2D block {path} has no scan_output module to hook")
                    self._handles.append(scan.register_forward_hook(_keep(store, ("state", path))))

    def close(self) -> None:
        """Remove the hooks from teacher and student."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def svd_term(self) -> torch.Tensor:
        """Mean over pairs of ||up @ down - W_r||^2 / ||W_r||^2 (0 without pairs)."""
        if not self.pairs:
            return torch.zeros(())
        return torch.stack([(pair.up.weight @ pair.down.weight - target).pow(2).sum() / target.pow(2).sum().clamp(min=1e-12)
                            for _, pair, target in self.pairs]).mean()

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted total on one batch, and each computed term's value (unweighted)."""
        teacher, student = self._models
        for store in self._captured:
            store.clear()
        inputs = _model_inputs(batch)
        terms: dict[str, torch.Tensor] = {}
        needs_blocks = "state" in self.weights or "feat" in self.weights
        if needs_blocks:
            with torch.no_grad():
                teacher(*inputs)
        if "task" in self.weights:
            value = self.task_loss(student, batch)
            terms["task"] = value[0] if isinstance(value, (tuple, list)) else value
        if needs_blocks and not self._captured[1]:  # the task loss did not run the student
            student(*inputs)
        if "svd" in self.weights:
            terms["svd"] = self.svd_term()
        if "state" in self.weights:
            terms["state"] = self._state_term()
        if "feat" in self.weights:
            teacher_out, student_out = self._captured
            terms["feat"] = torch.stack([_variance_scaled_mse(student_out["feat", p], teacher_out["feat", p])
                                         for p in self.blocks]).mean()
        total = sum(self.weights[t] * value for t, value in terms.items())
        return total, {t: float(value.detach()) for t, value in terms.items()}

    def _state_term(self) -> torch.Tensor:
        teacher_out, student_out = self._captured
        values = []
        for path, projection, how in zip(self.blocks, self.projections, self.initialised):
            theirs, mine = teacher_out["state", path], student_out["state", path]   # (b, k, d, t)
            if how == "least squares" and path not in self._fitted:
                _fit_projection(projection, theirs, mine.detach())
                self._fitted.add(path)
            target = torch.einsum("sd,bkdt->bkst", projection, theirs)
            values.append(_variance_scaled_mse(mine, target))
        return torch.stack(values).mean()


def _keep(store: dict, key) -> Callable:
    def hook(_module, _inputs, output):
        store[key] = output
    return hook


@torch.no_grad()
def _fit_projection(projection: nn.Parameter, theirs: torch.Tensor, mine: torch.Tensor) -> None:
    """The least-squares map over the channel axis from the teacher's scan output to the student's (ridge
    1e-6 of the mean eigenvalue, so that a channel constant 0 does not make it singular)."""
    x = theirs.transpose(2, 3).reshape(-1, theirs.shape[2]).double()   # (samples, d_teacher)
    y = mine.transpose(2, 3).reshape(-1, mine.shape[2]).double()       # (samples, d_student)
    gram = x.T @ x
    ridge = 1e-6 * float(gram.diagonal().mean().clamp(min=1e-12))
    solution = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), x.T @ y)
    projection.copy_(solution.T.to(projection.dtype))


# --- the loop ---------------------------------------------------------------------------------------
def _train_student(student: nn.Module) -> None:
    """Train mode, BatchNorm statistics frozen (see the module docstring)."""
    student.train()
    for module in student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _learning_rate(config: StructuredDistillConfig, step: int, elapsed: float) -> float:
    """A short linear warm-up, then a cosine from lr to FINAL_LR * lr over the steps or the time, whichever ends
    first."""
    progress = 0.0
    if config.steps is not None:
        progress = step / config.steps
    if config.time_limit is not None:
        progress = max(progress, elapsed / config.time_limit)
    cosine = FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * min(1.0, (step + 1) / WARMUP_STEPS) * cosine


def distill_ss2d(teacher: nn.Module, student: nn.Module, batches: Iterator, config: StructuredDistillConfig,
                 task_loss: Callable | None = None, progress: bool = True) -> dict:
    """Train `student` (in place) towards the frozen `teacher` on `batches` (each a tensor, or a tuple of input
    tensors that task_loss may read labels after) for config.steps or config.time_limit, whichever ends first,
    or until the batches run out. task_loss(student, batch) -> a loss (or a tuple led by one).
    Returns steps, seconds, the config, the terms computed, and each term's mean over the first and over the last 10% of the
    steps (None for a term not computed), with the total; and how the pairs and projections were matched."""
    loss = StructureAwareLoss(teacher, student, config, task_loss)
    modes = teacher.training, student.training
    teacher.eval()
    _train_student(student)
    trainable = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": params} for params in (trainable, list(loss.parameters())) if params]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    history: list[dict[str, float]] = []
    bar = progress_bar(total=config.steps, desc="distilling", unit="step", show=progress)
    started = time.perf_counter()
    try:
        for batch in batches:
            elapsed = time.perf_counter() - started
            if (config.steps is not None and len(history) >= config.steps) or \
                    (config.time_limit is not None and elapsed >= config.time_limit):
                break
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, len(history), elapsed)
            total, terms = loss(batch)
            if not total.requires_grad:
                raise EdgelrError("the distillation loss has no gradient: does the student have trainable parameters?")
            if not math.isfinite(float(total.detach())):
                raise EdgelrError(f"the distillation loss became {float(total)} at step {len(history)}; lower lr "
                                  f"(now {config.lr})")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(trainable + list(loss.parameters()), CLIP_NORM)
            optimizer.step()
            history.append({**terms, "total": float(total.detach())})
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['total']:.4g}")
    finally:
        bar.close()
        loss.close()
        teacher.train(modes[0])
        student.train(modes[1])
    seconds = time.perf_counter() - started
    window = max(1, math.ceil(REPORT_FRACTION * len(history)))

    def means(rows: list[dict[str, float]]) -> dict[str, float | None]:
        keys = (*TERMS, "total")
        return {k: (sum(r[k] for r in rows) / len(rows) if rows and k in rows[0] else None) for k in keys}

    return {
        "steps": len(history),
        "seconds": round(seconds, 2),
        "config": asdict(config),
        "terms": list(loss.weights),
        "first": means(history[:window]),
        "last": means(history[-window:]),
        "pairs": [path for path, _, _ in loss.pairs],
        "skipped_pairs": loss.skipped_pairs,
        "projections": dict(zip(loss.blocks, loss.initialised)),
    }
