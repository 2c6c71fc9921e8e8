"""The adaptive method's recall passes on cluster centers (a split identity joins, an unassigned face of a known person
joins, look-alike strangers stay apart, the user's word holds), and the people folds of the cross-validation
(issue 11)."""

from __future__ import annotations

import numpy as np

from benchmarks.cluster_cv import people_folds, worst_fold_best
from indexer.cluster import cluster_identities
from indexer.cluster.identity import average_linkage_forest, renumber
from indexer.cluster.passes import attach_unassigned, merge_close_centers, nearest_and_rival
from indexer.library import FaceIndex, OpenMode
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import FileRecord, NewFace
from tests.conftest import settings_for

DIM = 512


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def around(center: np.ndarray, n: int, rng: np.random.Generator, spread: float = 0.5) -> np.ndarray:
    """``n`` faces near ``center``: cosine ~ 1 / sqrt(1 + spread^2) to it (0.89 at 0.5)."""
    return unit(center + spread * rng.normal(size=(n, DIM)) / np.sqrt(DIM))


def blend(a: np.ndarray, b: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector at cosine ``cos`` to unit ``a``, in the plane of ``a`` and ``b`` (b ~ orthogonal to a)."""
    b = unit(b - (b @ a) * a)
    return unit(cos * a + np.sqrt(1 - cos * cos) * b)


def test_two_tight_halves_of_one_person_join_and_strangers_do_not():
    rng = np.random.default_rng(5)
    person, stranger = unit(rng.normal(size=DIM)), unit(rng.normal(size=DIM))
    look = unit(rng.normal(size=DIM))
    # One person in two looks (center cosine ~0.8), each look tight; a stranger far from both; one noise face.
    noise = lambda: 0.5 * rng.normal(size=(6, DIM)) / np.sqrt(DIM)  # noqa: E731  (norm ~0.5 a face)
    young, old = unit(person + 0.3 * look + noise()), unit(person - 0.3 * look + noise())
    other = unit(stranger + noise())
    x = np.concatenate([young, old, other, unit(rng.normal(size=(1, DIM)))])
    labels = np.array([0] * 6 + [1] * 6 + [2] * 6 + [-1])
    merged = merge_close_centers(x, labels, 0.7)
    assert len(set(merged[:12])) == 1
    assert merged[12] != merged[0] and len(set(merged[12:18])) == 1
    assert merged[18] == -1
    assert (merge_close_centers(x, labels, 0.99) == labels).all()  # nothing that close: unchanged


def test_a_person_in_pieces_joins_and_a_cluster_between_two_people_joins_neither():
    rng = np.random.default_rng(11)
    person = unit(rng.normal(size=DIM))
    # One person in a big cluster and three small pieces (centers ~0.8 apart). A lead over the *second* nearest
    # center would stop every piece (its second nearest is another piece of the same person); rivals are centers
    # that are not close to the nearest one, i.e. other people.
    pieces = [around(blend(person, rng.normal(size=DIM), 0.9), n, rng) for n in (12, 3, 3, 2)]
    # Two strangers, and a small cluster just between them (center cosine ~0.7 to both): nearest to one of them by a
    # hair, so not clearly either. Neither big cluster may join it (the smaller joins the larger, never back).
    a, b = unit(rng.normal(size=DIM)), unit(rng.normal(size=DIM))
    between = around(unit(a + b), 3, rng)
    x = np.concatenate(pieces + [around(a, 8, rng), around(b, 8, rng), between])
    labels = np.repeat(np.arange(7), [12, 3, 3, 2, 8, 8, 3])
    merged = merge_close_centers(x, labels, 0.65, lead=0.15)
    assert len(set(merged[:20])) == 1, "the pieces of one person join"
    rest = merged[20:]
    assert len(set(rest)) == 3 and not set(rest) & set(merged[:20]), "the two strangers and the in-between stay apart"
    # Without the lead the in-between cluster joins whichever stranger is a hair nearer: the lead is what stops it.
    assert len(set(merge_close_centers(x, labels, 0.65, lead=0.0)[20:])) == 2


def test_an_unassigned_face_joins_a_clearly_nearest_person_only():
    rng = np.random.default_rng(3)
    a, b, c = (unit(rng.normal(size=DIM)) for _ in range(3))
    x = np.concatenate([around(a, 8, rng), around(b, 8, rng), around(c, 8, rng)])
    odd = blend(a, rng.normal(size=DIM), 0.6)                   # a's odd photo: under any linkage threshold
    between = unit(a + b)                                       # as near a as b: not clearly anyone
    stranger = unit(rng.normal(size=DIM))
    x = np.concatenate([x, np.stack([odd, between, stranger])])
    labels = np.concatenate([np.repeat([0, 1, 2], 8), [-1, -1, -1]])
    best, sim, rival = nearest_and_rival(x[24:], unit(np.stack([x[:8].mean(0), x[8:16].mean(0), x[16:24].mean(0)])),
                                         None)
    assert best[0] == 0 and sim[0] - rival[0] > 0.3 and abs(sim[1] - rival[1]) < 0.05
    out = attach_unassigned(x, labels, 0.5, lead=0.15)
    assert out[24] == 0, "the odd photo joins its person"
    assert out[25] == -1 and out[26] == -1, "a face between two persons, and a stranger, stay unassigned"
    assert (out[:24] == labels[:24]).all()
    assert (attach_unassigned(x, labels, 0.9, lead=0.15) == labels).all()  # nothing that close: unchanged


def test_the_passes_obey_the_users_word(tmp_path):
    """A recluster with both passes on still keeps what the user said: faces removed from a person stay out of it
    although the merge pass would join them, and a face the user ignored is attached to nobody."""
    rng = np.random.default_rng(9)
    person, other = unit(rng.normal(size=DIM)), unit(rng.normal(size=DIM))
    looks = [blend(person, rng.normal(size=DIM), 0.9) for _ in range(2)]   # two looks, centers ~0.8 apart
    x = np.concatenate([around(looks[0], 6, rng, 0.4), around(looks[1], 6, rng, 0.4), around(other, 6, rng, 0.4)])
    store = FaceStore(tmp_path / "index")

    def fill(txn) -> None:
        for i in range(3):
            faces = [NewFace(box=[0, 0, 10, 10], prob=0.99, landmarks=[[0, 0]] * 5, vector=v, thumbnail=b"")
                     for v in x[i * 6:(i + 1) * 6]]
            store.put_file(txn, FileRecord(f"/p/{i}.jpg", 1, 1, f"{i:064d}", "indexed"), faces)

    store.transact(fill)
    store.close()
    passes = {"threshold": 0.75, "pair_margin": 0.0, "center_merge": 0.7, "center_lead": 0.15,
              "attach_similarity": 0.5}
    look_a, look_b = list(range(1, 7)), list(range(7, 13))
    with FaceIndex(settings_for(tmp_path / "index", cluster=passes), OpenMode.EDIT) as fi:
        fi.cluster()
        persons = {f.face_id: f.cluster for f in _faces(fi)}
        assert len({persons[f] for f in look_a + look_b}) == 1, "the merge pass joined the two looks"
        joined = persons[1]
        fi.remove_faces(joined, look_b)                     # the user: these are not that person
        fi.ignore_faces([13])
        for _ in range(2):
            fi.cluster()
            persons = {f.face_id: f.cluster for f in _faces(fi)}
            assert all(persons[f] != joined for f in look_b), "removed faces never rejoin, whatever the passes say"
            assert {persons[f] for f in look_a} == {joined}
            assert persons[13] == -1, "an ignored face is attached to nobody"


def _faces(fi: FaceIndex) -> list:
    with fi.store.read() as txn:
        return list(fi.store.iter_faces(txn))


def test_the_second_pass_off_is_the_plain_adaptive_method():
    rng = np.random.default_rng(1)
    x = unit(rng.normal(size=(60, DIM)) + np.repeat(rng.normal(size=(6, DIM)) * 0.2, 10, axis=0))
    plain = renumber(average_linkage_forest(x, 0.3).cut(0.3, 0.03), 2)
    off = {"center_merge": 0.0, "attach_similarity": 0.0}
    assert (cluster_identities(x, "adaptive", threshold=0.3, pair_margin=0.03, **off) == plain).all()


def test_people_folds_are_disjoint_and_share_the_big_identities():
    people = np.array(["big"] * 50 + ["big2"] * 40 + ["mid"] * 10 + [f"s{i}" for i in range(47)])
    folds = people_folds(people, k=5)
    for name in np.unique(people):
        assert len(set(folds[people == name])) == 1  # a person lies in one fold
    assert folds[0] != folds[50]  # the two largest people go to different folds
    strangers = np.array([p.startswith("s") for p in people])
    assert sorted(np.bincount(folds[strangers]).tolist()) == [9, 9, 9, 10, 10]  # dealt round-robin


def test_the_worst_fold_best_rule():
    balanced = np.array([[0.99, 0.80, 0.99], [0.90, 0.90, 0.91], [0.90, 0.90, 0.90]])
    assert worst_fold_best(balanced, [0, 1, 2]) == 1    # best minimum (0.90), then best mean
    assert worst_fold_best(balanced, [0, 2]) == 0       # without the bad fold, row 0 is best
