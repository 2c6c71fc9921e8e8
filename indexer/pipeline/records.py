"""The records the pipeline's stages exchange, and the one function that decides what a file is to the store.

A file goes read -> faces -> commit as a ``ReadItem`` (what was read and what it is), then a ``FaceItem`` (its
faces). Items are replaced, not mutated, when a later stage learns more (``dataclasses.replace``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from indexer.images import DecodedImage
from indexer.store.records import FileRecord, NewFace

if TYPE_CHECKING:
    from indexer.store.lmdb_store import FaceStore

REUSABLE = ("indexed", "no_face")  # a stored file in one of these states has faces (or none) worth reusing


class Verdict(StrEnum):
    """What a file on disk is to the store."""

    NEW = "new"              # never seen: read, detect, embed
    CHANGED = "changed"      # seen under this path with other content (or it failed before): do it again
    UNCHANGED = "unchanged"  # same content as stored (maybe a new mtime): keep, refresh the stat
    COPY = "copy"            # byte-identical to another indexed file that still exists: reuse its faces
    MOVED = "moved"          # byte-identical to an indexed file that is gone: it moved here, keep its face ids

    @property
    def needs_faces(self) -> bool:
        return self in (Verdict.NEW, Verdict.CHANGED)


@dataclass(frozen=True)
class Twin:
    """Another stored file with the same sha256, and whether it is still on disk."""

    path: str
    status: str
    exists: bool


def classify(size: int, mtime_ns: int, sha256: str | None, stored: FileRecord | None,
             twins: Sequence[Twin] = ()) -> tuple[Verdict, str | None]:
    """What the file at some path is to the store, and the path whose faces it reuses (copy, move).

    ``sha256`` None asks the cheap question before reading: a stat equal to the stored one means unchanged,
    anything else must be read (NEW or CHANGED: the content decides later). ``twins``: the other stored files with
    this sha256. A twin that is gone wins over one that exists: the file moved here, and its faces keep their ids.
    """
    if sha256 is None:
        if stored is not None and (stored.size, stored.mtime_ns) == (size, mtime_ns):
            return Verdict.UNCHANGED, None  # a failed file too: the same bytes would fail the same way
        return (Verdict.NEW if stored is None else Verdict.CHANGED), None
    if stored is not None and stored.sha256 == sha256 and stored.status != "failed":
        return Verdict.UNCHANGED, None
    reusable = [t for t in twins if t.status in REUSABLE]
    for twin in reusable:
        if not twin.exists:
            return Verdict.MOVED, twin.path
    if reusable:
        return Verdict.COPY, reusable[0].path
    return (Verdict.NEW if stored is None else Verdict.CHANGED), None


def classify_stored(store: FaceStore, txn, item: ReadItem) -> tuple[Verdict, str | None]:
    """``classify`` a read file against what the store holds in ``txn``: its own record and its byte-identical
    twins (with whether each is still on disk). The reader asks before decoding, the commit again in its txn."""
    twins = [Twin(rec.path, rec.status, os.path.exists(rec.path))
             for rec in store.files_with_sha(item.sha256, txn) if rec.path != item.path]
    return classify(item.size, item.mtime_ns, item.sha256, store.get_file(item.path, txn), twins)


@dataclass(frozen=True)
class ReadItem:
    """One file after the read stage."""

    path: str
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""
    verdict: Verdict = Verdict.NEW
    source: str | None = None            # COPY / MOVED: the stored file whose faces this one reuses
    image: DecodedImage | None = None    # decoded pixels, only when the verdict needs faces
    error: str | None = None             # -> status failed, with this reason
    orig_size: tuple[int, int] = (0, 0)  # (width, height) once decoded
    seconds: tuple[tuple[str, float], ...] = ()  # (stage, seconds) the reader spent on it: read, decode

    @property
    def needs_faces(self) -> bool:
        return self.error is None and self.verdict.needs_faces and self.image is not None


@dataclass
class FaceItem:
    """One file after the model stage: its faces with vectors and thumbnails."""

    read: ReadItem
    faces: list[NewFace] = field(default_factory=list)


def status_of(item: ReadItem, n_faces: int) -> str:
    if item.error is not None:
        return "failed"
    return "indexed" if n_faces else "no_face"


def record_for(item: ReadItem, n_faces: int) -> FileRecord:
    width, height = item.orig_size
    return FileRecord(path=item.path, size=item.size, mtime_ns=item.mtime_ns, sha256=item.sha256,
                      status=status_of(item, n_faces), reason=item.error or "", width=width, height=height)
