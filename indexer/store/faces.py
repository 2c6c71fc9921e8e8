"""The store's face tables: ``faces`` (records), ``vectors`` (float32 [512]), ``thumbs`` (JPEG) and the change log.

``FaceTable`` is a part of ``FaceStore`` (lmdb_store.py); its methods run inside the caller's transaction. Every
face write goes through here, and from here to the person tables (``_face_moved``, persons.py) and the faces no
recluster has seen (``mark_fresh``), in the same transaction. The change log (``log``: seq -> [op, face id]) is what
the FAISS snapshot replays (sync.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lmdb
import numpy as np

from indexer.embedding import EMBEDDING_DIM as DIM
from indexer.store.integrity import decode_face, vector_ok
from indexer.store.persons import placed
from indexer.store.records import FaceRecord, NewFace, from_u64, pack, u64, unpack


class FaceTable:
    """Methods of ``FaceStore`` that read and write faces, their vectors and thumbnails, and the change log."""

    db: dict[str, Any]   # FaceStore's tables; get_meta, put_meta, _get, the person tables' hooks are FaceStore's

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

