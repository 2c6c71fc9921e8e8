"""Persons from the clusterer's suggestion and the user's word: a pure function, run after every recluster and edit.

The clusterer (any method) suggests a person for each face; ``derive_persons`` turns that into the persons the user
sees, obeying what the user said:

1. Ignored faces belong to nobody and count for no center.
2. A face the user tied to a person (move, merge, name) is in that person, whatever was suggested.
3. Inside each suggested cluster, an untied face joins the nearest person tied there when that person's center
   is at least ``pull_similarity`` alike (the clustering threshold: the method's own "same person"), else it
   keeps the cluster's own identity: one confirmed face of a photo burst pulls the rest of the burst along, while
   the cluster's other faces stay where they were. A cluster's own id is the stable id of
   the person it matched, so it joins that person even when the person's tied faces sit elsewhere; unless most of
   its faces were removed from that person: then it is someone else, with a fresh id.
4. A face the user removed from a person never joins it: it goes to the nearest other person whose center is
   at least ``min_similarity`` alike, else it is unassigned.
5. An unassigned face that is a near-duplicate of a tied face (cosine >= ``NEAR_DUPLICATE``) joins its person.

Centers are the normalised means of each person's faces, tied ones included, so the live assignment of new faces
follows the user's corrections.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from indexer.embedding import stack_vectors
from indexer.persons.word import FaceWord

# An unassigned face this close to a face the user placed is taken as the same shot (a burst, a re-save): on LFW
# dev-train 1 in 8 million pairs of different people reach it, and 15 % of same-person pairs. Looser values pull
# strangers in: the nearest of hundreds of placed faces is too easily a chance look-alike (0.55 cost 6 points of
# pairwise F1 after 100 corrections on LFW, tests/test_persons_lfw.py).
NEAR_DUPLICATE = 0.80


@dataclass
class Derived:
    labels: np.ndarray       # person id per face, -1 unassigned
    similarity: np.ndarray   # cosine to the person's center (nan when unassigned)
    ids: np.ndarray          # person ids with at least one face, ascending
    centers: np.ndarray      # float32 [len(ids), d], rows L2-normalised
    fresh_ids: list[int] = field(default_factory=list)  # ids handed out because the suggested one was taken


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def _center(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return _unit(x[rows].mean(axis=0)).astype(np.float32)


def _split_cluster(x: np.ndarray, untied: np.ndarray, tied_centers: dict[int, np.ndarray], own_id: int,
                   pull_similarity: float) -> np.ndarray:
    """Person ids for the ``untied`` rows of one cluster: the nearest person tied in it when that person's center
    is at least ``pull_similarity`` alike (the clusterer's own notion of "same person"), else the cluster's own."""
    labels = np.full(len(untied), own_id, np.int64)
    if tied_centers:
        persons = np.asarray(list(tied_centers), np.int64)
        sims = x[untied] @ np.stack(list(tied_centers.values())).T
        best = np.argmax(sims, axis=1)
        near = sims[np.arange(len(untied)), best] >= pull_similarity
        labels[near] = persons[best[near]]
    return labels


def _suggested_to_persons(x: np.ndarray, suggested: np.ndarray, tied: np.ndarray, active: np.ndarray,
                          forbidden: Mapping[int, set[int]], next_id: int,
                          pull_similarity: float) -> tuple[np.ndarray, list[int]]:
    """Steps 2 and 3: labels from ties and suggested clusters."""
    labels = np.where(active & (tied >= 0), tied, -1)
    owned = set(tied[active & (tied >= 0)].tolist())
    tied_centers_all = {p: _center(x, np.flatnonzero(active & (tied == p))) for p in owned}
    fresh: list[int] = []
    for cluster in np.unique(suggested[active & (suggested >= 0)]).tolist():
        members = active & (suggested == cluster)
        untied = np.flatnonzero(members & (tied < 0))
        if len(untied) == 0:
            continue
        persons_here = set(tied[members & (tied >= 0)].tolist())
        own_id = cluster
        refusing = sum(1 for row in untied.tolist() if cluster in forbidden.get(row, ()))
        if cluster in owned and cluster not in persons_here and 2 * refusing > len(untied):
            # Most of this cluster was taken out of the person whose id it carries: it is someone else.
            own_id = next_id
            next_id += 1
            fresh.append(own_id)
        labels[untied] = _split_cluster(x, untied, {p: tied_centers_all[p] for p in persons_here}, own_id,
                                        pull_similarity)
    return labels, fresh


def _place(x: np.ndarray, rows: np.ndarray, labels: np.ndarray, forbidden: Mapping[int, set[int]],
           ids: np.ndarray, centers: np.ndarray, min_similarity: float) -> None:
    """Step 4: each row goes to the nearest allowed person at least ``min_similarity`` alike, else -1."""
    if len(ids) == 0:
        labels[rows] = -1
        return
    sims = x[rows] @ centers.T
    for n, row in enumerate(rows.tolist()):
        order = np.argsort(-sims[n])
        labels[row] = -1
        for j in order.tolist():
            if sims[n, j] < min_similarity:
                break
            if int(ids[j]) not in forbidden.get(row, ()):
                labels[row] = int(ids[j])
                break


def _persons(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.unique(labels[labels >= 0])
    return ids, stack_vectors([_center(x, np.flatnonzero(labels == p)) for p in ids.tolist()])


def derive_persons(face_ids: np.ndarray, suggested: np.ndarray, x: np.ndarray, word: Mapping[int, FaceWord], *,
                   min_similarity: float, pull_similarity: float, next_id: int) -> Derived:
    """Persons for faces ``face_ids`` (rows of unit vectors ``x``) given the clusterer's ``suggested`` person ids
    (-1 = none) and the user's ``word``; ``next_id`` is the first id never used in this index."""
    n = len(face_ids)
    words = [word.get(int(f), FaceWord()) for f in face_ids.tolist()]
    active = np.array([not w.ignored for w in words], bool)
    tied = np.array([w.person if w.person is not None else -1 for w in words], np.int64)
    forbidden = {i: set(w.not_persons) for i, w in enumerate(words) if w.not_persons}
    labels, fresh = _suggested_to_persons(x, np.asarray(suggested, np.int64), tied, active, forbidden, next_id,
                                          pull_similarity)
    # Step 4: faces sent to a person they must never join.
    clash = np.array([labels[i] >= 0 and labels[i] in forbidden.get(i, ()) for i in range(n)], bool)
    ids, centers = _persons(x, np.where(clash, -1, labels))
    _place(x, np.flatnonzero(clash), labels, forbidden, ids, centers, min_similarity)
    # Step 5: unassigned near-duplicates of a tied face join its person.
    loose = np.flatnonzero(active & (labels < 0))
    anchors = np.flatnonzero(active & (tied >= 0))
    if len(loose) and len(anchors):
        sims = x[loose] @ x[anchors].T
        for n_, row in enumerate(loose.tolist()):
            j = int(np.argmax(sims[n_]))
            person = int(tied[anchors[j]])
            if sims[n_, j] >= NEAR_DUPLICATE and person not in forbidden.get(row, ()):
                labels[row] = person
    labels[~active] = -1
    ids, centers = _persons(x, labels)
    sims = np.full(n, np.nan, np.float32)
    assigned = labels >= 0
    if assigned.any():
        row_of = np.searchsorted(ids, labels[assigned])
        sims[assigned] = np.einsum("ij,ij->i", x[assigned], centers[row_of])
    return Derived(labels, sims, ids, centers, fresh)
