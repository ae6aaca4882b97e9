"""What the processes of one run (torchrun, accelerate) agree on: how many there are, where a flag is true, a barrier.

Every stop (a signal, a NaN) must happen on every process at the same step, or the others wait forever on the next
gradient all-reduce; these are the small collectives that make that so.
"""

from __future__ import annotations

import itertools
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from phitune.errors import PhituneError
from phitune.runlock import RunLock, is_main_process


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


def failures_elsewhere(failure: Exception | None, device) -> list[Exception]:
    """The errors other processes met where this one met `failure` (None: it succeeded), rebuilt here so that this
    process stops as they do: an OSError keeps its errno, message and file (a full disk stays a full disk, for
    lifecycle.save_failure's one line); any other error is a RuntimeError with its text and process. Every process
    must call it at the same point; one small all-reduce, and a gather of the messages only when one failed."""
    import torch.distributed as dist

    failing = ranks_where(failure is not None, device)
    if not failing or world_size() == 1:
        return []
    described: list = [None] * dist.get_world_size()
    own = None if failure is None else (getattr(failure, "errno", None), getattr(failure, "strerror", None) or
                                        str(failure), getattr(failure, "filename", None))
    dist.all_gather_object(described, own)
    rebuilt = []
    for rank in (rank for rank in failing if rank != dist.get_rank()):
        errno, text, filename = described[rank]
        rebuilt.append(OSError(errno, text, filename) if errno else RuntimeError(f"{text} (on process {rank})"))
    return rebuilt


def tell_the_job(key: str, value: str | None = None) -> str:
    """Before the process group exists: the main process (global rank 0) says `value` under `key`, and every other
    process of the job waits until it has, and gets it. Through the key-value store torch.distributed's env://
    rendezvous makes (torchrun's agent's store, or the one rank 0 hosts, which the process group later shares); keys
    are per restart attempt. Waiting is a Python loop, so SIGTERM (torchrun's, when rank 0 has failed) stops it at
    once. Outside torchrun, `value` itself."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return value
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"phitune/attempt{attempt}/", _job_store())
    if os.environ.get("RANK", "0") == "0":
        store.set(key, value)
        return value
    try:
        while not store.check([key]):
            time.sleep(0.05)
        return store.get(key).decode()
    except RuntimeError as exc:  # rank 0's store went away with it
        raise PhituneError(f"process 0 stopped before it said {key} ({exc})") from None


_STORES: list = []  # the main process's store: the process group's rendezvous shares its server (multi_tenant)


def _job_store():
    """The job's store, connected to again until it answers (rank 0 may not have started its server yet); each
    try is short, so a signal is handled between tries."""
    from datetime import timedelta

    import torch.distributed as dist

    while True:
        try:
            store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=2)))
        except RuntimeError:  # no server to connect to yet (DistNetworkError, DistStoreError are RuntimeErrors)
            time.sleep(0.1)
            continue
        _STORES.append(store)
        return store


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def restarts_reuse_the_store() -> bool:
    """Whether torchrun will restart these workers (--max-restarts) with the store its agent shares across
    attempts. Restarted workers then find the previous attempt's keys there, and gloo or NCCL can read a dead
    worker's address instead of its successor's: the restart fails ("Gloo connectFullMesh failed ... Connection
    refused") or waits on a connection that never comes (pytorch/pytorch#135712, #167288). Seen with torch 2.13 and
    c10d rendezvous: both restarts failed so, on the previous attempt's port. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    (set where torchrun starts) gives each attempt a store of its own; static rendezvous (--master-port) always
    shares one."""
    return (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


_LOCKS_TAKEN = itertools.count()  # every rank takes its job's locks in the same order: one key per lock


@contextmanager
def job_lock(output_dir: Path):
    """The directory's lock for the whole job: RANK 0 holds it while the block runs; under torchrun every other rank
    first waits for rank 0 to say whether it got it, so none reads a directory another run is writing, and a refused
    job stops on every rank at once (the others exit quietly, rank 0 says why)."""
    key = f"lock{next(_LOCKS_TAKEN)}"
    if not is_main_process():
        if tell_the_job(key) != "held":
            raise PhituneError(f"process 0 could not lock {output_dir}")
        yield
        return
    try:
        lock = RunLock(output_dir).acquire()
    except PhituneError:
        tell_the_job(key, "refused")
        raise
    try:
        tell_the_job(key, "held")
        yield lock
    finally:
        lock.release()
