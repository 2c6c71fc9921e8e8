"""The LMDB store: the source of truth for files, faces, vectors, thumbnails, clusters and the change log.

One environment (``<index>/store.lmdb``) with named databases; values are msgpack (records) or raw bytes
(float32 vectors, JPEG thumbnails) — no pickle. Every batch is committed in ONE write transaction, so a crash
leaves either the whole batch or none of it. The map grows by itself when full.

The ``log`` database records, under a monotonically increasing sequence number, each face added to or removed from
the store. The FAISS index is derived data: its snapshot remembers the sequence number it reflects, and whoever opens
it replays the log from there (see indexer/store/sync.py), so a crash between "committed" and "indexed" loses
nothing and a reader never sees a stale answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from indexer import faults
from indexer import fingerprint as fp
from indexer.embedding import EMBEDDING_DIM as DIM
from indexer.errors import IndexMismatchError, NotFoundError
from indexer.fsutil import private_dir
from indexer.store.files import COUNTS_KEY, FileTable, count_files
from indexer.store.integrity import decode_face, vector_ok
from indexer.store.mapguard import MapGuard, storage_error
from indexer.store.persons import BUILT_KEY, FRESH_TABLE, PERSON_TABLES, PersonTable, placed
from indexer.store.records import FaceRecord, NewFace, from_u64, pack, u64, unpack
from indexer.store.word import WordTable

# 2: the user's word about persons (tables word, names, history) and each face's suggested person. A version 1
# index is read as it is and upgraded by the first writer (the new tables start empty).
# 3: files counted by status (meta file_counts) and the failed files in a table of their own (files.py), kept with
# every file record; the first writer of an older index counts it once. An older faceindex refuses a version 3
# index (it would not keep the counts).
# 4: the person tables (persons.py: members, vector sums, sizes, suggestions), kept with every face write; the first
# writer of an older index builds them once.
SCHEMA_VERSION = 4
READABLE_SCHEMAS = (1, 2, 3, 4)
STORE_DIR = "store.lmdb"
SNAPSHOT_FILE = "vectors.faiss"  # beside it: the FAISS snapshot (indexer/store/sync.py)
_DBS = ("meta", "files", "sha", "faces", "vectors", "thumbs", "log", "clusters", "word", "names", "history",
        "failed", *PERSON_TABLES, FRESH_TABLE)
# absent from an older index until a writer opens it
_OPTIONAL = ("word", "names", "history", "failed", *PERSON_TABLES, FRESH_TABLE)
_INITIAL_MAP = 1 << 30      # 1 GiB; sparse on Linux, doubled whenever a transaction fills it


def store_exists(index_dir: str | Path) -> bool:
    return (Path(index_dir) / STORE_DIR / "data.mdb").is_file()


class FaceStore(FileTable, PersonTable, WordTable):
    """LMDB environment of one index. ``readonly`` opens for queries from other processes."""

    def __init__(self, index_dir: str | Path, readonly: bool = False) -> None:
        self.index_dir = Path(index_dir)
        path = self.index_dir / STORE_DIR
        if readonly and not store_exists(self.index_dir):
            raise NotFoundError(f"no index at {self.index_dir}; run `faceindex ingest PATH --index {self.index_dir}`")
        self.readonly = readonly
        self._guard = MapGuard()
        try:  # mode 0o700: the folder owner-only, data.mdb and lock.mdb 0600 (SECURITY.md)
            private_dir(self.index_dir)
            self.env = lmdb.open(str(path), map_size=_INITIAL_MAP, max_dbs=len(_DBS), readonly=readonly, lock=True,
                                 readahead=False, meminit=False, mode=0o700)
        except (OSError, lmdb.Error) as exc:
            raise storage_error(self.index_dir, "open the index", exc) from None
        self.db = {name: self.env.open_db(name.encode(), create=True) for name in _DBS} if not readonly \
            else {name: db for name in _DBS if (db := self._open_existing(name)) is not None}
        self._check_schema()

    def _check_schema(self) -> None:
        """Refuse an index of a newer faceindex; upgrade a readable older one when opened for writing."""
        version = self.get_meta("schema")
        if version is not None and version not in READABLE_SCHEMAS:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise IndexMismatchError(
                f"index {self.index_dir} has schema version {version}, this faceindex reads up to "
                f"{SCHEMA_VERSION}; " + ("upgrade faceindex to open it" if newer else "re-ingest into a new --index"))
        if not self.readonly and version != SCHEMA_VERSION:
            def upgrade(txn: lmdb.Transaction) -> None:
                if version is None:
                    txn.put(b"created", pack(time.time()), db=self.db["meta"])
                if self.get_meta(COUNTS_KEY, None, txn) is None:
                    count_files(self, txn)  # once: every file record of an older index (seconds per 100k)
                if not self.get_meta(BUILT_KEY, False, txn):
                    self.build_person_tables(txn)  # once: every face of an older index
                txn.put(b"schema", pack(SCHEMA_VERSION), db=self.db["meta"])

            self.transact(upgrade)

    def _open_existing(self, name: str):
        try:
            return self.env.open_db(name.encode(), create=False)
        except lmdb.NotFoundError:
            if name in _OPTIONAL:
                return None
            raise NotFoundError(f"{self.index_dir} is not a faceindex index (no '{name}' table)") from None

    def has_table(self, name: str) -> bool:
        """False only for a table a version 1 index opened read-only does not have yet (read it as empty)."""
        return name in self.db

    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def read(self, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """A read transaction; ``buffers``: values are memoryviews into the map, valid inside it (no copy made)."""
        for retry in (False, True):
            with self._guard.reading():  # no remap of the map while this transaction reads it (mapguard.py)
                try:
                    txn = self.env.begin(write=False, buffers=buffers)
                except lmdb.MapResizedError:
                    if retry:
                        raise
                else:
                    try:
                        yield txn
                    finally:
                        txn.abort()
                    return
            self._guard.remap(lambda: self.env.set_mapsize(0))  # another process grew the map: adopt its size

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """One write transaction; commits on success, aborts on any exception. A failed commit (disk full, read-only)
        is a StorageError: LMDB keeps the last committed state, nothing of this transaction is half-written."""
        try:
            txn = self.env.begin(write=True)
        except lmdb.MapResizedError:
            self._guard.remap(lambda: self.env.set_mapsize(0))
            txn = self.env.begin(write=True)
        try:
            yield txn
        except BaseException:
            txn.abort()
            raise
        faults.reached("commit")  # tests/faults: a crash with the transaction written but not committed
        try:
            txn.commit()
        except lmdb.MapFullError:
            raise
        except lmdb.Error as exc:
            raise storage_error(self.index_dir, "commit to", exc) from None

    def _get(self, db: str, key: bytes, txn: lmdb.Transaction | None) -> bytes | None:
        """One value, in the caller's transaction or a short read transaction of its own (values are copies)."""
        if txn is not None:
            return txn.get(key, db=self.db[db])
        with self.read() as t:
            return t.get(key, db=self.db[db])

    def transact(self, fn, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(txn, ...)`` in one write transaction, growing the map and retrying when it is full."""
        while True:
            try:
                with self.write() as txn:
                    return fn(txn, *args, **kwargs)
            except lmdb.MapFullError:
                self._guard.remap(lambda: self.env.set_mapsize(self.env.info()["map_size"] * 2))

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str, default: Any = None, txn: lmdb.Transaction | None = None) -> Any:
        raw = self._get("meta", key.encode(), txn)
        return default if raw is None else unpack(raw)

    def put_meta(self, txn: lmdb.Transaction, key: str, value: Any) -> None:
        txn.put(key.encode(), pack(value), db=self.db["meta"])

    def delete_meta(self, txn: lmdb.Transaction, key: str) -> None:
        txn.delete(key.encode(), db=self.db["meta"])

    def delete_meta_prefix(self, txn: lmdb.Transaction, prefix: str) -> None:
        """Delete every meta key that starts with ``prefix``."""
        raw = prefix.encode()
        cursor = txn.cursor(db=self.db["meta"])
        if cursor.set_range(raw):
            while cursor.key().startswith(raw):
                if not cursor.delete():
                    break

    def check_model(self, fingerprint: str, txn: lmdb.Transaction) -> None:
        """Record the model (weights and preprocessing: indexer/fingerprint.py) on first use; refuse vectors made
        differently afterwards, and any while a rebuild is unfinished."""
        pending = self.get_meta(fp.REBUILD_KEY, txn=txn)
        if pending is not None:
            raise fp.interrupted(self.index_dir, pending)
        current = fp.normalised(self.get_meta("model", txn=txn))
        if current is not None and current != fingerprint:
            raise fp.mismatch(self.index_dir, current, fingerprint)
        if self.get_meta("model", txn=txn) != fingerprint:  # first use, or a pre-issue-11 record made explicit
            self.put_meta(txn, "model", fingerprint)

    # ------------------------------------------------------------------ faces
    def _next_id(self, txn: lmdb.Transaction, key: str) -> int:
        n = self.get_meta(key, 0, txn) + 1
        self.put_meta(txn, key, n)
        return n

    def _log(self, txn: lmdb.Transaction, op: str, face_id: int) -> None:
        txn.put(u64(self._next_id(txn, "seq")), pack([op, face_id]), db=self.db["log"])

    def _add_face(self, txn: lmdb.Transaction, path: str, face: NewFace) -> int:
        face_id = self._next_id(txn, "next_face_id")
        rec = FaceRecord(face_id, path, [float(v) for v in face.box], float(face.prob),
                         [[float(x), float(y)] for x, y in face.landmarks], int(face.cluster), float(face.similarity))
        vector = np.ascontiguousarray(face.vector, dtype=np.float32)
        if vector.shape != (DIM,):
            raise ValueError(f"vector of shape {vector.shape}, expected ({DIM},)")
        txn.put(u64(face_id), pack(rec.to_dict()), db=self.db["faces"])
        txn.put(u64(face_id), vector.tobytes(), db=self.db["vectors"])
        txn.put(u64(face_id), face.thumbnail, db=self.db["thumbs"])
        self._face_moved(txn, face_id, placed(None), placed(rec), None, vector)
        self.mark_fresh(txn, face_id)
        self._log(txn, "a", face_id)
        return face_id

    def _remove_face(self, txn: lmdb.Transaction, face_id: int) -> None:
        key = u64(face_id)
        self._face_moved(txn, face_id, placed(self.get_face(face_id, txn)), placed(None),
                         self.get_vector(face_id, txn), None)
        for name in ("faces", "vectors", "thumbs"):
            txn.delete(key, db=self.db[name])
        self.mark_fresh(txn, face_id, False)
        self._log(txn, "r", face_id)

    def replace_face(self, txn: lmdb.Transaction, face_id: int, face: NewFace) -> None:
        """The same face embedded again (``ingest --rebuild``): new box, vector, thumbnail, same id (and so the user's
        word and, until the next recluster, its person). Logged as 'u' (sync.py)."""
        rec = self.get_face(face_id, txn)
        rec.box, rec.prob, rec.landmarks = [float(v) for v in face.box], float(face.prob), face.landmarks
        vector = np.ascontiguousarray(face.vector, dtype=np.float32)
        old_vector = self.get_vector(face_id, txn)
        self._face_moved(txn, face_id, placed(rec), placed(rec), None if old_vector is None else old_vector.copy(),
                         vector)
        txn.put(u64(face_id), pack(rec.to_dict()), db=self.db["faces"])
        txn.put(u64(face_id), vector.tobytes(), db=self.db["vectors"])
        txn.put(u64(face_id), face.thumbnail, db=self.db["thumbs"])
        self._log(txn, "u", face_id)

    def get_face(self, face_id: int, txn: lmdb.Transaction | None = None) -> FaceRecord | None:
        raw = self._get("faces", u64(face_id), txn)
        return None if raw is None else decode_face(u64(face_id), raw)

    def put_face(self, txn: lmdb.Transaction, face: FaceRecord, old: tuple[int, int, float] | None = None,
                 vector: np.ndarray | None = None) -> None:
        """Rewrite a face's record (its person, similarity, suggestion); its vector and thumbnail stay. ``old``
        (``placed`` of the stored record) and ``vector`` spare the person tables a read when the caller has them."""
        if old is None:
            old = placed(self.get_face(face.face_id, txn))
        if vector is None:
            vector = self.get_vector(face.face_id, txn)
        self._face_moved(txn, face.face_id, old, placed(face), vector, vector)
        txn.put(u64(face.face_id), pack(face.to_dict()), db=self.db["faces"])

    def reusable_faces(self, txn: lmdb.Transaction, path: str) -> list[NewFace]:
        """The stored faces of ``path`` as new faces (vector, thumbnail, person) for a byte-identical copy."""
        rec = self.get_file(path, txn)
        faces = []
        for face_id in rec.face_ids if rec else []:
            face, vector = self.get_face(face_id, txn), self.get_vector(face_id, txn)
            if face is None or vector is None:
                continue  # damaged (integrity.py): the copy goes without that face
            faces.append(NewFace(box=face.box, prob=face.prob, landmarks=face.landmarks, vector=vector.copy(),
                                 thumbnail=self.get_thumbnail(face_id, txn) or b"",
                                 cluster=face.cluster, similarity=face.similarity))
        return faces

    def face_count(self, txn: lmdb.Transaction | None = None) -> int:
        if txn is None:
            with self.read() as t:
                return self.face_count(t)
        return txn.stat(self.db["faces"])["entries"]

    def iter_faces(self, txn: lmdb.Transaction) -> Iterator[FaceRecord]:
        for key, raw in txn.cursor(db=self.db["faces"]):
            face = decode_face(key, raw)  # a damaged record is skipped with a warning (integrity.py)
            if face is not None:
                yield face

    def get_vector(self, face_id: int, txn: lmdb.Transaction) -> np.ndarray | None:
        """The face's vector; None when it has none or it is damaged (wrong length: warned once, integrity.py)."""
        key = u64(face_id)
        raw = txn.get(key, db=self.db["vectors"])
        return None if raw is None or not vector_ok(key, raw) else np.frombuffer(raw, dtype=np.float32)

    def get_thumbnail(self, face_id: int, txn: lmdb.Transaction) -> bytes | None:
        raw = txn.get(u64(face_id), db=self.db["thumbs"])
        return None if raw is None else bytes(raw)

    def all_vectors(self, txn: lmdb.Transaction) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [N], vectors float32 [N, 512]) of every face, in id order."""
        ids, chunks = [], []
        for key, raw in txn.cursor(db=self.db["vectors"]):
            if vector_ok(key, raw):
                ids.append(from_u64(key))
                chunks.append(raw)
        vectors = np.frombuffer(b"".join(chunks), dtype=np.float32).reshape(-1, DIM) if chunks \
            else np.zeros((0, DIM), np.float32)
        return np.asarray(ids, dtype=np.int64), vectors

    # ------------------------------------------------------------------ change log
    def log_since(self, seq: int, txn: lmdb.Transaction) -> Iterator[tuple[int, str, int]]:
        """(seq, op, face_id) for every change after ``seq``; op is 'a' (added), 'r' (removed) or 'u' (its vector
        replaced by ``replace_face``)."""
        cursor = txn.cursor(db=self.db["log"])
        if cursor.set_range(u64(seq + 1)):
            for key, raw in cursor:
                op, face_id = unpack(raw)
                yield from_u64(key), op, face_id

    def truncate_log(self, txn: lmdb.Transaction, upto: int) -> None:
        """Drop log entries <= ``upto`` (a saved snapshot covers them); readers of older snapshots reload."""
        cursor = txn.cursor(db=self.db["log"])
        while cursor.first() and from_u64(cursor.key()) <= upto:
            cursor.delete()
        self.put_meta(txn, "log_floor", max(upto, self.get_meta("log_floor", 0, txn)))

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.index_dir.rglob("*") if p.is_file())
