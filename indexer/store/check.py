"""The integrity scan: every face record, vector and thumbnail of the store read and checked (integrity.py)."""

from __future__ import annotations

from typing import Any

from indexer.store.integrity import VECTOR_BYTES, thumbnail_ok
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import FaceRecord, from_u64, unpack


def scan(store: FaceStore) -> dict[str, Any]:
    """Count damaged face records, vectors and thumbnails (and name a few face ids) for ``status``."""
    damaged = {"faces": 0, "vectors": 0, "thumbnails": 0}
    examples: list[int] = []

    def bad(kind: str, key: bytes) -> None:
        damaged[kind] += 1
        if len(examples) < 10:
            examples.append(from_u64(key) if len(key) == 8 else -1)

    with store.read() as txn:
        for key, raw in txn.cursor(db=store.db["faces"]):
            try:
                FaceRecord(**unpack(raw))
            except Exception:
                bad("faces", key)
        for key, raw in txn.cursor(db=store.db["vectors"]):
            if len(raw) != VECTOR_BYTES:
                bad("vectors", key)
        for key, raw in txn.cursor(db=store.db["thumbs"]):
            if raw and not thumbnail_ok(raw):
                bad("thumbnails", key)
    return {**damaged, "face_ids": examples}
