"""Stable cluster ids across reclusterings: a new cluster inherits the id of the old cluster it matches.

Users name clusters ("this is Ana"), so a recluster must not shuffle ids. Matching is one-to-one (Hungarian
assignment on cosine between centers), so two new clusters never claim the same old id; a pair only counts as
a match when its centers are at least ``min_similarity`` alike, otherwise the new cluster is a new person.

Up to ``DENSE_MAX_PAIRS`` old x new pairs the assignment is solved on the full similarity matrix. Above (a
million faces make hundreds of thousands of persons: a dense matrix would take hundreds of GB), only pairs that can
match are considered: each new center's ``CANDIDATES`` nearest old centers (``neighbors.search``) at cosine >=
``min_similarity``. They fall apart into small groups (a person's look-alikes), and each group is solved exactly
on its own; a group too large for that (more than ``DENSE_MAX_PAIRS`` pairs) is matched greedily, best pair first.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from indexer.cluster.kmeans import as_unit_matrix
from indexer.cluster.neighbors import search
from indexer.errors import ClusteringError

DENSE_MAX_PAIRS = 4_000_000   # a 2,000 x 2,000 float32 matrix (16 MB); Hungarian on it takes about a second
CANDIDATES = 8


def _dense_match(new: np.ndarray, old: np.ndarray) -> list[tuple[int, int, float]]:
    sims = new @ old.T
    rows, cols = linear_sum_assignment(sims, maximize=True)
    return [(int(r), int(c), float(sims[r, c])) for r, c in zip(rows, cols, strict=True)]


def _sparse_match(new: np.ndarray, old: np.ndarray, min_similarity: float) -> list[tuple[int, int, float]]:
    """One-to-one matches among each new center's nearest old centers at >= ``min_similarity`` (module doc)."""
    sims, idx = search(old, new, CANDIDATES)
    ok = (idx >= 0) & (sims >= min_similarity)
    rows = np.repeat(np.arange(len(new)), idx.shape[1])[ok.ravel()]
    cols = idx[ok]
    n_new = len(new)
    # Components of the bipartite graph (new centers 0..n_new-1, old ones after them).
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, n_new + cols)), shape=(n_new + len(old),) * 2)
    _, comp = connected_components(graph, directed=False)
    out: list[tuple[int, int, float]] = []
    order = np.argsort(comp[rows], kind="stable")
    bounds = np.flatnonzero(np.diff(comp[rows][order])) + 1
    for pairs in np.split(order, bounds) if len(order) else []:
        r_ids, c_ids = np.unique(rows[pairs]), np.unique(cols[pairs])
        if len(r_ids) * len(c_ids) <= DENSE_MAX_PAIRS:
            out += [(int(r_ids[r]), int(c_ids[c]), s) for r, c, s in _dense_match(new[r_ids], old[c_ids])]
            continue
        taken_r, taken_c = set(), set()   # too large to solve exactly: greedy, best pair first
        pair_sims = sims[ok][pairs]
        for j in np.argsort(-pair_sims, kind="stable").tolist():
            r, c = int(rows[pairs][j]), int(cols[pairs][j])
            if r not in taken_r and c not in taken_c:
                taken_r.add(r)
                taken_c.add(c)
                out.append((r, c, float(pair_sims[j])))
    return out


def match_ids(
    old_centers: np.ndarray,
    old_ids: np.ndarray | list[int],
    new_centers: np.ndarray,
    *,
    min_similarity: float = 0.5,
) -> tuple[np.ndarray, list[str]]:
    """Ids (int64 [C_new]) for ``new_centers`` and a human-readable log of how each was decided.

    Matched clusters keep the old id; unmatched ones get fresh ids counting up from ``max(old_ids) + 1`` in
    new-cluster order, so an id is never reused for a different person within one index.
    """
    old_ids = np.asarray(old_ids, dtype=np.int64).reshape(-1)
    new = as_unit_matrix(new_centers, "new centers")
    n_new = new.shape[0]
    n_old = old_ids.shape[0]
    old = as_unit_matrix(old_centers, "old centers") if n_old else np.zeros((0, new.shape[1]), np.float32)
    if old.shape[0] != n_old:
        raise ClusteringError(f"{old.shape[0]} old centers but {n_old} old ids; pass one id per center.")
    if n_old and old.shape[1] != new.shape[1]:
        raise ClusteringError(f"Old centers are {old.shape[1]}-d but new ones {new.shape[1]}-d; the model changed, "
                              "so recluster without id matching.")
    if len(np.unique(old_ids)) != n_old:
        raise ClusteringError("Old cluster ids are not unique; the stored clustering is inconsistent.")

    new_ids = np.full(n_new, -1, np.int64)
    best_sim = np.full(n_new, np.nan, np.float32)
    log: list[str] = []
    dense = n_old * n_new <= DENSE_MAX_PAIRS
    if n_old and n_new:
        for r, c, sim in _dense_match(new, old) if dense else _sparse_match(new, old, min_similarity):
            best_sim[r] = sim
            if sim >= min_similarity:
                new_ids[r] = old_ids[c]
    next_id = int(old_ids.max()) + 1 if n_old else 0
    for r in range(n_new):
        if new_ids[r] >= 0:
            log.append(f"new cluster {r} keeps id {new_ids[r]} (cosine {best_sim[r]:.3f})")
            continue
        new_ids[r] = next_id
        next_id += 1
        if np.isnan(best_sim[r]):
            reason = "no old cluster left to match" if dense else f"no old cluster at cosine >= {min_similarity:.2f}"
        else:
            reason = f"best one-to-one match only cosine {best_sim[r]:.3f} < {min_similarity:.2f}"
        log.append(f"new cluster {r} gets fresh id {new_ids[r]} ({reason})")
    kept = set(new_ids.tolist())
    for old_id in old_ids.tolist():
        if old_id not in kept:
            log.append(f"old id {old_id} retired (no new cluster matches it)")
    return new_ids, log
