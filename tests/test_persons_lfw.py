"""100 corrections a user would make on LFW dev-train hold through a recluster, and the clustering is no worse."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from indexer.cluster import external_scores
from indexer.library import FaceIndex, OpenMode
from tests.conftest import settings_for

N_CORRECTIONS = 100


def labels_of(fi: FaceIndex, n: int) -> np.ndarray:
    with fi.store.read() as txn:
        return np.array([fi.store.get_face(i + 1, txn).cluster for i in range(n)])


def plan_corrections(labels: np.ndarray, truth: np.ndarray) -> list[tuple]:
    """The clustering's own mistakes, as a user would fix them: merge persons split in two, move a face to its
    true person, remove a face from a person it does not belong to (its true person has no cluster)."""
    majority = {p: Counter(truth[labels == p]).most_common(1)[0][0] for p in np.unique(labels[labels >= 0])}
    person_of_identity: dict[int, list[int]] = {}
    for p, ident in majority.items():
        person_of_identity.setdefault(int(ident), []).append(int(p))
    merges = [("merge", ps[0], other) for ps in person_of_identity.values() if len(ps) > 1 for other in ps[1:]]
    moves, removes = [], []
    for face in np.flatnonzero(labels >= 0):
        p, ident = int(labels[face]), int(truth[face])
        if majority[p] == ident:
            continue
        home = person_of_identity.get(ident)
        if home:
            moves.append(("move", int(face) + 1, home[0]))
        else:
            removes.append(("remove", int(face) + 1, p))
    plan, queues = [], [merges, moves, removes]
    while any(queues):  # interleave the three kinds, as a user would meet them
        for q in queues:
            if q:
                plan.append(q.pop(0))
    return plan


class User:
    """Applies planned corrections as a user would, to what the persons are now; remembers what was applied."""

    def __init__(self, fi: FaceIndex) -> None:
        self.fi = fi
        self.merged: dict[int, int] = {}
        self.applied: list[tuple] = []

    def live(self, person: int) -> int:
        while person in self.merged:
            person = self.merged[person]
        return person

    def now(self, face_id: int) -> int:
        return self.fi.store.get_face(face_id).cluster

    def exists(self, person: int) -> bool:
        """A user can only act on persons they see (an earlier correction may have emptied one)."""
        with self.fi.store.read() as txn:
            return any(f.cluster == person for f in self.fi.store.iter_faces(txn))

    def correct(self, kind: str, a: int, b: int) -> None:
        if kind == "merge":
            keep, other = self.live(a), self.live(b)
            if keep != other and self.exists(keep) and self.exists(other):
                with self.fi.store.read() as txn:
                    members = [f.face_id for f in self.fi.store.iter_faces(txn) if f.cluster in (keep, other)]
                if any(self.live(p) in (keep, other) for kind_, f, p in self.applied if kind_ == "remove"
                       and f in members):
                    return  # a user does not merge back a face they took out themselves
                self.fi.merge(keep, other)
                self.merged[other] = keep
                self.applied.append(("merge", keep, members))
        elif kind == "move" and self.now(a) != self.live(b) and self.exists(self.live(b)):
            self.fi.move_faces([a], self.live(b))
            self.applied.append(("move", a, self.live(b)))
        elif kind == "remove" and self.now(a) >= 0:  # from the person it is in now, as a user would see it
            person = self.now(a)
            self.fi.remove_faces(person, [a])
            self.applied.append(("remove", a, person))


def held(applied: list[tuple], after: np.ndarray, live) -> int:
    """How many corrections hold; a merge holds when its faces that no later correction moved are in one person."""
    later_touched: set[int] = set()
    count = 0
    for kind, a, b in reversed(applied):
        if kind == "merge":
            kept = [f for f in b if f not in later_touched]
            count += len({int(after[f - 1]) for f in kept}) == 1 and int(after[kept[0] - 1]) == live(a)
        elif kind == "move":
            count += int(after[a - 1]) == live(b)
            later_touched.add(a)
        else:
            count += int(after[a - 1]) != live(b)
            later_touched.add(a)
    return count


@pytest.mark.lfw
@pytest.mark.slow
def test_100_corrections_hold_and_the_clustering_is_no_worse(shared_data, tmp_path):
    from benchmarks.lfw_data import index_of_vectors, lfw_embeddings

    data = lfw_embeddings(shared_data / "lfw-devtrain")
    _, truth = np.unique(data["people"], return_inverse=True)
    index_of_vectors(tmp_path / "index", data["vectors"], truth)
    n = len(truth)
    with FaceIndex(settings_for(tmp_path / "index"), OpenMode.EDIT) as fi:
        fi.cluster()
        before = labels_of(fi, n)
        user = User(fi)
        for correction in plan_corrections(before, truth):
            if len(user.applied) == N_CORRECTIONS:
                break
            user.correct(*correction)
        assert len(user.applied) == N_CORRECTIONS
        assert {c[0] for c in user.applied} == {"merge", "move", "remove"}
        fi.cluster()
        after = labels_of(fi, n)
        n_held = held(user.applied, after, user.live)
    s_before, s_after = external_scores(truth, before), external_scores(truth, after)
    print(f"\ncorrections held: {n_held}/{N_CORRECTIONS}; pairwise F1 {s_before['pairwise_f1']:.4f} -> "
          f"{s_after['pairwise_f1']:.4f}, BCubed F1 {s_before['bcubed_f1']:.4f} -> {s_after['bcubed_f1']:.4f}")
    assert n_held == N_CORRECTIONS
    assert s_after["pairwise_f1"] >= s_before["pairwise_f1"]
    assert s_after["bcubed_f1"] >= s_before["bcubed_f1"]
