"""Stable cluster ids across reclusterings: a new cluster inherits the id of the old cluster it matches.

Users name clusters ("this is Ana"), so a recluster must not shuffle ids. Matching is one-to-one (Hungarian
assignment on cosine between centers), so two new clusters never claim the same old id; a pair only counts as
a match when its centers are at least ``min_similarity`` alike, otherwise the new cluster is a new person.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from indexer.cluster.kmeans import as_unit_matrix
from indexer.errors import ClusteringError


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
    if n_old and n_new:
        sims = new @ old.T
        rows, cols = linear_sum_assignment(sims, maximize=True)
        for r, c in zip(rows, cols, strict=True):
            best_sim[r] = sims[r, c]
            if sims[r, c] >= min_similarity:
                new_ids[r] = old_ids[c]
    next_id = int(old_ids.max()) + 1 if n_old else 0
    for r in range(n_new):
        if new_ids[r] >= 0:
            log.append(f"new cluster {r} keeps id {new_ids[r]} (cosine {best_sim[r]:.3f})")
            continue
        new_ids[r] = next_id
        next_id += 1
        if np.isnan(best_sim[r]):
            reason = "no old cluster left to match"
        else:
            reason = f"best one-to-one match only cosine {best_sim[r]:.3f} < {min_similarity:.2f}"
        log.append(f"new cluster {r} gets fresh id {new_ids[r]} ({reason})")
    kept = set(new_ids.tolist())
    for old_id in old_ids.tolist():
        if old_id not in kept:
            log.append(f"old id {old_id} retired (no new cluster matches it)")
    return new_ids, log
