"""Serving before batch work: batch processes give the CPU to Triton and the Serve replicas first.

On a small machine a fine-tune (its Ray Train workers), a reindex or a bulk upsert (their Ray Data
actors) would otherwise take the cores the search path needs: in issue 17 the demo's Triton aborted
during a fine-tune, its python backend stubs starved of CPU. Every place where batch work starts calls
`run_as_batch` once with `ray.batch_nice` (configs/stack.yaml). Triton and the replicas stay at 0.

Linux keeps a nice value per thread, not per process (setpriority(2), "BUGS"): the threads a Ray worker
started before (its gRPC and I/O threads, torch's pool) are lowered one by one; threads started later
inherit the value of the thread that starts them.
"""

from __future__ import annotations

import os
from pathlib import Path

THREADS = Path("/proc/self/task")


def run_as_batch(nice: int) -> int:
    """Raises the niceness of every thread of this process to `nice` (a thread already nicer keeps its
    own: this never raises a priority); returns the calling thread's niceness afterwards."""
    threads = [int(t.name) for t in THREADS.iterdir()] if THREADS.exists() else [0]  # 0: the caller (not Linux)
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:
            continue  # the thread ended meanwhile
    return os.getpriority(os.PRIO_PROCESS, 0)
