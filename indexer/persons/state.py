"""The current clustering of faces into persons, persisted in the store: centers, stable ids, person names, metrics.

Layout: meta key ``clustering`` holds the method, its parameters, when it ran, on how many faces, its scores and the
id mapping of the last recluster; the store's person tables (indexer/store/persons.py) hold each person's members,
vector sum and size, and the user's word its name (``names``). Each face record carries its person id and its
similarity to that person's center.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexer.embedding import stack_vectors
from indexer.errors import ClusteringError
from indexer.store.lmdb_store import FaceStore

NO_CLUSTERS = "no clusters yet; run `faceindex cluster` first"

LOCAL_KEY = "local_recluster"   # meta: when the last local recluster ran and what it saw (persons/local.py)

@dataclass
class Clustering:
    method: str
    params: dict[str, Any]
    ids: np.ndarray                      # int64 [C] stable cluster ids
    centers: np.ndarray                  # float32 [C, 512], rows L2-normalised
    sizes: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    n_faces: int = 0
    mapping: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "k": int(len(self.ids)), "params": self.params, "n_faces": self.n_faces,
                "last_recluster": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
                "named": len(self.names), "metrics": self.metrics}


def person_names(store: FaceStore, txn) -> dict[int, str]:
    """Person id -> name, from their one home: the user's word (``names``). An index from before the word kept
    names on its clusters; they count until its first edit or recluster adopts them (persons/apply.py)."""
    names: dict[int, str] = {}
    if not store.get_meta("names_adopted", False, txn):
        names.update(store.legacy_cluster_names(txn))
    for pid, name in store.name_rows(txn):
        if name:
            names[pid] = name
        else:
            names.pop(pid, None)
    return names


def load_clustering(store: FaceStore, txn=None) -> Clustering | None:
    """The whole clustering: every person's center (from the person tables' sums) and name. For a recluster, an
    export and the live assignment; an edit, a page and ``status`` read only what they show."""
    if txn is None:
        with store.read() as t:
            return load_clustering(store, t)
    meta = store.get_meta("clustering", None, txn)
    if meta is None:
        return None
    rows = store.person_rows(txn)
    names = person_names(store, txn)
    return Clustering(
        method=meta["method"], params=meta.get("params", {}), ids=np.asarray([r.person for r in rows], np.int64),
        centers=stack_vectors([r.center for r in rows]), sizes={r.person: r.n for r in rows},
        names={r.person: names[r.person] for r in rows if r.person in names},
        metrics=meta.get("metrics", {}), created=meta.get("created", 0.0), n_faces=meta.get("n_faces", 0),
        mapping=meta.get("mapping", []),
    )


def clustering_summary(store: FaceStore) -> dict[str, Any]:
    """``Clustering.summary()`` for ``status``, from the meta record and the tables' sizes: no center is read."""
    with store.read() as txn:
        meta = store.get_meta("clustering", None, txn)
        if meta is None:
            return {"method": None, "k": 0}
        k = store.person_count(txn)
        named = sum(1 for p in person_names(store, txn) if store.person_row(p, txn) is not None)
        fresh, local = store.fresh_count(txn), store.get_meta(LOCAL_KEY, None, txn)
    summary = Clustering(method=meta["method"], params=meta.get("params", {}), ids=np.zeros(0, np.int64),
                         centers=np.zeros((0, 0), np.float32), metrics=meta.get("metrics", {}),
                         created=meta.get("created", 0.0), n_faces=meta.get("n_faces", 0)).summary()
    if local is not None:
        local = {**local, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(local["time"]))}
    return {**summary, "k": int(k), "named": named, "fresh_faces": fresh, "last_local_recluster": local}


def save_clustering(store: FaceStore, txn, clustering: Clustering) -> None:
    """Record a recluster's method, parameters, scores and id mapping inside the caller's transaction (the persons
    themselves are the person tables, kept by every face write). Clusters of an index from before the person
    tables are dropped once their names were adopted."""
    if store.get_meta("names_adopted", False, txn):
        store.drop_legacy_clusters(txn)
    touched(store, txn)
    store.put_meta(txn, "clustering", {
        "method": clustering.method, "params": clustering.params, "metrics": clustering.metrics,
        "created": clustering.created, "n_faces": clustering.n_faces, "mapping": clustering.mapping[-200:],
    })


def touched(store: FaceStore, txn) -> None:
    """Persons changed (a recluster, an edit): readers caching centers (the live assignment) read them again."""
    store.put_meta(txn, "clustering_version", store.get_meta("clustering_version", 0, txn) + 1)


def has_clustering(store: FaceStore, txn) -> bool:
    return store.get_meta("clustering", None, txn) is not None and store.person_count(txn) > 0


def require_clustering(store: FaceStore, txn=None) -> Clustering:
    clustering = load_clustering(store, txn)
    if clustering is None or len(clustering.ids) == 0:
        raise ClusteringError(NO_CLUSTERS)
    return clustering


def require_clustered(store: FaceStore, txn) -> None:
    """``require_clustering`` without loading a center: for an edit and a page."""
    if not has_clustering(store, txn):
        raise ClusteringError(NO_CLUSTERS)
