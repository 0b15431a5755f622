"""Distributed training on torch.distributed: which process this is, and the few collectives the loop needs.

Launched by torchrun (`torchrun --nproc-per-node N -m edgelr distill ...`, or `edgelr distill --nproc N`),
every process reads WORLD_SIZE, RANK and LOCAL_RANK from its environment and joins one process group:
gloo on CPU, NCCL on CUDA GPUs (one GPU per process, cuda:LOCAL_RANK). Without WORLD_SIZE > 1 (and no
group already set up by the caller), `World` is the single process and every collective is a no-op,
so a single-process run computes exactly what it computed before distributed training existed.

The scheme (edgelr.train.loop): every process prepares the same global batch (same data order, same
augmentation draws) and takes its equal slice; batch statistics (output scales, feature variances,
quantization ranges) are summed or maxed over the processes; the gradients of the per-slice mean losses
are averaged (an explicit all-reduce, not DistributedDataParallel: one flat buffer per step), which is
the gradient of the global batch's mean loss. Rank 0 decides when to stop and alone writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from edgelr.errors import EdgelrError

try:
    import torch
    import torch.distributed as dist
except ImportError:  # torch is only needed for training
    torch = None  # type: ignore[assignment]


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun) started this one among: WORLD_SIZE, else 1."""
    text = os.environ.get("WORLD_SIZE", "1") or "1"
    try:
        size = int(text)
    except ValueError:
        raise EdgelrError(f"WORLD_SIZE={text!r} in the environment is not a number of processes") from None
    if torch is not None and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(size, 1)


@dataclass
class World:
    """This process's place in a distributed run (size 1: the only process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where the collectives' tensors live (a CUDA device under NCCL)
    owned: bool = False  # join() set the process group up, and close() ends it

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, writes checkpoints and the output, and decides when to stop."""
        return self.rank == 0

    def sum(self, array: np.ndarray) -> np.ndarray:
        """ARRAY (float64) summed elementwise over the processes."""
        if self.size == 1:
            return array
        t = torch.from_numpy(np.ascontiguousarray(array, np.float64)).to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def max_(self, tensor) -> None:
        """TENSOR replaced, in place, by its elementwise max over the processes."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)

    def average_gradients(self, params) -> None:
        """Every parameter's .grad replaced by its mean over the processes (one flat all-reduce)."""
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.size
        at = 0
        for g in grads:
            g.copy_(flat[at : at + g.numel()].view_as(g))
            at += g.numel()

    def mean(self, value: float) -> float:
        """VALUE averaged over the processes."""
        if self.size == 1:
            return value
        return float(self.sum(np.array([value], np.float64))[0]) / self.size

    def from_main(self, value: float) -> float:
        """Rank 0's VALUE, on every process (so that all of them take the same decision)."""
        if self.size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group if join() set it up."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False


def join(device: str) -> tuple[World, str]:
    """This process's World, setting up the process group under a launcher, and the device it trains on
    (cuda -> cuda:LOCAL_RANK in a distributed run)."""
    if torch is None or not dist.is_available():
        if launched_world_size() > 1:
            raise EdgelrError("WORLD_SIZE > 1, but this torch has no torch.distributed; run one process")
        return World(), device
    if not dist.is_initialized() and launched_world_size() == 1:
        return World(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if torch.device(device).index is None:
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise EdgelrError(f"process {local_rank} of this machine has no GPU of its own ({count} visible); "
                                  "start at most one process per GPU")
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    owned = False
    if not dist.is_initialized():
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise EdgelrError(f"WORLD_SIZE is set but {key} is not: start distributed training with torchrun "
                                  "(or edgelr distill --nproc N)")
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owned = True
    backend = dist.get_backend()
    world = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank,
                  device=device if backend == "nccl" else "cpu", owned=owned)
    return world, device
