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
from collections.abc import Iterable, Iterator
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
from indexer.store.integrity import decode_face, vector_ok
from indexer.store.mapguard import MapGuard, storage_error
from indexer.store.records import FaceRecord, FileRecord, NewFace, from_u64, pack, path_key, u64, unpack

# 2: the user's word about persons (tables word, names, history) and each face's suggested person. A version 1
# index is read as it is and upgraded by the first writer (the new tables start empty).
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
STORE_DIR = "store.lmdb"
SNAPSHOT_FILE = "vectors.faiss"  # beside it: the FAISS snapshot (indexer/store/sync.py)
_DBS = ("meta", "files", "sha", "faces", "vectors", "thumbs", "log", "clusters", "word", "names", "history")
_SINCE_SCHEMA_2 = ("word", "names", "history")  # absent from a version 1 index until a writer opens it
_INITIAL_MAP = 1 << 30      # 1 GiB; sparse on Linux, doubled whenever a transaction fills it


def store_exists(index_dir: str | Path) -> bool:
    return (Path(index_dir) / STORE_DIR / "data.mdb").is_file()


class FaceStore:
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
            with self.write() as txn:
                if version is None:
                    txn.put(b"created", pack(time.time()), db=self.db["meta"])
                txn.put(b"schema", pack(SCHEMA_VERSION), db=self.db["meta"])

    def _open_existing(self, name: str):
        try:
            return self.env.open_db(name.encode(), create=False)
        except lmdb.NotFoundError:
            if name in _SINCE_SCHEMA_2:
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
        txn.put(path_key(record.path), pack(record.to_dict()), db=self.db["files"])
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
        txn.delete(path_key(path), db=self.db["files"])
        if rec.sha256:
            self._link_sha(txn, rec.sha256, path, add=False)
        return len(rec.face_ids)

    def move_file(self, txn: lmdb.Transaction, old: str, new: str, mtime_ns: int | None = None) -> bool:
        """A renamed file keeps its faces (and their ids): only paths change, nothing is re-embedded."""
        rec = self.get_file(old, txn)
        if rec is None:
            return False
        self.remove_file(txn, new)  # a file overwritten by the move
        txn.delete(path_key(old), db=self.db["files"])
        if rec.sha256:
            self._link_sha(txn, rec.sha256, old, add=False)
            self._link_sha(txn, rec.sha256, new, add=True)
        rec.path = new
        if mtime_ns is not None:
            rec.mtime_ns = mtime_ns
        txn.put(path_key(new), pack(rec.to_dict()), db=self.db["files"])
        for face_id in rec.face_ids:
            face = self.get_face(face_id, txn)
            if face is not None:
                face.path = new
                txn.put(u64(face_id), pack(face.to_dict()), db=self.db["faces"])
        return True

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
        self._log(txn, "a", face_id)
        return face_id

    def _remove_face(self, txn: lmdb.Transaction, face_id: int) -> None:
        key = u64(face_id)
        for name in ("faces", "vectors", "thumbs"):
            txn.delete(key, db=self.db[name])
        self._log(txn, "r", face_id)

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
        record.face_ids = list(kept) + [self._add_face(txn, record.path, face) for face in new]
        record.indexed_at = time.time()
        txn.put(path_key(record.path), pack(record.to_dict()), db=self.db["files"])
        if record.sha256:
            self._link_sha(txn, record.sha256, record.path, add=True)
        return record.face_ids

    def replace_face(self, txn: lmdb.Transaction, face_id: int, face: NewFace) -> None:
        """The same face embedded again (``ingest --rebuild``): new box, vector, thumbnail, same id (and so the user's
        word and, until the next recluster, its person). Logged as 'u' (sync.py)."""
        rec = self.get_face(face_id, txn)
        rec.box, rec.prob, rec.landmarks = [float(v) for v in face.box], float(face.prob), face.landmarks
        txn.put(u64(face_id), pack(rec.to_dict()), db=self.db["faces"])
        txn.put(u64(face_id), np.ascontiguousarray(face.vector, dtype=np.float32).tobytes(), db=self.db["vectors"])
        txn.put(u64(face_id), face.thumbnail, db=self.db["thumbs"])
        self._log(txn, "u", face_id)

    def get_face(self, face_id: int, txn: lmdb.Transaction | None = None) -> FaceRecord | None:
        raw = self._get("faces", u64(face_id), txn)
        return None if raw is None else decode_face(u64(face_id), raw)

    def put_face(self, txn: lmdb.Transaction, face: FaceRecord) -> None:
        """Rewrite a face's record (its person, similarity, suggestion); its vector and thumbnail stay."""
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

    # ------------------------------------------------------------------ counts
    def counts(self, max_failures: int = 50) -> dict[str, Any]:
        """Files by status, faces, model, change sequence, and the first ``max_failures`` failed files."""
        with self.read() as txn:
            by_status = {"indexed": 0, "no_face": 0, "failed": 0}
            failures = []
            for rec in self.iter_files(txn):
                by_status[rec.status] = by_status.get(rec.status, 0) + 1
                if rec.status == "failed" and len(failures) < max_failures:
                    failures.append({"path": rec.path, "reason": rec.reason})
            return {"files": by_status, "faces": self.face_count(txn), "model": self.get_meta("model", None, txn),
                    "seq": self.get_meta("seq", 0, txn), "failures": failures}

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.index_dir.rglob("*") if p.is_file())
