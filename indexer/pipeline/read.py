"""The read stage: stat, read, hash, classify against the store, decode; and the one read-ahead that feeds it.

A reader never blocks the pipeline on a file that is not a regular file (a FIFO named ``x.jpg``, a socket, a device):
the type is checked before opening, and the open is non-blocking. Everything that can go wrong with one file
becomes its recorded reason; the run goes on.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from indexer.config import Settings
from indexer.errors import ImageError
from indexer.images import decode
from indexer.pipeline.records import ReadItem, Twin, Verdict, classify
from indexer.store.lmdb_store import FaceStore

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
        raise FileReadError("vanished before it could be read") from None
    except PermissionError:
        raise FileReadError("unreadable: permission denied", st) from None
    except OSError as exc:
        raise FileReadError(f"unreadable: {exc.strerror or exc}", st) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileReadError("not a regular file", st)
        chunks, total = [], 0
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
        # Draft mode may shrink big JPEGs, but never below twice what the detector looks at.
        self.min_side = 2 * settings.detector.max_side

    def __call__(self, path: str) -> ReadItem:
        try:
            st, data = read_regular_file(path, self.max_bytes)
        except FileReadError as exc:
            size, mtime_ns = (exc.st.st_size, exc.st.st_mtime_ns) if exc.st is not None else (0, 0)
            return ReadItem(path, size=size, mtime_ns=mtime_ns, error=str(exc))
        # A file still being written may have grown since the stat: the size is what was read (the watcher
        # re-reads it once it is stable).
        item = ReadItem(path, size=len(data), mtime_ns=st.st_mtime_ns, sha256=file_sha256(data))
        verdict, source = self.classify(item)
        item = replace(item, verdict=verdict, source=source)
        if not verdict.needs_faces:
            return item
        if not data:
            return replace(item, error="empty file (0 bytes)")
        try:
            image = decode(io.BytesIO(data), self.max_pixels, self.min_side, name=path)
        except ImageError as exc:
            return replace(item, error=str(exc))
        return replace(item, image=image, orig_size=image.orig_size)

    def classify(self, item: ReadItem) -> tuple[Verdict, str | None]:
        with self.store.read() as txn:
            stored = self.store.get_file(item.path, txn)
            twins = [Twin(rec.path, rec.status, os.path.exists(rec.path))
                     for rec in self.store.files_with_sha(item.sha256, txn) if rec.path != item.path]
        return classify(item.size, item.mtime_ns, item.sha256, stored, twins)


class ReadAhead:
    """Files are read in a thread pool while the models work on the previous batch: the pipeline's one read-ahead.

    ``take`` returns the reads of a batch (reading what was not asked for ahead); ``ahead`` starts reading the
    next batch's files and forgets reads of any others (bounded memory). A read is used only while the file's
    size and mtime are still the ones read; otherwise it is read again.
    """

    def __init__(self, reader: Callable[[str], ReadItem], workers: int) -> None:
        self.reader = reader
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="read")
        self.futures: dict[str, Future[ReadItem]] = {}

    def _start(self, paths: list[str]) -> None:
        for path in paths:
            if path not in self.futures:
                self.futures[path] = self.pool.submit(self.reader, path)

    def take(self, paths: list[str]) -> list[ReadItem]:
        self._start(paths)
        items = []
        for path in paths:
            item = self.futures.pop(path).result()
            items.append(item if item.error is not None or _still_as_read(item) else self.reader(path))
        return items

    def ahead(self, paths: list[str]) -> None:
        wanted = set(paths)
        for path in [p for p in self.futures if p not in wanted]:
            self.futures.pop(path).cancel()
        self._start(paths)

    def close(self) -> None:
        for future in self.futures.values():
            future.cancel()
        self.futures.clear()
        self.pool.shutdown(wait=True)


def _still_as_read(item: ReadItem) -> bool:
    try:
        st = os.stat(item.path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (item.size, item.mtime_ns)
