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
from scipy.sparse import csr_matrix

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


def _rows_by_cluster(suggested: np.ndarray, rows: np.ndarray, clusters: set[int]) -> dict[int, np.ndarray]:
    """The rows (of ``rows``) suggested into each of ``clusters``: one sort, not one scan per cluster."""
    order = rows[np.argsort(suggested[rows], kind="stable")]
    keys = suggested[order]
    out = {}
    for cluster in sorted(clusters):
        lo, hi = np.searchsorted(keys, cluster, "left"), np.searchsorted(keys, cluster, "right")
        out[cluster] = order[lo:hi]
    return out


def _suggested_to_persons(x: np.ndarray, suggested: np.ndarray, tied: np.ndarray, active: np.ndarray,
                          forbidden: Mapping[int, set[int]], next_id: int,
                          pull_similarity: float) -> tuple[np.ndarray, list[int]]:
    """Steps 2 and 3: labels from ties and suggested clusters."""
    is_tied = active & (tied >= 0)
    loose = active & (tied < 0)
    labels = np.where(is_tied, tied, np.where(loose, suggested, -1))  # by default a cluster is its own person
    owned = set(tied[is_tied].tolist())
    # Only clusters holding a tied face, or carrying the id of a person the user owns, need a closer look.
    with_ties = set(suggested[is_tied & (suggested >= 0)].tolist())
    attention = with_ties | (owned & set(suggested[loose].tolist()))
    if not attention:
        return labels, []
    tied_rows = _rows_by_cluster(tied, np.flatnonzero(is_tied), owned)
    tied_centers_all = {p: _center(x, rows) for p, rows in tied_rows.items()}
    members_of = _rows_by_cluster(suggested, np.flatnonzero(active), attention)
    fresh: list[int] = []
    for cluster, members in members_of.items():
        untied = members[tied[members] < 0]
        if len(untied) == 0:
            continue
        persons_here = set(tied[members[tied[members] >= 0]].tolist())
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
    """Person ids (ascending) and their centers: the normalised sums of their faces, in one pass."""
    keep = np.flatnonzero(labels >= 0)
    if len(keep) == 0:
        return np.zeros(0, np.int64), stack_vectors([])
    ids, row = np.unique(labels[keep], return_inverse=True)
    # A sparse [persons, faces] membership matrix times the vectors: no copy of the vectors is gathered.
    members = csr_matrix((np.ones(len(keep), np.float32), (row, keep)), shape=(len(ids), len(labels)))
    sums = np.asarray(members @ x)
    return ids, (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _pull_near_duplicates(x: np.ndarray, labels: np.ndarray, tied: np.ndarray, active: np.ndarray,
                          forbidden: Mapping[int, set[int]], block: int = 512) -> None:
    """Step 5, in blocks of rows (a [block, placed faces] similarity matrix at a time, bounded memory)."""
    loose = np.flatnonzero(active & (labels < 0))
    anchors = np.flatnonzero(active & (tied >= 0))
    if len(loose) == 0 or len(anchors) == 0:
        return
    for start in range(0, len(loose), block):
        rows = loose[start:start + block]
        sims = x[rows] @ x[anchors].T
        best = np.argmax(sims, axis=1)
        near = sims[np.arange(len(rows)), best] >= NEAR_DUPLICATE
        for row, j in zip(rows[near].tolist(), best[near].tolist(), strict=True):
            person = int(tied[anchors[j]])
            if person not in forbidden.get(row, ()):
                labels[row] = person


def _word_arrays(face_ids: np.ndarray, word: Mapping[int, FaceWord]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per row: not ignored, tied person (-1: none), and the persons it must never join (rows with any only).
    Only the faces the user spoke about are visited: an index of a million faces and a few edits stays cheap."""
    n = len(face_ids)
    active, tied, forbidden = np.ones(n, bool), np.full(n, -1, np.int64), {}
    if not word or n == 0:
        return active, tied, forbidden
    order = np.argsort(face_ids, kind="stable")
    spoken = np.fromiter(word.keys(), np.int64, len(word))
    at = np.minimum(np.searchsorted(face_ids, spoken, sorter=order), n - 1)
    for face_id, row in zip(spoken.tolist(), order[at].tolist(), strict=True):
        if face_ids[row] != face_id:
            continue  # a face that left the store (its file was deleted)
        w = word[face_id]
        active[row] = not w.ignored
        tied[row] = -1 if w.person is None else w.person
        if w.not_persons:
            forbidden[row] = set(w.not_persons)
    return active, tied, forbidden


def derive_persons(face_ids: np.ndarray, suggested: np.ndarray, x: np.ndarray, word: Mapping[int, FaceWord], *,
                   min_similarity: float, pull_similarity: float, next_id: int) -> Derived:
    """Persons for faces ``face_ids`` (rows of unit vectors ``x``) given the clusterer's ``suggested`` person ids
    (-1 = none) and the user's ``word``; ``next_id`` is the first id never used in this index."""
    n = len(face_ids)
    active, tied, forbidden = _word_arrays(face_ids, word)
    labels, fresh = _suggested_to_persons(x, np.asarray(suggested, np.int64), tied, active, forbidden, next_id,
                                          pull_similarity)
    # Step 4: faces sent to a person they must never join.
    clash = np.array(sorted(i for i, no in forbidden.items() if labels[i] >= 0 and labels[i] in no), np.int64)
    if len(clash):
        kept = labels.copy()
        kept[clash] = -1
        ids, centers = _persons(x, kept)
        _place(x, clash, labels, forbidden, ids, centers, min_similarity)
    _pull_near_duplicates(x, labels, tied, active, forbidden)  # step 5
    labels[~active] = -1
    ids, centers = _persons(x, labels)
    sims = np.full(n, np.nan, np.float32)
    assigned = labels >= 0
    if assigned.any():
        row_of = np.searchsorted(ids, labels[assigned])
        sims[assigned] = np.einsum("ij,ij->i", x[assigned], centers[row_of])
    return Derived(labels, sims, ids, centers, fresh)
