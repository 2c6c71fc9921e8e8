"""The store's tables of the user's word: ``word``, ``names``, ``history`` (and the legacy ``clusters``' names).

``WordTable`` is a part of ``FaceStore`` (lmdb_store.py); its methods run inside the caller's transaction and deal
in plain values (dicts, names, history entries). What they mean, and the rules every recluster obeys, live in
indexer/persons/word.py; this module only owns the bytes:

- ``word``: face id -> {"person", "confirmed", "not", "ignored"};
- ``names``: person id -> name ("" is a name the user removed);
- ``history``: edit seq -> {"seq", "time", "op", "args", "overrode", "undo": [[table, key, old value], ...]};
- ``clusters``: a schema 1 index's clusters; read only to adopt their names, dropped once adopted.

An index opened read-only before its first writer may lack the first three (``has_table``): they read as empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lmdb

from indexer.store.records import from_u64, pack, u64, unpack

WORD_TABLES = ("word", "names")  # the tables an edit writes (and undo restores), key by key


class WordTable:
    """Methods of ``FaceStore`` that read and write the user's word."""

    db: dict[str, Any]   # FaceStore's tables; ``has_table`` is FaceStore's too

    # ------------------------------------------------------------------ word
    def face_word(self, txn: lmdb.Transaction, face_id: int) -> dict[str, Any] | None:
        """What the user said of one face, or None."""
        raw = txn.get(u64(face_id), db=self.db["word"]) if self.has_table("word") else None
        return None if raw is None else unpack(raw)

    def face_words(self, txn: lmdb.Transaction) -> Iterator[tuple[int, dict[str, Any]]]:
        """(face id, word) for every face the user said something of, in face id order."""
        if self.has_table("word"):
            for key, raw in txn.cursor(db=self.db["word"]):
                yield from_u64(key), unpack(raw)

    # ------------------------------------------------------------------ names
    def name_rows(self, txn: lmdb.Transaction) -> Iterator[tuple[int, str]]:
        """(person id, name) as the user left them ("" = removed), in person id order."""
        if self.has_table("names"):
            for key, raw in txn.cursor(db=self.db["names"]):
                yield from_u64(key), unpack(raw)

    def legacy_cluster_names(self, txn: lmdb.Transaction) -> Iterator[tuple[int, str]]:
        """(person id, name) of a schema 1 index's named clusters (names lived there before the word)."""
        for key, raw in txn.cursor(db=self.db["clusters"]):
            name = unpack(raw).get("name", "")
            if name:
                yield from_u64(key), name

    def drop_legacy_clusters(self, txn: lmdb.Transaction) -> None:
        """Empty the schema 1 clusters table (after its names were adopted)."""
        if txn.stat(self.db["clusters"])["entries"]:
            txn.drop(self.db["clusters"], delete=False)

    # ------------------------------------------------------------------ edits
    def put_word_key(self, txn: lmdb.Transaction, table: str, key: bytes, value: bytes | None) -> bytes | None:
        """Write (or delete, for None) one key of ``word`` or ``names``; returns its value before."""
        if table not in WORD_TABLES:
            raise ValueError(f"not a table of the user's word: {table!r}")
        db = self.db[table]
        old = txn.get(key, db=db)
        old = None if old is None else bytes(old)
        if value is None:
            txn.delete(key, db=db)
        else:
            txn.put(key, value, db=db)
        return old

    def append_history(self, txn: lmdb.Transaction, entry: dict[str, Any]) -> None:
        txn.put(u64(entry["seq"]), pack(entry), db=self.db["history"])

    def history_entries(self, txn: lmdb.Transaction) -> Iterator[dict[str, Any]]:
        """Every edit, oldest first, with its undo records."""
        if self.has_table("history"):
            for _, raw in txn.cursor(db=self.db["history"]):
                yield unpack(raw)

    def pop_history(self, txn: lmdb.Transaction) -> dict[str, Any] | None:
        """Restore every key the last edit wrote to its value before, drop the edit, and return it (None: none)."""
        cursor = txn.cursor(db=self.db["history"])
        if not cursor.last():
            return None
        entry = unpack(cursor.value())
        for table, key, old in reversed(entry["undo"]):
            self.put_word_key(txn, table, key, old)
        cursor.delete()
        return entry
