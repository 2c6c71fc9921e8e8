"""Two stages on the same workers: jobs that each produce items (detection: a chunk of photos -> their face crops),
and a batched stage over those items (embedding: crops -> vectors), with no barrier between them.

Each worker takes, in this order: a full batch of pending items; else the next first-stage job; else whatever items
are pending (a short batch beats an idle core; once no job can add to them, a share of them, so the last items are
split among the workers); else it waits while a first-stage job is still running somewhere (it may produce more),
and leaves when nothing is left. So embedding starts as soon as the first photos' faces are
cut, a photo with sixteen faces and fifteen photos with one face each fill the same batches, and the workers stay
busy to the end. A failure stops every worker at its next step and is raised by ``run_two_stages`` (``map_workers``
raises the first one, after all threads finished).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from indexer.models.parallel import map_workers, split

J = TypeVar("J")
T = TypeVar("T")


class _Work(Generic[J, T]):
    def __init__(self, jobs: Sequence[J], batch: int, workers: int) -> None:
        self.jobs: deque[J] = deque(jobs)
        self.pending: list[T] = []
        self.ready: deque[list[T]] = deque()  # the last items, split into one share a worker
        self.batch = max(1, batch)
        self.workers = max(1, workers)
        self.running = 0          # first-stage jobs in progress
        self.failed = False
        self.cond = threading.Condition()

    def next(self) -> tuple[str, J | list[T]] | None:
        """("first", job), ("second", items), or None when this worker is done."""
        with self.cond:
            while True:
                if self.failed:
                    return None
                if len(self.pending) >= self.batch:
                    return "second", self._take(self.batch)
                if self.jobs:
                    self.running += 1
                    return "first", self.jobs.popleft()
                if self.ready:
                    return "second", self.ready.popleft()
                if self.pending and self.running:
                    return "second", self._take(len(self.pending))
                if self.pending:  # the last items, which no job can add to: one share a worker
                    self.ready.extend(self.pending[r.start:r.stop] for r in split(len(self.pending), self.workers))
                    self.pending = []
                    return "second", self.ready.popleft()
                if self.running == 0:
                    return None
                self.cond.wait()

    def _take(self, n: int) -> list[T]:
        items, self.pending = self.pending[:n], self.pending[n:]
        return items

    def produced(self, items: list[T] | None) -> None:
        with self.cond:
            self.running -= 1
            if items is None:
                self.failed = True
            else:
                self.pending.extend(items)
            self.cond.notify_all()

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


def run_two_stages(jobs: Sequence[J], first: Callable[[J], list[T]], second: Callable[[list[T]], None],
                   batch: int, workers: int) -> None:
    """Run ``first`` on every job and ``second`` on the items they produce, in batches of at most ``batch``, on
    ``workers`` model workers (``map_workers``: one PyTorch thread each); one worker runs it all in turn here."""
    workers = max(1, workers) if jobs else 0
    work: _Work[J, T] = _Work(jobs, batch, workers)

    def worker(_: int) -> None:
        while (step := work.next()) is not None:
            kind, payload = step
            if kind == "first":
                items = None
                try:
                    items = first(payload)
                finally:
                    work.produced(items)
            else:
                try:
                    second(payload)
                except BaseException:
                    work.fail()
                    raise

    map_workers(worker, list(range(workers)), workers)
