"""What the processes of one run (torchrun, accelerate) agree on: how many there are, where a flag is true, a barrier.

Every stop (a signal, a NaN) must happen on every process at the same step, or the others wait forever on the next
gradient all-reduce; these are the small collectives that make that so.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def ranks_where(flag: bool, device) -> list[int]:
    """The processes on which `flag` is true, known to every process (one small all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [0] if flag else []
    votes = torch.zeros(dist.get_world_size(), device=device)
    votes[dist.get_rank()] = float(flag)
    dist.all_reduce(votes, op=dist.ReduceOp.SUM)
    return [rank for rank, vote in enumerate(votes.tolist()) if vote]


def any_process(flag: bool, device) -> bool:
    """True on every process if it is true on any: all must stop at the same step, or the others wait forever on
    the next gradient all-reduce. One small all-reduce per step, against the gradients' millions."""
    return bool(ranks_where(flag, device))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
