"""The oracle the kill -9 trials compare with: what an index over a folder must hold, whatever happened to it.

- every regular image file in the folder has exactly one record, true to its bytes (sha256), with exactly the faces
  a clean ingest of those bytes finds (count, and each box on the same face: IoU >= 0.8);
- no record of a file that is not there (deleted, or renamed away);
- no face belongs to two files; faces, vectors and the FAISS index (opened as a user would: snapshot + replayed
  log) hold exactly the same ids (tests.test_ingest.consistency);
- persons: every face is in an existing person or unassigned, and the names given before the kill are still on
  the same ids;
- the user's word (tests/faults/test_kill9.py makes every kind of edit: name, merge, move, remove, ignore) is
  intact for every face still present, and obeyed: a face tied to a person is in it, an ignored face in none, a
  removed face not in the person it was removed from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from indexer.config import Settings
from indexer.library import FaceIndex
from indexer.persons.word import FaceWord, load_word
from indexer.pipeline.scan import scan
from indexer.store.lmdb_store import FaceStore
from tests.test_ingest import consistency

# The same face, not the same floats: a photo detected in another batch composition can come out a few pixels
# off (bench_soak: 511 of 514 faces identical, 3 off by up to 4.6 px, IoU > 0.9), as batched convolutions round
# differently; a different face would not overlap this much.
MIN_IOU = 0.8


@dataclass(frozen=True)
class Truth:
    """What a clean ingest makes of some bytes: the boxes of their faces, sorted; or a failure."""

    boxes: tuple[tuple[float, ...], ...] = ()
    failed: bool = False


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reference(index: Path) -> dict[str, Truth]:
    """sha256 -> Truth, from an index built by a clean, uninterrupted ingest."""
    store = FaceStore(index, readonly=True)
    try:
        with store.read() as txn:
            return {rec.sha256: Truth(tuple(sorted(tuple(store.get_face(f, txn).box) for f in rec.face_ids)),
                                      failed=rec.status == "failed")
                    for rec in store.iter_files(txn) if rec.sha256}
    finally:
        store.close()


def users_word(index: Path) -> dict[int, FaceWord]:
    """What the user said of each face, as the store holds it."""
    store = FaceStore(index, readonly=True)
    try:
        with store.read() as txn:
            return dict(load_word(store, txn).faces)
    finally:
        store.close()


def check_word(index: Path, word: dict[int, FaceWord]) -> None:
    """The word given before the kill is intact for every face still present, and every person obeys it."""
    store = FaceStore(index, readonly=True)
    try:
        with store.read() as txn:
            placed = {f.face_id: f.cluster for f in store.iter_faces(txn)}
            now = load_word(store, txn).faces
    finally:
        store.close()
    for face_id, said in word.items():
        if face_id not in placed:
            continue  # its file was deleted or overwritten: the face is gone, and its word with it
        assert now.get(face_id) == said, f"face {face_id}: the user said {said}, the store now holds {now.get(face_id)}"
        if said.ignored:
            assert placed[face_id] == -1, f"ignored face {face_id} is in person {placed[face_id]}"
        elif said.person is not None:
            assert placed[face_id] == said.person, f"face {face_id} tied to {said.person} is in {placed[face_id]}"
        assert placed[face_id] not in said.not_persons, f"face {face_id} is back in {placed[face_id]}"


def check(index: Path, folder: Path, truth: dict[str, Truth], names: dict[int, str],
          word: dict[int, FaceWord] | None = None) -> dict[str, int]:
    """Compare ``index`` with the oracle for ``folder``; returns {path: faces} (and "_faces") when it agrees."""
    view = consistency(index)  # store invariants and FAISS == store
    on_disk = set(scan([folder], Settings().ingest.extensions, Settings().watch.ignore))
    store = FaceStore(index, readonly=True)
    try:
        with store.read() as txn:
            records = {rec.path: rec for rec in store.iter_files(txn)}
            missing, extra = on_disk - set(records), set(records) - on_disk
            assert not missing and not extra, f"files without records: {missing}; records of absent files: {extra}"
            for path, rec in records.items():
                want = truth[sha(path)]
                if want.failed:
                    assert rec.status == "failed", f"{path}: {rec.status}, a clean ingest records it as failed"
                    continue
                assert rec.sha256 == sha(path), f"{path}: the record is of other bytes"
                got = tuple(sorted(tuple(store.get_face(f, txn).box) for f in rec.face_ids))
                assert len(got) == len(want.boxes), (f"{path}: {len(got)} faces ({rec.status} {rec.reason!r}), a clean "
                                                     f"ingest finds {len(want.boxes)}")
                for a, b in zip(got, want.boxes, strict=True):
                    assert iou(a, b) >= MIN_IOU, (path, a, b)
            clusters = {f.cluster for f in store.iter_faces(txn)}
    finally:
        store.close()
    if names:
        with FaceIndex(Settings(index_dir=str(index))) as fi:
            persons = {row["id"]: row["name"] for row in fi.people()}
        assert clusters <= set(persons) | {-1}, f"faces in persons that do not exist: {clusters - set(persons)}"
        for pid, name in names.items():
            assert persons.get(pid) == name, f"person {pid} was named {name!r}, now {persons.get(pid)!r}"
    if word is not None:
        check_word(index, word)
    check_person_tables(index)
    return view


def check_person_tables(index: Path) -> None:
    """The person tables (store/persons.py) say what a scan of every face says: members, sizes, sums."""
    from tests.test_person_tables import tables_match_a_scan

    store = FaceStore(index, readonly=True)
    try:
        tables_match_a_scan(store)
    finally:
        store.close()
