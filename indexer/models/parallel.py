"""Running the models on several CPU cores: one intra-op thread per worker, several photos (or crops) at a time.

PyTorch's own parallelism splits each operation over its intra-op threads (OpenMP), and every operation ends in a
barrier where the threads wait for each other. When anything else runs on the machine (the reader threads decoding
the next photos, another program) a waiting thread spins on a core that someone else needs: measured on this
2-core machine under load, MTCNN over 30 camera photos took 43 s of wall time (30 s CPU) with 2 intra-op threads,
and 10.7 s (7.6 s CPU) as 2 workers of one thread each. MTCNN also spends much of its time in small operations
and Python that do not split at all. So on CPU the detector and the embedder run their batches as ``workers``
threads of one intra-op thread each (``choose_workers``); on a GPU, one worker feeds the device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

from indexer.models.device import DeviceInfo

T = TypeVar("T")
R = TypeVar("R")
_threads_lock = threading.Lock()
_single_threaded = 0  # callers inside one_intra_op_thread, all threads together
_before = 1           # torch's intra-op threads before the first of them came in
_worker = threading.local()  # .inside: this thread is one of map_workers' threads


def choose_workers(requested: int, device: DeviceInfo) -> tuple[int, str]:
    """How many photos (or crop chunks) the models work on at once, and why: a pure function of the device."""
    if requested > 0:
        return requested, "set by ingest.model_workers"
    if device.kind == "cuda":
        return 1, f"{device.describe()}: 1 (one worker feeds the GPU; its kernels are the parallelism)"
    n = max(1, device.cpu_cores)
    return n, (f"{device.describe()}: {n}, one per core with one intra-op thread each (PyTorch's intra-op threads "
               "spin at every barrier when other work shares the cores: see indexer/models/parallel.py)")


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """PyTorch runs each operation on the calling thread alone while any caller is inside (process-wide setting,
    restored when the last caller leaves)."""
    global _single_threaded, _before
    with _threads_lock:
        if _single_threaded == 0:
            _before = torch.get_num_threads()
            torch.set_num_threads(1)
        _single_threaded += 1
    try:
        yield
    finally:
        with _threads_lock:
            _single_threaded -= 1
            if _single_threaded == 0:
                torch.set_num_threads(_before)



def _enter_worker() -> None:
    _worker.inside = True


def available_workers(workers: int) -> int:
    """``workers``, or 1 on a thread that is itself a model worker: work a worker was handed (a photo's
    detection, then its faces' embedding) runs on that worker, not on a second pool over the same cores."""
    return 1 if getattr(_worker, "inside", False) else workers


def map_workers(fn: Callable[[T], R], chunks: Sequence[T], workers: int) -> list[R]:
    """``[fn(c) for c in chunks]``, ``workers`` at a time on threads of one intra-op thread each; in order. Chunks
    are taken in order as workers come free. An exception in any chunk is raised here, after the others finished
    (no thread is left running). Called from a model worker, it runs the chunks there, one after another."""
    workers = available_workers(workers)
    if workers <= 1 or len(chunks) <= 1:
        return [fn(c) for c in chunks]
    with one_intra_op_thread(), ThreadPoolExecutor(min(workers, len(chunks)), thread_name_prefix="model",
                                                   initializer=_enter_worker) as pool:
        return list(pool.map(fn, chunks))


def plan_chunks(groups: Sequence[Sequence[int]], costs: Sequence[float], workers: int,
                most: int) -> list[list[int]]:
    """Chunks of work for ``workers``: each group (items that must share a chunk's batches, e.g. photos of one
    shape) cut into near-equal pieces of at most ``most`` items, about ``workers`` pieces for a group that holds
    all the items, costliest chunk first (``costs``: per item). Taken in that order as workers come free, the
    long chunks start first and the short ones fill the gaps at the end (longest-processing-time first), so no
    worker waits long for the last one. One worker: every group whole, up to ``most``."""
    total = sum(len(g) for g in groups)
    out: list[list[int]] = []
    for group in groups:
        if not group:
            continue
        pieces = max(-(-len(group) // most), -(-len(group) * max(workers, 1) // max(total, 1)) if workers > 1 else 1)
        out += [list(group[r.start:r.stop]) for r in split(len(group), pieces)]
    return sorted(out, key=lambda chunk: -sum(costs[i] for i in chunk))


def split(n: int, parts: int) -> list[range]:
    """``range(n)`` in ``parts`` contiguous, near-equal ranges (fewer when n < parts; none when n == 0)."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]
