"""Nearest neighbours by cosine for clustering: exact below a size, an inverted file above it, memory O(N k).

Clustering asks two questions of every row: its k nearest faces (the recluster's graph) and its nearest cluster
centers (the recall passes). Exact search costs n_queries x n_base dot products: 20,000 faces against themselves
took 12.7 s on this 2-core machine, 50,000 took 114 s (it grows with the square), so above ``EXACT_MAX_PAIRS``
the candidates come from an inverted file instead (``plan_search``, a pure function that says why):

- rows are projected on the top ``PROJECTED_DIMS`` directions of their second moment (no centring, so inner products
  are kept: this model's embeddings hold 99.99% of their variance in 128 of 512 directions, store/choose.py), which
  makes every scanned candidate 4x cheaper;
- the projected base is split into ``nlist`` ~ 2 sqrt(n) lists by k-means on a sample (40 rows a list), and each
  query scans the ``nprobe`` lists nearest to it;
- every candidate found is scored again exactly on the full vectors, so a similarity returned is always exact; only
  a true neighbour that no scanned list holds can be missed (recall, measured in bench_persons_scale).

Memory: the projected base (n x 128 float32, 512 MB at 1M) and the results (n x k), never n x n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

# Exact search up to this many query x base pairs: 10,000 rows against themselves, a quarter of the 20,000-row case
# above; LFW dev-train (9,525 faces) stays exact. Past it, the inverted file built and searched the graph of 100,000
# face-like vectors in 15 s here (profiled, other jobs running).
EXACT_MAX_PAIRS = 100_000_000
PROJECTED_DIMS = 128
ROWS_PER_LIST = 40          # k-means training rows per list (FAISS warns under 39)
NPROBE = 16                 # lists scanned per query (recall: bench_persons_scale.py)
MIN_LISTS, MAX_LISTS = 64, 4096
QUERY_BLOCK = 65_536        # queries handed to FAISS at once (bounded result buffers)
RESCORE_BLOCK = 1_024       # queries whose candidates are gathered at once for exact scores (~64 MB at k = 32)
SEED = 1234


@dataclass(frozen=True)
class SearchPlan:
    kind: str            # "exact" | "ivf"
    dims: int            # dimensions searched (candidates are scored again on all of them)
    nlist: int           # inverted lists (0 for exact)
    nprobe: int          # lists scanned per query (0 for exact)
    reason: str


def plan_search(n_base: int, n_queries: int, dim: int, *, exact_max_pairs: int = EXACT_MAX_PAIRS) -> SearchPlan:
    """How to find the nearest neighbours of ``n_queries`` rows among ``n_base`` (pure; the reason is logged)."""
    pairs = n_base * n_queries
    if pairs <= exact_max_pairs or n_base < 2 * MIN_LISTS * ROWS_PER_LIST:
        # Small enough for every pair (the answer is then exact), or too few rows to train lists on.
        return SearchPlan("exact", dim, 0, 0, f"exact: {n_queries:,} x {n_base:,} pairs "
                                              f"{'<=' if pairs <= exact_max_pairs else '>'} {exact_max_pairs:,}"
                                              f"{'' if pairs <= exact_max_pairs else ', too few rows for lists'}")
    nlist = 2 ** round(math.log2(2 * math.sqrt(n_base)))
    nlist = int(min(MAX_LISTS, max(MIN_LISTS, nlist, 1)))
    dims = min(dim, PROJECTED_DIMS)
    nprobe = min(NPROBE, nlist)
    return SearchPlan("ivf", dims, nlist, nprobe,
                      f"inverted file: {n_queries:,} x {n_base:,} pairs > {exact_max_pairs:,}; {nlist} lists "
                      f"(~2 sqrt(n)), {nprobe} scanned per query, on {dims} projected dimensions, candidates "
                      "scored again exactly")


def second_moment_basis(base: np.ndarray, dims: int, rng: np.random.Generator) -> np.ndarray:
    """[d, dims]: the top eigenvectors of a sample's second moment (inner products kept, no centring)."""
    sample = base[np.sort(rng.choice(len(base), size=min(len(base), 50_000), replace=False))].astype(np.float64)
    values, vectors = np.linalg.eigh(sample.T @ sample)
    return np.ascontiguousarray(vectors[:, ::-1][:, :dims], dtype=np.float32)


def _exact(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index.search(queries, k)


def _ivf_candidates(base: np.ndarray, queries: np.ndarray, k: int, plan: SearchPlan,
                    same: bool) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    project = second_moment_basis(base, plan.dims, rng)
    yb = np.ascontiguousarray(base @ project)
    quantizer = faiss.IndexFlatIP(plan.dims)
    index = faiss.IndexIVFFlat(quantizer, plan.dims, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = SEED
    train = yb[np.sort(rng.choice(len(yb), size=min(len(yb), plan.nlist * ROWS_PER_LIST), replace=False))]
    index.train(train)
    index.add(yb)
    index.nprobe = plan.nprobe
    idx = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, len(queries))
        yq = yb[start:stop] if same else np.ascontiguousarray(queries[start:stop] @ project)
        idx[start:stop] = index.search(yq, k)[1]
    return idx


def _rescore(base: np.ndarray, queries: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosines of each query's candidates, best first (-1 ids: missing, scored -inf)."""
    sims = np.full(idx.shape, -np.inf, np.float32)
    for start in range(0, len(idx), RESCORE_BLOCK):
        stop = min(start + RESCORE_BLOCK, len(idx))
        block = idx[start:stop]
        found = block >= 0
        cand = base[np.where(found, block, 0)]
        scores = np.einsum("qkd,qd->qk", cand, queries[start:stop])
        sims[start:stop] = np.where(found, scores, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def search(base: np.ndarray, queries: np.ndarray | None, k: int, *,
           plan: SearchPlan | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``base`` (unit rows, float32) to each query: (cosines [nq, k] float32, best first;
    rows int64 [nq, k]); k is capped at the rows there are (n - 1 against itself). ``queries=None`` searches the
    base against itself and leaves each row out of its own answer (by identity: a duplicate of a row stays). An
    inverted file may find fewer than k for a query: those answers are row -1 with cosine -inf."""
    same = queries is None
    queries = base if queries is None else queries
    n, nq = len(base), len(queries)
    want = min(k + (1 if same else 0), n)
    if want - (1 if same else 0) < 1 or nq == 0:
        cols = max(0, want - (1 if same else 0))
        return np.zeros((nq, cols), np.float32), np.full((nq, cols), -1, np.int64)
    plan = plan or plan_search(n, nq, base.shape[1])
    if plan.kind == "exact":
        sims, idx = _exact(base, queries, want)
    else:
        sims, idx = _rescore(base, queries, _ivf_candidates(base, queries, want, plan, same))
    idx = idx.astype(np.int64, copy=False)
    if same:
        keep = idx != np.arange(nq)[:, None]
        keep[keep.sum(axis=1) > want - 1, -1] = False  # self not found: drop the weakest instead
        sims, idx = sims[keep].reshape(nq, want - 1), idx[keep].reshape(nq, want - 1)
    return sims.astype(np.float32, copy=False), idx
