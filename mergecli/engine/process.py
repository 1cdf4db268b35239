"""Process settings for a merge: the allocator tuned for big short-lived blocks, cores shared out."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc malloc.h


def tune_malloc() -> None:
    """glibc settings for big short-lived blocks (benchmarks/RESULTS.md): one heap
    ("arena") for all threads, since memory freed in one arena is not reused by another
    (with one per worker thread peak RSS was about 1.6x); blocks up to 256 MB from the heap
    rather than fresh mmaps, and freed memory kept for reuse up to 1 GB, since every
    fresh page of a fresh mmap is a page fault (a third of the CPU time went to the kernel).
    A no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    for option, value in (
        (M_ARENA_MAX, 1),
        (M_MMAP_THRESHOLD, 256 << 20),
        (M_TRIM_THRESHOLD, 1 << 30),
    ):
        mallopt(option, value)


def share_cores(workers: int) -> None:
    """Give torch's intra-op threads the cores per worker: jobs already run in parallel,
    and more threads than cores made every operation wait on the others (benchmarks:
    2 jobs on 2 cores, 1 thread each was 5-10% faster than 2 each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // max(1, workers)))


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM ignored while the block runs: cleanup after a failure or a first
    signal must finish, whatever further signals come (main thread only; elsewhere the
    handlers cannot be changed and the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
