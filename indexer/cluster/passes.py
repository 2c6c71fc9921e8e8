"""The adaptive method's recall passes on cluster centers (issue 11), and the centers themselves.

Both passes are one ratio test, as in matching local image features: a cluster (``merge_close_centers``) or an
unassigned face (``attach_unassigned``) joins the cluster of its nearest center when that cosine is high enough
*and* leads the cosine of the nearest rival person by a margin. Pairwise F1 weighs a person by the square of their
photos, so what it punishes most is a big identity split in two looks, or its odd photos left unassigned; the lead
is what keeps strangers who merely resemble someone (measured on LFW dev-train: a center cosine alone merged
strangers) apart. Parameters: ``benchmarks/cluster_cv.py``; figures: README, "Parameters that generalise".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components

from indexer.cluster.kmeans import as_unit_matrix
from indexer.cluster.neighbors import search
from indexer.errors import ClusteringError

log = logging.getLogger(__name__)

# Candidates searched per center / face for the nearest rival; the merge pass repeats at most this many rounds.
RIVAL_NEIGHBORS = 32
MERGE_ROUNDS = 10
INCREMENTAL_MIN_CLUSTERS = 20_000   # from here on a later merge round searches only what changed (_Nearest)
RIVAL_BLOCK = 1_024     # queries whose candidates are compared with their nearest center at once
CENTER_BLOCK = 65_536   # rows summed at once into the centers (a 256 MB float64 block at 512-d)


def nearest_and_rival(queries: np.ndarray, centers: np.ndarray, same_below: float | None,
                      *, queries_are_centers: bool = False,
                      neighbors: int = RIVAL_NEIGHBORS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each query row: (row of its nearest center, that cosine, the cosine of its nearest rival).

    A rival is a center other than the nearest one that could be another person: its cosine to the nearest center
    is below ``same_below`` (None: every other center is a rival). Centers closer than that to the nearest one may be
    more pieces of the same person (George W Bush in 4 clusters): they must not hide a clear lead. When
    ``queries_are_centers``, query i is center i and is left out of its own candidates. The search keeps
    ``neighbors`` candidates (``neighbors.search``: exact, or an inverted file for many centers; memory O(queries x
    neighbors)); when all of them are near the nearest center, the last one's cosine stands in for the rival (an
    upper bound: fewer merges, never more). No rival at all: -1.
    """
    own = np.arange(len(centers)) if queries_are_centers else None
    return _nearest_rival_candidates(queries, centers, same_below, own, neighbors)[:3]


def _candidates(queries: np.ndarray, centers: np.ndarray, own: np.ndarray | None,
                neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """``neighbors.search`` of the queries among the centers, query i's own center ``own[i]`` left out."""
    if own is None:
        return search(centers, queries, neighbors)
    if len(own) == len(centers) and np.array_equal(own, np.arange(len(centers))):
        return search(centers, None, neighbors)
    sims, idx = search(centers, queries, neighbors + 1)
    keep = idx != own[:, None]
    keep[keep.sum(axis=1) > sims.shape[1] - 1, -1] = False   # own not found: drop the weakest instead
    cols = sims.shape[1] - 1
    return sims[keep].reshape(len(own), cols), idx[keep].reshape(len(own), cols)


def _nearest_rival_candidates(queries: np.ndarray, centers: np.ndarray, same_below: float | None,
                              own: np.ndarray | None, neighbors: int
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``nearest_and_rival`` with each query's candidate centers (rows [n, neighbors], best first)."""
    n, c = queries.shape[0], centers.shape[0]
    sims, idx = _candidates(queries, centers, own, neighbors)
    k = sims.shape[1] + (0 if own is None else 1)
    found = idx >= 0
    idx = np.where(found, idx, idx[:, :1])   # (an inverted file may find fewer: those stand for the nearest)
    if sims.shape[1] == 0:
        return np.zeros(n, np.int64), np.full(n, -1.0, np.float32), np.full(n, -1.0, np.float32), idx
    best, best_sim = idx[:, 0].astype(np.int64), sims[:, 0].copy()
    rival_ok = found.copy()
    rival_ok[:, 0] = False
    if same_below is not None:   # each candidate's cosine to the nearest center, a block of queries at a time
        for start in range(0, n, RIVAL_BLOCK):
            block = slice(start, start + RIVAL_BLOCK)
            near = np.einsum("qd,qkd->qk", centers[best[block]], centers[idx[block, 1:]])
            rival_ok[block, 1:] &= near < same_below
    rival = np.where(rival_ok, sims, -np.inf).max(axis=1)
    searched_all = k >= c
    none_found = ~rival_ok.any(axis=1)
    last_found = np.where(found, sims, np.inf).min(axis=1)
    rival[none_found] = -1.0 if searched_all else last_found[none_found]
    return best, best_sim, rival.astype(np.float32), idx


def merge_close_centers(x: np.ndarray, labels: np.ndarray, min_similarity: float, lead: float = 0.0,
                        rounds: int = MERGE_ROUNDS) -> np.ndarray:
    """Second pass over clusters (a recall fix): a cluster joins the cluster of its nearest center when their cosine
    is >= ``min_similarity`` and leads the nearest rival's (``nearest_and_rival``) by >= ``lead``, and that cluster is
    at least as large; repeated on the new centers until nothing joins (at most ``rounds`` times). Noise (-1) stays
    noise.

    Average linkage judges a merge by the mean cosine over all cross pairs, which stays low between two halves of
    one person photographed in two ways (young and old, glasses), however tight each half is. Their centers, means
    of many photos, are close nonetheless: the center cosine divides out each half's spread. A center cosine alone
    also joins strangers who look alike (measured: it merged strangers on all of dev-train), so the nearest center
    must also stand out from every other person's: a ratio test, as in matching local image features."""
    out = np.asarray(labels, dtype=np.int64).copy()
    # Sums and sizes are additive: computed once from the faces, then each round's merges add up rows of them.
    sums, size, ids = cluster_sums(x, out)
    state: _Nearest | None = None
    for round_ in range(rounds):
        if len(ids) < 2:
            break
        centers = as_unit_matrix(sums, "centers")
        state = _Nearest.search(centers, min_similarity, state)
        best, sim, rival = state.best, state.sim, state.rival
        # The smaller joins the larger: a small cluster between two people must not pull both big ones into it.
        join = np.flatnonzero(clear_lead(sim, rival, min_similarity, lead) & (size <= size[best]))
        log.debug("center merge round %d: %d of %d clusters join, %d searched", round_ + 1, len(join), len(ids),
                  state.searched)
        if len(join) == 0:
            break
        graph = coo_matrix((np.ones(len(join), np.int8), (join, best[join])), shape=(len(ids), len(ids)))
        n_comp, comp = connected_components(graph, directed=False)
        clustered = out >= 0
        out[clustered] = comp[np.searchsorted(ids, out[clustered])]
        sums = _indicator(comp, n_comp) @ sums   # each component's sum (np.add.reduceat took 10 s a round at 1M)
        size = np.bincount(comp, weights=size, minlength=n_comp).astype(np.int64)
        ids = np.arange(n_comp, dtype=np.int64)
        state = state.after_merge(comp, n_comp)
    return out


@dataclass
class _Nearest:
    """The merge pass's view of every cluster: nearest center, its cosine, the rival's cosine and the candidates
    searched; ``stale`` marks the clusters whose view a round's merges may have changed.

    A round joins few clusters (300,000 faces: 315 of 53,236 in the first, 44 in the second, then fewer), so past
    ``INCREMENTAL_MIN_CLUSTERS`` a later round searches again only the clusters that grew, those whose candidates
    held a cluster that merged, and those in a merged cluster's candidates; every other cluster keeps its view.
    Below it (LFW dev-train: ~5,000 clusters) every round searches every cluster, as before."""

    best: np.ndarray
    sim: np.ndarray
    rival: np.ndarray
    candidates: np.ndarray
    stale: np.ndarray | None = None
    searched: int = 0

    @classmethod
    def search(cls, centers: np.ndarray, same_below: float, before: _Nearest | None) -> _Nearest:
        c = len(centers)
        if before is None or before.stale is None or c < INCREMENTAL_MIN_CLUSTERS:
            return cls(*_nearest_rival_candidates(centers, centers, same_below, np.arange(c), RIVAL_NEIGHBORS),
                       searched=c)
        rows = np.flatnonzero(before.stale)
        found = _nearest_rival_candidates(centers[rows], centers, same_below, rows, RIVAL_NEIGHBORS)
        for mine, theirs in zip((before.best, before.sim, before.rival, before.candidates), found, strict=True):
            mine[rows] = theirs
        return cls(before.best, before.sim, before.rival, before.candidates, searched=len(rows))

    def after_merge(self, comp: np.ndarray, n_comp: int) -> _Nearest:
        """The view in the ids after a round (``comp``: old id -> new id), with the stale clusters marked."""
        merged = np.bincount(comp, minlength=n_comp)[comp] > 1
        stale_old = merged | merged[self.candidates].any(axis=1)
        stale_old[self.candidates[merged].ravel()] = True
        rep = np.empty(n_comp, np.int64)
        rep[comp] = np.arange(len(comp))     # one old id per new id (the only one where nothing merged)
        stale = np.zeros(n_comp, bool)
        stale[comp[stale_old]] = True
        return _Nearest(comp[self.best[rep]], self.sim[rep], self.rival[rep], comp[self.candidates[rep]], stale)


def attach_unassigned(x: np.ndarray, labels: np.ndarray, min_similarity: float, lead: float = 0.0,
                      same_below: float | None = None) -> np.ndarray:
    """Last pass (a recall fix): an unassigned face (-1) joins the cluster of its nearest center when their cosine is
    >= ``min_similarity`` and leads the nearest rival's by >= ``lead`` (rivals: ``nearest_and_rival``).

    Average linkage leaves out a person's odd photos (profile, dark, old) whose mean cosine to a big cluster stays
    under the threshold; with pairwise F1 each such face of a person with n photos loses n - 1 pairs. A face whose
    nearest person stands out from all others is that person far more often than a stranger is (LFW dev-train:
    benchmarks/results/bench_cluster.txt, part (c))."""
    noise, nearest, sim, rival = unassigned_candidates(x, labels, same_below)
    out = np.asarray(labels, dtype=np.int64).copy()
    join = clear_lead(sim, rival, min_similarity, lead)
    out[noise[join]] = nearest[join]
    return out


def unassigned_candidates(x: np.ndarray, labels: np.ndarray, same_below: float | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each unassigned face: (its row, the label of its nearest center, that cosine, the nearest rival's cosine)
    (``attach_unassigned`` without the rule, so the benchmark can try many rules on one search)."""
    labels = np.asarray(labels, dtype=np.int64)
    noise = np.flatnonzero(labels < 0)
    centers, ids = centers_from_labels(x, labels)
    if len(noise) == 0 or len(ids) == 0:
        empty = np.zeros(0, np.float32)
        return np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty
    best, sim, rival = nearest_and_rival(as_unit_matrix(x)[noise], centers, same_below)
    return noise, ids[best], sim, rival


def clear_lead(sim: np.ndarray, rival: np.ndarray, min_similarity: float, lead: float) -> np.ndarray:
    """The passes' test: the nearest center is close enough and leads the nearest rival by enough."""
    return (sim >= min_similarity) & (sim - rival >= lead)


def cluster_sums(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sums float64 [C, d] of each cluster's rows, sizes int64 [C], ids int64 [C] sorted); noise (-1) skipped.

    One pass over the rows sorted by label, a block of rows at a time: each block is summed into the runs of labels
    it holds by a sparse indicator product in float64 (0.1 s for 65,536 rows here, where ``np.add.reduceat`` took
    1 s). No copy of all the rows: a float64 copy of a million would be 4 GB."""
    x = np.asarray(x, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ClusteringError(f"{labels.shape[0] if labels.ndim else 0} labels for {x.shape[0]} faces; "
                              "pass one label per face.")
    kept = np.flatnonzero(labels >= 0)
    order = kept[np.argsort(labels[kept], kind="stable")]
    ids, run, sizes = np.unique(labels[order], return_inverse=True, return_counts=True)
    sums = np.zeros((len(ids), x.shape[1]), np.float64)
    for lo in range(0, len(order), CENTER_BLOCK):
        hi = min(lo + CENTER_BLOCK, len(order))
        first, last = int(run[lo]), int(run[hi - 1]) + 1    # the runs this block holds rows of
        sums[first:last] += _indicator(run[lo:hi] - first, last - first) @ x[order[lo:hi]].astype(np.float64)
    return sums, sizes.astype(np.int64), ids.astype(np.int64)


def _indicator(groups: np.ndarray, n_groups: int) -> csr_matrix:
    """[n_groups, len(groups)] float64 with a 1 where row i belongs to ``groups[i]``: times the rows, each group's
    sum."""
    return csr_matrix((np.ones(len(groups)), (groups, np.arange(len(groups)))), shape=(n_groups, len(groups)))


def centers_from_labels(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centers float32 [C, d] = normalised mean of each cluster's rows, ids int64 [C] sorted); noise (-1) skipped.
    ``x``'s rows are unit (as every stored embedding is)."""
    sums, _, ids = cluster_sums(x, labels)
    return as_unit_matrix(sums, "centers"), ids
