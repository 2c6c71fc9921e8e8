"""Write the persons derived from the clusterer's suggestion and the user's word into the store.

``rederive`` is the one place where the user's word is applied: after every recluster (manual or the daemon's)
and after every edit, inside that transaction. It reads each face's suggested person, the word and the vectors,
runs the pure ``derive_persons``, and writes each face's person and similarity, the persons' centers, sizes and
names (the user's word; an index from before it had names on its clusters, adopted once).
"""

from __future__ import annotations

import numpy as np

from indexer.config import ClusterSettings
from indexer.embedding import stack_vectors
from indexer.persons.derive import Derived, derive_persons
from indexer.persons.state import Clustering, load_clustering, save_clustering
from indexer.persons.word import Word, load_word
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import pack, u64


def next_person_id(store: FaceStore, txn, *in_use: object) -> int:
    """The first person id never used in this index (ids are never reused for another person)."""
    highest = [store.get_meta("next_person_id", 0, txn) - 1]
    for ids in in_use:
        highest += [int(i) for i in ids]  # type: ignore[attr-defined]
    return max(highest) + 1


def _adopt_old_names(store: FaceStore, txn, word: Word, previous: Clustering | None) -> None:
    """Once per index: names given before the user's word existed (schema 1, kept on the clusters) become the
    user's word, so that from then on names live in one place."""
    if store.get_meta("names_adopted", False, txn):
        return
    for pid, name in (previous.names.items() if previous else ()):
        if pid not in word.names:
            word.names[pid] = name
            txn.put(u64(pid), pack(name), db=store.db["names"])
    store.put_meta(txn, "names_adopted", True)


def rederive(store: FaceStore, txn, settings: ClusterSettings, base: Clustering | None = None,
             suggested: dict[int, int] | None = None) -> Clustering:
    """Apply the user's word to the faces' suggested persons; ``base`` and ``suggested`` come from a fresh
    recluster (method, parameters, scores; each face's suggestion), else the stored ones are kept. Runs inside the
    caller's write transaction."""
    previous = load_clustering(store, txn)
    base = base or previous
    word = load_word(store, txn)
    _adopt_old_names(store, txn, word, previous)
    with_vectors = [(f, store.get_vector(f.face_id, txn)) for f in store.iter_faces(txn)]
    _unplace_damaged(store, txn, [f for f, v in with_vectors if v is None])
    with_vectors = [(f, v) for f, v in with_vectors if v is not None]
    faces = [f for f, _ in with_vectors]
    face_ids = np.array([f.face_id for f in faces], np.int64)
    if suggested is None:  # a face without a suggestion yet (a schema 1 index, live assignment) keeps its person
        suggestions = [f.cluster if f.suggested is None else f.suggested for f in faces]
    else:
        suggestions = [suggested.get(f.face_id, -1) for f in faces]
    suggested_ids = np.array(suggestions, np.int64)
    x = stack_vectors([v for _, v in with_vectors])
    first_free = next_person_id(store, txn, suggested_ids[suggested_ids >= 0], base.ids if base else [],
                                [w.person for w in word.faces.values() if w.person is not None], word.names)
    derived: Derived = derive_persons(face_ids, suggested_ids, x, word.faces, next_id=first_free,
                                      min_similarity=settings.assign_min_similarity,
                                      pull_similarity=settings.threshold)
    for face, person, sim, sugg in zip(faces, derived.labels.tolist(), derived.similarity.tolist(),
                                       suggested_ids.tolist(), strict=True):
        if (face.cluster, face.suggested) != (person, sugg) or not _same(face.similarity, sim):
            face.cluster, face.similarity, face.suggested = int(person), float(sim), int(sugg)
            store.put_face(txn, face)
    counted, counts = np.unique(derived.labels[derived.labels >= 0], return_counts=True)
    sizes = dict(zip(counted.tolist(), counts.tolist(), strict=True))
    clustering = Clustering(
        method=base.method if base else "none", params=base.params if base else {}, ids=derived.ids,
        centers=derived.centers, sizes=sizes,
        names={p: word.names[p] for p in derived.ids.tolist() if word.names.get(p)},
        metrics=base.metrics if base else {}, created=base.created if base else 0.0, n_faces=len(faces),
        mapping=(base.mapping if base else []) + [f"person {p} gets fresh id (its suggested id is the user's "
                                                  "person elsewhere)" for p in derived.fresh_ids])
    save_clustering(store, txn, clustering)
    store.put_meta(txn, "next_person_id", next_person_id(store, txn, derived.ids, [first_free - 1]))
    return clustering


def _same(a: float, b: float) -> bool:
    return (np.isnan(a) and np.isnan(b)) or a == b


def _unplace_damaged(store: FaceStore, txn, faces: list) -> None:
    """A face whose vector is damaged (integrity.py) cannot be compared with anyone: it belongs to no person."""
    for face in faces:
        if face.cluster != -1:
            face.cluster, face.similarity = -1, 0.0
            store.put_face(txn, face)
