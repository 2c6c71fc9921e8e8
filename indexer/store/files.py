"""The store's file tables: one record per file, its sha256 links, and the counts ``status`` shows, kept in step.

``FileTable`` is a part of ``FaceStore`` (lmdb_store.py), which owns the environment and the face tables; its
methods run inside the caller's transaction. Every write of a file record goes through ``_write_file`` or
``_delete_file``, which also keep the counts of files by status (meta ``file_counts``) and the ``failed`` table
(path -> reason) up to date in the same transaction, so ``status`` reads them instead of every record (issue 24:
a million files took seconds). An index made before these existed is counted once by its first writer
(``count_files``); until then a reader counts by a scan, as before.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import lmdb

from indexer.store.records import FileRecord, NewFace, pack, path_key, u64, unpack

COUNTS_KEY = "file_counts"
STATUSES = ("indexed", "no_face", "failed")


def scan_counts(records: Iterable[FileRecord]) -> tuple[dict[str, int], list[FileRecord]]:
    """Files by status over ``records`` (a full scan), and the failed ones among them."""
    counts = dict.fromkeys(STATUSES, 0)
    failed: list[FileRecord] = []
    for rec in records:
        counts[rec.status] = counts.get(rec.status, 0) + 1
        if rec.status == "failed":
            failed.append(rec)
    return counts, failed


def failed_entry(rec: FileRecord) -> dict[str, str]:
    return {"path": rec.path, "reason": rec.reason}


def count_files(store: Any, txn: lmdb.Transaction) -> None:
    """Count every file record once and fill the ``failed`` table (an index from before the counts)."""
    cursor = txn.cursor(db=store.db["failed"])
    while cursor.first():
        cursor.delete()
    counts, failed = scan_counts(store.iter_files(txn))
    for rec in failed:
        txn.put(path_key(rec.path), pack(failed_entry(rec)), db=store.db["failed"])
    store.put_meta(txn, COUNTS_KEY, counts)


class FileTable:
    """Files, sha256 links and their counts: a part of ``FaceStore``, which provides the environment (``db``,
    ``read``, ``_get``), the meta table (``get_meta``, ``put_meta``) and the faces (``_add_face``, ``_remove_face``,
    ``replace_face``, ``get_face``, ``face_count``)."""

    db: dict[str, Any]

    # ------------------------------------------------------------------ records and counts
    def _recount(self, txn: lmdb.Transaction, old: FileRecord | None, new: FileRecord | None) -> None:
        counts = self.get_meta(COUNTS_KEY, None, txn)
        if counts is None:
            return  # an index not counted yet: its first writer counts it (count_files)
        for rec, step in ((old, -1), (new, 1)):
            if rec is not None:
                counts[rec.status] = counts.get(rec.status, 0) + step
        if old is not None and old.status == "failed":
            txn.delete(path_key(old.path), db=self.db["failed"])
        if new is not None and new.status == "failed":
            txn.put(path_key(new.path), pack(failed_entry(new)), db=self.db["failed"])
        self.put_meta(txn, COUNTS_KEY, counts)

    def _write_file(self, txn: lmdb.Transaction, record: FileRecord, old: FileRecord | None) -> None:
        txn.put(path_key(record.path), pack(record.to_dict()), db=self.db["files"])
        self._recount(txn, old, record)

    def _delete_file(self, txn: lmdb.Transaction, record: FileRecord) -> None:
        txn.delete(path_key(record.path), db=self.db["files"])
        self._recount(txn, record, None)

    def counts(self, max_failures: int = 50) -> dict[str, Any]:
        """Files by status, faces, model, change sequence, and the first ``max_failures`` failed files."""
        with self.read() as txn:
            by_status = self.get_meta(COUNTS_KEY, None, txn)
            failures = []
            if by_status is None:  # not counted yet (a reader of an older index): a scan, as before
                by_status, failed = scan_counts(self.iter_files(txn))
                failures = [failed_entry(rec) for rec in failed[:max_failures]]
            else:
                for _, raw in txn.cursor(db=self.db["failed"]):
                    if len(failures) >= max_failures:
                        break
                    failures.append(unpack(raw))
            return {"files": {s: by_status.get(s, 0) for s in STATUSES} | by_status,
                    "faces": self.face_count(txn),
                    "model": self.get_meta("model", None, txn),
                    "seq": self.get_meta("seq", 0, txn), "failures": failures}

    # ------------------------------------------------------------------ files
    def get_file(self, path: str, txn: lmdb.Transaction | None = None) -> FileRecord | None:
        raw = self._get("files", path_key(path), txn)
        return None if raw is None else FileRecord(**unpack(raw))

    def iter_files(self, txn: lmdb.Transaction, prefix: str = "") -> Iterator[FileRecord]:
        cursor = txn.cursor(db=self.db["files"])
        start = path_key(prefix)
        if not cursor.set_range(start):
            return
        for key, raw in cursor:
            if not key.startswith(start):
                break
            yield FileRecord(**unpack(raw))

    def paths_with_sha(self, sha: str, txn: lmdb.Transaction) -> list[str]:
        raw = txn.get(sha.encode(), db=self.db["sha"])
        return [] if raw is None else unpack(raw)

    def files_with_sha(self, sha: str, txn: lmdb.Transaction) -> list[FileRecord]:
        """The stored files holding exactly these bytes."""
        records = (self.get_file(path, txn) for path in self.paths_with_sha(sha, txn))
        return [rec for rec in records if rec is not None]

    def _link_sha(self, txn: lmdb.Transaction, sha: str, path: str, add: bool) -> None:
        paths = set(self.paths_with_sha(sha, txn))
        paths.add(path) if add else paths.discard(path)
        if paths:
            txn.put(sha.encode(), pack(sorted(paths)), db=self.db["sha"])
        else:
            txn.delete(sha.encode(), db=self.db["sha"])

    def put_file(self, txn: lmdb.Transaction, record: FileRecord, faces: Iterable[NewFace] = ()) -> list[int]:
        """Replace whatever the store had for ``record.path`` by ``record`` and ``faces``; returns new face ids."""
        self.remove_file(txn, record.path)
        ids = [self._add_face(txn, record.path, face) for face in faces]
        record.face_ids = ids
        record.indexed_at = time.time()
        self._write_file(txn, record, None)
        if record.sha256:
            self._link_sha(txn, record.sha256, record.path, add=True)
        return ids

    def touch_file(self, txn: lmdb.Transaction, path: str, size: int, mtime_ns: int) -> None:
        """Same content, new stat (e.g. ``touch``): remember the stat so the next scan skips it cheaply."""
        rec = self.get_file(path, txn)
        if rec is not None:
            rec.size, rec.mtime_ns = size, mtime_ns
            txn.put(path_key(path), pack(rec.to_dict()), db=self.db["files"])

    def remove_file(self, txn: lmdb.Transaction, path: str) -> int:
        """Forget a file and its faces; returns how many faces left."""
        rec = self.get_file(path, txn)
        if rec is None:
            return 0
        for face_id in rec.face_ids:
            self._remove_face(txn, face_id)
        self._delete_file(txn, rec)
        if rec.sha256:
            self._link_sha(txn, rec.sha256, path, add=False)
        return len(rec.face_ids)

    def move_file(self, txn: lmdb.Transaction, old: str, new: str, mtime_ns: int | None = None) -> bool:
        """A renamed file keeps its faces (and their ids): only paths change, nothing is re-embedded."""
        rec = self.get_file(old, txn)
        if rec is None:
            return False
        self.remove_file(txn, new)  # a file overwritten by the move
        self._delete_file(txn, rec)
        if rec.sha256:
            self._link_sha(txn, rec.sha256, old, add=False)
            self._link_sha(txn, rec.sha256, new, add=True)
        rec.path = new
        if mtime_ns is not None:
            rec.mtime_ns = mtime_ns
        self._write_file(txn, rec, None)
        for face_id in rec.face_ids:
            face = self.get_face(face_id, txn)
            if face is not None:
                face.path = new
                txn.put(u64(face_id), pack(face.to_dict()), db=self.db["faces"])
        return True

    def rewrite_file(self, txn: lmdb.Transaction, record: FileRecord, kept: dict[int, NewFace],
                     new: Iterable[NewFace] = ()) -> list[int]:
        """A file embedded again (``ingest --rebuild``): its faces in ``kept`` keep their ids (``replace_face``),
        its other old faces leave, ``new`` faces are added; returns the file's face ids."""
        old = self.get_file(record.path, txn)
        for face_id in old.face_ids if old else []:
            if face_id not in kept:
                self._remove_face(txn, face_id)
        if old is not None and old.sha256 and old.sha256 != record.sha256:
            self._link_sha(txn, old.sha256, record.path, add=False)
        for face_id, face in kept.items():
            self.replace_face(txn, face_id, face)
        record.face_ids = list(kept) + [self._add_face(txn, record.path, face)
                                        for face in new]
        record.indexed_at = time.time()
        self._write_file(txn, record, old)
        if record.sha256:
            self._link_sha(txn, record.sha256, record.path, add=True)
        return record.face_ids
