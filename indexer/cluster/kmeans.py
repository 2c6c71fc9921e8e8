"""Spherical K-Means on unit face embeddings (FAISS), and a silhouette-based choice of k.

Rows are L2-normalised 512-d vectors, so cosine similarity is the inner product and the squared L2 distance to a
unit center is ``2 - 2 * cosine``. FAISS trains on at most ``max_points_per_centroid`` points per centroid (a
uniform sample) and then assigns every point once: that sampling is where most of its speed over scikit-learn
comes from, at a negligible cost in inertia (see benchmarks/bench_cluster.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from indexer.errors import ClusteringError

# Most dot products (sample rows x centers x candidates) k-means++ seeding may cost; see kmeanspp_seeds.
SEEDING_BUDGET = 20_000_000


@dataclass(frozen=True)
class KMeansResult:
    centers: np.ndarray      # float32 [k, d], rows L2-normalised
    labels: np.ndarray       # int64 [N], index of the assigned center
    similarity: np.ndarray   # float32 [N], cosine to the assigned center
    inertia: float           # sum over ALL points of the squared L2 distance to the assigned (unit) center


def as_unit_matrix(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """``x`` as a C-contiguous float32 [N, d] array with unit rows (FAISS needs exactly that layout)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ClusteringError(f"{what} must be a 2-D array [N, d], got shape {x.shape}.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]   # no temporary the size of x (np.linalg.norm makes one)
    if x.shape[0] and not np.all(np.isfinite(norms)):
        raise ClusteringError(f"{what} contain NaN or infinite values; re-embed the affected faces.")
    # Stored embeddings are unit already: skip the copy (100k x 512 is 200 MB) when every norm is within 1e-4 of 1;
    # otherwise renormalise, so that cosine == inner product holds for whatever the caller passes.
    if x.shape[0] and np.abs(norms - 1.0).max() <= 1e-4:
        return x
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def check_k(n: int, k: int) -> None:
    if k < 1:
        raise ClusteringError(f"k must be at least 1, got {k}; pass a positive --k.")
    if n == 0:
        raise ClusteringError("There are no faces to cluster; index some photos first.")
    if n < k:
        raise ClusteringError(f"{n} faces cannot make {k} clusters; add photos or lower --k.")


def nearest_center(x: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64, cosine float32) of each row of ``x`` to its most similar unit center (exact search)."""
    index = faiss.IndexFlatIP(centers.shape[1])
    index.add(centers)
    sims, labels = index.search(x, 1)
    return labels[:, 0].astype(np.int64), sims[:, 0].astype(np.float32)


def kmeanspp_seeds(x: np.ndarray, k: int, *, seed: int = 1234, sample_per_center: int = 40) -> np.ndarray:
    """k-means++ initial centers [k, d] (unit rows of ``x``), chosen on a seeded sample of the rows.

    FAISS seeds with k random points, which often puts two seeds in one identity and none in another, a local
    minimum K-Means does not leave. k-means++ spreads the seeds. It is sequential (k steps, each a pass over the
    sample), so it runs on at most ``sample_per_center * k`` rows, fewer when k is large (one cluster per person),
    keeping its cost within ``SEEDING_BUDGET`` dot products; greedy k-means++ (2 + ln k candidates per step, as
    scikit-learn does) is used when that budget allows.
    """
    # Each step is a small matrix-vector product: BLAS threads only add synchronisation, and on busy cores the
    # spinning made seeding 10-30x slower in measurements, so it runs single-threaded.
    with threadpool_limits(limits=1, user_api="blas"):
        return _kmeanspp(x, k, seed, sample_per_center)


def _kmeanspp(x: np.ndarray, k: int, seed: int, sample_per_center: int) -> np.ndarray:
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    trials = int(2 + np.log(k))
    if min(n, sample_per_center * k) * k * trials > SEEDING_BUDGET:
        trials = 1
    m = max(k, min(n, sample_per_center * k, SEEDING_BUDGET // (k * trials)))
    sample = x[np.sort(rng.choice(n, size=m, replace=False))] if m < n else x
    chosen = np.empty(k, np.int64)
    chosen[0] = rng.integers(sample.shape[0])
    # Squared distance between unit rows is 2 - 2 cos; closest[i] = distance of row i to its nearest seed so far.
    closest = np.maximum(2.0 - 2.0 * (sample @ sample[chosen[0]]), 0.0).astype(np.float64)
    for j in range(1, k):
        total = closest.sum()
        if total <= 0:   # every row coincides with a seed already: any unused row will do
            chosen[j] = rng.choice(np.setdiff1d(np.arange(sample.shape[0]), chosen[:j]))
            continue
        candidates = np.searchsorted(np.cumsum(closest), rng.random(trials) * total).clip(0, sample.shape[0] - 1)
        dist = np.maximum(2.0 - 2.0 * (sample[candidates] @ sample.T), 0.0)
        trial_closest = np.minimum(closest[None, :], dist)
        best = int(np.argmin(trial_closest.sum(axis=1)))
        chosen[j] = candidates[best]
        closest = trial_closest[best]
    return np.ascontiguousarray(sample[chosen], dtype=np.float32)


def fit_kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 1234,
    niter: int = 25,
    init_centers: np.ndarray | None = None,
    max_points_per_centroid: int = 256,
    restarts: int = 1,
) -> KMeansResult:
    """Spherical K-Means of unit rows ``x`` [N, d] into ``k`` clusters.

    Seeds are k-means++ on a sample, unless ``init_centers`` [k, d] warm-starts from a previous clustering (the
    daemon reclusters a grown index), which keeps clusters where they were and converges in fewer iterations.
    ``restarts`` > 1 (cold starts only): that many seeds (seed, seed + 1, ...), the lowest inertia kept; one
    k-means++ start can settle in a poor local minimum (8 LFW people: purity 0.85 from seed 1234, 0.94 on
    average over 30 seeds).
    """
    if restarts > 1 and init_centers is None:
        runs = [fit_kmeans(x, k, seed=seed + i, niter=niter, max_points_per_centroid=max_points_per_centroid)
                for i in range(restarts)]
        return min(runs, key=lambda r: r.inertia)
    x = as_unit_matrix(x)
    check_k(x.shape[0], k)
    d = x.shape[1]
    kmeans = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=max_points_per_centroid,
                          # min_points_per_centroid only gates a stderr warning about small N: silence it.
                          min_points_per_centroid=1)
    if init_centers is not None:
        init = as_unit_matrix(init_centers, "initial centers")
        if init.shape != (k, d):
            raise ClusteringError(f"Initial centers have shape {init.shape} but k={k} needs ({k}, {d}); "
                                  "recluster from scratch or keep k unchanged.")
    else:
        init = kmeanspp_seeds(x, k, seed=seed)
    kmeans.train(x, init_centroids=init)
    centers = as_unit_matrix(kmeans.centroids, "centers")
    labels, sims = nearest_center(x, centers)
    inertia = float(np.sum(2.0 - 2.0 * sims.astype(np.float64)))
    return KMeansResult(centers=centers, labels=labels, similarity=sims, inertia=max(inertia, 0.0))


def cosine_silhouette(x: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean silhouette with cosine distance, or None when fewer than 2 or more than N-1 clusters make it undefined."""
    from sklearn.metrics import silhouette_score

    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels > len(labels) - 1:
        return None
    return float(silhouette_score(x, labels, metric="cosine"))


def choose_k(
    x: np.ndarray,
    k_values: list[int] | range,
    *,
    seed: int = 1234,
    sample: int = 5000,
    niter: int = 25,
) -> tuple[int, list[dict]]:
    """The k of ``k_values`` with the best cosine silhouette, and the table behind the choice.

    Each k is fitted on all points, but the silhouette (O(n^2)) is computed on one seeded sample of at most
    ``sample`` rows shared by every k, so the scores are comparable. The table rows are
    ``{"k", "inertia", "silhouette"}`` for printing an elbow/silhouette table; silhouette is None where undefined.
    """
    x = as_unit_matrix(x)
    n = x.shape[0]
    candidates = sorted({int(k) for k in k_values})
    if not candidates:
        raise ClusteringError("No candidate k was given; pass a range such as 2..40.")
    usable = [k for k in candidates if 2 <= k <= max(n - 1, 0)]
    if not usable:
        raise ClusteringError(f"{n} faces cannot be split into any of k={candidates[0]}..{candidates[-1]} "
                              "with a defined silhouette; add photos or pass --k.")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=sample, replace=False)) if n > sample else np.arange(n)
    table = []
    for k in usable:
        result = fit_kmeans(x, k, seed=seed, niter=niter)
        table.append({"k": k, "inertia": result.inertia, "silhouette": cosine_silhouette(x[rows], result.labels[rows])})
    scored = [row for row in table if row["silhouette"] is not None]
    if not scored:
        raise ClusteringError("The silhouette is undefined for every candidate k on this data; pass --k explicitly.")
    # Ties go to the smaller k: fewer clusters for the same separation is the simpler explanation.
    best = max(scored, key=lambda row: (row["silhouette"], -row["k"]))
    return int(best["k"]), table
