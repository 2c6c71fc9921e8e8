"""Files that are either wholly there or not at all: the one atomic writer every module uses, and the checksum
their headers carry (``header_digest``).

A temp file in the destination's folder (same filesystem, so the rename is atomic), written and fsynced, then
``os.replace``d over the destination, then the folder fsynced so the rename itself survives a power cut. A crash at
any point leaves the old file or the new one, never a mix; the temp file is removed when the write fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

PRIVATE_FILE = 0o600  # index files are the user's own: nobody else on the machine reads their faces
PRIVATE_DIR = 0o700


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Make sure folder ``path`` exists; created here it is owner-only (an existing one keeps its mode)."""
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            pass
    return path


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = PRIVATE_FILE) -> Iterator[BinaryIO]:
    """``with atomic_writer(p) as fh: fh.write(...)``: ``p`` appears complete when the block ends, or not at all."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, mode: int = PRIVATE_FILE) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` atomically and durably."""
    with atomic_writer(path, mode) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def leftover_temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """Temp files a crash inside ``atomic_writer(path)`` may have left beside ``path``."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def header_digest(fields: dict[str, Any], *payload: Any) -> str:
    """sha256 over a file header's fields (canonical JSON, so a damaged field is caught too), then the payload
    (arrays or other buffers, their bytes as they lie in memory)."""
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for part in payload:
        h.update(memoryview(part))
    return h.hexdigest()
