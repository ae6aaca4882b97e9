"""CPU threads that fit the machine's load.

torch takes one thread per core, and on cores that other work keeps busy its threads wait on each other at every
parallel region: the tiny SimPO example trained 5.9x slower on 2 threads than on 1 beside one busy process on
2 cores; a tiny SFT run ended with the same adapter, bit for bit, on 1 and 2 threads."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("phitune")
_SELF = 0.5  # this process's own share of the 1-minute load average as it starts (importing, reading the config)
_DONE = []  # chosen once per process: a second model (eval's base and fine-tuned, a teacher) keeps the choice


def use_free_cores() -> None:
    """On a CPU-only machine whose cores other work keeps busy, give torch only the free ones, and say so once.

    The free cores are torch's default thread count less the 1-minute load average of other work (this process's
    start discounted). OMP_NUM_THREADS, when set, is the user's (or torchrun's) choice and is kept, as is a GPU run,
    whose CPU threads only feed the GPU."""
    import torch

    if _DONE or os.environ.get("OMP_NUM_THREADS") or torch.cuda.is_available() or not hasattr(os, "getloadavg"):
        return
    _DONE.append(True)
    cores, load = torch.get_num_threads(), os.getloadavg()[0]
    threads = max(1, cores - round(max(0.0, load - _SELF)))
    if threads < cores:
        torch.set_num_threads(threads)
        log.info("using %d of %d CPU threads: other work keeps the rest busy (load %.1f); OMP_NUM_THREADS=N "
                 "chooses", threads, cores, load)
