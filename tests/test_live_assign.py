"""The live assignment of new faces by their nearest indexed faces (indexer/persons/assign.py).

The rule itself is a pure function with table tests; then the real thing: a real store, a real FAISS index, the
plan made outside the transaction and settled inside it, the person tables checked against a scan.
"""

from __future__ import annotations

import numpy as np
import pytest

from indexer.persons.assign import AssignRule, KnnAssigner, Neighbour, decide
from indexer.persons.state import Clustering, save_clustering
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import FileRecord, NewFace, u64
from indexer.store.vectors import VectorIndex
from tests.test_person_tables import tables_match_a_scan

RULE = AssignRule(k=10, link=0.55, agree=0.5, min_center=0.45, min_faces=3)


def near(person: int, photo: str, sim: float = 0.8, face: int = 0, free: bool = True) -> Neighbour:
    return Neighbour(sim, person, photo, free, face=face)


def centers_at(value: float):
    return lambda i, person: value


@pytest.mark.parametrize("neighbours, center, expected", [
    ([near(7, "a", face=1), near(7, "b", face=2), near(9, "c", face=3)], 0.7, 7),       # two of three say 7
    ([near(7, "a", face=1), near(9, "b", face=2)], 0.7, 7),                              # a tie: the nearer (equal)
    ([near(7, "a", face=1), near(9, "b", 0.9, face=2), near(9, "c", 0.9, face=3)], 0.7, 9),
    ([near(7, "a", face=1), near(7, "b", face=2)], 0.40, -1),                            # too far from 7's center
    ([near(7, "a", 0.50, face=1), near(7, "b", 0.50, face=2)], 0.7, -1),                # below the linkage
    ([near(7, "a", face=1), near(8, "b", face=2), near(9, "c", face=3)], 0.7, -1),      # no agreement
    ([near(7, "new.jpg", face=1), near(7, "new.jpg", face=2)], 0.7, -1),                # its own photo never counts
])
def test_a_face_joins_the_person_its_linked_neighbours_agree_on(neighbours, center, expected):
    decision = decide(RULE, ["new.jpg"], [neighbours], centers_at(center))
    assert decision.labels == [expected]
    assert decision.adopted == {}


def test_enough_free_neighbours_of_other_photos_start_a_new_person():
    free = [near(-1, "a", face=1), near(-1, "b", face=2)]
    decision = decide(RULE, ["new.jpg"], [free], centers_at(0.9))
    assert decision.labels == [-2] and decision.adopted == {-2: [1, 2]}
    # Two free faces of one photo count once; an ignored face (not free) never; below the link, not at all.
    for weak in ([near(-1, "a", face=1), near(-1, "a", face=2)], [near(-1, "a", face=1), near(-1, "b", free=False)],
                 [near(-1, "a", face=1), near(-1, "b", 0.5, face=2)]):
        assert decide(RULE, ["new.jpg"], [weak], centers_at(0.9)).labels == [-1]
    # A neighbour with a person beside the free ones: no new person (the recluster decides).
    mixed = [near(-1, "a", face=1), near(-1, "b", face=2), near(7, "c", 0.6, face=3)]
    assert decide(RULE, ["new.jpg"], [mixed], centers_at(0.3)).labels == [-1]


def test_a_free_face_taken_into_a_new_person_is_that_person_for_the_rest_of_the_batch():
    free = [near(-1, "a", face=1), near(-1, "b", face=2)]
    later = [near(-1, "a", face=1), near(-1, "c", face=3)]    # face 1 is already in the first new person
    decision = decide(RULE, ["x.jpg", "y.jpg"], [free, later], centers_at(0.9))
    assert decision.labels == [-2, -2] and decision.adopted == {-2: [1, 2]}


def test_batch_mates_start_a_person_together_and_faces_of_one_photo_never_share_one():
    def mates(i: int, photos: list[str], sim: float = 0.8) -> list[Neighbour]:
        return [Neighbour(sim, -1, p, mate=j) for j, p in enumerate(photos) if j != i]

    photos = ["x.jpg", "y.jpg", "z.jpg"]
    decision = decide(RULE, photos, [mates(i, photos) for i in range(3)], centers_at(0.9))
    assert decision.labels == [-2, -2, -2] and decision.adopted == {-2: []}
    # Two faces of one group photo, both close to person 7: the first joins it, the second may not.
    group = ["g.jpg", "g.jpg"]
    known = [near(7, "a", face=1), near(7, "b", face=2)]
    decision = decide(RULE, group, [known + mates(0, group), known + mates(1, group)], centers_at(0.8))
    assert decision.labels == [7, -1]


def _store_with_persons(path, vectors: np.ndarray, persons: list[int], photos: list[str]) -> FaceStore:
    store = FaceStore(path)

    def write(txn):
        for photo in dict.fromkeys(photos):  # in order: face ids 1, 2, ... follow the rows
            rows = [i for i, p in enumerate(photos) if p == photo]
            faces = [NewFace([0, 0, 10, 10], 0.99, [[0, 0]] * 5, vectors[i], b"t", persons[i], 0.9) for i in rows]
            store.put_file(txn, FileRecord(photo, 1, 1, "", "indexed", width=10, height=10), faces)
        save_clustering(store, txn, Clustering("adaptive", {}, np.zeros(0, np.int64), np.zeros((0, 512), np.float32)))

    store.transact(write)
    return store


def _unit(rng, n: int, base: np.ndarray | None = None, noise: float = 0.3) -> np.ndarray:
    x = rng.standard_normal((n, 512)).astype(np.float32)
    if base is not None:
        x = base + noise * x / np.sqrt(512)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_real_store_and_index_place_new_faces_and_adopt_free_neighbours(tmp_path):
    rng = np.random.default_rng(3)
    anna, bert, carl = _unit(rng, 3)
    old = np.concatenate([_unit(rng, 4, anna), _unit(rng, 2, carl), _unit(rng, 6)])   # carl's two unassigned
    persons = [0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1]
    store = _store_with_persons(tmp_path / "ix", old, persons, [f"old{i}.jpg" for i in range(len(old))])
    index = VectorIndex.build(np.arange(1, len(old) + 1), old)  # face ids are 1, 2, ...
    assigner = KnnAssigner(store, RULE, lambda: index.search)

    new = np.concatenate([_unit(rng, 1, anna), _unit(rng, 1, carl), _unit(rng, 1, bert), _unit(rng, 1, anna)])
    faces = [NewFace([0, 0, 10, 10], 0.99, [[0, 0]] * 5, v, b"t") for v in new]
    photos = ["new1.jpg", "new2.jpg", "new3.jpg", "new1.jpg"]   # faces 0 and 3 share a photo
    plan = assigner.plan(faces, photos)
    assert plan.decision.labels[:3] == [0, -2, -1]          # anna; carl starts a person; bert: alone, unassigned
    assert plan.decision.labels[3] == -1                     # anna again, but its photo already has anna

    def commit(txn):
        plan.settle(store, txn)
        for photo in sorted(set(photos)):
            rows = [faces[i] for i, p in enumerate(photos) if p == photo]
            store.put_file(txn, FileRecord(photo, 1, 1, "", "indexed", width=10, height=10), rows)

    store.transact(commit)
    with store.read() as txn:
        by_path = {f.path: f for f in store.iter_faces(txn)}
        carl_id = by_path["new2.jpg"].cluster
        assert carl_id >= 1 and by_path["old4.jpg"].cluster == by_path["old5.jpg"].cluster == carl_id
        assert by_path["old4.jpg"].suggested is None            # placed live: kept by an edit's re-derivation
        assert store.person_row(carl_id, txn).n == 3
        assert store.get_meta("next_person_id", 0, txn) == carl_id + 1
        assert by_path["new3.jpg"].cluster == -1
        group = sorted((f.cluster, f.similarity) for f in store.iter_faces(txn) if f.path == "new1.jpg")
        assert [c for c, _ in group] == [-1, 0] and 0.45 <= group[1][1] <= 1
    tables_match_a_scan(store)
    store.close()


def test_nothing_is_placed_before_the_first_clustering(tmp_path):
    rng = np.random.default_rng(4)
    store = FaceStore(tmp_path / "ix")
    assigner = KnnAssigner(store, RULE, lambda: None)
    assert assigner.plan([NewFace([0, 0, 1, 1], 0.9, [[0, 0]] * 5, _unit(rng, 1)[0], b"t")], ["a.jpg"]) is None
    store.close()


def test_a_neighbour_with_a_damaged_vector_is_passed_over(tmp_path):
    rng = np.random.default_rng(5)
    (carl,) = _unit(rng, 1)
    old = np.concatenate([_unit(rng, 3, carl), _unit(rng, 3)])
    store = _store_with_persons(tmp_path / "ix", old, [-1] * 6, [f"old{i}.jpg" for i in range(6)])
    index = VectorIndex.build(np.arange(1, 7), old)
    store.transact(lambda txn: txn.put(u64(1), b"\x00" * 100, db=store.db["vectors"]))  # face 1
    plan = KnnAssigner(store, RULE, lambda: index.search).plan(
        [NewFace([0, 0, 10, 10], 0.99, [[0, 0]] * 5, _unit(rng, 1, carl)[0], b"t")], ["new.jpg"])
    assert plan.decision.labels == [-2] and plan.decision.adopted == {-2: [2, 3]}, "face 1 cannot be compared"
    store.close()
