"""The training loop: AdamW on the student's weights against the teacher in ONNX Runtime, step by step.

Every step draws one global batch (edgelr.train.data.Stream: a pure function of (seed, step)), runs the
teacher on it in ONNX Runtime and the student in torch, and lowers the Objective (edgelr.train.losses).
The model runs in eval mode (BatchNorm uses its stored statistics, exactly as the ONNX graph does; no
dropout). The learning rate warms up linearly, then decays on a cosine to 0 (`schedule`).

Resuming. A checkpoint holds the student's state, AdamW's and the schedule's state, the step, the loss
history and the torch/numpy RNG states, written atomically; a resumed run ends with bit-identical
weights to an uninterrupted one (on CPU, same thread count and the same number of processes; not with
anneal_by_time, whose schedule follows the clock). A checkpoint records the settings it was made with
(`meta`) and refuses to resume another run.

Distributed (edgelr.train.parallel): each process takes its slice of every global batch, the gradients
are averaged, batch statistics are reduced, so N processes reach the weights one process reaches with
the same global batch (up to float rounding). Rank 0 alone prints, writes checkpoints, and decides when
the time limit is reached.

Threads: the teacher's ONNX Runtime session uses EDGELR_ORT_THREADS if set (else ORT's default; in a
distributed run, torch's thread count), with its worker threads not spinning between runs. On a 2-core
machine the teacher and the student run one after the other, each with both cores.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.errors import EdgelrError
from edgelr.io import model as model_io
from edgelr.io.progress import progress_bar
from edgelr.train.convert import TorchGraph, ort_threads, to_tensors
from edgelr.train.data import Data, Stream, chunks, shard
from edgelr.train.losses import Objective
from edgelr.train.parallel import World

try:
    import torch
except ImportError:  # torch is only needed for training
    torch = None  # type: ignore[assignment]

LOG_EVERY = 5  # the returned loss history: the mean loss of each window of this many steps
# a teacher of at most this many bytes, all of them in memory, gets its ONNX Runtime session from memory
# (as edgelr.io.model.ort_session decides); a larger one goes through a file
TEACHER_IN_MEMORY_BYTES = 256 << 20


@dataclass
class Job:
    """What one training run works on; the options come from a DistillConfig (edgelr.train.distill)."""

    module: object  # the student, from edgelr.train.convert.to_torch, on `device`
    info: TorchGraph
    session: object  # the teacher's ONNX Runtime session, returning `teacher_outputs`
    dataset: Data
    inputs: list[str]  # the model's input names, in order
    teacher_outputs: list[str]  # the teacher's outputs, then its aligned features
    objective: Objective
    total: int  # steps planned
    device: str
    start: float  # time.perf_counter() when the run began (time_limit counts from it)
    meta: dict  # what a checkpoint must match to be resumed
    world: World = field(default_factory=World)
    progress: bool = True


def schedule(total: int, warmup: int, clock: Callable[[], float] | None = None):
    """The learning rate's factor: a linear warm-up over WARMUP steps, then a cosine decay to 0 at step
    TOTAL, or with CLOCK (the fraction of the time budget spent) at whichever comes first."""
    def factor(step: int) -> float:  # LambdaLR calls it with the number of steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if clock is not None:
            progress = max(progress, clock())
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def autocast(device: str, precision: str):
    """The student's forward pass in bfloat16 (weights, gradients and the loss stay float32) with
    precision 'bf16'; a no-op for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@contextlib.contextmanager
def teacher_session(model: ir.Model, extra: list[str], threads: int = 0):
    """The teacher in ONNX Runtime, with the intermediate tensors EXTRA as outputs too."""
    if extra:
        known = {v.name: v for n in model.graph for v in n.outputs}
        model.graph.outputs.extend(known[name] for name in extra if name not in {o.name for o in model.graph.outputs})
    size = model_io.model_bytes(model)
    inline = all(v.const_value is None or not isinstance(v.const_value, ir.ExternalTensor)
                 for v in model.graph.initializers.values())
    if size <= TEACHER_IN_MEMORY_BYTES and inline:
        import onnxruntime as ort

        # ORT's worker threads spin between runs by default, taking the cores torch needs next
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        yield ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return
    with model_io.ort_session(model, threads=threads) as session:
        yield session


def teacher_threads(world: World) -> int:
    """ONNX Runtime threads for the teacher: EDGELR_ORT_THREADS; in a distributed run torch's share of
    the cores (torchrun sets OMP_NUM_THREADS) rather than ORT's default of every core per process."""
    return ort_threads() or (torch.get_num_threads() if world.size > 1 else 0)


# ---------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save STATE to PATH atomically (a temporary file, then a rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def numpy_rng_state() -> dict:
    """numpy's global RNG state as tensors and numbers (what torch.load(weights_only=True) reads)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


def _load_checkpoint(path: Path, device: str, meta: dict) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise EdgelrError(f"{path}: not a readable distillation checkpoint ({model_io.first_line(exc)})") from None
    if state.get("meta") != meta:
        diff = sorted(k for k in set(meta) | set(state.get("meta", {})) if meta.get(k) != state.get("meta", {}).get(k))
        raise EdgelrError(f"{path}: made for another run (differs in {', '.join(diff)}); "
                          "use the same models and settings, or resume=False to start over")
    return state


# ---------------------------------------------------------------------------------------------------
# the loop


def _optimizer(info: TorchGraph, config):
    groups: dict[tuple[float, bool], list] = {}  # (lr factor, decayed) -> parameters
    seen = set()
    lr_scale = dict(config.lr_scale)
    for value, p in info.params.items():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            names = (value, info.weights[value].node)
            factor = next((float(f) for pattern, f in lr_scale.items()
                           if any(n and fnmatch.fnmatchcase(n, pattern) for n in names)), 1.0)
            groups.setdefault((factor, p.dim() >= 2), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "lr": config.lr * factor, "weight_decay": config.weight_decay if decayed else 0.0}
         for (factor, decayed), ps in sorted(groups.items())], lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def train(job: Job, config) -> dict:
    """Train JOB's student with CONFIG (a DistillConfig: batch, lr, seed, checkpoint, ...); the statistics."""
    module, info, dataset, world, device = job.module, job.info, job.dataset, job.world, job.device
    total, start, time_limit = job.total, job.start, config.time_limit
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    if device.startswith("cuda"):
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    trainable = [p for p in info.params.values() if p.requires_grad]
    if not trainable:
        raise EdgelrError(f"{info.path}: no trainable float32 weight (Conv, Gemm, MatMul, norms) to distil")
    optimizer = _optimizer(info, config)
    warmup = max(1, min(100, total // 20))
    clock, shared_clock = None, [0.0]
    if config.anneal_by_time and time_limit:
        if world.size == 1:
            clock = lambda: (time.perf_counter() - start) / time_limit
        else:  # rank 0's clock, broadcast before each scheduler step
            clock = lambda: shared_clock[0]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(total, warmup, clock))
    stream = Stream(len(dataset), config.batch, config.seed)
    share = config.batch // world.size  # samples per process and step
    batched = all(dataset.batched.values())
    reduce = world.sum if world.size > 1 else None
    augment = config.augment not in (False, "none")
    checkpoint = Path(config.checkpoint) if config.checkpoint is not None else None
    step, losses, window = 0, [], []
    resumed_from = None

    if checkpoint is not None and config.resume and checkpoint.exists():
        state = _load_checkpoint(checkpoint, device, job.meta)
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses, window = int(state["step"]), [tuple(x) for x in state["losses"]], list(state["window"])
        torch.set_rng_state(state["torch_rng"].cpu())
        set_numpy_rng_state(state["numpy_rng"])
        resumed_from = step

    def save():
        if checkpoint is None or not world.main:
            return
        save_checkpoint(checkpoint, {
            "meta": job.meta, "module": module.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "losses": [list(x) for x in losses],
            "window": list(window), "torch_rng": torch.get_rng_state(), "numpy_rng": numpy_rng_state(),
            "world_size": world.size,
        })

    teacher_s = student_s = data_s = 0.0
    taken = 0
    stopped = False
    loss_value = float("nan")
    bar = progress_bar(total=total, initial=step, desc="distilling", unit="step", show=job.progress and world.main)
    try:
        while step < total:
            if time_limit is not None and world.from_main(float(time.perf_counter() - start > time_limit)):
                stopped = True
                break
            t_data = time.perf_counter()
            indices = stream.indices(step)
            whole = dataset.batch(indices, stream.augmentation(step) if augment else None)  # the global batch
            mine = indices[world.rank * share : (world.rank + 1) * share]
            feeds = chunks(shard(whole, world.rank, world.size), dataset.batched)
            t0 = time.perf_counter()
            data_s += t0 - t_data
            targets = [job.session.run(job.teacher_outputs, feed) for feed in feeds]
            t1 = time.perf_counter()
            scales = job.objective.scales(targets, reduce)
            variances = None  # one forward's features: the global batch's, or a single sample's
            if reduce is not None and batched and job.objective.n_features:
                variances = job.objective.variances(targets[0], reduce)
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            per_chunk = len(mine) // len(feeds)
            for c, (feed, target) in enumerate(zip(feeds, targets)):
                with autocast(device, config.train_precision):
                    outputs = module(*to_tensors(feed, job.inputs, device))
                if config.train_precision != "fp32":
                    outputs = tuple(o.float() if o.is_floating_point() else o for o in outputs)
                loss = job.objective(outputs, target, scales, mine[c * per_chunk : (c + 1) * per_chunk], device,
                                     variances)
                (loss / len(feeds)).backward()
                loss_value += float(loss.detach()) / len(feeds)
            loss_value = world.mean(loss_value)
            if not math.isfinite(loss_value):
                raise EdgelrError(f"the distillation loss became {loss_value} at step {step}; lower lr (now {config.lr})")
            world.average_gradients(trainable)
            if config.clip:
                torch.nn.utils.clip_grad_norm_(trainable, config.clip)
            optimizer.step()
            if clock is not None and world.size > 1:
                shared_clock[0] = world.from_main((time.perf_counter() - start) / time_limit)
            scheduler.step()
            t2 = time.perf_counter()
            teacher_s += t1 - t0
            student_s += t2 - t1
            step += 1
            taken += 1
            window.append(loss_value)
            if len(window) == LOG_EVERY or step == total:
                losses.append((step, float(np.mean(window))))
                window = []
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                save()
        if window and stopped:
            losses.append((step, float(np.mean(window))))
            window = []
        save()
    finally:
        bar.close()
    return {
        "steps": step,
        "planned_steps": total,
        "steps_this_run": taken,
        "stopped_early": stopped,
        "resumed_from": resumed_from,
        "final_loss": losses[-1][1] if losses else None,
        "losses": losses,
        "trainable_parameters": int(sum(p.numel() for p in trainable)),
        "device": device,
        "world_size": world.size,
        "teacher_seconds_per_step": teacher_s / taken if taken else None,
        "student_seconds_per_step": student_s / taken if taken else None,
        "data_seconds_per_step": data_s / taken if taken else None,
    }
