"""Process-group setup from torchrun's standard variables, and the few collectives training and evaluation need.

Why: the model never imports distributed code; the trainer, the strategies and the evaluation runner get one
`DistContext` telling them their rank, world size and device. Launching is plain torchrun (single node or multi-node through ``--nnodes``,
``--node_rank``, ``--master_addr``), which sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. Sharded strategies
also work in one process without torchrun (a world of one over an in-memory store), so a seed script that asks for
ZeRO-3 runs unchanged on a laptop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, its ``local_rank`` on the node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes logs, exports and renames checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when a process group is initialised (even a world of one)."""
        return dist.is_available() and dist.is_initialized()


def init_distributed(needs_process_group: bool) -> DistContext:
    """Initialise the default process group when launched by torchrun or when the strategy needs one.

    Args:
        needs_process_group: True for DDP/FSDP2 (a one-process group is created without torchrun).

    Returns:
        The process's `DistContext`; the backend is NCCL on CUDA, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (world_size > 1 or needs_process_group) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_reduce_sum(value: float, context: DistContext) -> float:
    """Sum a Python number over all ranks (identity without a process group)."""
    return all_reduce_sums([value], context)[0]


def all_reduce_sums(values: list[float], context: DistContext) -> list[float]:
    """Sum several Python numbers over all ranks in one collective (identity without a process group)."""
    if not context.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(context: DistContext) -> None:
    """Wait for every rank (no-op without a process group)."""
    if context.is_distributed:
        dist.barrier()


def broadcast_object(value: object, context: DistContext) -> object:
    """Rank 0's ``value`` on every rank."""
    if not context.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
