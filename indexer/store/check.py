"""``faceindex check``: the integrity scan, every face record, vector and thumbnail read and checked (integrity.py).

It reads the whole store, so it is a command of its own with a progress bar, not part of ``status``: its findings
and when it ran are recorded (meta ``integrity_check``), and ``status`` shows that record.
"""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from indexer.store.integrity import VECTOR_BYTES, face_or_why, thumbnail_ok
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import from_u64

RECORD_KEY = "integrity_check"
KINDS = ("faces", "vectors", "thumbnails")


def scan(store: FaceStore, progress: bool = False) -> dict[str, Any]:
    """Count damaged face records, vectors and thumbnails, naming up to 10 face ids."""
    damaged = dict.fromkeys(KINDS, 0)
    examples: list[int] = []

    def bad(kind: str, key: bytes) -> None:
        damaged[kind] += 1
        if len(examples) < 10:
            examples.append(from_u64(key) if len(key) == 8 else -1)

    checks = (("faces", "faces", lambda raw: not isinstance(face_or_why(raw), str)),
              ("vectors", "vectors", lambda raw: len(raw) == VECTOR_BYTES),
              ("thumbs", "thumbnails", lambda raw: not raw or thumbnail_ok(raw)))
    started = time.time()
    with store.read(buffers=True) as txn:
        total = sum(txn.stat(store.db[table])["entries"] for table, _, _ in checks)
        with tqdm(total=total, unit="record", disable=not progress, desc="check") as bar:
            for table, kind, ok in checks:
                for key, raw in txn.cursor(db=store.db[table]):
                    if not ok(raw):
                        bad(kind, bytes(key))
                    bar.update()
    return {**damaged, "face_ids": examples, "records": total, "checked_at": started,
            "seconds": round(time.time() - started, 3)}


def record(store: FaceStore, result: dict[str, Any]) -> None:
    """Keep the findings for ``status`` (a read-only index is checked but keeps no record)."""
    if not store.readonly:
        store.transact(lambda txn: store.put_meta(txn, RECORD_KEY, result))


def last(store: FaceStore) -> dict[str, Any]:
    """What the last check found, for ``status``: counts of None and ``checked_at`` None when it never ran."""
    found = store.get_meta(RECORD_KEY, None)
    if found is None:
        return {**dict.fromkeys(KINDS), "face_ids": [], "checked_at": None}
    return {**found, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(found["checked_at"]))}
