"""The store's person tables: who is in each person, its vector sum and size, kept in step with every face write.

``PersonTable`` is a part of ``FaceStore`` (lmdb_store.py); its methods run inside the caller's transaction. Every
write of a face record (``_add_face``, ``_remove_face``, ``replace_face``, ``put_face``) passes through
``_face_moved``, which updates, in the same transaction:

- ``persons``: person id -> {"n": faces, "sum": float64 [512] sum of their vectors, "cover": a central face id,
  "cover_sim": its similarity}; a center is ``sum / |sum|`` and the mean similarity of the members to it (the
  person's cohesion) is ``|sum| / n``, so neither needs a pass over the faces;
- ``members``: person id + face id -> float32 similarity of the face to its person's center (a Person page reads
  its own faces, in key order, and nothing else);
- ``by_size``: (largest first) size + person id -> empty (the people list is a page of this table);
- ``suggested``: suggested person id + face id -> empty (the faces the clusterer put together: an edit re-derives
  exactly the clusters it touched, persons/apply.py).

An index made before these tables existed has them built once by its first writer (``build_person_tables``);
until then a reader builds the same rows in memory from one pass over the faces (``_scanned``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import lmdb
import numpy as np

from indexer.embedding import EMBEDDING_DIM as DIM
from indexer.store.records import FaceRecord, from_u64, pack, u64, unpack

PERSON_TABLES = ("persons", "members", "by_size", "suggested")
FRESH_TABLE = "fresh"   # face id -> empty: faces added since a recluster last saw them (persons/local.py)
BUILT_KEY = "person_tables"  # meta: the tables are complete for this index
_PAIR = struct.Struct(">QQ")
_SIM = struct.Struct("<f")
_BIG = (1 << 63) - 1


@dataclass
class PersonRow:
    """One person as the tables hold it."""

    person: int
    n: int
    sum: np.ndarray          # float64 [512]
    cover: int | None = None
    cover_sim: float = -2.0

    @property
    def center(self) -> np.ndarray:
        norm = float(np.linalg.norm(self.sum))
        return (self.sum / norm if norm > 0 else self.sum).astype(np.float32)

    @property
    def cohesion(self) -> float | None:
        """Mean cosine of the members to the center: |sum| / n, exactly."""
        return float(np.linalg.norm(self.sum)) / self.n if self.n else None

    def pack(self) -> bytes:
        return pack({"n": self.n, "sum": np.ascontiguousarray(self.sum, np.float64).tobytes(), "cover": self.cover,
                     "cover_sim": self.cover_sim})

    @classmethod
    def unpack(cls, person: int, raw: bytes) -> PersonRow:
        d = unpack(raw)
        return cls(person, d["n"], np.frombuffer(d["sum"], np.float64).copy(), d.get("cover"),
                   d.get("cover_sim", -2.0))


def placed(face: FaceRecord | None) -> tuple[int, int, float]:
    """(person, suggested person, similarity) of a face record as the tables index it (-1: none)."""
    if face is None:
        return -1, -1, float("nan")
    suggested = face.cluster if face.suggested is None else face.suggested
    return int(face.cluster), int(suggested), float(face.similarity)


def _sim_bytes(sim: float) -> bytes:
    return _SIM.pack(sim if sim == sim else -2.0)


class PersonTable:
    """Person rows, members, sizes and suggestions: a part of ``FaceStore``, which provides ``db``, ``get_meta``,
    ``put_meta``, ``get_face``, ``get_vector`` and ``iter_faces``."""

    db: dict[str, Any]

    _person_tables_built = False
    _scan_cache: tuple[tuple[int, int, int], Any] | None = None

    def _tables_ready(self, txn: lmdb.Transaction) -> bool:
        if not self._person_tables_built:
            self._person_tables_built = all(t in self.db for t in PERSON_TABLES) and bool(
                self.get_meta(BUILT_KEY, False, txn))
        return self._person_tables_built

    # ------------------------------------------------------------------ writes (inside the caller's transaction)
    def _face_moved(self, txn: lmdb.Transaction, face_id: int, old: tuple[int, int, float],
                    new: tuple[int, int, float], old_vector: np.ndarray | None,
                    new_vector: np.ndarray | None) -> None:
        """Keep the tables in step with one face record going from ``old`` to ``new`` (``placed``)."""
        if not self._tables_ready(txn):
            return  # an older index before its first writer built them (build_person_tables)
        (op, osug, osim), (np_, nsug, nsim) = old, new
        same_vector = old_vector is new_vector or (
            old_vector is not None and new_vector is not None and np.array_equal(old_vector, new_vector))
        if op != np_ or not same_vector:
            if op >= 0:
                self._change_person(txn, op, face_id, -1, old_vector, None)
            if np_ >= 0:
                self._change_person(txn, np_, face_id, +1, new_vector, nsim)
        elif np_ >= 0 and not (osim == nsim or (osim != osim and nsim != nsim)):
            txn.put(_PAIR.pack(np_, face_id), _sim_bytes(nsim), db=self.db["members"])
            row = self.person_row(np_, txn)
            if row is not None and (nsim > row.cover_sim or row.cover == face_id):
                row.cover, row.cover_sim = face_id, nsim
                txn.put(u64(np_), row.pack(), db=self.db["persons"])
        if osug != nsug:
            if osug >= 0:
                txn.delete(_PAIR.pack(osug, face_id), db=self.db["suggested"])
            if nsug >= 0:
                txn.put(_PAIR.pack(nsug, face_id), b"", db=self.db["suggested"])

    def _change_person(self, txn: lmdb.Transaction, person: int, face_id: int, sign: int,
                       vector: np.ndarray | None, sim: float | None) -> None:
        row = self.person_row(person, txn) or PersonRow(person, 0, np.zeros(DIM, np.float64))
        if row.n:
            txn.delete(_PAIR.pack(_BIG - row.n, person), db=self.db["by_size"])
        row.n += sign
        if vector is not None:
            row.sum += sign * vector.astype(np.float64)
        if sign > 0:
            txn.put(_PAIR.pack(person, face_id), _sim_bytes(sim), db=self.db["members"])
            if sim is not None and sim == sim and sim > row.cover_sim or row.cover is None:
                row.cover, row.cover_sim = face_id, sim if sim is not None and sim == sim else -2.0
        else:
            txn.delete(_PAIR.pack(person, face_id), db=self.db["members"])
            if row.cover == face_id:
                best = max(self.member_similarities(person, txn), key=lambda m: m[1], default=(None, -2.0))
                row.cover, row.cover_sim = best
        if row.n <= 0:
            txn.delete(u64(person), db=self.db["persons"])
            return
        txn.put(_PAIR.pack(_BIG - row.n, person), b"", db=self.db["by_size"])
        txn.put(u64(person), row.pack(), db=self.db["persons"])

    def build_person_tables(self, txn: lmdb.Transaction) -> None:
        """Fill the tables from every face record (once, for an index made before them)."""
        for name in PERSON_TABLES:
            txn.drop(self.db[name], delete=False)
        rows, members, suggested = self._scanned(txn)
        for row in rows.values():
            txn.put(u64(row.person), row.pack(), db=self.db["persons"])
            txn.put(_PAIR.pack(_BIG - row.n, row.person), b"", db=self.db["by_size"])
        for (person, face_id), sim in members.items():
            txn.put(_PAIR.pack(person, face_id), _sim_bytes(sim), db=self.db["members"])
        for pair in suggested:
            txn.put(_PAIR.pack(*pair), b"", db=self.db["suggested"])
        self.put_meta(txn, BUILT_KEY, True)

    # ------------------------------------------------------------------ reads
    def _scanned(self, txn: lmdb.Transaction) -> tuple[dict[int, PersonRow], dict[tuple[int, int], float],
                                                       list[tuple[int, int]]]:
        """The tables' rows from one pass over the faces (the builder's, and a reader's of an older index, which
        keeps them while neither its transaction nor the store changed)."""
        key = (id(txn), self.get_meta("seq", 0, txn), self.get_meta("clustering_version", 0, txn))
        if self._scan_cache is not None and self._scan_cache[0] == key:
            return self._scan_cache[1]
        rows: dict[int, PersonRow] = {}
        members: dict[tuple[int, int], float] = {}
        suggested: list[tuple[int, int]] = []
        for face in self.iter_faces(txn):
            person, sugg, sim = placed(face)
            if sugg >= 0:
                suggested.append((sugg, face.face_id))
            if person < 0:
                continue
            row = rows.setdefault(person, PersonRow(person, 0, np.zeros(DIM, np.float64)))
            vector = self.get_vector(face.face_id, txn)
            row.n += 1
            if vector is not None:
                row.sum += vector
            members[(person, face.face_id)] = sim
            if sim == sim and sim > row.cover_sim or row.cover is None:
                row.cover, row.cover_sim = face.face_id, sim if sim == sim else -2.0
        self._scan_cache = (key, (rows, members, sorted(suggested)))
        return self._scan_cache[1]

    def person_row(self, person: int, txn: lmdb.Transaction) -> PersonRow | None:
        if not self._tables_ready(txn):
            return self._scanned(txn)[0].get(person)
        raw = txn.get(u64(person), db=self.db["persons"])
        return None if raw is None else PersonRow.unpack(person, raw)

    # ------------------------------------------------------------------ faces no recluster has seen yet
    def mark_fresh(self, txn: lmdb.Transaction, face_id: int, fresh: bool = True) -> None:
        if fresh:
            txn.put(u64(face_id), b"", db=self.db[FRESH_TABLE])
        else:
            txn.delete(u64(face_id), db=self.db[FRESH_TABLE])

    def fresh_faces(self, txn: lmdb.Transaction, limit: int | None = None) -> list[int]:
        """Faces added since a recluster last saw them, oldest first (at most ``limit``)."""
        if FRESH_TABLE not in self.db:
            return []
        out = []
        for key in txn.cursor(db=self.db[FRESH_TABLE]).iternext(values=False):
            if limit is not None and len(out) >= limit:
                break
            out.append(from_u64(key))
        return out

    def fresh_count(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self.db[FRESH_TABLE])["entries"] if FRESH_TABLE in self.db else 0

    def forget_fresh(self, txn: lmdb.Transaction, face_ids: Iterable[int]) -> None:
        """A recluster saw these faces."""
        for face_id in face_ids:
            txn.delete(u64(int(face_id)), db=self.db[FRESH_TABLE])

    def highest_person(self, txn: lmdb.Transaction) -> int:
        """The highest id of a person with faces (-1: none)."""
        if not self._tables_ready(txn):
            return max(self._scanned(txn)[0], default=-1)
        cursor = txn.cursor(db=self.db["persons"])
        return from_u64(cursor.key()) if cursor.last() else -1

    def person_rows(self, txn: lmdb.Transaction, persons: Iterable[int] | None = None) -> list[PersonRow]:
        """Rows of ``persons`` (those with faces), or of every person, in id order."""
        if not self._tables_ready(txn):
            rows = self._scanned(txn)[0]
            return [rows[p] for p in sorted(rows if persons is None else set(persons) & rows.keys())]
        if persons is not None:
            return [r for p in sorted(set(persons)) if (r := self.person_row(p, txn)) is not None]
        return [PersonRow.unpack(from_u64(k), v) for k, v in txn.cursor(db=self.db["persons"])]

    def person_count(self, txn: lmdb.Transaction) -> int:
        if not self._tables_ready(txn):
            return len(self._scanned(txn)[0])
        return txn.stat(self.db["persons"])["entries"]

    def person_ids_by_size(self, txn: lmdb.Transaction) -> Iterator[int]:
        """Person ids, largest first (ties by id): a walk of the ``by_size`` keys."""
        if not self._tables_ready(txn):
            yield from (r.person for r in sorted(self._scanned(txn)[0].values(), key=lambda r: (-r.n, r.person)))
            return
        cursor = txn.cursor(db=self.db["by_size"])
        if cursor.first():
            for key in cursor.iternext(values=False):
                yield _PAIR.unpack(key)[1]

    def persons_by_size(self, txn: lmdb.Transaction, offset: int = 0, limit: int | None = None) -> list[PersonRow]:
        """A page of persons, largest first (ties by id)."""
        out: list[PersonRow] = []
        for n, person in enumerate(self.person_ids_by_size(txn)):
            if limit is not None and len(out) >= limit:
                break
            if n >= offset and (row := self.person_row(person, txn)) is not None:
                out.append(row)
        return out

    def member_similarities(self, person: int, txn: lmdb.Transaction) -> list[tuple[int, float]]:
        """(face id, similarity to the center) of each face of ``person``, in face id order."""
        if not self._tables_ready(txn):
            return [(f, s) for (p, f), s in sorted(self._scanned(txn)[1].items()) if p == person]
        return [(face_id, _SIM.unpack(raw)[0]) for face_id, raw in self._range("members", person, txn)]

    def suggested_faces(self, suggested: int, txn: lmdb.Transaction) -> list[int]:
        """The faces the clusterer suggested for person ``suggested``."""
        if not self._tables_ready(txn):
            return [f for s, f in self._scanned(txn)[2] if s == suggested]
        return [face_id for face_id, _ in self._range("suggested", suggested, txn)]

    def _range(self, table: str, person: int, txn: lmdb.Transaction) -> Iterator[tuple[int, bytes]]:
        cursor = txn.cursor(db=self.db[table])
        if not cursor.set_range(_PAIR.pack(person, 0)):
            return
        for key, raw in cursor:
            p, face_id = _PAIR.unpack(key)
            if p != person:
                return
            yield face_id, raw
