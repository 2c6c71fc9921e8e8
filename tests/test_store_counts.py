"""``status`` reads kept counts of files by status and a table of the failed ones, never every file record: every
way a file record changes keeps them equal to a full count, and an index from before them is counted once."""

from __future__ import annotations

import numpy as np

from indexer.store.files import COUNTS_KEY, STATUSES
from indexer.store.lmdb_store import SCHEMA_VERSION, FaceStore
from indexer.store.records import FileRecord, NewFace, pack


def face(seed: int) -> NewFace:
    v = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
    return NewFace(box=[0, 0, 10, 10], prob=0.99, landmarks=[[0, 0]] * 5, vector=v / np.linalg.norm(v),
                   thumbnail=b"")


def scanned(store: FaceStore) -> tuple[dict[str, int], list[dict]]:
    with store.read() as txn:
        records = list(store.iter_files(txn))
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    return counts, sorted(({"path": r.path, "reason": r.reason} for r in records if r.status == "failed"),
                          key=lambda f: f["path"])


def assert_kept(store: FaceStore) -> None:
    kept = store.counts()
    counts, failures = scanned(store)
    assert kept["files"] == counts and sorted(kept["failures"], key=lambda f: f["path"]) == failures


def test_every_change_of_a_file_record_keeps_the_counts(tmp_path):
    store = FaceStore(tmp_path / "ix")
    with store.read() as txn:
        assert store.get_meta(COUNTS_KEY, None, txn) == dict.fromkeys(STATUSES, 0)

    def steps(txn) -> None:
        store.put_file(txn, FileRecord("/p/a.jpg", 1, 1, "a" * 64, "indexed"), [face(1)])
        store.put_file(txn, FileRecord("/p/b.jpg", 1, 1, "b" * 64, "failed", reason="truncated"))
        store.put_file(txn, FileRecord("/p/c.jpg", 1, 1, "c" * 64, "no_face"))
        store.put_file(txn, FileRecord("/p/d\udcff.jpg", 1, 1, "d" * 64, "failed", reason="not an image"))

    store.transact(steps)
    assert_kept(store)
    assert store.counts()["files"] == {"indexed": 1, "no_face": 1, "failed": 2}
    # Re-indexed with another outcome, touched, moved (a failed one too), removed, rewritten by a rebuild.
    store.transact(lambda txn: store.put_file(txn, FileRecord("/p/b.jpg", 2, 2, "e" * 64, "indexed"), [face(2)]))
    assert_kept(store)
    store.transact(lambda txn: store.touch_file(txn, "/p/a.jpg", 5, 5))
    store.transact(lambda txn: store.move_file(txn, "/p/d\udcff.jpg", "/q/d.jpg"))
    assert_kept(store)
    assert store.counts()["failures"] == [{"path": "/q/d.jpg", "reason": "not an image"}]
    store.transact(lambda txn: store.move_file(txn, "/p/c.jpg", "/p/a.jpg"))   # a move over another file
    assert_kept(store)
    store.transact(lambda txn: store.remove_file(txn, "/q/d.jpg"))
    store.transact(lambda txn: store.rewrite_file(txn, FileRecord("/p/b.jpg", 3, 3, "f" * 64, "no_face"), {}))
    assert_kept(store)
    assert store.counts()["files"] == {"indexed": 0, "no_face": 2, "failed": 0} and store.face_count() == 0
    store.close()


def test_an_index_from_before_the_counts_is_scanned_by_readers_and_counted_once_by_a_writer(tmp_path):
    store = FaceStore(tmp_path / "ix")

    def fill(txn) -> None:
        for i in range(30):
            status = ("indexed", "no_face", "failed")[i % 3]
            store.put_file(txn, FileRecord(f"/p/{i}.jpg", 1, 1, f"{i:064x}", status, reason=f"why {i}"),
                           [face(i)] if status == "indexed" else [])

    store.transact(fill)
    want = scanned(store)

    def downgrade(txn) -> None:   # what a version 2 index holds: no counts, no failed table
        txn.delete(COUNTS_KEY.encode(), db=store.db["meta"])
        txn.drop(store.db["failed"], delete=True)
        txn.put(b"schema", pack(2), db=store.db["meta"])

    store.transact(downgrade)
    store.close()
    reader = FaceStore(tmp_path / "ix", readonly=True)
    assert not reader.has_table("failed") and reader.counts()["files"] == want[0]
    reader.close()
    writer = FaceStore(tmp_path / "ix")
    assert writer.get_meta("schema") == SCHEMA_VERSION and writer.get_meta(COUNTS_KEY) == want[0]
    assert_kept(writer)
    writer.close()
