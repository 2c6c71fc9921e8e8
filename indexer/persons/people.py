"""Persons as the user sees them: list, show, a face's photo and thumbnail (read-only views for the CLI and the
web app)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from indexer.errors import NotFoundError
from indexer.persons.state import load_clustering, require_clustering
from indexer.persons.word import load_word
from indexer.store.lmdb_store import FaceStore


def people_version(store: FaceStore) -> tuple[int, int]:
    """What ``people`` depends on: the clustering version (bumped by every recluster and every edit) and the change
    log's sequence number (bumped by every face added or removed, which the daemon assigns to persons live)."""
    with store.read() as txn:
        return store.get_meta("clustering_version", 0, txn), store.get_meta("seq", 0, txn)


def people(store: FaceStore) -> list[dict[str, Any]]:
    """Every person with a face: id, name, size, cohesion (mean similarity to the center) and ``face``, the face
    most similar to the center (its picture); largest first. One pass over the faces."""
    return people_and_members(store)[0]


def people_and_members(store: FaceStore) -> tuple[list[dict[str, Any]], dict[int, list[int]]]:
    """``people`` and, from the same pass, each person's face ids (so ``person`` need not pass over all faces)."""
    clustering = require_clustering(store)
    members: dict[int, list[int]] = {int(i): [] for i in clustering.ids}
    similarities: dict[int, list[float]] = {int(i): [] for i in clustering.ids}
    central: dict[int, tuple[float, int]] = {}
    with store.read() as txn:
        for face in store.iter_faces(txn):
            if face.cluster in members:
                members[face.cluster].append(face.face_id)
                similarities[face.cluster].append(face.similarity)
                sim = face.similarity if face.similarity == face.similarity else -2.0  # NaN: any other face first
                if face.cluster not in central or sim > central[face.cluster][0]:
                    central[face.cluster] = (sim, face.face_id)
    rows = [{"id": cid, "name": clustering.names.get(cid, ""), "size": len(sims),
             "cohesion": round(float(np.mean(sims)), 4) if sims else None,
             "face": central[cid][1] if cid in central else None} for cid, sims in similarities.items()]
    return sorted(rows, key=lambda r: (-r["size"], r["id"])), members


def person(store: FaceStore, cluster_id: int, face_ids: Iterable[int] | None = None) -> dict[str, Any]:
    """One person's faces, most central first; ``confirmed`` marks those the user placed there. ``face_ids``: its
    members if known (``people_and_members``), read instead of passing over every face."""
    clustering = require_clustering(store)
    if cluster_id not in set(clustering.ids.tolist()):
        raise NotFoundError(f"no person {cluster_id}; see `faceindex people list`")
    with store.read() as txn:
        word = load_word(store, txn)
        records = store.iter_faces(txn) if face_ids is None else (store.get_face(i, txn) for i in face_ids)
        faces = [{**f.to_dict(), "confirmed": word.of(f.face_id).confirmed}
                 for f in records if f is not None and f.cluster == cluster_id]
    faces.sort(key=lambda f: -f["similarity"])
    return {"id": cluster_id, "name": clustering.names.get(cluster_id, ""), "size": len(faces),
            "confirmed": sum(f["confirmed"] for f in faces), "faces": faces}


def photo(store: FaceStore, face_id: int) -> dict[str, Any]:
    """The photo holding face ``face_id``: its path and size, and each of its faces with box, person and name.

    Only a photo the store records as holding that face is answered, so a caller serving the file serves only
    files the index knows."""
    with store.read() as txn:
        face = store.get_face(face_id, txn)
        record = store.get_file(face.path, txn) if face is not None else None
        if record is None or face_id not in record.face_ids:
            raise NotFoundError(f"no photo with face {face_id} in the index")
        clustering = load_clustering(store, txn)
        names = clustering.names if clustering is not None else {}
        faces = [store.get_face(i, txn) for i in record.face_ids]
    return {"face_id": face_id, "path": record.path, "width": record.width, "height": record.height,
            "faces": [{"face_id": f.face_id, "box": f.box, "person": f.cluster, "name": names.get(f.cluster, "")}
                      for f in faces if f is not None]}


def thumbnail(store: FaceStore, face_id: int) -> bytes:
    """The stored JPEG thumbnail of a face."""
    with store.read() as txn:
        data = store.get_thumbnail(face_id, txn)
    if not data:
        raise NotFoundError(f"no thumbnail for face {face_id}")
    return data
