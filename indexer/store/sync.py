"""Keep the FAISS index in step with the LMDB store (the source of truth).

On open the snapshot ``<index>/vectors.faiss`` is loaded and the store's change log is replayed from the sequence
number the snapshot reflects, so faces committed after the last snapshot (by a crash, or by another process that is
writing right now) are always searched. A missing, corrupt or foreign-model snapshot is rebuilt from LMDB with a
warning. Only the writer saves snapshots; readers replay in memory.

The index's memory budget (``index.memory_budget_mb``, 0 = a quarter of RAM) is resolved here, once; an index
built under another budget is rebuilt when the current one calls for another kind. A rebuild streams the vectors
from the store in chunks, and kinds past RAM read their candidates' vectors back from it (store/compressed.py).

The inverted-list kind past RAM re-ranks from the packed file ``<index>/vectors.f16`` instead (store/packed.py):
written in the rebuild's own pass over the store, rewritten when a snapshot is saved (the file must reflect at least
the snapshot's sequence number, since the change log below it is then truncated), used only when its ``seq`` lies
between the snapshot's and the store's; faces changed since its ``seq`` are read from the store. Only a process that
opened the store for writing writes it; the others read the store while it is missing or stale.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from indexer import fingerprint as fp
from indexer.config import IndexSettings
from indexer.errors import IndexFileError
from indexer.fsutil import leftover_temp_files
from indexer.store.choose import STORE_RERANK, IndexChoice, choose_index, memory_budget
from indexer.store.compressed import StoreVectors
from indexer.store.lmdb_store import SNAPSHOT_FILE, FaceStore
from indexer.store.packed import PACKED_FILE, PackedVectors, PackedWriter, TeeSource, write_all, write_merged
from indexer.store.snapshot_info import physical_memory
from indexer.store.vectors import VectorIndex

log = logging.getLogger(__name__)


class SyncedIndex:
    """A VectorIndex plus the store sequence number it reflects."""

    def __init__(self, store: FaceStore, settings: IndexSettings) -> None:
        self.store = store
        self.settings = settings
        self.path = Path(store.index_dir) / SNAPSHOT_FILE
        self.packed_path = Path(store.index_dir) / PACKED_FILE
        self.packed: PackedVectors | None = None
        self._packed_tried = -1   # the seq of the last full write attempted (a failing disk is not retried per save)
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
        seq = int(meta.get("seq", 0))
        self._attach(index, self._open_packed(index.dim, seq) if uses_packed(index.choice) else None)
        return index, seq

    def _open_packed(self, dim: int, seq: int) -> PackedVectors | None:
        """The packed file when it can serve an index at ``seq`` (faces changed after it are marked by catch_up)."""
        try:
            packed = PackedVectors.open(self.packed_path, dim, StoreVectors(self.store))
        except IndexFileError as exc:
            log.warning("re-rank file unusable (%s); reading the store until it is rewritten", exc)
            return None
        if packed is None:
            return None
        store_seq = self.store.get_meta("seq", 0)
        if not seq <= packed.seq <= store_seq or fp.normalised(packed.model) != fp.normalised(
                self.store.get_meta("model")):
            log.info("re-rank file %s is stale (seq %d; index %d, store %d); reading the store until it is "
                     "rewritten", self.packed_path, packed.seq, seq, store_seq)
            return None
        return packed

    def _attach(self, index: VectorIndex, packed: PackedVectors | None) -> None:
        self.packed = packed
        # Searches read candidates in transactions of their own (not the build's, which has ended).
        index.attach(packed if packed is not None else StoreVectors(self.store))

    def rebuild(self) -> tuple[VectorIndex, int]:
        # One read transaction: the vectors streamed and the sequence number they reflect are one snapshot.
        with self.store.read() as txn:
            seq = self.store.get_meta("seq", 0, txn)
            source = StoreVectors(self.store, txn)
            # Asked here, once, and handed to build_from: a kind re-ranked from the packed file gets it in the same
            # pass over the store.
            choice = choose_index(len(source), source.dim, exact_max_vectors=self.settings.exact_max_vectors,
                                  target_recall=self.settings.target_recall,
                                  memory_budget_bytes=self.memory_budget_bytes)
            writer = PackedWriter(self.packed_path, source.dim, seq, self.store.get_meta("model", None, txn)) \
                if uses_packed(choice) and not self.store.readonly else None
            with writer if writer is not None else nullcontext():
                index = VectorIndex.build_from(TeeSource(source, writer) if writer is not None else source,
                                               source.dim, exact_max_vectors=self.settings.exact_max_vectors,
                                               target_recall=self.settings.target_recall,
                                               memory_budget_bytes=self.memory_budget_bytes, choice=choice)
        written = writer is not None and not writer.failed
        self._attach(index, self._open_packed(index.dim, seq) if written else None)
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
        if uses_packed(self.index.choice):   # where candidates are re-ranked from: the packed file, or the store
            info["rerank_file"] = None if self.packed is None else {
                "path": str(self.packed_path), "vectors": len(self.packed), "seq": self.packed.seq,
                "changed_since": len(self.packed.changed)}
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
            if self.packed is not None:   # their rows there (if any) are older than the store's: read the store
                self.packed.mark_changed(final)
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
        self.save_packed()
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

    def save_packed(self) -> bool:
        """Bring the packed file up to the index's sequence number (a writer's job, before each snapshot): merged
        from the old file and the faces changed since, or written whole from the store when there is none. A
        packed file of a kind that no longer uses one is deleted. Whether a file was written."""
        if self.store.readonly:
            return False
        if not uses_packed(self.index.choice):
            self.packed = None
            self.packed_path.unlink(missing_ok=True)
            return False
        if self.packed is not None and self.packed.seq >= self.seq:
            return False
        # A writer killed while writing the file left its temp file (gigabytes past 1M faces); only a writer gets here.
        for leftover in leftover_temp_files(self.packed_path):
            leftover.unlink(missing_ok=True)
        model = self.store.get_meta("model")
        if self.packed is not None:
            seq = self.seq        # unchanged faces had the old rows' vectors up to here; changed ones: the store's
            written = write_merged(self.packed_path, self.packed, StoreVectors(self.store), seq, model)
        elif self._packed_tried == self.seq:
            return False
        else:
            self._packed_tried = self.seq
            with self.store.read() as txn:
                seq = self.store.get_meta("seq", 0, txn)
                written = write_all(self.packed_path, StoreVectors(self.store, txn), self.index.dim, seq, model)
        if written:
            # Faces changed after ``seq`` are marked again as catch_up replays them (it starts at self.seq <= seq).
            self._attach(self.index, self._open_packed(self.index.dim, self.seq))
        return written


def uses_packed(choice: IndexChoice) -> bool:
    """Whether a kind re-ranks from the packed file: the inverted-list kind past RAM. ``SQ8,RLMDB`` (below
    EXACT_MAX_VECTORS) keeps reading the store: under 50,000 faces its pages stay in the page cache, and its
    answers keep the exact float32 similarities."""
    return choice.key.endswith(STORE_RERANK) and choice.nlist > 0
