"""The read stage: stat, read, hash, classify against the store, decode; and the one read-ahead that feeds it.

A reader never blocks the pipeline on a file that is not a regular file (a FIFO named ``x.jpg``, a socket, a device):
the type is checked before opening, and the open is non-blocking. Everything that can go wrong with one file
becomes its recorded reason; the run goes on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from indexer import faults
from indexer.config import Settings
from indexer.errors import ImageError, ReadStalledError
from indexer.images import decode
from indexer.pipeline.records import ReadItem, Verdict, classify_stored
from indexer.store.lmdb_store import FaceStore

log = logging.getLogger("faceindex.read")
READ_CHUNK = 1 << 20


class FileReadError(Exception):
    """A file could not be read; ``str`` is the reason recorded in the store, ``st`` its stat when known (so an
    unchanged failed file is not read again by the next scan)."""

    def __init__(self, reason: str, st: os.stat_result | None = None) -> None:
        super().__init__(reason)
        self.st = st


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_regular_file(path: str, max_bytes: int) -> tuple[os.stat_result, bytes]:
    """The bytes of a regular file, never blocking on a FIFO or device and never reading past ``max_bytes``."""
    st = None
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise FileReadError("not a regular file", st)
        if st.st_size > max_bytes:
            raise FileReadError(f"too large: {st.st_size / 2**20:.0f} MB > ingest.max_file_mb {max_bytes // 2**20}",
                                st)
        # O_NONBLOCK: if the path was swapped for a FIFO after the stat, the open returns instead of waiting for a
        # writer; the fstat below then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        reason = "a broken symbolic link" if os.path.islink(path) else "vanished before it could be read"
        raise FileReadError(reason) from None
    except PermissionError:
        raise FileReadError("unreadable: permission denied", st) from None
    except OSError as exc:
        raise FileReadError(f"unreadable: {exc.strerror or exc}", st) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileReadError("not a regular file", st)
        chunks, total = [], 0
        faults.reached("read")
        while total <= max_bytes:
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise FileReadError(f"too large: grew past ingest.max_file_mb {max_bytes // 2**20} while being read", st)
        return st, b"".join(chunks)
    except OSError as exc:
        raise FileReadError(f"unreadable: {exc.strerror or exc}", st) from None
    finally:
        os.close(fd)


class Reader:
    """Stat, read, hash, classify and decode one file. Runs in worker threads: no model, one short read txn."""

    def __init__(self, settings: Settings, store: FaceStore) -> None:
        self.max_bytes = settings.ingest.max_file_mb * 2**20
        self.max_pixels = settings.ingest.max_pixels
        self.store = store
        # Draft mode may shrink big JPEGs down to what the detector looks at; small faces are cropped from a second,
        # full decode of the same bytes (FaceDetector.crop_source).
        self.max_side = settings.detector.max_side

    def __call__(self, path: str) -> ReadItem:
        started = time.perf_counter()
        try:
            st, data = read_regular_file(path, self.max_bytes)
        except FileReadError as exc:
            size, mtime_ns = (exc.st.st_size, exc.st.st_mtime_ns) if exc.st is not None else (0, 0)
            return ReadItem(path, size=size, mtime_ns=mtime_ns, error=str(exc))
        # A file still being written may have grown since the stat: the size is what was read (the watcher
        # re-reads it once it is stable).
        item = ReadItem(path, size=len(data), mtime_ns=st.st_mtime_ns, sha256=file_sha256(data))
        verdict, source = self.classify(item)
        read_s = time.perf_counter() - started
        item = replace(item, verdict=verdict, source=source, seconds=(("read", read_s),))
        if not verdict.needs_faces:
            return item
        if not data:
            return replace(item, error="empty file (0 bytes)")
        started = time.perf_counter()
        try:
            image = decode(data, self.max_pixels, self.max_side, name=path)
        except ImageError as exc:
            return replace(item, error=str(exc))
        decode_s = time.perf_counter() - started
        started = time.perf_counter()
        image.detection_copy(self.max_side)  # the detector's input, made here, off the models' thread
        resize_s = time.perf_counter() - started
        return replace(item, image=image, orig_size=image.orig_size,
                       seconds=(("read", read_s), ("decode", decode_s), ("resize", resize_s)))

    def classify(self, item: ReadItem) -> tuple[Verdict, str | None]:
        with self.store.read() as txn:
            return classify_stored(self.store, txn, item)


@dataclass
class _Job:
    path: str
    done: threading.Event = field(default_factory=threading.Event)
    item: ReadItem | None = None
    started: float | None = None    # monotonic time a worker picked it up
    worker: _Worker | None = None
    cancelled: bool = False


class _Worker(threading.Thread):
    """One reader thread. A daemon thread: one stuck in a read that never returns (a dead NFS or FUSE mount, where
    even SIGKILL waits for the kernel) must not keep the process alive at exit, as a ThreadPoolExecutor's would."""

    def __init__(self, jobs: queue.SimpleQueue, reader: Callable[[str], ReadItem], n: int) -> None:
        super().__init__(name=f"read-{n}", daemon=True)
        self.jobs, self.reader = jobs, reader
        self.retired = False   # set when its read timed out: it exits if that read ever returns

    def run(self) -> None:
        while not self.retired:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled:
                continue
            job.worker, job.started = self, time.monotonic()
            try:
                job.item = self.reader(job.path)
            except Exception as exc:  # a reader bug must cost one file, not the run
                log.exception("reading %r failed", job.path)
                job.item = ReadItem(job.path, error=f"read failed: {type(exc).__name__}: {str(exc)[:160]}")
            job.done.set()


class ReadAhead:
    """Files are read in reader threads while the models work on the previous batch: the pipeline's one read-ahead.

    ``take`` returns the reads of a batch (reading what was not asked for ahead); ``ahead`` starts reading the
    next batch's files and forgets reads of any others (bounded memory). A read is used only while the file's
    size and mtime are still the ones read; otherwise it is read again.

    Nothing here waits without a bound: a read that takes longer than ``timeout_s`` is given up (the file is
    recorded as failed, without its stat so that the next run tries again) and its thread replaced; once ``stop``
    is set, ``take`` returns the reads that are done and drops the rest (not recorded: read again next run);
    ``close`` does not wait for a stuck thread. More than ``max_stalled`` hung reads end the run with
    ``ReadStalledError`` instead of piling up threads.
    """

    def __init__(self, reader: Callable[[str], ReadItem], workers: int, stop: threading.Event | None = None,
                 timeout_s: float = 120.0, max_stalled: int = 8) -> None:
        self.reader = reader
        self.stop = stop or threading.Event()
        self.timeout_s, self.max_stalled = timeout_s, max_stalled
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.futures: dict[str, _Job] = {}
        self.workers: list[_Worker] = []
        self.stalled = 0
        for _ in range(max(1, workers)):
            self._spawn()

    def _spawn(self) -> None:
        worker = _Worker(self.jobs, self.reader, len(self.workers) + self.stalled)
        self.workers.append(worker)
        worker.start()

    def _start(self, paths: list[str]) -> None:
        for path in paths:
            if path not in self.futures:
                self.futures[path] = job = _Job(path)
                self.jobs.put(job)

    def take(self, paths: list[str]) -> list[ReadItem]:
        self._start(paths)
        items = []
        for path in paths:
            item = self._wait(self.futures.pop(path))
            if item is not None and item.error is None and not _still_as_read(item):
                self._start([path])  # changed since it was read ahead: read it again
                item = self._wait(self.futures.pop(path))
            if item is None:  # stopping: the rest of the batch is left for the next run
                break
            items.append(item)
        return items

    def _wait(self, job: _Job) -> ReadItem | None:
        """The job's item; a timed-out item if it hung; None once ``stop`` is set."""
        while not job.done.wait(0.1):
            if self.stop.is_set():
                job.cancelled = True
                return None
            if job.started is not None and time.monotonic() - job.started > self.timeout_s:
                return self._give_up(job)
        return job.item

    def _give_up(self, job: _Job) -> ReadItem:
        job.cancelled = True
        if job.worker is not None and job.worker in self.workers:
            job.worker.retired = True
            self.workers.remove(job.worker)
            self.stalled += 1
            if self.stalled > self.max_stalled:
                raise ReadStalledError(f"{self.stalled} reads hung for more than {self.timeout_s:.0f} s (last: "
                                       f"{job.path}); is the disk or network mount holding the photos answering?")
            self._spawn()
        log.warning("read of %r timed out after %.0f s; recorded as failed, tried again next run",
                    job.path, self.timeout_s)
        return ReadItem(job.path, error=f"read timed out after {self.timeout_s:.0f} s (a stalled disk or network "
                                        "mount?); it is read again by the next run")

    def ahead(self, paths: list[str]) -> None:
        wanted = set(paths)
        for path in [p for p in self.futures if p not in wanted]:
            self.futures.pop(path).cancelled = True
        self._start(paths)

    def close(self) -> None:
        """Drop pending reads and let the workers go; never waits for a stuck one."""
        for job in self.futures.values():
            job.cancelled = True
        self.futures.clear()
        for _ in self.workers:
            self.jobs.put(None)
        deadline = time.monotonic() + 1.0
        for worker in self.workers:  # idle workers exit at once; a busy one finishes its file (or is abandoned)
            worker.join(max(0.0, deadline - time.monotonic()))
        self.workers.clear()


def _still_as_read(item: ReadItem) -> bool:
    try:
        st = os.stat(item.path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (item.size, item.mtime_ns)
