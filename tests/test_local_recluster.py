"""The local recluster (indexer/persons/local.py) and the daemon's choice of kind (persons/schedule.py), on a real
store and a real FAISS index of synthetic faces (no models needed)."""

from __future__ import annotations

import numpy as np

from indexer.persons.local import local_recluster, scope
from indexer.persons.schedule import BackgroundRecluster, due, local_due
from indexer.store.records import FileRecord, NewFace
from indexer.store.vectors import VectorIndex
from tests.test_person_tables import a_full_rederive_changes_nothing, tables_match_a_scan
from tests.test_persons import N_PEOPLE, PER_PERSON, faces_of_identity, index, people_vectors, person_of  # noqa: F401


def _add(fi, vectors: np.ndarray, prefix: str) -> list[int]:
    """New photos of one face each, committed without a live assignment (as a daemon before the first cluster)."""
    def write(txn) -> list[int]:
        ids = []
        for i, v in enumerate(vectors):
            face = NewFace(box=[0, 0, 10, 10], prob=0.99, landmarks=[[0, 0]] * 5, vector=v, thumbnail=b"")
            ids += fi.store.put_file(txn, FileRecord(f"/new/{prefix}{i}.jpg", 1, 1, f"{prefix}{i:063d}"[:64],
                                                     "indexed"), [face])
        return ids
    return fi.store.transact(write)


def _search(fi):
    with fi.store.read() as txn:
        ids, x = fi.store.all_vectors(txn)
    return VectorIndex.build(ids, x).search


def _fresh(fi) -> int:
    with fi.store.read() as txn:
        return fi.store.fresh_count(txn)


def test_a_local_recluster_places_what_arrived_and_only_that(index):  # noqa: F811
    index.cluster()
    assert _fresh(index) == 0, "a full recluster has seen every face"
    before = person_of(index)
    known = {before[faces_of_identity(i)[0]] for i in range(N_PEOPLE)}
    # 4 faces of a newcomer and 2 more of identity 0, all unassigned (no live assignment here).
    x = people_vectors(N_PEOPLE + 1, PER_PERSON + 2)
    newcomer = _add(index, x[N_PEOPLE * (PER_PERSON + 2):][:4], "n")
    more = _add(index, people_vectors(N_PEOPLE, PER_PERSON + 2)[PER_PERSON:PER_PERSON + 2], "m")   # identity 0
    assert _fresh(index) == 6

    found = scope(index.store, index.settings.cluster, _search(index))
    assert set(found.fresh.tolist()) == set(newcomer + more)
    # in scope: the fresh faces and the person they are near; no other person's faces
    assert set(found.face_ids.tolist()) == set(newcomer + more + faces_of_identity(0))

    done = local_recluster(index.store, index.settings.cluster, _search(index))
    after = person_of(index)
    assert done["fresh"] == 6 and _fresh(index) == 0
    newcomer_person = {after[f] for f in newcomer}
    assert len(newcomer_person) == 1 and newcomer_person.pop() not in known | {-1}
    assert {after[f] for f in more} == {before[faces_of_identity(0)[0]]}, "they joined the person they are"
    assert {f: p for f, p in after.items() if f in before} == before, "no face seen before moved"
    tables_match_a_scan(index.store)
    a_full_rederive_changes_nothing(index)


def test_a_person_that_grew_is_reclustered_with_its_faces_and_the_users_word_holds(index):  # noqa: F811
    index.cluster()
    p = person_of(index)
    a = p[faces_of_identity(0)[0]]
    kept_out = faces_of_identity(0)[-1]
    index.name(a, "Anna")
    index.remove_faces(a, [kept_out])
    # two more photos of Anna, placed in her person as the live assignment would
    x = people_vectors(N_PEOPLE, PER_PERSON + 2)[PER_PERSON:PER_PERSON + 2]
    added = _add(index, x, "a")

    def place(txn) -> None:
        for f in added:
            face = index.store.get_face(f, txn)
            face.cluster = a
            index.store.put_face(txn, face)

    index.store.transact(place)
    found = scope(index.store, index.settings.cluster, _search(index))
    assert set(found.face_ids.tolist()) >= set(faces_of_identity(0)[:-1]) | set(added)
    local_recluster(index.store, index.settings.cluster, _search(index))
    after = person_of(index)
    assert {after[f] for f in [*faces_of_identity(0)[:-1], *added]} == {a}
    assert after[kept_out] != a, "a face the user removed never comes back"
    people = {row["id"]: row for row in index.people()}
    assert people[a]["name"] == "Anna"
    tables_match_a_scan(index.store)
    a_full_rederive_changes_nothing(index)


def test_the_daemon_runs_a_local_recluster_for_new_faces_and_a_full_one_when_the_index_grew(index):  # noqa: F811
    from dataclasses import replace

    index.cluster()
    settings = replace(index.settings.cluster, local_recluster_faces=3, recluster_growth=0.5)
    n = N_PEOPLE * PER_PERSON
    x = people_vectors(N_PEOPLE + 1, PER_PERSON + 2)[N_PEOPLE * (PER_PERSON + 2):]
    _add(index, x[:2], "a")
    assert not local_due(index.store, settings) and not due(index.store, settings, n + 2)
    _add(index, x[2:4], "b")
    assert local_due(index.store, settings) and not due(index.store, settings, n + 4)
    daemon = BackgroundRecluster(index.store, settings, lambda: _search(index))
    daemon.poll(wait=True)
    assert _fresh(index) == 0 and index.store.get_meta("local_recluster")["fresh"] == 4
    clustering = index.store.get_meta("clustering")
    assert clustering["n_faces"] == n, "no full recluster ran"
    _add(index, people_vectors(40, 1, seed=11), "c")   # +44 faces of 48: the index grew by over half
    assert due(index.store, settings, index.store.face_count())
    daemon.poll(wait=True)
    assert index.store.get_meta("clustering")["n_faces"] == n + 44 and _fresh(index) == 0
    tables_match_a_scan(index.store)


def test_a_scope_never_exceeds_its_bound_and_what_does_not_fit_waits(index):  # noqa: F811
    index.cluster()
    x = people_vectors(N_PEOPLE + 1, PER_PERSON + 2)
    _add(index, x[N_PEOPLE * (PER_PERSON + 2):][:4], "n")
    _add(index, people_vectors(N_PEOPLE, PER_PERSON + 2)[PER_PERSON:PER_PERSON + 2], "m")   # near identity 0
    found = scope(index.store, index.settings.cluster, _search(index), max_faces=5)
    assert len(found.fresh) == 5 and len(found.face_ids) <= 5
    assert len(found.persons) == 0, "identity 0's 8 faces do not fit: its person is left whole for later"
    local_recluster(index.store, index.settings.cluster, _search(index), max_faces=5)
    assert _fresh(index) == 1
    tables_match_a_scan(index.store)
    a_full_rederive_changes_nothing(index)


def test_a_big_person_comes_in_with_its_faces_near_the_new_ones_only_and_keeps_them(index, monkeypatch):  # noqa: F811
    from indexer.persons import local

    index.cluster()
    before = person_of(index)
    zero = before[faces_of_identity(0)[0]]
    more = _add(index, people_vectors(N_PEOPLE, PER_PERSON + 2)[PER_PERSON:PER_PERSON + 2], "m")   # identity 0
    monkeypatch.setattr(local, "NEIGHBOURS", 3)
    found = scope(index.store, index.settings.cluster, _search(index), whole_max=PER_PERSON - 1)
    partly = set(found.face_ids.tolist()) - set(more)
    assert zero in found.persons.tolist() and partly < set(faces_of_identity(0)) and 0 < len(partly)
    monkeypatch.setattr(local, "LOCAL_WHOLE_MAX", PER_PERSON - 1)
    local_recluster(index.store, index.settings.cluster, _search(index))
    after = person_of(index)
    assert {after[f] for f in more} == {zero}, "they joined the big person through its center"
    assert {f: p for f, p in after.items() if f in before} == before, "no face seen before moved"
    tables_match_a_scan(index.store)
    a_full_rederive_changes_nothing(index)
