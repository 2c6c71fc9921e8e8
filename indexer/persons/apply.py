"""Write the persons derived from the clusterer's suggestion and the user's word into the store.

The user's word is applied in one place, ``derive_persons`` (persons/derive.py), over two scopes:
- ``rederive``: every face, after a recluster (manual or the daemon's), inside its transaction;
- ``rederive_local``: after an edit, only the faces it can change (``region``): the faces it spoke of, every face of
  the persons it touched and of the clusters those faces were suggested into. The rest of the index is not read.
Each face's person, suggestion and similarity are written through ``FaceStore.put_face``, which keeps the person
tables (members, vector sums, sizes: store/persons.py) in step in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from indexer.config import ClusterSettings
from indexer.embedding import stack_vectors
from indexer.persons.derive import Derived, derive_persons
from indexer.persons.state import Clustering, load_clustering, save_clustering, touched
from indexer.persons.word import Word, lazy_word, load_word
from indexer.store.lmdb_store import FaceStore
from indexer.store.persons import placed
from indexer.store.records import FaceRecord, pack, u64

REGION_ROUNDS = 3  # closure rounds of ``region``: faces -> their persons and clusters -> those persons' faces


def next_person_id(store: FaceStore, txn, *in_use: object) -> int:
    """The first person id never used in this index (ids are never reused for another person)."""
    highest = [store.get_meta("next_person_id", 0, txn) - 1]
    for ids in in_use:
        highest += [int(i) for i in ids]  # type: ignore[attr-defined]
    return max(highest) + 1


def _adopt_old_names(store: FaceStore, txn, word: Word) -> None:
    """Once per index: names given before the user's word existed (schema 1, kept on the clusters) become the
    user's word, so that from then on names live in one place."""
    if store.get_meta("names_adopted", False, txn):
        return
    for pid, name in list(store.legacy_cluster_names(txn)):
        if pid not in word.names:
            word.names[pid] = name
            store.put_word_key(txn, "names", u64(pid), pack(name))
    store.put_meta(txn, "names_adopted", True)


def _suggestion(face: FaceRecord, suggested: dict[int, int] | None) -> int:
    if suggested is None:  # a face without a suggestion yet (a schema 1 index, live assignment) keeps its person
        return face.cluster if face.suggested is None else face.suggested
    return suggested.get(face.face_id, -1)


def _write(store: FaceStore, txn, faces: list[FaceRecord], vectors: list[np.ndarray], labels: np.ndarray,
           sims: np.ndarray, suggested: np.ndarray) -> None:
    """Write each face whose person, suggestion or similarity changed (the person tables follow)."""
    for face, vector, person, sim, sugg in zip(faces, vectors, labels.tolist(), sims.tolist(), suggested.tolist(),
                                               strict=True):
        if (face.cluster, face.suggested) != (person, sugg) or not _same(face.similarity, sim):
            old = placed(face)
            face.cluster, face.similarity, face.suggested = int(person), float(sim), int(sugg)
            store.put_face(txn, face, old=old, vector=vector)


def rederive(store: FaceStore, txn, settings: ClusterSettings, base: Clustering | None = None,
             suggested: dict[int, int] | None = None) -> Clustering:
    """Apply the user's word to every face's suggested person; ``base`` and ``suggested`` come from a fresh
    recluster (method, parameters, scores; each face's suggestion), else the stored ones are kept. Runs inside the
    caller's write transaction."""
    base = base or load_clustering(store, txn)
    word = load_word(store, txn)
    _adopt_old_names(store, txn, word)
    with_vectors = [(f, store.get_vector(f.face_id, txn)) for f in store.iter_faces(txn)]
    _unplace_damaged(store, txn, [f for f, v in with_vectors if v is None])
    with_vectors = [(f, v) for f, v in with_vectors if v is not None]
    faces = [f for f, _ in with_vectors]
    face_ids = np.array([f.face_id for f in faces], np.int64)
    suggested_ids = np.array([_suggestion(f, suggested) for f in faces], np.int64)
    x = stack_vectors([v for _, v in with_vectors])
    first_free = next_person_id(store, txn, suggested_ids[suggested_ids >= 0], base.ids if base else [],
                                [w.person for w in word.faces.values() if w.person is not None], word.names)
    derived: Derived = derive_persons(face_ids, suggested_ids, x, word.faces, next_id=first_free,
                                      min_similarity=settings.assign_min_similarity,
                                      pull_similarity=settings.threshold)
    _write(store, txn, faces, [v for _, v in with_vectors], derived.labels, derived.similarity, suggested_ids)
    counted, counts = np.unique(derived.labels[derived.labels >= 0], return_counts=True)
    clustering = Clustering(
        method=base.method if base else "none", params=base.params if base else {}, ids=derived.ids,
        centers=derived.centers, sizes=dict(zip(counted.tolist(), counts.tolist(), strict=True)),
        names={p: word.names[p] for p in derived.ids.tolist() if word.names.get(p)},
        metrics=base.metrics if base else {}, created=base.created if base else 0.0, n_faces=len(faces),
        mapping=(base.mapping if base else []) + [f"person {p} gets fresh id (its suggested id is the user's "
                                                  "person elsewhere)" for p in derived.fresh_ids])
    save_clustering(store, txn, clustering)
    store.put_meta(txn, "next_person_id", next_person_id(store, txn, derived.ids, [first_free - 1]))
    return clustering


def region(store: FaceStore, txn, faces: Iterable[int], persons: Iterable[int]) -> dict[int, FaceRecord]:
    """The faces an edit of ``faces`` and ``persons`` can change: those, every face of their persons and of the
    clusters they were suggested into, closed over ``REGION_ROUNDS`` rounds (persons are compact: it stops at
    once but where a cluster was split between persons)."""
    records: dict[int, FaceRecord] = {}
    seen_persons: set[int] = set()
    seen_clusters: set[int] = set()
    todo, new_persons = set(faces), set(persons)
    for _ in range(REGION_ROUNDS):
        new_clusters: set[int] = set()
        for face_id in todo - records.keys():
            face = store.get_face(face_id, txn)
            if face is not None:
                records[face_id] = face
                person, sugg, _ = placed(face)
                new_persons.add(person)
                new_clusters.add(sugg)
        new_persons -= seen_persons | {-1}
        new_clusters = (new_clusters | new_persons) - seen_clusters - {-1}
        if not new_persons and not new_clusters:
            break
        seen_persons |= new_persons
        seen_clusters |= new_clusters
        todo = {f for p in new_persons for f, _ in store.member_similarities(p, txn)}
        todo |= {f for c in new_clusters for f in store.suggested_faces(c, txn)}
        new_persons = set()
    return records


def rederive_local(store: FaceStore, txn, settings: ClusterSettings, faces: Iterable[int],
                   persons: Iterable[int]) -> int:
    """Apply the user's word after an edit of ``faces`` and ``persons``: ``derive_persons`` over their region only,
    centers and similarities from the person tables. Returns how many faces were re-derived."""
    word = lazy_word(store, txn)
    _adopt_old_names(store, txn, word)
    records = region(store, txn, faces, persons)
    read = [(f, store.get_vector(f.face_id, txn)) for f in records.values()]
    _unplace_damaged(store, txn, [f for f, v in read if v is None])
    with_vectors = [(f, v) for f, v in read if v is not None]
    if not with_vectors:
        touched(store, txn)
        return 0
    local = [f for f, _ in with_vectors]
    vectors = [v for _, v in with_vectors]
    face_ids = np.array([f.face_id for f in local], np.int64)
    suggested_ids = np.array([_suggestion(f, None) for f in local], np.int64)
    x = stack_vectors(vectors)
    said = word.about(face_ids.tolist())
    first_free = next_person_id(store, txn, suggested_ids[suggested_ids >= 0],
                                [w.person for w in said.values() if w.person is not None], word.names)
    derived = derive_persons(face_ids, suggested_ids, x, said, next_id=first_free,
                             min_similarity=settings.assign_min_similarity, pull_similarity=settings.threshold)
    labels = derived.labels
    sims = _similarities(store, txn, local, x, labels)
    _write(store, txn, local, vectors, labels, sims, suggested_ids)
    touched(store, txn)
    store.put_meta(txn, "next_person_id", next_person_id(store, txn, labels, [first_free - 1]))
    return len(local)


def _similarities(store: FaceStore, txn, faces: list[FaceRecord], x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each face's cosine to its new person's center: the stored sum, less the region's faces that leave, plus
    those that join (the sums the writes will leave), so faces outside the region count as they should."""
    old = np.array([f.cluster for f in faces], np.int64)
    sums: dict[int, np.ndarray] = {}
    for person in set(labels.tolist()) - {-1}:
        row = store.person_row(person, txn)
        total = row.sum.copy() if row is not None else np.zeros(x.shape[1], np.float64)
        total -= x[old == person].sum(axis=0, dtype=np.float64)
        total += x[labels == person].sum(axis=0, dtype=np.float64)
        sums[person] = total / max(float(np.linalg.norm(total)), 1e-12)
    sims = np.full(len(faces), np.nan, np.float32)
    for person, center in sums.items():
        rows = labels == person
        sims[rows] = x[rows] @ center.astype(np.float32)
    return sims


def _same(a: float, b: float) -> bool:
    return (np.isnan(a) and np.isnan(b)) or a == b


def _unplace_damaged(store: FaceStore, txn, faces: list) -> None:
    """A face whose vector is damaged (integrity.py) cannot be compared with anyone: it belongs to no person."""
    for face in faces:
        if face.cluster != -1:
            old = placed(face)
            face.cluster, face.similarity = -1, 0.0
            store.put_face(txn, face, old=old)
