"""Average linkage over a sparse neighbour graph: the merges of a component too large for exact linkage.

Exact average linkage needs every pair of a component (``identity._tree_exact``: m (m - 1) / 2 float64 distances),
so a component of 270,000 faces (300,000 face-like vectors at cosine 0.55 chain into one) could only be cut into
pieces by K-Means first, each piece linked on its own: a person could be cut in two, and at 1M faces the 100 pieces
of 10,000 took most of the recluster's half hour. Two facts make the pairs unnecessary:

- For unit rows the mean cosine between two clusters is a product of their sums: mean_{i in A, j in B} x_i . x_j =
  (S_A . S_B) / (|A| |B|). A cluster is its sum and its size, whatever its size.
- Average linkage is reducible: two clusters that are each other's nearest (reciprocal nearest neighbours) can be
  merged at once without changing the tree (the nearest-neighbour-chain argument). So a whole round of such pairs
  merges together, as vectorised array work, and rounds repeat until no pair is left at the floor.

Candidates are the pairs of clusters joined by an edge of the k-nearest-neighbour graph (the same graph that made
the components): a pair of clusters with no edge between any of their faces is never compared. That, and the sums
kept on ``PROJECTED_DIMS`` projected dimensions (inner products kept: store/choose.py), are the approximations;
bench_persons_scale measures the result against the generator's identities.

Memory: the projected rows and the sums of merged clusters (2 x m x 128 float32, 1 GB at 1M) and the edge arrays
(O(m k)); never m x m.
"""

from __future__ import annotations

import logging

import numpy as np

from indexer.cluster.neighbors import PROJECTED_DIMS, SEED, second_moment_basis

log = logging.getLogger(__name__)

BLOCK = 262_144   # edges scored at once (two [BLOCK, 128] float32 gathers, 256 MB)


def project(x: np.ndarray, members: np.ndarray, dims: int = PROJECTED_DIMS) -> np.ndarray:
    """Rows ``members`` of ``x`` on their top ``dims`` second-moment directions, built block by block (no copy of
    the full rows)."""
    if x.shape[1] <= dims:
        return np.ascontiguousarray(x[members], np.float32)
    sample = members[np.sort(np.random.default_rng(SEED).choice(len(members), min(len(members), 50_000),
                                                                replace=False))]
    basis = second_moment_basis(x[sample], dims, np.random.default_rng(SEED))
    out = np.empty((len(members), dims), np.float32)
    for start in range(0, len(members), BLOCK):
        out[start:start + BLOCK] = x[members[start:start + BLOCK]] @ basis
    return out


class _Clusters:
    """Sums and sizes of every node: leaves 0..m-1 are the rows, node m + j the j-th merge."""

    def __init__(self, y: np.ndarray) -> None:
        self.m = len(y)
        self.leaves = y
        self.sums = np.empty((max(self.m - 1, 0), y.shape[1]), np.float32)
        self.size = np.ones(2 * self.m, np.int64)
        self.merges = 0

    def sum_of(self, nodes: np.ndarray) -> np.ndarray:
        out = np.empty((len(nodes), self.leaves.shape[1]), np.float32)
        leaf = nodes < self.m
        out[leaf] = self.leaves[nodes[leaf]]
        out[~leaf] = self.sums[nodes[~leaf] - self.m]
        return out

    def mean_cosine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.empty(len(a), np.float64)
        if len(a) == 0:
            return out
        for start in range(0, len(a), BLOCK):
            aa, bb = a[start:start + BLOCK], b[start:start + BLOCK]
            dots = np.einsum("ij,ij->i", self.sum_of(aa), self.sum_of(bb)).astype(np.float64)
            out[start:start + BLOCK] = dots / (self.size[aa] * self.size[bb])
        return out

    def merge(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Merge each pair (a[i], b[i]) into a new node; returns the new nodes' ids."""
        new = self.m + self.merges + np.arange(len(a))
        for start in range(0, len(a), BLOCK):
            aa, bb = a[start:start + BLOCK], b[start:start + BLOCK]
            self.sums[new[start:start + BLOCK] - self.m] = self.sum_of(aa) + self.sum_of(bb)
        self.size[new] = self.size[a] + self.size[b]
        self.merges += len(a)
        return new


def _unique(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges (a, b) as (low, high) pairs without self loops, each once: (low, high, index into the input)."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keep = np.flatnonzero(lo != hi)
    key = lo[keep].astype(np.int64) * (int(hi.max(initial=0)) + 1) + hi[keep]
    _, first = np.unique(key, return_index=True)
    kept = keep[first]
    return lo[kept], hi[kept], kept


def _best(a: np.ndarray, b: np.ndarray, s: np.ndarray, nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each node's best neighbour and that mean cosine (-1 / -inf: no edge); ties go to the lowest id, so the best
    pair of all is always reciprocal and a round never stalls. No sort: ``ufunc.at`` over the edges."""
    best_sim = np.full(nodes, -np.inf, np.float32)
    np.maximum.at(best_sim, a, s)
    np.maximum.at(best_sim, b, s)
    none = np.iinfo(np.int32).max
    best = np.full(nodes, none, np.int32)
    at_a, at_b = s == best_sim[a], s == best_sim[b]
    np.minimum.at(best, a[at_a], b[at_a])
    np.minimum.at(best, b[at_b], a[at_b])
    best[best == none] = -1
    return best, best_sim


def graph_average_linkage(y: np.ndarray, edges: list[np.ndarray],
                          floor: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Average-linkage merges of the rows of ``y`` ([m, p] float32, projected unit rows) over the graph of
    ``edges`` = [a, b, s] (row a[i] to row b[i] at cosine s[i], in either direction or both; the list is emptied,
    so the caller's arrays go as soon as they are deduplicated), down to mean cosine ``floor``: (children [M, 2]
    in scipy numbering, leaves 0..m-1 and merge j creating node m + j; the merges' mean cosines [M]; rounds).
    M < m - 1 when the graph or the floor leaves several trees."""
    clusters = _Clusters(y)
    m = len(y)
    a, b, s = (np.asarray(edges.pop(0), dtype) for dtype in (np.int32, np.int32, np.float32))
    given = len(a)
    lo, hi, kept = _unique(a, b)
    a, b, s = lo, hi, s[kept]
    del lo, hi, kept
    children: list[np.ndarray] = []
    sims: list[np.ndarray] = []
    rounds = 0
    while len(a):
        best, best_sim = _best(a, b, s, 2 * m)
        node = np.flatnonzero(best >= 0)
        mutual = node[(best[best[node]] == node) & (node < best[node]) & (best_sim[node] >= floor)]
        if len(mutual) == 0:
            break
        rounds += 1
        partner = best[mutual].astype(np.int64)
        new = clusters.merge(mutual, partner)
        children.append(np.stack([mutual, partner], axis=1))
        sims.append(best_sim[mutual].astype(np.float64))
        into = np.arange(2 * m, dtype=np.int32)
        into[mutual], into[partner] = new, new
        a, b = into[a], into[b]
        # Edges between clusters that did not merge keep their cosine; those of a new cluster are scored again,
        # once per pair (two old edges may now join the same two clusters).
        moved = (a >= new[0]) | (b >= new[0])   # new nodes have the highest ids
        still = ~moved & (a != b)
        ma, mb, _ = _unique(a[moved], b[moved])
        a = np.concatenate([a[still], ma])
        b = np.concatenate([b[still], mb])
        s = np.concatenate([s[still], clusters.mean_cosine(ma, mb).astype(np.float32)])
    log.info("graph average linkage of %d faces over %d edges: %d merges in %d rounds of reciprocal nearest pairs",
             m, given, clusters.merges, rounds)
    if not children:
        return np.zeros((0, 2), np.int64), np.zeros(0), rounds
    return np.concatenate(children), np.concatenate(sims), rounds
