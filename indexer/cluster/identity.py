"""Identity clustering: group unit face embeddings into people, and assign new faces to existing people.

Methods (all take cosine thresholds, since rows are unit vectors and cosine is the inner product):
- ``kmeans``: spherical K-Means with a given k. Fast, but k must be known and every face is forced into a
  cluster, so it is poor at identities (on LFW, with k = number of people, pairwise F1 is < 0.1).
- ``threshold``: connected components of the k-NN graph with cosine >= threshold (single linkage). One wrong
  edge chains two people together, so big clusters swallow others.
- ``agglomerative``: average linkage cut at cosine >= threshold, via a decomposition: two clusters can only be
  merged when their mean pairwise cosine is >= threshold, which needs at least one pair >= threshold, so every
  average-linkage cluster lies inside one single-linkage component at the same threshold. The components come from
  the k-nearest-neighbour graph (``KNN_NEIGHBORS`` per face, ``neighbors.search``: exact on small sets, an inverted
  file above; memory O(N k), never all pairs), keeping edges with cosine >= threshold, and each is clustered on its
  own with exact average linkage over all its pairs (O(m^2) in the size m of the component only). A component larger
  than ``EXACT_LINKAGE_MAX`` faces (a person with thousands of photos, or look-alikes chained together: 300,000
  face-like vectors chain into one of 270,000) is linked over the neighbour graph instead (``graph_linkage``: a
  cluster is its sum, and reciprocal nearest clusters merge in rounds; memory O(m k), logged).
- ``adaptive`` (the recommended default): the same average-linkage tree, cut with a size-aware test, merge
  cosine >= threshold + pair_margin / sqrt(a * b) for clusters of a and b faces. A merge judged on one pair of
  photos must clear a higher bar than one judged on the mean of many pairs. On LFW this keeps strangers with one
  or two photos apart (BCubed precision) without splitting people with many photos (pairwise recall).
  Then two recall passes, each a ratio test on cluster centers: a cluster joins the cluster of its nearest center
  (``center_merge``), and an unassigned face joins its nearest center (``attach_similarity``), when that cosine is
  high and leads the nearest rival person's by ``center_lead``. They mend what pairwise F1 punishes most: big
  identities split in two looks, and their odd photos left unassigned.
- ``hdbscan``: scikit-learn's HDBSCAN on chord distances (O(N^2) memory up to ``HDBSCAN_MAX`` faces).

Clusters smaller than ``min_cluster_size`` become noise (-1): a face seen once is "not yet a person".
Labels are renumbered 0..C-1 by decreasing cluster size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components

from indexer.cluster import graph_linkage, neighbors
from indexer.cluster.kmeans import as_unit_matrix, check_k, fit_kmeans, nearest_center
from indexer.cluster.passes import attach_unassigned, merge_close_centers
from indexer.config import CLUSTER_METHODS
from indexer.errors import ClusteringError

log = logging.getLogger(__name__)

METHODS = CLUSTER_METHODS
# Tuned on LFW View 1 (dev-train, LFW's tuning set); the sweeps are in benchmarks/results/bench_cluster.txt.
DEFAULT_THRESHOLD = {"adaptive": 0.55, "agglomerative": 0.55, "threshold": 0.70}
DEFAULT_PAIR_MARGIN = 0.06
# The adaptive method's defaults are the product's (config.ClusterSettings, cross-validated: README, Clustering):
# 0.55 + 0.06, then the recall passes of passes.py, merge 0.65 and attach 0.50, each with a lead of 0.15 over the
# nearest rival person. tests/test_cluster.py holds the two equal. Pass 0 to turn a pass off.
DEFAULT_CENTER_MERGE = 0.65  # adaptive's second pass (passes.merge_close_centers): 0 = off
DEFAULT_CENTER_LEAD = 0.15  # the lead over the nearest rival person both passes ask for
DEFAULT_ATTACH_SIMILARITY = 0.50  # adaptive's last pass (passes.attach_unassigned): 0 = off
# A component of m faces needs the m (m - 1) / 2 float64 condensed distances for exact linkage, and scipy's average
# linkage works on a copy: 10k faces ~ 0.8 GB at the peak. Larger components are linked over the graph instead.
EXACT_LINKAGE_MAX = 10_000
# HDBSCAN here runs on a full N x N distance matrix (8 bytes per pair): 15k faces ~ 1.8 GB.
HDBSCAN_MAX = 15_000
KNN_NEIGHBORS = 32


def renumber(labels: np.ndarray, min_cluster_size: int = 1) -> np.ndarray:
    """Labels 0..C-1 by decreasing cluster size (ties: first appearance); clusters below the minimum become -1."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full(labels.shape, -1, np.int64)
    valid = labels >= 0
    if not valid.any():
        return out
    ids, first, inverse, counts = np.unique(labels[valid], return_index=True, return_inverse=True,
                                            return_counts=True)
    order = np.lexsort((first, -counts))
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    new = rank[inverse]
    new[counts[inverse] < min_cluster_size] = -1
    # Dropping small clusters leaves gaps at the end only, because ranks sort by size.
    out[valid] = new
    return out


def knn_graph(x: np.ndarray, k: int = KNN_NEIGHBORS) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest neighbours by cosine, self excluded: (similarities [N, k], indices [N, k]; -1 = none found).
    Exact on small sets, an inverted file above (``neighbors.plan_search``); similarities are always exact."""
    plan = neighbors.plan_search(x.shape[0], x.shape[0], x.shape[1])
    if plan.kind != "exact":
        log.info("k-nearest-neighbour graph of %d faces: %s", x.shape[0], plan.reason)
    return neighbors.search(x, None, k, plan=plan)


def knn_edges(x: np.ndarray, threshold: float, k: int = KNN_NEIGHBORS) -> tuple[np.ndarray, np.ndarray,
                                                                            np.ndarray]:
    """Each face's edges to its k nearest neighbours with cosine >= ``threshold``, self excluded: (rows, neighbours,
    cosines), each pair once per direction it was found in (memory O(N k))."""
    sims, idx = knn_graph(x, k)
    mask = (sims >= threshold) & (idx >= 0)
    rows = np.nonzero(mask)[0].astype(np.int32)   # int32 and float32: 32 edges a face make 400 MB at 1M
    return rows, idx[mask].astype(np.int32), sims[mask].astype(np.float32)


def _graph(n: int, rows: np.ndarray, cols: np.ndarray) -> csr_matrix:
    # Structure only (weight 1): a cosine of exactly 0 would otherwise vanish as a sparse zero.
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n)).tocsr()
    return graph.maximum(graph.T)


def similarity_graph(x: np.ndarray, threshold: float, k: int = KNN_NEIGHBORS) -> csr_matrix:
    """Sparse symmetric graph of each face's k nearest neighbours with cosine >= ``threshold``, self excluded
    (memory O(N k))."""
    rows, cols, _ = knn_edges(x, threshold, k)
    return _graph(x.shape[0], rows, cols)


def threshold_components(x: np.ndarray, threshold: float, k: int = KNN_NEIGHBORS) -> np.ndarray:
    """Connected components of the k-NN graph keeping edges with cosine >= threshold (labels, not renumbered)."""
    return connected_components(similarity_graph(x, threshold, k), directed=False)[1].astype(np.int64)


def _condensed_cosine(x: np.ndarray, block: int = 1024) -> np.ndarray:
    """Condensed (scipy ``pdist`` layout) cosine distances of unit rows, built by row blocks of BLAS products.

    Filling the condensed array block by block keeps peak memory at the condensed float64 array (what linkage
    needs anyway) plus one block, instead of a full N x N matrix in two dtypes.
    """
    n = x.shape[0]
    out = np.empty(n * (n - 1) // 2, np.float64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        dist = 1.0 - x[start:stop] @ x.T
        np.clip(dist, 0.0, 2.0, out=dist)
        for i in range(start, stop):
            offset = i * n - i * (i + 1) // 2
            out[offset:offset + n - i - 1] = dist[i - start, i + 1:]
    return out


def _tree_exact(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average-linkage merges of ``x`` (m >= 2 rows): children [m-1, 2] (scipy numbering) and merge cosines."""
    from scipy.cluster.hierarchy import linkage

    tree = linkage(_condensed_cosine(x), method="average")
    return tree[:, :2].astype(np.int64), 1.0 - tree[:, 2]


@dataclass(frozen=True)
class LinkageForest:
    """Average-linkage trees of every single-linkage component at cosine ``floor`` (see the module doc).

    Node ids follow scipy: leaves are 0..n-1, merge j creates node n + j, and children always come before their
    parent. Built once, it can be cut at any threshold >= ``floor`` (the benchmark sweeps thresholds this way).
    """

    n: int
    floor: float
    children: np.ndarray    # int64 [M, 2]
    similarity: np.ndarray  # float64 [M], average cosine between the two merged clusters
    split: int              # faces in components larger than exact linkage takes (linked over the graph)

    def cut(self, threshold: float, pair_margin: float = 0.0) -> np.ndarray:
        """Labels (not renumbered) of the maximal subtrees whose merges all pass the size-aware test.

        A merge of clusters of a and b faces passes when its average cosine is >= threshold + pair_margin /
        sqrt(a * b). With pair_margin 0 that is the plain average-linkage cut. A margin asks more of merges judged
        on few pairs: one pair of photos is a noisy estimate of "same person", the mean over many pairs is not.
        """
        if threshold < self.floor - 1e-9:
            raise ClusteringError(f"This linkage was built for thresholds >= {self.floor:.2f}, not {threshold:.2f}; "
                                  "rebuild it with a lower floor.")
        n, m = self.n, self.children.shape[0]
        size = np.ones(n + m, np.int64)
        ok = np.ones(n + m, bool)
        parent = np.full(n + m, -1, np.int64)
        for j, (a, b) in enumerate(self.children.tolist()):
            node = n + j
            size[node] = size[a] + size[b]
            parent[a] = parent[b] = node
            ok[node] = ok[a] and ok[b] and self.similarity[j] >= threshold + pair_margin / np.sqrt(size[a] * size[b])
        # Every node takes the label of its highest accepted ancestor; parents have higher ids, so go downwards.
        label = np.arange(n + m, dtype=np.int64)
        for node in range(n + m - 2, -1, -1):
            p = parent[node]
            if p >= 0 and ok[p]:
                label[node] = label[p]
        return label[:n].copy()


def average_linkage_forest(x: np.ndarray, floor: float, *, exact_max: int = EXACT_LINKAGE_MAX) -> LinkageForest:
    """Build the average-linkage forest of unit rows ``x`` for cuts at cosine >= ``floor``: exact linkage inside
    each single-linkage component of at most ``exact_max`` faces, graph linkage (graph_linkage.py) over the larger
    ones."""
    n = x.shape[0]
    rows, cols, edge_sims = knn_edges(x, floor)
    _, comp = connected_components(_graph(n, rows, cols), directed=False)
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    children, sims = [], []
    next_node = n

    def add(rows_of: np.ndarray, tree: np.ndarray, sim: np.ndarray) -> None:
        # Local ids: leaves 0..m-1 are the rows ``rows_of``; internal m + j becomes the next free global node.
        nonlocal next_node
        glob = np.concatenate([rows_of, next_node + np.arange(len(sim))])
        children.append(glob[tree])
        sims.append(sim)
        next_node += len(sim)

    components = np.split(order, bounds)
    large = [m for m in components if len(m) > exact_max]
    split = sum(len(m) for m in large)
    if large:   # their edges, in the rows of their members; the whole graph's edges go before the linkage
        members = np.sort(np.concatenate(large))
        local = np.full(n, -1, np.int32)
        local[members] = np.arange(len(members))
        keep = local[rows] >= 0
        edges = [local[rows[keep]], local[cols[keep]], edge_sims[keep]]
    del rows, cols, edge_sims
    for part in components:
        if 2 <= len(part) <= exact_max:
            add(part, *_tree_exact(x[part]))
    if large:
        log.info("average linkage: %d faces in %d components of more than %d faces, linked over the neighbour "
                 "graph (graph_linkage.py)", split, len(large), exact_max)
        y = graph_linkage.project(x, members)
        tree, sim, _ = graph_linkage.graph_average_linkage(y, edges, floor)
        add(members, tree, sim)
    if children:
        return LinkageForest(n, floor, np.concatenate(children), np.concatenate(sims), split)
    return LinkageForest(n, floor, np.zeros((0, 2), np.int64), np.zeros(0), split)


def hdbscan_labels(x: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """scikit-learn HDBSCAN on chord distances sqrt(2 - 2 cos) (noise = -1).

    Chord rather than cosine distance: HDBSCAN's cluster stability integrates 1 / distance, so the two give
    different trees; chord (Euclidean on unit rows) is what HDBSCAN is usually run with and scored better on LFW.
    Up to ``HDBSCAN_MAX`` faces the distance matrix is precomputed with one BLAS product; above, scikit-learn
    computes distances itself (memory O(N), but slow in 512-d).
    """
    from sklearn.cluster import HDBSCAN

    n = x.shape[0]
    if n < 2:
        return np.full(n, -1, np.int64)
    size = max(2, min_cluster_size)
    if n > HDBSCAN_MAX:
        log.warning("hdbscan on %d faces without a distance matrix: this is slow; prefer the adaptive method", n)
        return HDBSCAN(min_cluster_size=size, metric="euclidean").fit_predict(x).astype(np.int64)
    dist = np.sqrt(np.clip(2.0 - 2.0 * (x @ x.T).astype(np.float64), 0.0, 4.0))
    np.fill_diagonal(dist, 0.0)
    return HDBSCAN(min_cluster_size=size, metric="precomputed", copy=False).fit_predict(dist).astype(np.int64)


def cluster_identities(
    x: np.ndarray,
    method: str,
    *,
    threshold: float | None = None,
    min_cluster_size: int = 2,
    seed: int = 1234,
    k: int | None = None,
    pair_margin: float | None = None,
    center_merge: float | None = None,
    center_lead: float | None = None,
    attach_similarity: float | None = None,
) -> np.ndarray:
    """Cluster labels (int64 [N], -1 = noise/unassigned) of unit embeddings ``x`` by ``method``.

    ``threshold`` is a cosine similarity (adaptive, agglomerative, threshold; None = the method's tuned default),
    ``pair_margin`` the adaptive method's extra cosine for merges judged on few pairs, ``k`` is required for
    kmeans, ``center_merge`` and ``attach_similarity`` the adaptive method's recall passes (``merge_close_centers``,
    ``attach_unassigned``; 0 = none) with ``center_lead`` the lead over the nearest rival both ask for, and
    ``min_cluster_size`` turns smaller clusters into noise (all methods but kmeans). None = the tuned default.
    """
    x = as_unit_matrix(x)
    n = x.shape[0]
    if method not in METHODS:
        raise ClusteringError(f"Unknown clustering method {method!r}; choose one of {', '.join(METHODS)}.")
    if min_cluster_size < 1:
        raise ClusteringError(f"min_cluster_size must be at least 1, got {min_cluster_size}.")
    if threshold is None:
        threshold = DEFAULT_THRESHOLD.get(method, 0.0)
    if not -1.0 <= threshold <= 1.0:
        raise ClusteringError(f"threshold is a cosine similarity and must lie in [-1, 1], got {threshold}.")
    margin = DEFAULT_PAIR_MARGIN if pair_margin is None else pair_margin
    if margin < 0:
        raise ClusteringError(f"pair_margin must be >= 0, got {margin}.")
    if method == "kmeans":
        if k is None:
            raise ClusteringError("kmeans needs k; pass --k N or choose it with --k auto.")
        check_k(n, k)
        return fit_kmeans(x, k, seed=seed).labels
    if n == 0:
        raise ClusteringError("There are no faces to cluster; index some photos first.")
    if method == "threshold":
        labels = threshold_components(x, threshold)
    elif method == "agglomerative":
        labels = average_linkage_forest(x, threshold).cut(threshold)
    elif method == "adaptive":
        merge = DEFAULT_CENTER_MERGE if center_merge is None else center_merge
        lead = DEFAULT_CENTER_LEAD if center_lead is None else center_lead
        attach = DEFAULT_ATTACH_SIMILARITY if attach_similarity is None else attach_similarity
        if not (0 <= merge <= 1 and 0 <= attach <= 1 and lead >= 0):
            raise ClusteringError(f"center_merge and attach_similarity are cosines in [0, 1] (0 = off) and center_lead "
                                  f">= 0; got {merge}, {attach} and {lead}.")
        return adaptive_labels(x, average_linkage_forest(x, threshold), threshold, margin, min_cluster_size, merge,
                               lead, attach)
    else:
        labels = hdbscan_labels(x, min_cluster_size)
    return renumber(labels, min_cluster_size)


def adaptive_labels(x: np.ndarray, forest: LinkageForest, threshold: float, pair_margin: float,
                    min_cluster_size: int = 2, center_merge: float = 0.0, center_lead: float = 0.0,
                    attach_similarity: float = 0.0) -> np.ndarray:
    """The adaptive method's labels from an average-linkage forest of ``x`` built at a floor <= ``threshold`` (the
    benchmark cuts one forest at many thresholds; ``cluster_identities`` builds it at the threshold), then its two
    recall passes: clusters join a clearly nearest center (``center_merge`` > 0, ``merge_close_centers``), and
    unassigned faces join a clearly nearest center (``attach_similarity`` > 0, ``attach_unassigned``)."""
    labels = renumber(forest.cut(threshold, pair_margin), min_cluster_size)
    if center_merge > 0:
        labels = renumber(merge_close_centers(x, labels, center_merge, center_lead), min_cluster_size)
    if attach_similarity > 0:
        rivals = center_merge if center_merge > 0 else None
        labels = renumber(attach_unassigned(x, labels, attach_similarity, center_lead, rivals), min_cluster_size)
    return labels


def assign_to_centers(
    x: np.ndarray,
    centers: np.ndarray,
    min_similarity: float,
    *,
    ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest center of each face: (labels int64 [N], cosine float32 [N]); label -1 when cosine < min_similarity.

    Labels are row indices of ``centers`` unless ``ids`` (one per center) is given, in which case they are ids.
    """
    x = as_unit_matrix(x)
    centers = as_unit_matrix(centers, "centers")
    if x.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if centers.shape[0] == 0:
        # No people yet: every face is unassigned, similarity undefined.
        return np.full(x.shape[0], -1, np.int64), np.full(x.shape[0], np.nan, np.float32)
    if centers.shape[1] != x.shape[1]:
        raise ClusteringError(f"Faces are {x.shape[1]}-d but centers are {centers.shape[1]}-d; recluster with the "
                              "current model.")
    labels, sims = nearest_center(x, centers)
    if ids is not None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape != (centers.shape[0],):
            raise ClusteringError(f"{ids.shape[0]} ids for {centers.shape[0]} centers; pass one id per center.")
        labels = ids[labels]
    labels[sims < min_similarity] = -1
    return labels, sims
