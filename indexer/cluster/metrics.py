"""Cluster quality: internal scores (no ground truth, for `export`'s metrics.json) and external scores against
known identities (for benchmarks and tests).

Label -1 means noise/unassigned. Internal scores leave noise out (it belongs to no cluster); external scores count
each noise face as its own singleton cluster, which is what "unassigned" means to a user looking for a person.
"""

from __future__ import annotations

import numpy as np

from indexer.errors import ClusteringError


def _labels(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ClusteringError(f"{what} must be a 1-D array of cluster labels, got shape {labels.shape}.")
    return labels


def calinski_harabasz(x: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's ``calinski_harabasz_score`` in O(n d) from the clusters' sums: its per-cluster loop is O(n k),
    hours at a million faces. Faces labelled -1 are left out; at least 2 clusters.

    Within-cluster dispersion sum ||x - mean_k||^2 = sum ||x||^2 - sum_k ||sum_k||^2 / n_k; between-cluster
    dispersion sum_k n_k ||mean_k - mean||^2."""
    from indexer.cluster.passes import CENTER_BLOCK, cluster_sums

    sums, counts, _ = cluster_sums(x, labels)
    n, k = int(counts.sum()), len(counts)
    total = sums.sum(axis=0)
    kept = np.flatnonzero(np.asarray(labels) >= 0)
    squares = sum(float(np.einsum("ij,ij->", block, block)) for block in
                  (x[kept[i:i + CENTER_BLOCK]].astype(np.float64) for i in range(0, len(kept), CENTER_BLOCK)))
    within = squares - float((np.einsum("ij,ij->i", sums, sums) / counts).sum())
    means, overall = sums / counts[:, None], total / n
    between = float((counts * ((means - overall) ** 2).sum(axis=1)).sum())
    return 1.0 if within <= 0 else between * (n - k) / (within * (k - 1))


def internal_scores(x: np.ndarray, labels: np.ndarray, *, sample: int = 10000, seed: int = 1234,
                    sample_clusters: int = 1000) -> dict:
    """Silhouette (cosine), Davies-Bouldin and Calinski-Harabasz of a clustering of unit rows ``x``.

    The silhouette costs O(n^2): above ``sample`` clustered faces it is computed on a seeded uniform sample of faces
    (``silhouette_sample``). Davies-Bouldin compares every pair of clusters (a million faces make ~250,000): above
    ``sample_clusters`` clusters it is computed on a seeded sample of whole clusters (``davies_bouldin_clusters``).
    Calinski-Harabasz uses every face (O(n d)). Any score that is undefined (fewer than 2 clusters, or every face in
    its own cluster) is None rather than an error: a fresh index with one person is not a failure.
    """
    from sklearn import config_context
    from sklearn.metrics import davies_bouldin_score, silhouette_score

    x = np.asarray(x, dtype=np.float32)
    labels = _labels(labels, "labels")
    if x.ndim != 2 or x.shape[0] != labels.shape[0]:
        raise ClusteringError(f"Embeddings {x.shape} and labels {labels.shape} do not describe the same faces.")
    kept = labels >= 0
    lk = labels[kept]   # no copy of the clustered rows: at a million faces that is 2 GB
    n, k = int(lk.shape[0]), int(len(np.unique(lk)))
    scores: dict = {"n_faces": int(labels.shape[0]), "n_clustered": n, "n_noise": int((~kept).sum()), "k": k,
                    "silhouette": None, "silhouette_sample": 0, "davies_bouldin": None, "davies_bouldin_clusters": 0,
                    "calinski_harabasz": None}
    # All three scores need at least 2 clusters and at least one cluster with 2 members.
    if k < 2 or k > n - 1:
        return scores
    rng = np.random.default_rng(seed)
    scores["calinski_harabasz"] = calinski_harabasz(x, labels)
    rows_kept = np.flatnonzero(kept)
    chosen = np.unique(lk)
    if k > sample_clusters:
        chosen = np.sort(rng.choice(chosen, size=sample_clusters, replace=False))
    in_chosen = np.isin(lk, chosen)
    scores["davies_bouldin"] = float(davies_bouldin_score(x[rows_kept[in_chosen]], lk[in_chosen]))
    scores["davies_bouldin_clusters"] = int(len(chosen))
    rows = np.arange(n)
    if n > sample:
        rows = np.sort(rng.choice(n, size=sample, replace=False))
    ks = len(np.unique(lk[rows]))
    if 2 <= ks <= len(rows) - 1:
        # scikit-learn computes the distances in chunks of its working memory (1 GB by default: +840 MB of peak
        # RSS at 300,000 faces); 64 MB chunks give the same score.
        with config_context(working_memory=64):
            scores["silhouette"] = float(silhouette_score(x[rows_kept[rows]], lk[rows], metric="cosine"))
        scores["silhouette_sample"] = int(len(rows))
    return scores


def noise_as_singletons(labels: np.ndarray) -> np.ndarray:
    """``labels`` with each -1 replaced by a fresh label of its own (ids above every existing one)."""
    labels = np.asarray(labels).astype(np.int64, copy=True)
    noise = labels < 0
    start = int(labels.max()) + 1 if labels.size else 0
    labels[noise] = start + np.arange(int(noise.sum()))
    return labels


def _pairs(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    return float(np.sum(counts * (counts - 1.0) / 2.0))


def external_scores(labels_true: np.ndarray, labels_pred: np.ndarray, information: bool = True) -> dict:
    """Pairwise and BCubed precision/recall/F1, NMI and ARI of predicted clusters against true identities
    (``information`` False: NMI and ARI are left out as NaN, for parameter sweeps).

    Everything is computed from the contingency table of (true, predicted) so the cost is O(N), not O(N^2):
    a same-person pair put together is one of C(n_ij, 2) pairs in a cell. When there is no pair to judge
    (every face alone) precision or recall is 1.0 by convention, so a perfect singleton clustering scores 1.
    """
    from scipy.sparse import csr_matrix
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    true = _labels(labels_true, "true labels")
    pred = _labels(labels_pred, "predicted labels")
    if true.shape != pred.shape:
        raise ClusteringError(f"True labels ({true.shape[0]}) and predicted labels ({pred.shape[0]}) differ in length.")
    n = int(true.shape[0])
    if n == 0:
        raise ClusteringError("There are no labelled faces to score; pass at least one face.")
    _, t = np.unique(true, return_inverse=True)
    _, p = np.unique(noise_as_singletons(pred), return_inverse=True)
    table = csr_matrix((np.ones(n), (t, p))).tocsr()
    table.sum_duplicates()
    cells = table.data
    true_sizes = np.bincount(t).astype(np.float64)
    pred_sizes = np.bincount(p).astype(np.float64)

    together = _pairs(cells)
    pred_pairs, true_pairs = _pairs(pred_sizes), _pairs(true_sizes)
    pw_p = together / pred_pairs if pred_pairs else 1.0
    pw_r = together / true_pairs if true_pairs else 1.0

    # BCubed: each face's precision is the share of its cluster that is its person; a cell of n_ij faces contributes
    # n_ij * (n_ij / |cluster j|), and symmetrically for recall.
    coo = table.tocoo()
    b_p = float(np.sum(coo.data ** 2 / pred_sizes[coo.col]) / n)
    b_r = float(np.sum(coo.data ** 2 / true_sizes[coo.row]) / n)

    def f1(a: float, b: float) -> float:
        return 2 * a * b / (a + b) if a + b else 0.0

    return {
        "pairwise_precision": pw_p, "pairwise_recall": pw_r, "pairwise_f1": f1(pw_p, pw_r),
        "bcubed_precision": b_p, "bcubed_recall": b_r, "bcubed_f1": f1(b_p, b_r),
        "nmi": float(normalized_mutual_info_score(t, p)) if information else float("nan"),
        "ari": float(adjusted_rand_score(t, p)) if information else float("nan"),
        # Noise faces count as singleton clusters here, so n_clusters is comparable with n_people.
        "n_clusters": int(pred_sizes.shape[0]), "n_noise": int((pred < 0).sum()), "n_people": int(true_sizes.shape[0]),
    }


def purity(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Share of faces whose cluster's majority identity is their own (noise faces count as singletons)."""
    true = _labels(labels_true, "true labels")
    pred = noise_as_singletons(_labels(labels_pred, "predicted labels"))
    if true.shape != pred.shape or true.size == 0:
        raise ClusteringError("Purity needs the same, non-zero number of true and predicted labels.")
    _, t = np.unique(true, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    pairs = np.unique(np.stack([p, t], axis=1), axis=0, return_counts=True)
    majority = np.zeros(p.max() + 1, np.int64)
    np.maximum.at(majority, pairs[0][:, 0], pairs[1])
    return float(majority.sum() / true.size)
