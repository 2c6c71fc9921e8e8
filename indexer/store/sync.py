"""Keep the FAISS index in step with the LMDB store (the source of truth).

On open the snapshot ``<index>/vectors.faiss`` is loaded and the store's change log is replayed from the sequence
number the snapshot reflects, so faces committed after the last snapshot (by a crash, or by another process that is
writing right now) are always searched. A missing, corrupt or foreign-model snapshot is rebuilt from LMDB with a
warning. Only the writer saves snapshots; readers replay in memory.

The index's memory budget (``index.memory_budget_mb``, 0 = a quarter of RAM) is resolved here, once; an index
built under another budget is rebuilt when the current one calls for another kind. A rebuild streams the vectors
from the store in chunks, and kinds past RAM read their candidates' vectors back from it (store/compressed.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from indexer import fingerprint as fp
from indexer.config import IndexSettings
from indexer.errors import IndexFileError
from indexer.store.choose import choose_index, memory_budget
from indexer.store.compressed import StoreVectors
from indexer.store.lmdb_store import SNAPSHOT_FILE, FaceStore
from indexer.store.vectors import VectorIndex

log = logging.getLogger(__name__)


class SyncedIndex:
    """A VectorIndex plus the store sequence number it reflects."""

    def __init__(self, store: FaceStore, settings: IndexSettings) -> None:
        self.store = store
        self.settings = settings
        self.path = Path(store.index_dir) / SNAPSHOT_FILE
        self.memory_budget_bytes, self.budget_reason = memory_budget(settings.memory_budget_mb, physical_memory())
        self.index, self.seq = self._load_or_rebuild()
        self.saved_seq = self.seq if self.path.is_file() else -1
        self.catch_up()

    def _load_or_rebuild(self) -> tuple[VectorIndex, int]:
        model = self.store.get_meta("model")
        try:
            index, meta = VectorIndex.load(self.path, source=StoreVectors(self.store))
        except IndexFileError as exc:
            if self.path.exists() or self.store.get_meta("seq", 0) > 0:
                log.warning("FAISS snapshot unusable (%s); rebuilding it from the store", exc)
            return self.rebuild()
        if fp.normalised(meta.get("model")) != fp.normalised(model):
            log.warning("FAISS snapshot was built for model %s, the store holds %s; rebuilding",
                        meta.get("model"), model)
            return self.rebuild()
        index.memory_budget_bytes = self.memory_budget_bytes  # today's budget decides should_rebuild
        return index, int(meta.get("seq", 0))

    def rebuild(self) -> tuple[VectorIndex, int]:
        # One read transaction: the vectors streamed and the sequence number they reflect are one snapshot.
        with self.store.read() as txn:
            seq = self.store.get_meta("seq", 0, txn)
            index = VectorIndex.build_from(StoreVectors(self.store, txn),
                                           exact_max_vectors=self.settings.exact_max_vectors,
                                           target_recall=self.settings.target_recall,
                                           memory_budget_bytes=self.memory_budget_bytes)
        index.attach(StoreVectors(self.store))  # searches read candidates in transactions of their own
        self.saved_seq = -1
        return index, seq

    def info(self) -> dict[str, Any]:
        """For ``status``: the index's info, its reason restated for its current size when the choice for that
        size agrees, and the memory budget with its reason."""
        info = dict(self.index.info)
        now = choose_index(len(self.index), self.index.dim, exact_max_vectors=self.settings.exact_max_vectors,
                           target_recall=self.settings.target_recall, memory_budget_bytes=self.memory_budget_bytes)
        if now.key == info["type"]:
            info["reason"] = now.reason
        budget = self.memory_budget_bytes
        return {**info, "memory_budget_mb": None if budget is None else round(budget / 2**20, 3),
                "memory_budget_reason": self.budget_reason}

    def catch_up(self) -> int:
        """Apply the store's changes since ``self.seq``; returns how many faces changed."""
        with self.store.read() as txn:
            if self.seq < self.store.get_meta("log_floor", 0, txn):
                # The writer truncated the log past our snapshot (we loaded an older file): start again.
                self.index, self.seq = self.rebuild()
                return len(self.index)
            # Per face, its first and last change since self.seq: 'a' added, 'r' removed, 'u' its vector replaced
            # (ingest --rebuild). A face whose first change is not 'a' was in the index: it leaves; one whose last
            # change is not 'r' is (back) in the store: its current vector goes in.
            first: dict[int, str] = {}
            final: dict[int, str] = {}
            last = self.seq
            for seq, op, face_id in self.store.log_since(self.seq, txn):
                first.setdefault(face_id, op)
                final[face_id] = op
                last = seq
            fresh, vectors = [], []
            for i, op in final.items():
                vector = self.store.get_vector(i, txn) if op != "r" else None
                if vector is not None and vector.shape == (self.index.dim,):  # else damaged: see integrity.py
                    fresh.append(i)
                    vectors.append(vector)
        gone = [i for i, op in first.items() if op != "a"]
        if gone:
            self.index.remove(np.asarray(gone, dtype=np.int64))
        if fresh:
            self.index.add(np.asarray(fresh, dtype=np.int64), np.stack(vectors))
        self.seq = last
        if self.index.should_rebuild(len(self.index)):
            log.info("index grew to %d vectors: rebuilding with a new index type", len(self.index))
            self.index, self.seq = self.rebuild()
        return len(fresh) + len(gone)

    def save(self, force: bool = False) -> bool:
        """Snapshot if enough changed since the last one (or ``force``); then the log below it can go."""
        # A snapshot rewrites the whole index (2 GB and ~17 s at 1M faces): take one per snapshot_every changes
        # or per 10% growth, whichever is more; the change log covers everything in between.
        every = max(self.settings.snapshot_every, len(self.index) // 10)
        if not force and self.saved_seq >= 0 and self.seq - self.saved_seq < every:
            return False
        if self.seq == self.saved_seq:
            return False
        try:
            self.index.save(self.path, {"seq": self.seq, "model": self.store.get_meta("model")})
        except OSError as exc:  # disk full, read-only: the snapshot is derived, the change log still covers it
            log.warning("could not save the FAISS snapshot %s (%s); the store's change log is replayed instead",
                        self.path, exc.strerror or exc)
            return False
        self.saved_seq = self.seq
        self.store.transact(lambda txn: self.store.truncate_log(txn, self.seq))
        return True


def physical_memory() -> int | None:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit when lower (containers)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total
