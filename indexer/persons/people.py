"""Persons as the user sees them: list and show (read-only views for the CLI and the web app)."""

from __future__ import annotations

from typing import Any

import numpy as np

from indexer.errors import NotFoundError
from indexer.persons.state import require_clustering
from indexer.persons.word import load_word
from indexer.store.lmdb_store import FaceStore


def people(store: FaceStore) -> list[dict[str, Any]]:
    """Every person with a face: id, name, size, cohesion (mean similarity to the center); largest first."""
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
    """One person's faces, most central first; ``confirmed`` marks those the user placed there."""
    clustering = require_clustering(store)
    if cluster_id not in set(clustering.ids.tolist()):
        raise NotFoundError(f"no person {cluster_id}; see `faceindex people list`")
    with store.read() as txn:
        word = load_word(store, txn)
        faces = [{**f.to_dict(), "confirmed": word.of(f.face_id).confirmed}
                 for f in store.iter_faces(txn) if f.cluster == cluster_id]
    faces.sort(key=lambda f: -f["similarity"])
    return {"id": cluster_id, "name": clustering.names.get(cluster_id, ""), "size": len(faces),
            "confirmed": sum(f["confirmed"] for f in faces), "faces": faces}
