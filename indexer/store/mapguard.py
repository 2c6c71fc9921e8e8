"""What keeps one LMDB environment safe inside a process and turns its failures into clear errors.

``MapGuard``: growing the map (``set_mapsize``) unmaps the old one; LMDB requires that no transaction of the process
is active meanwhile, and py-lmdb invalidates any that are (measured: a reader thread iterating while the writer grew
a 64 KiB map got "Attempt to operate on closed/deleted/dropped object" and "mdb_txn_begin: Invalid argument" by the
thousand). The pipeline's reader threads classify files in read transactions while the main thread commits, so read
transactions share the guard and a resize takes it alone, waiting for the readers in flight and holding new ones
back for the few milliseconds it takes.

``storage_error``: LMDB reports a full disk as "Input/output error" (a short write), so the free space of the folder
is looked up to say what most likely happened.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from indexer.errors import StorageError

# A failed write with less free space than this is called "disk full" (LMDB says "Input/output error" for a short
# write; a batch needs a few MB at most, so a disk with this much left fails for another reason).
LOW_SPACE = 64 * 2**20


class MapGuard:
    """Many read transactions at once, or one remap alone (a readers-writer lock, readers re-entrant)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._remapping = False
        self._mine = threading.local()  # read transactions the current thread holds

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            # A pending remap goes first (else a stream of readers starves it); a thread already reading may nest.
            while self._remapping and not getattr(self._mine, "n", 0):
                self._cond.wait()
            self._readers += 1
        self._mine.n = getattr(self._mine, "n", 0) + 1
        try:
            yield
        finally:
            self._mine.n -= 1
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    def remap(self, resize: Callable[[], None]) -> None:
        """Run ``resize`` once no other thread is inside a read transaction (ours would be invalidated: a bug)."""
        if getattr(self._mine, "n", 0):
            raise RuntimeError("the map cannot grow inside a read transaction of the same thread")
        with self._cond:
            while self._remapping:  # one remap at a time
                self._cond.wait()
            self._remapping = True  # from now on new readers wait
            while self._readers:
                self._cond.wait()
        try:
            resize()
        finally:
            with self._cond:
                self._remapping = False
                self._cond.notify_all()


def storage_error(index_dir: Path, doing: str, exc: BaseException) -> StorageError:
    """A one-line StorageError for a failed write to the index (disk full, read-only, permissions)."""
    code = getattr(exc, "errno", None)
    reason = getattr(exc, "strerror", None) or str(exc).split(": ", 1)[-1]
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StorageError(f"cannot {doing} {index_dir} ({reason}): the folder is read-only or not yours; "
                            "use another --index or fix its permissions")
    try:
        vfs = os.statvfs(index_dir)
        free = vfs.f_bavail * vfs.f_frsize
    except OSError:
        free = None
    if code == errno.ENOSPC or (free is not None and free < LOW_SPACE):
        return StorageError(f"cannot {doing} {index_dir}: the disk is full ({(free or 0) / 2**20:.1f} MiB free); "
                            "free some space and run again (everything committed before is intact)")
    return StorageError(f"cannot {doing} {index_dir} ({reason}); check the disk (everything committed before is "
                        "intact)")
