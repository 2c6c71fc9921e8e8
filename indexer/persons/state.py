"""The current clustering of faces into persons, persisted in the store: centers, stable ids, person names, metrics.

Layout: meta key ``clustering`` holds the method, its parameters, when it ran, on how many faces, its scores and the
id mapping of the last recluster; the ``clusters`` table maps a cluster id to its center (raw float32), size and
name. Each face record carries its cluster id and its similarity to that center.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexer.config import ClusterSettings
from indexer.embedding import stack_vectors
from indexer.errors import ClusteringError
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import from_u64, pack, u64, unpack


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


def load_clustering(store: FaceStore, txn=None) -> Clustering | None:
    if txn is None:
        with store.read() as t:
            return load_clustering(store, t)
    meta = store.get_meta("clustering", None, txn)
    if meta is None:
        return None
    ids, centers, sizes, names = [], [], {}, {}
    for key, raw in txn.cursor(db=store.db["clusters"]):
        rec = unpack(raw)
        cid = from_u64(key)
        ids.append(cid)
        centers.append(np.frombuffer(rec["center"], dtype=np.float32))
        sizes[cid] = rec.get("size", 0)
        if rec.get("name"):
            names[cid] = rec["name"]
    return Clustering(
        method=meta["method"], params=meta.get("params", {}), ids=np.asarray(ids, dtype=np.int64),
        centers=stack_vectors(centers), sizes=sizes, names=names,
        metrics=meta.get("metrics", {}), created=meta.get("created", 0.0), n_faces=meta.get("n_faces", 0),
        mapping=meta.get("mapping", []),
    )


def clustering_summary(store: FaceStore) -> dict[str, Any]:
    """``Clustering.summary()`` for ``status``, from the meta record and the tables' sizes: no center is read."""
    with store.read() as txn:
        meta = store.get_meta("clustering", None, txn)
        if meta is None:
            return {"method": None, "k": 0}
        k = txn.stat(store.db["clusters"])["entries"]
        named = 0
        if store.has_table("names") and store.get_meta("names_adopted", False, txn):
            named = sum(1 for key, raw in txn.cursor(db=store.db["names"])
                        if unpack(raw) and txn.get(key, db=store.db["clusters"]) is not None)
        else:  # names still on the clusters (an index from before the user's word): the old way
            named = sum(1 for _, raw in txn.cursor(db=store.db["clusters"]) if unpack(raw).get("name"))
    summary = Clustering(method=meta["method"], params=meta.get("params", {}), ids=np.zeros(0, np.int64),
                         centers=np.zeros((0, 0), np.float32), metrics=meta.get("metrics", {}),
                         created=meta.get("created", 0.0), n_faces=meta.get("n_faces", 0)).summary()
    return {**summary, "k": int(k), "named": named}


def save_clustering(store: FaceStore, txn, clustering: Clustering) -> None:
    """Replace the stored clustering (centers, sizes, names, meta) inside the caller's transaction."""
    cursor = txn.cursor(db=store.db["clusters"])
    while cursor.first():
        cursor.delete()
    for cid, center in zip(clustering.ids.tolist(), clustering.centers, strict=True):
        rec = {"center": np.ascontiguousarray(center, np.float32).tobytes(), "size": clustering.sizes.get(cid, 0),
               "name": clustering.names.get(cid, "")}
        txn.put(u64(cid), pack(rec), db=store.db["clusters"])
    store.put_meta(txn, "clustering_version", store.get_meta("clustering_version", 0, txn) + 1)
    store.put_meta(txn, "clustering", {
        "method": clustering.method, "params": clustering.params, "metrics": clustering.metrics,
        "created": clustering.created, "n_faces": clustering.n_faces, "mapping": clustering.mapping[-200:],
    })


def live_assigner(store: FaceStore, settings: ClusterSettings):
    """A function assigning new vectors to the stored centers (all -1 while no clustering exists).

    It rereads the centers whenever the stored clustering changed (a recluster or a merge, maybe by another
    process), checked by a version number: one small read per batch.
    """
    from indexer.cluster import assign_to_centers  # here, not at the top: `status` should not load FAISS

    cache: dict[str, Any] = {"version": None, "ids": np.zeros(0, np.int64), "centers": stack_vectors([])}

    def assign(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with store.read() as txn:
            version = store.get_meta("clustering_version", 0, txn)
            if version != cache["version"]:
                clustering = load_clustering(store, txn)
                cache["version"] = version
                if clustering is not None:
                    cache["ids"], cache["centers"] = clustering.ids, clustering.centers
        return assign_to_centers(vectors, cache["centers"], settings.assign_min_similarity, ids=cache["ids"])

    return assign


def require_clustering(store: FaceStore, txn=None) -> Clustering:
    clustering = load_clustering(store, txn)
    if clustering is None or len(clustering.ids) == 0:
        raise ClusteringError("no clusters yet; run `faceindex cluster` first")
    return clustering
