"""The commit stage: one LMDB write transaction per batch, applying each file's verdict."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from indexer.pipeline.records import FaceItem, ReadItem, Verdict, classify_stored, record_for
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import FileRecord

TWIN_LEFT = "its identical twin left the index while it was read; it is read again"


class Committer:
    """``store.transact(committer, face_items)`` -> (counts by outcome, failures, paths to read again). Runs inside
    the caller's transaction."""

    def __init__(self, store: FaceStore, fingerprint: Callable[[], str]) -> None:
        self.store = store
        self.fingerprint = fingerprint  # asked only when new vectors are committed: the models are loaded then

    def __call__(self, txn, face_items: list[FaceItem]) -> tuple[Counter, list[dict[str, str]], list[str]]:
        if any(fi.faces and fi.read.verdict.needs_faces for fi in face_items):
            self.store.check_model(self.fingerprint(), txn)
        counts: Counter = Counter()
        failures: list[dict[str, str]] = []
        again: list[str] = []
        for fi in face_items:
            record = self._commit_one(txn, fi, counts)
            if record is not None and record.reason == TWIN_LEFT:
                again.append(record.path)  # not counted: the caller reads it again at once
            elif record is not None:
                counts[record.status] += 1
                counts["faces"] += len(record.face_ids)
                if record.status == "failed":
                    failures.append({"path": record.path, "reason": record.reason})
        return counts, failures, again

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
        """A copy or a move, decided again now against the twins the store holds in this transaction: the one seen
        at read time may have vanished (or come back), or moved away to an earlier file of this very batch (two
        new copies of a moved photo: the first takes the move, the second is a copy of it)."""
        verdict, source = classify_stored(self.store, txn, item)
        if verdict is Verdict.UNCHANGED:
            self.store.touch_file(txn, item.path, item.size, item.mtime_ns)
            counts["unchanged"] += 1
            return None
        if verdict is Verdict.MOVED:
            self.store.move_file(txn, source, item.path, item.mtime_ns)
            counts["moved"] += 1
            return None
        if verdict is Verdict.COPY:
            faces = self.store.reusable_faces(txn, source)
            twin = self.store.get_file(source, txn)
            record = record_for(replace(item, orig_size=(twin.width, twin.height)), len(faces))
            self.store.put_file(txn, record, faces)
            counts["duplicates"] += 1
            return record
        # Every twin left the store while this file was read: nothing to reuse, and its pixels were never decoded.
        # Recorded without its stat (a crash now leaves it to be read again by the next scan); the pipeline reads
        # it again right after this transaction.
        record = record_for(replace(item, size=0, mtime_ns=0, error=TWIN_LEFT), 0)
        self.store.put_file(txn, record)
        return record
