"""One writer per index: an exclusive ``flock`` on ``<index>/writer.lock`` that says who holds it.

The kernel drops the lock when the holder dies, even by ``kill -9``, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from indexer.errors import IndexLockedError
from indexer.fsutil import PRIVATE_FILE, private_dir
from indexer.store.mapguard import storage_error


class WriterLock:
    def __init__(self, index_dir: str | Path, command: str) -> None:
        self.path = Path(index_dir) / "writer.lock"
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        try:
            private_dir(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        except OSError as exc:
            raise storage_error(self.path.parent, "write to the index folder", exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(self.path) or {}
            raise IndexLockedError(
                f"index {self.path.parent} is held by `faceindex {holder.get('command', '?')}` "
                f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}); "
                "stop it first or use another --index"
            ) from None
        info = {"pid": os.getpid(), "command": self.command, "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass  # disk full: the lock holds all the same, only the holder's name is missing from it
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def is_held(index_dir: str | Path) -> dict[str, Any] | None:
    """Who holds the writer lock now (None when nobody does). Probes with a non-blocking shared lock."""
    path = Path(index_dir) / "writer.lock"
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return read_holder(path) or {}
    finally:
        os.close(fd)
