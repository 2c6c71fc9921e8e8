"""Persons as the user sees them: list, show, name and merge (the CLI's `people` commands and the web app's)."""

from __future__ import annotations

from typing import Any

import numpy as np

from indexer.embedding import stack_vectors
from indexer.errors import ClusteringError, NotFoundError
from indexer.persons.state import load_clustering, require_clustering, save_clustering
from indexer.store.lmdb_store import FaceStore


def people(store: FaceStore) -> list[dict[str, Any]]:
    clustering = require_clustering(store)
    cohesion: dict[int, list[float]] = {int(i): [] for i in clustering.ids}
    with store.read() as txn:
        for face in store.iter_faces(txn):
            if face.cluster in cohesion:
                cohesion[face.cluster].append(face.similarity)
    rows = [{"id": cid, "name": clustering.names.get(cid, ""), "size": len(sims),
             "cohesion": round(float(np.mean(sims)), 4) if sims else None} for cid, sims in cohesion.items()]
    return sorted(rows, key=lambda r: (-r["size"], r["id"]))


def person(store: FaceStore, cluster_id: int) -> dict[str, Any]:
    clustering = require_clustering(store)
    if cluster_id not in set(clustering.ids.tolist()):
        raise NotFoundError(f"no cluster {cluster_id}; see `faceindex people list`")
    with store.read() as txn:
        faces = [f.to_dict() for f in store.iter_faces(txn) if f.cluster == cluster_id]
    faces.sort(key=lambda f: -f["similarity"])
    return {"id": cluster_id, "name": clustering.names.get(cluster_id, ""), "size": len(faces), "faces": faces}


def name(store: FaceStore, cluster_id: int, new_name: str) -> dict[str, Any]:
    def write(txn) -> dict[str, Any]:
        clustering = load_clustering(store, txn)
        if clustering is None or cluster_id not in set(clustering.ids.tolist()):
            raise NotFoundError(f"no cluster {cluster_id}; see `faceindex people list`")
        clustering.names[cluster_id] = new_name.strip()
        if not clustering.names[cluster_id]:
            clustering.names.pop(cluster_id)
        save_clustering(store, txn, clustering)
        return {"id": cluster_id, "name": new_name.strip()}

    return store.transact(write)


def merge(store: FaceStore, keep: int, other: int) -> dict[str, Any]:
    """Fold cluster ``other`` into ``keep``: its faces move, the center becomes the mean of both, a name survives."""
    if keep == other:
        raise ClusteringError("cannot merge a cluster with itself")

    def write(txn) -> dict[str, Any]:
        clustering = load_clustering(store, txn)
        ids = set(clustering.ids.tolist()) if clustering else set()
        for cid in (keep, other):
            if cid not in ids:
                raise NotFoundError(f"no cluster {cid}; see `faceindex people list`")
        members = [f for f in store.iter_faces(txn) if f.cluster in (keep, other)]
        vectors = stack_vectors([store.get_vector(f.face_id, txn) for f in members])
        center = vectors.mean(axis=0)
        center /= np.linalg.norm(center)
        for face, vector in zip(members, vectors, strict=True):
            store.set_face_cluster(txn, face.face_id, keep, float(vector @ center))
        rows = clustering.ids != other
        clustering.ids, clustering.centers = clustering.ids[rows], clustering.centers[rows]
        clustering.centers[np.flatnonzero(clustering.ids == keep)[0]] = center
        clustering.sizes[keep] = len(members)
        clustering.sizes.pop(other, None)
        other_name = clustering.names.pop(other, "")
        if not clustering.names.get(keep) and other_name:
            clustering.names[keep] = other_name
        clustering.mapping.append(f"merged cluster {other} into {keep}")
        save_clustering(store, txn, clustering)
        return {"id": keep, "name": clustering.names.get(keep, ""), "size": len(members), "merged": other}

    return store.transact(write)
