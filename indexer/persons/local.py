"""The local recluster: what the daemon runs instead of a full one. It costs what changed since the last recluster.

The store keeps the faces no recluster has seen yet (``fresh``: added by ingest or the daemon, placed at once by
the live assignment, persons/assign.py). A local recluster:

1. **scope** (a read transaction): the fresh faces; among each one's ``k`` nearest indexed faces at the
   clustering threshold, the unassigned ones; and every face of the persons the fresh faces are in or near (an
   old face far from every fresh one was seen by the last recluster, and nothing near it changed). A person of
   more than ``LOCAL_WHOLE_MAX`` faces comes in with its faces among those nearest only: its center (the person
   table's sum) still lends its id to the cluster that matches it. At most ``max_faces`` faces: the oldest fresh
   faces first, persons while they fit, the rest next time.
   Memory: the scope's vectors (2 KiB per face, 0.4 GB at the 200,000 default) and the method's O(scope x 32)
   neighbour graph.
2. **compute** (no transaction, in the daemon's background thread): the same ``compute`` as ``faceindex cluster``
   over the scope's faces.
3. **apply** (one write transaction): the new clusters take the ids of the scope's persons by center (the same
   Hungarian matching as a full recluster, so ids and names stay), the others fresh ids; every scope face records
   its new suggestion and the user's word is applied over the region (``rederive_local``, as for an edit). The
   faces the scope held are no longer fresh; faces added meanwhile stay fresh for the next run.

What it cannot see: a cluster of the scope that is really a person outside it (none of the scope's faces was near
enough to that person's faces to be placed there) stays a person of its own until the next full recluster
(``faceindex cluster``, or the daemon's when the index grew by ``cluster.recluster_growth``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer import faults
from indexer.cluster import match_ids
from indexer.config import ClusterSettings
from indexer.persons.apply import next_person_id, rederive_local
from indexer.persons.assign import Search
from indexer.persons.recluster import ID_MATCH_MIN_SIMILARITY, Computed, compute
from indexer.persons.state import LOCAL_KEY
from indexer.store.lmdb_store import FaceStore
from indexer.store.persons import placed

log = logging.getLogger("faceindex.cluster")
LOCAL_MAX_FACES = 200_000   # faces in one local recluster's scope (the vectors: 0.4 GB)
# A person with more faces comes in partly: its faces among the fresh faces' nearest. Whole, the 5 people of a
# family library with 4% of 1M faces each would put 200,000 faces in the scope of a few new photos.
LOCAL_WHOLE_MAX = 2_000
NEIGHBOURS = 10             # per fresh face, for the unassigned faces near it


@dataclass
class Scope:
    """What one local recluster looks at."""

    fresh: np.ndarray        # the fresh faces it covers
    face_ids: np.ndarray     # every face of the scope (fresh ones included)
    x: np.ndarray            # their vectors
    persons: np.ndarray      # the persons taken in, whole or a big one's faces near the fresh ones (the
                             # clusters may take their ids)
    method: str
    threshold: float | None


def scope(store: FaceStore, settings: ClusterSettings, search: Search | None,
          max_faces: int = LOCAL_MAX_FACES, whole_max: int | None = None) -> Scope | None:
    """The faces a local recluster covers now (None: nothing fresh, or no clustering yet, or K-Means, which has
    no local form: the daemon runs a full one for it)."""
    with store.read() as txn:
        meta = store.get_meta("clustering", None, txn)
        if meta is None or meta["method"] == "kmeans":
            return None
        fresh = store.fresh_faces(txn, limit=max_faces)
        if not fresh:
            return None
        vectors: dict[int, np.ndarray] = {}
        persons: set[int] = set()
        for face_id in fresh:
            face, vector = store.get_face(face_id, txn), store.get_vector(face_id, txn)
            if face is not None and vector is not None:
                vectors[face_id] = vector
                persons.add(placed(face)[0])
        threshold = meta.get("params", {}).get("threshold", settings.threshold)
        near: dict[int, set[int]] = {}
        if search is not None:
            near = _near(store, txn, search, fresh, vectors, threshold, max_faces)
            persons |= set(near)
        persons.discard(-1)
        taken = []   # the persons taken in (the others wait for the next run, or a full recluster)
        whole_max = LOCAL_WHOLE_MAX if whole_max is None else whole_max
        for person in sorted(persons):
            row = store.person_row(person, txn)
            if row is not None and row.n > whole_max:   # a big person: only its faces near the fresh ones
                members = sorted(near.get(person, set()) - vectors.keys())
            else:
                members = [f for f, _ in store.member_similarities(person, txn) if f not in vectors]
            if len(vectors) + len(members) > max_faces:
                continue
            vectors.update((f, v) for f in members if (v := store.get_vector(f, txn)) is not None)
            taken.append(person)
        ignored = {f for f in vectors if (store.face_word(txn, f) or {}).get("ignored")}
    face_ids = np.array([f for f in vectors if f not in ignored], np.int64)
    x = np.stack([vectors[f] for f in face_ids.tolist()]) if len(face_ids) else np.zeros((0, 512), np.float32)
    return Scope(np.array(fresh, np.int64), face_ids, x, np.array(taken, np.int64), meta["method"], threshold)


def _near(store: FaceStore, txn, search: Search, fresh: list[int], vectors: dict[int, np.ndarray],
          threshold: float, max_faces: int) -> dict[int, set[int]]:
    """Add the unassigned faces among the fresh faces' nearest to ``vectors``; return the others by person."""
    queries = [f for f in fresh if f in vectors]
    persons: dict[int, set[int]] = {}
    for start in range(0, len(queries), 1024):
        chunk = queries[start:start + 1024]
        sims, ids = search(np.stack([vectors[f] for f in chunk]), NEIGHBOURS)
        for f in np.unique(ids[(sims >= threshold) & (ids >= 0)]).tolist():
            face = store.get_face(f, txn) if f not in vectors else None
            if face is None:
                continue
            if face.cluster != -1:
                persons.setdefault(face.cluster, set()).add(f)
            elif len(vectors) < max_faces and (vector := store.get_vector(f, txn)) is not None:
                vectors[f] = vector
    return persons


def apply_local(store: FaceStore, found: Scope, computed: Computed, settings: ClusterSettings) -> dict[str, Any]:
    """Write a local recluster's result (one transaction); returns what it did."""
    def write(txn) -> dict[str, Any]:
        ids = _local_ids(store, txn, found.persons, computed)
        suggestion = np.where(computed.labels >= 0, ids[np.maximum(computed.labels, 0)] if len(ids) else -1, -1)
        for row, (face_id, sugg) in enumerate(zip(computed.face_ids.tolist(), suggestion.tolist(), strict=True)):
            face = store.get_face(face_id, txn)
            if face is not None and face.suggested != sugg:
                old = placed(face)
                face.suggested = int(sugg)
                store.put_face(txn, face, old=old, vector=found.x[row])   # computed keeps the scope's order
        faults.reached("local-recluster")  # tests/faults: a crash with the suggestions written, not committed
        changed = rederive_local(store, txn, settings, computed.face_ids.tolist(), [*found.persons.tolist(),
                                                                                     *ids.tolist()])
        store.forget_fresh(txn, found.fresh.tolist())
        done = {"time": time.time(), "fresh": len(found.fresh), "faces": len(found.face_ids),
                "persons_before": len(found.persons), "clusters": int(len(ids)), "rederived": changed,
                "seconds": round(computed.seconds, 2)}
        store.put_meta(txn, LOCAL_KEY, done)
        return done

    return store.transact(write)


def _local_ids(store: FaceStore, txn, persons: np.ndarray, computed: Computed) -> np.ndarray:
    """The scope persons' ids for the clusters whose centers match theirs, ids never used for the others."""
    rows = store.person_rows(txn, persons.tolist())
    if not len(computed.centers):
        return np.zeros(0, np.int64)
    if rows:
        old = np.stack([r.center for r in rows])
        ids, _ = match_ids(old, [r.person for r in rows], computed.centers, min_similarity=ID_MATCH_MIN_SIMILARITY)
        fresh = ~np.isin(ids, [r.person for r in rows])
    else:
        ids, fresh = np.full(len(computed.centers), -1, np.int64), np.ones(len(computed.centers), bool)
    first = next_person_id(store, txn, [store.highest_person(txn)])
    ids[fresh] = first + np.arange(int(fresh.sum()))
    if fresh.any():
        store.put_meta(txn, "next_person_id", int(first + fresh.sum()))
    return ids


def local_recluster(store: FaceStore, settings: ClusterSettings, search: Search | None,
                    max_faces: int = LOCAL_MAX_FACES) -> dict[str, Any] | None:
    """Scope, compute and apply in one go (``faceindex cluster --local``, benchmarks); None when nothing to do."""
    found = scope(store, settings, search, max_faces)
    if found is None:
        return None
    computed = compute_local(found, settings)
    return apply_local(store, found, computed, settings) if computed is not None else None


def compute_local(found: Scope, settings: ClusterSettings) -> Computed | None:
    if len(found.face_ids) == 0:
        return None
    return compute(found.face_ids, found.x, settings, method=found.method, threshold=found.threshold)

