"""The person tables (store/persons.py) stay equal to what a full pass over the faces gives, through edits, undo,
reclusters, re-embedding and deleted files; and an edit's local re-derivation gives what a full one would."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.persons.apply import rederive
from indexer.store.records import FileRecord, NewFace
from tests.test_persons import apply_edits, faces_of_identity, index, person_of  # noqa: F401 (fixture)


def tables_match_a_scan(store) -> None:
    with store.read() as txn:
        kept = {r.person: r for r in store.person_rows(txn)}
        members = {p: dict(store.member_similarities(p, txn)) for p in kept}
        suggested = {c: store.suggested_faces(c, txn) for c in {s for s, _ in store._scanned(txn)[2]}}
        by_size = list(store.person_ids_by_size(txn))
        rows, scanned_members, scanned_suggested = store._scanned(txn)
    assert kept.keys() == rows.keys()
    for person, row in rows.items():
        assert kept[person].n == row.n == len(members[person])
        np.testing.assert_allclose(kept[person].sum, row.sum, atol=1e-9)  # float64 sums: drift far below this
        for face_id, sim in members[person].items():
            assert scanned_members[(person, face_id)] == pytest.approx(sim, nan_ok=True)
    assert by_size == [r.person for r in sorted(rows.values(), key=lambda r: (-r.n, r.person))]
    expected: dict[int, list[int]] = {}
    for cluster, face_id in scanned_suggested:
        expected.setdefault(cluster, []).append(face_id)
    assert suggested == expected


def a_full_rederive_changes_nothing(fi) -> None:
    before = person_of(fi)
    fi.store.transact(lambda txn: rederive(fi.store, txn, fi.settings.cluster))
    assert person_of(fi) == before, "an edit's local re-derivation gives what a full one gives"


def test_tables_follow_every_write(index):  # noqa: F811
    store = index.store
    index.cluster()
    tables_match_a_scan(store)
    apply_edits(index)
    tables_match_a_scan(store)
    a_full_rederive_changes_nothing(index)
    index.undo()
    index.undo()
    tables_match_a_scan(store)
    a_full_rederive_changes_nothing(index)
    index.cluster(method="agglomerative")
    tables_match_a_scan(store)

    rng = np.random.default_rng(3)
    face = faces_of_identity(2)[0]

    def rewrite_and_delete(txn) -> None:
        record = store.get_file("/p/2.jpg", txn)
        vector = rng.standard_normal(512).astype(np.float32)
        new = NewFace(box=[0, 0, 10, 10], prob=0.9, landmarks=[[0, 0]] * 5, vector=vector / np.linalg.norm(vector),
                      thumbnail=b"")
        store.rewrite_file(txn, record, {face: new})  # re-embedded: same id, new vector
        store.remove_file(txn, "/p/5.jpg")
        store.put_file(txn, FileRecord("/p/new.jpg", 1, 1, "f" * 64, "indexed"), [new])

    store.transact(rewrite_and_delete)
    tables_match_a_scan(store)


def test_each_edit_kind_rederives_locally_as_a_full_pass_would(index):  # noqa: F811
    index.cluster()
    p = person_of(index)
    persons = sorted(set(p.values()) - {-1})
    index.merge(persons[0], persons[1])
    a_full_rederive_changes_nothing(index)
    index.name(persons[2], "Cee")
    index.move_faces([faces_of_identity(3)[0], faces_of_identity(4)[0]], persons[2])
    a_full_rederive_changes_nothing(index)
    index.remove_faces(persons[2], [faces_of_identity(2)[1]])
    a_full_rederive_changes_nothing(index)
    index.ignore_faces([faces_of_identity(5)[0]])
    index.ignore_faces([faces_of_identity(5)[0]], ignored=False)
    a_full_rederive_changes_nothing(index)
    for _ in range(6):
        index.undo()
        a_full_rederive_changes_nothing(index)
    tables_match_a_scan(index.store)


def test_status_reads_a_current_snapshot_header_and_loads_the_index_only_when_stale(index, tmp_path):  # noqa: F811
    from indexer.library import FaceIndex, OpenMode
    from indexer.store.lmdb_store import SNAPSHOT_FILE
    from indexer.store.snapshot_info import status_info
    from tests.conftest import settings_for

    index.vectors.save(force=True)
    seq, model = index.store.get_meta("seq"), index.store.get_meta("model")
    loaded = {**index.vectors.info(), "snapshot_seq": index.vectors.saved_seq, "store_seq": seq}
    index.close()
    settings = settings_for(tmp_path / "index")
    with FaceIndex(settings, OpenMode.READ) as reader:
        assert reader.status()["index"] == loaded
        assert "vectors" not in reader.__dict__, "status read the header, not the index"
    path = tmp_path / "index" / SNAPSHOT_FILE
    assert status_info(path, seq, model, settings.index) == loaded
    assert status_info(path, seq + 1, model, settings.index) is None  # stale: the index is loaded and caught up
    path.write_bytes(b"garbage")
    assert status_info(path, seq, model, settings.index) is None
