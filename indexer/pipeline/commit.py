"""The commit stage: one LMDB write transaction per batch, applying each file's verdict."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from indexer.pipeline.records import FaceItem, ReadItem, Twin, Verdict, classify, record_for
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import FileRecord


class Committer:
    """``store.transact(committer, face_items)`` -> (counts by outcome, failures). Runs inside the caller's txn."""

    def __init__(self, store: FaceStore, fingerprint: Callable[[], str]) -> None:
        self.store = store
        self.fingerprint = fingerprint  # asked only when new vectors are committed: the models are loaded then

    def __call__(self, txn, face_items: list[FaceItem]) -> tuple[Counter, list[dict[str, str]]]:
        if any(fi.faces and fi.read.verdict.needs_faces for fi in face_items):
            self.store.check_model(self.fingerprint(), txn)
        counts: Counter = Counter()
        failures = []
        for fi in face_items:
            record = self._commit_one(txn, fi, counts)
            if record is not None:
                counts[record.status] += 1
                counts["faces"] += len(record.face_ids)
                if record.status == "failed":
                    failures.append({"path": record.path, "reason": record.reason})
        return counts, failures

    def _commit_one(self, txn, fi: FaceItem, counts: Counter) -> FileRecord | None:
        """Apply one file's verdict; returns the record written for it (None when only a stat or a path changed)."""
        item = fi.read
        if item.error is None and item.verdict is Verdict.UNCHANGED:
            self.store.touch_file(txn, item.path, item.size, item.mtime_ns)
            counts["unchanged"] += 1
            return None
        if item.error is None and item.verdict in (Verdict.COPY, Verdict.MOVED):
            return self._reuse(txn, item, counts)
        record = record_for(item, len(fi.faces))
        self.store.put_file(txn, record, fi.faces)
        return record

    def _reuse(self, txn, item: ReadItem, counts: Counter) -> FileRecord | None:
        """A copy or a move, decided again now: the twin may have vanished (or come back) since the read."""
        twin = self.store.get_file(item.source, txn)
        twins = [Twin(twin.path, twin.status, os.path.exists(twin.path))] if twin is not None else []
        verdict, source = classify(item.size, item.mtime_ns, item.sha256, self.store.get_file(item.path, txn), twins)
        if verdict is Verdict.MOVED:
            self.store.move_file(txn, source, item.path, item.mtime_ns)
            counts["moved"] += 1
            return None
        if verdict is Verdict.COPY:
            faces = self.store.reusable_faces(txn, source)
            record = record_for(replace(item, orig_size=(twin.width, twin.height)), len(faces))
            self.store.put_file(txn, record, faces)
            counts["duplicates"] += 1
            return record
        # The twin left the store while this file was read: nothing to reuse. Recorded without its stat, so the
        # next scan reads it again.
        record = record_for(replace(item, size=0, mtime_ns=0, error="its identical twin left the index while it was "
                                    "read; it is read again by the next scan"), 0)
        self.store.put_file(txn, record)
        return record
