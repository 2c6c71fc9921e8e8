"""Reclustering the store's faces into persons: compute on a snapshot, match stable ids, apply in one transaction.

The algorithms are pure functions in ``indexer.cluster``; this module reads vectors from the store, runs them,
matches the new clusters to the old ones (Hungarian on cosine, so ids and names survive), and writes the result in
one transaction. ``compute`` touches no state, so the daemon runs it on a snapshot in a thread and applies the
result between two batches; faces committed meanwhile are assigned to the new centers when it is applied.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexer import faults
from indexer.cluster import (
    assign_to_centers,
    centers_from_labels,
    choose_k,
    cluster_identities,
    fit_kmeans,
    internal_scores,
    match_ids,
)
from indexer.config import ClusterSettings
from indexer.embedding import stack_vectors
from indexer.errors import ClusteringError
from indexer.persons.apply import next_person_id, rederive
from indexer.persons.state import Clustering, load_clustering
from indexer.persons.word import load_word
from indexer.store.lmdb_store import FaceStore

log = logging.getLogger("faceindex.cluster")
ID_MATCH_MIN_SIMILARITY = 0.5  # an old and a new center this close are the same person
SIMS_BLOCK = 65_536  # faces whose similarity to their center is computed at once
KMEANS_RESTARTS = 5  # cold K-Means starts per recluster, best inertia kept (cluster/kmeans.fit_kmeans)


@dataclass
class Computed:
    """The outcome of clustering one snapshot of the store (no ids matched yet)."""

    method: str
    params: dict[str, Any]
    face_ids: np.ndarray
    labels: np.ndarray            # per face, row of ``centers`` or -1
    similarity: np.ndarray        # per face, cosine to its center (nan when unassigned)
    centers: np.ndarray
    metrics: dict[str, Any]
    k_table: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def snapshot(store: FaceStore) -> tuple[np.ndarray, np.ndarray]:
    """(face ids, vectors) to cluster: every face but those the user ignored."""
    with store.read() as txn:
        ids, x = store.all_vectors(txn)
        ignored = {f for f, w in load_word(store, txn).faces.items() if w.ignored}
    keep = ~np.isin(ids, list(ignored)) if ignored else np.ones(len(ids), bool)
    return ids[keep], x[keep]


def compute(ids: np.ndarray, x: np.ndarray, settings: ClusterSettings, method: str | None = None,
            k: int | str | None = None, threshold: float | None = None,
            previous: Clustering | None = None) -> Computed:
    """Cluster one snapshot. ``k``: an int, "auto" (silhouette over a range), or None (config; 0 = auto)."""
    started = time.perf_counter()
    method = method or settings.method
    n = len(ids)
    if n == 0:
        raise ClusteringError("the index holds no faces yet; run `faceindex ingest PATH` first")
    params: dict[str, Any] = {}
    table: list[dict] = []
    if method == "kmeans":
        k = settings.k if k is None else k
        if k in ("auto", 0):
            if n < 3:
                raise ClusteringError(f"{n} faces are too few to choose k; add photos or pass --k 1")
            k, table = choose_k(x, range(2, min(40, n - 1) + 1), seed=settings.seed)
        k = int(k)
        if k > n:
            raise ClusteringError(f"{n} faces cannot make {k} clusters; add photos or lower --k")
        init = None
        if previous is not None and previous.method == "kmeans" and len(previous.ids) == k:
            init = previous.centers  # warm start: clusters stay where they were, fewer iterations
        result = fit_kmeans(x, k, seed=settings.seed, init_centers=init, restarts=KMEANS_RESTARTS)
        labels = result.labels
        params = {"k": k, "warm_start": init is not None}
    else:
        threshold = settings.threshold if threshold is None else threshold
        labels = cluster_identities(x, method, threshold=threshold, min_cluster_size=settings.min_cluster_size,
                                    seed=settings.seed, pair_margin=settings.pair_margin,
                                    center_merge=settings.center_merge, center_lead=settings.center_lead,
                                    attach_similarity=settings.attach_similarity)
        params = {"threshold": threshold, "min_cluster_size": settings.min_cluster_size}
        if method == "adaptive":
            params.update(pair_margin=settings.pair_margin, center_merge=settings.center_merge,
                          center_lead=settings.center_lead, attach_similarity=settings.attach_similarity)
    centers, rows = centers_from_labels(x, labels)
    # Renumber labels to rows of ``centers`` (centers_from_labels returns the label values it saw, sorted).
    labels = np.asarray(labels, np.int64)
    labels = np.where(labels >= 0, np.searchsorted(rows, labels), -1).astype(np.int64)
    sims = np.full(n, np.nan, np.float32)
    assigned = labels >= 0
    # By blocks: x[assigned] would copy every clustered row (2 GB at 1M).
    for start in range(0, n if len(centers) else 0, SIMS_BLOCK):
        block = slice(start, start + SIMS_BLOCK)
        sims[block] = np.einsum("ij,ij->i", x[block], centers[np.maximum(labels[block], 0)])
    sims[~assigned] = np.nan
    metrics = internal_scores(x, labels, seed=settings.seed)
    return Computed(method, params, ids, labels, sims, centers, metrics, table, time.perf_counter() - started)


def _stable_ids(store: FaceStore, txn, previous: Clustering | None, centers: np.ndarray) -> tuple[np.ndarray, list]:
    """Ids for new clusters: an old person's id when their centers match (names and edits follow), else an id
    never used before in this index."""
    if previous is not None and len(previous.ids) and len(centers):
        ids, mapping = match_ids(previous.centers, previous.ids, centers, min_similarity=ID_MATCH_MIN_SIMILARITY)
        fresh = ~np.isin(ids, previous.ids)
    else:
        ids = np.arange(len(centers), dtype=np.int64)
        mapping = [f"new cluster {i} gets fresh id {i} (first clustering)" for i in range(len(ids))]
        fresh = np.ones(len(ids), bool)
    first = next_person_id(store, txn, previous.ids if previous is not None else [])
    for n, row in enumerate(np.flatnonzero(fresh).tolist()):
        mapping[row] = mapping[row].replace(f"fresh id {ids[row]}", f"fresh id {first + n}")
        ids[row] = first + n
    return ids, mapping


def apply(store: FaceStore, computed: Computed, settings: ClusterSettings) -> Clustering:
    """Match ids to the stored persons, record each face's suggested person, then apply the user's word
    (persons/apply.py), all in one transaction."""
    def write(txn) -> Clustering:
        previous = load_clustering(store, txn)
        new_ids, mapping = _stable_ids(store, txn, previous, computed.centers)
        rows = computed.labels
        suggested = dict(zip(computed.face_ids.tolist(), np.where(rows >= 0, new_ids[np.maximum(rows, 0)]
                                                                  if len(new_ids) else -1, -1).tolist(),
                             strict=True))
        # Faces committed after the snapshot (the daemon kept ingesting): their nearest new center suggests.
        # (A face whose vector is damaged has none to compare: rederive leaves it out.)
        late = [f.face_id for f in store.iter_faces(txn)
                if f.face_id not in suggested and store.get_vector(f.face_id, txn) is not None]
        if late and len(new_ids):
            labels, _ = assign_to_centers(_vectors(store, txn, np.asarray(late)), computed.centers,
                                          settings.assign_min_similarity, ids=new_ids)
            suggested.update(zip(late, labels.tolist(), strict=True))
        base = Clustering(method=computed.method, params=computed.params, ids=new_ids, centers=computed.centers,
                          metrics=computed.metrics, mapping=mapping)
        clustering = rederive(store, txn, settings, base, suggested=suggested)
        seen = set(computed.face_ids.tolist())
        store.forget_fresh(txn, [f for f in store.fresh_faces(txn) if f in seen])
        faults.reached("recluster")  # tests/faults: a crash with the recluster written but not committed
        return clustering

    clustering = store.transact(write)
    for line in clustering.mapping:
        log.info("recluster: %s", line)
    return clustering


def _vectors(store: FaceStore, txn, ids: np.ndarray) -> np.ndarray:
    return stack_vectors([store.get_vector(int(i), txn) for i in ids])


def recluster(store: FaceStore, settings: ClusterSettings, method: str | None = None, k: int | str | None = None,
              threshold: float | None = None) -> dict[str, Any]:
    ids, x = snapshot(store)
    computed = compute(ids, x, settings, method, k, threshold, previous=load_clustering(store))
    clustering = apply(store, computed, settings)
    return {**clustering.summary(), "seconds": round(computed.seconds, 2), "k_table": computed.k_table,
            "mapping": clustering.mapping, "unassigned": clustering.n_faces - sum(clustering.sizes.values())}
