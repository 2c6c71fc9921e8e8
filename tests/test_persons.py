"""The user's word about persons: derived persons obey it, through every clustering method, and undo restores it."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.config import CLUSTER_METHODS
from indexer.errors import ClusteringError
from indexer.library import FaceIndex, OpenMode
from indexer.persons.derive import derive_persons
from indexer.persons.word import FaceWord
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import FileRecord, NewFace
from tests.conftest import settings_for

DIM = 512


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def people_vectors(n_people: int, per_person: int, seed: int = 7, spread: float = 0.45) -> np.ndarray:
    """Faces of ``n_people`` identities: cosine ~0.8 within an identity, ~0 across."""
    rng = np.random.default_rng(seed)
    centers = unit(rng.normal(size=(n_people, DIM)))
    noise = rng.normal(size=(n_people, per_person, DIM)) * spread / np.sqrt(DIM)
    return unit(centers[:, None, :] + noise).reshape(-1, DIM)


# ------------------------------------------------------------------------------------------ derive_persons (pure)
def derive(suggested, x, word=None, **kw):
    ids = np.arange(len(suggested), dtype=np.int64)
    args = {"min_similarity": 0.45, "pull_similarity": 0.55, "next_id": 100, **kw}
    return derive_persons(ids, np.asarray(suggested), x, word or {}, **args)


def test_without_edits_the_suggestion_stands():
    x = people_vectors(2, 3)
    d = derive([4, 4, 4, 9, 9, -1], x)
    assert d.labels.tolist() == [4, 4, 4, 9, 9, -1]
    assert d.ids.tolist() == [4, 9] and d.centers.shape == (2, DIM)
    assert np.allclose(np.linalg.norm(d.centers, axis=1), 1) and np.isnan(d.similarity[5])


def test_a_tied_face_is_where_the_user_put_it_and_pulls_its_near_duplicates():
    x = people_vectors(2, 4)  # rows 0-3 person A, 4-7 person B
    # The clusterer put A's faces 2 and 3 (a burst) with B; the user moves face 2 to A (id 1).
    suggested = [1, 1, 5, 5, 5, 5, 5, 5]
    d = derive(suggested, x, {2: FaceWord(person=1, confirmed=True)})
    assert d.labels.tolist() == [1, 1, 1, 1, 5, 5, 5, 5]


def test_removed_faces_never_join_that_person():
    x = people_vectors(2, 4)
    d = derive([1, 1, 1, 1, 5, 5, 5, 5], x, {0: FaceWord(not_persons=(1,))})
    assert d.labels[0] not in (1,)
    assert d.labels[1:].tolist() == [1, 1, 1, 5, 5, 5, 5]


def test_ignored_faces_belong_to_nobody_and_count_for_no_center():
    x = people_vectors(1, 4)
    far = unit(np.random.default_rng(3).normal(size=(1, DIM)))
    x = np.vstack([x, far])
    with_ignored = derive([2, 2, 2, 2, 2], x, {4: FaceWord(ignored=True)})
    assert with_ignored.labels.tolist() == [2, 2, 2, 2, -1]
    assert np.allclose(with_ignored.centers, derive([2, 2, 2, 2], x[:4]).centers, atol=1e-5)


def test_a_cluster_taken_out_of_the_person_whose_id_it_carries_gets_a_fresh_id():
    x = people_vectors(2, 3)
    # Person 3 is the user's (face 0 tied); the faces of cluster 3 were removed from person 3 by the user.
    word = {0: FaceWord(person=3, confirmed=True), **{i: FaceWord(not_persons=(3,)) for i in (3, 4, 5)}}
    d = derive([7, 7, 7, 3, 3, 3], x, word, next_id=40)
    assert d.labels.tolist() == [3, 3, 3, 40, 40, 40] and d.fresh_ids == [40]
    # Without the removals the cluster carrying id 3 is person 3 (ids are matched by center).
    assert derive([7, 7, 7, 3, 3, 3], x, {0: FaceWord(person=3)}).labels.tolist() == [3] * 6


def test_merged_groups_stay_together_and_only_near_duplicates_of_placed_faces_are_pulled_in():
    x = people_vectors(3, 3, spread=0.2)
    rng = np.random.default_rng(5)
    burst = unit(x[0] + rng.normal(size=DIM) * 0.3 / np.sqrt(DIM))      # another shot of face 0's burst
    x = np.vstack([x, burst[None, :]])
    assert float(burst @ x[0]) >= 0.8
    word = {i: FaceWord(person=1) for i in range(6)}  # a merge tied A's and B's faces to person 1
    d = derive([1, 1, 1, 2, 2, 2, -1, 8, 8, -1], x, word)
    assert d.labels[:6].tolist() == [1] * 6
    assert d.labels[6] == -1, "noise of another identity is not pulled into person 1"
    assert d.labels[9] == 1, "a near-duplicate of a placed face joins its person"


# ------------------------------------------------------------------------------------------ edits over a store
N_PEOPLE, PER_PERSON = 6, 8


@pytest.fixture
def index(tmp_path):
    """An index of synthetic faces (no models needed): identity i has faces i*8 .. i*8+7 (face ids from 1)."""
    x = people_vectors(N_PEOPLE, PER_PERSON)
    store = FaceStore(tmp_path / "index")

    def fill(txn) -> None:
        for person in range(N_PEOPLE):
            faces = [NewFace(box=[0, 0, 10, 10], prob=0.99, landmarks=[[0, 0]] * 5, vector=v, thumbnail=b"")
                     for v in x[person * PER_PERSON:(person + 1) * PER_PERSON]]
            store.put_file(txn, FileRecord(f"/p/{person}.jpg", 1, 1, f"{person:064d}", "indexed"), faces)

    store.transact(fill)
    store.close()
    with FaceIndex(settings_for(tmp_path / "index"), OpenMode.EDIT) as fi:
        yield fi


def faces_of_identity(i: int) -> list[int]:
    return list(range(i * PER_PERSON + 1, (i + 1) * PER_PERSON + 1))


def person_of(fi: FaceIndex) -> dict[int, int]:
    with fi.store.read() as txn:
        return {f.face_id: f.cluster for f in fi.store.iter_faces(txn)}


def apply_edits(fi: FaceIndex) -> dict[str, int]:
    """One edit of each kind; returns the persons involved."""
    fi.cluster()
    p = person_of(fi)
    a, b, c, d, e, f = (p[faces_of_identity(i)[0]] for i in range(N_PEOPLE))
    fi.merge(a, b)                                          # the user says identities 0 and 1 are one person
    fi.name(c, "Cee")
    fi.remove_faces(d, [faces_of_identity(3)[0]])          # this face is not d
    fi.move_faces([faces_of_identity(4)[1]], f)            # this face of e is f
    fi.ignore_faces([faces_of_identity(4)[2]])             # a stranger
    return {"a": a, "c": c, "d": d, "f": f}


def check_edits_hold(fi: FaceIndex, ids: dict[str, int]) -> None:
    p = person_of(fi)
    merged = {p[i] for i in faces_of_identity(0) + faces_of_identity(1)}
    assert merged == {ids["a"]}, "merged persons stay one person under the kept id"
    assert {p[i] for i in faces_of_identity(2)} == {ids["c"]} and fi.person(ids["c"])["name"] == "Cee"
    assert p[faces_of_identity(3)[0]] != ids["d"], "a removed face never rejoins its person"
    assert p[faces_of_identity(4)[1]] == ids["f"], "a moved face stays where the user put it"
    assert p[faces_of_identity(4)[2]] == -1, "an ignored face belongs to nobody"
    listed = {r["id"]: r for r in fi.people()}
    assert all(listed[pid]["size"] == sum(1 for v in p.values() if v == pid) for pid in listed)


@pytest.mark.parametrize("method", CLUSTER_METHODS)
def test_every_clustering_method_obeys_the_edits(index, method):
    ids = apply_edits(index)
    check_edits_hold(index, ids)  # at once, before any recluster
    result = index.cluster(method=method, **({"k": N_PEOPLE} if method == "kmeans" else {}))
    assert result["method"] == method
    check_edits_hold(index, ids)
    index.cluster(method=method, **({"k": N_PEOPLE} if method == "kmeans" else {}))  # and again
    check_edits_hold(index, ids)


def test_show_marks_confirmed_faces_and_history_lists_edits(index):
    ids = apply_edits(index)
    shown = index.person(ids["f"])
    confirmed = {f["face_id"] for f in shown["faces"] if f["confirmed"]}
    assert confirmed == {faces_of_identity(4)[1]}  # moved, so confirmed; the suggested faces are not
    assert all(f["confirmed"] for f in index.person(ids["c"])["faces"])  # named while they were in it
    assert [e["op"] for e in index.history()] == ["merge", "name", "remove", "move", "ignore"]


def visible_state(fi: FaceIndex) -> tuple:
    """What the user sees: each face's person, each person's name, which faces are confirmed."""
    people = fi.people()
    confirmed = sorted(f["face_id"] for r in people for f in fi.person(r["id"])["faces"] if f["confirmed"])
    return person_of(fi), {r["id"]: r["name"] for r in people}, confirmed


def test_undo_restores_the_state_before_each_edit(index):
    index.cluster()
    states = [visible_state(index)]
    p = states[0][0]
    a, b = p[faces_of_identity(0)[0]], p[faces_of_identity(1)[0]]
    for edit in (lambda: index.merge(a, b), lambda: index.name(a, "Ab"),
                 lambda: index.move_faces([faces_of_identity(2)[0]], a),
                 lambda: index.ignore_faces([faces_of_identity(3)[0]]),
                 lambda: index.remove_faces(a, [faces_of_identity(0)[1]])):
        edit()
        states.append(visible_state(index))
    assert all(states[i] != states[i + 1] for i in range(len(states) - 1)), "each edit changed something"
    for expected in reversed(states[:-1]):
        index.undo()
        assert visible_state(index) == expected
    with pytest.raises(ClusteringError, match="nothing to undo"):
        index.undo()
    assert index.people() and not any(r["name"] for r in index.people())


def test_contradictory_edits_the_later_wins_and_says_what_it_overrode(index):
    index.cluster()
    p = person_of(index)
    a, b = p[faces_of_identity(0)[0]], p[faces_of_identity(1)[0]]
    face = faces_of_identity(0)[3]
    index.remove_faces(a, [face])
    moved = index.move_faces([face], a)
    assert moved["overrode"] == [f"face {face} was marked not #{a}"]
    assert person_of(index)[face] == a
    ignored = index.ignore_faces([face])
    assert ignored["overrode"] == [f"face {face} was confirmed as #{a}"]
    index.name(b, "Bee")
    renamed = index.name(b, "Bea")
    assert renamed["overrode"] == [f"#{b} was named 'Bee'"]
    with pytest.raises(ClusteringError, match="is not in"):
        index.remove_faces(b, [faces_of_identity(0)[0]])


def test_an_index_from_before_the_word_is_read_as_it_is_and_upgraded_by_a_writer(index, tmp_path):
    """A schema 1 index (no word or person tables, centers and names on the clusters) reads as before; its names
    become the user's, and its first writer builds the person tables."""
    from indexer.persons.state import load_clustering
    from indexer.store.lmdb_store import SCHEMA_VERSION
    from indexer.store.persons import BUILT_KEY, PERSON_TABLES
    from indexer.store.records import pack, u64

    index.cluster()
    before = index.people()
    person = before[0]["id"]
    store = index.store

    def downgrade(txn) -> None:
        clustering = load_clustering(store, txn)
        for cid, center in zip(clustering.ids.tolist(), clustering.centers, strict=True):  # schema 1's rows
            rec = {"center": center.tobytes(), "size": clustering.sizes[cid],
                   "name": "Old Name" if cid == person else ""}
            txn.put(u64(cid), pack(rec), db=store.db["clusters"])
        for table in ("word", "names", "history", *PERSON_TABLES):
            txn.drop(store.db[table], delete=True)
        txn.delete(BUILT_KEY.encode(), db=store.db["meta"])
        txn.put(b"schema", pack(1), db=store.db["meta"])
        txn.delete(b"names_adopted", db=store.db["meta"])

    store.transact(downgrade)
    index.close()
    path = tmp_path / "index"
    with FaceIndex(settings_for(path), OpenMode.READ) as reader:
        assert reader.store.get_meta("schema") == 1 and not reader.store.has_table("word")
        assert {r["id"]: r["name"] for r in reader.people()}[person] == "Old Name"
        assert [(r["id"], r["size"]) for r in reader.people()] == [(r["id"], r["size"]) for r in before]
        assert reader.history() == []
    with FaceIndex(settings_for(path), OpenMode.EDIT) as writer:
        assert writer.store.get_meta("schema") == SCHEMA_VERSION
        assert [(r["id"], r["size"], r["face"]) for r in writer.people()] == [
            (r["id"], r["size"], r["face"]) for r in before]
        writer.merge(person, next(r["id"] for r in writer.people() if r["id"] != person))
        assert writer.person(person)["name"] == "Old Name"  # adopted as the user's word, kept by the merge
        writer.undo()
        assert writer.person(person)["name"] == "Old Name"


def test_status_summarises_the_clustering_without_reading_its_centers(index):
    """``status`` reads the clustering's meta record and table sizes only; it says what the full load says."""
    from indexer.persons.state import clustering_summary, load_clustering

    assert clustering_summary(index.store) == {"method": None, "k": 0}
    index.cluster()
    persons = [r["id"] for r in index.people()]
    index.name(persons[0], "Ada")
    index.name(persons[1], "Bo")
    index.merge(persons[0], persons[1])   # Bo's name goes with the merge: one named person left
    summary = clustering_summary(index.store)
    assert summary.pop("fresh_faces") == 0 and summary.pop("last_local_recluster") is None  # status's own additions
    assert summary == load_clustering(index.store).summary()
    assert summary["named"] == 1
