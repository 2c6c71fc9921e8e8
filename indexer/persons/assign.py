"""The live assignment: each new face gets its person at once, from its nearest indexed faces (not only centers).

For every new face, before its batch is committed (indexer/pipeline/runner.py):

1. **search**: its ``k`` nearest faces in the FAISS index, plus the other new faces of its batch;
2. **decide** (``decide``, a pure function): among the neighbours at cosine >= ``link`` (``cluster.assign_link``,
   0.65: stricter than the recluster's 0.55 linkage, which has its passes to catch a wrong link) from *other*
   photos,
   - if most of those with a person name one person P (a share >= ``agree``), no other face of its photo is in P,
     and the face is within ``min_center`` of P's center, it joins P;
   - else, if none of them has a person and at least ``min_faces - 1`` of them are free (no person, not ignored,
     each from a different photo), the face and those neighbours start a new person (the density rule: the
     min-faces core rule of Immich's clustering; 2 is what LFW dev-train prefers, benchmarks/bench_assign.py);
   - else it stays unassigned (-1) for the next recluster.
3. **settle**, inside the batch's write transaction: new persons get their ids and the free neighbours that are
   still free join them (``put_face``; the person tables follow).

Two faces of one photo are never put in one person by this rule. A face placed here has no suggestion of the
clusterer yet (``suggested`` None), so an edit's local re-derivation keeps it where it is; the next recluster
decides it like any other face. Nothing happens before the index's first clustering (``faceindex cluster``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from indexer.store.lmdb_store import FaceStore
from indexer.store.persons import placed
from indexer.store.records import FaceRecord, NewFace

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (sims [m, k], ids [m, k]), -1 padded
UNASSIGNED = -1


@dataclass(frozen=True)
class AssignRule:
    k: int = 10               # indexed neighbours searched per new face
    link: float = 0.65        # a neighbour counts at this cosine (tuned on LFW dev-train: benchmarks/bench_assign.py)
    agree: float = 0.5        # share of the linked neighbours with a person that must name the same one
    min_center: float = 0.45  # and the face must be this close to that person's center (assign_min_similarity)
    min_faces: int = 2        # a new person needs this many faces (the new one and its free neighbours)


@dataclass(frozen=True)
class Neighbour:
    """One candidate neighbour of a new face: an indexed face (``face`` >= 0) or a batch mate (``mate``)."""

    sim: float
    person: int          # its person (-1: none); a batch mate's is decided as the batch goes
    photo: str
    free: bool = True    # may join a new person (no person, not ignored)
    face: int = -1
    mate: int = -1


@dataclass
class Decision:
    """Per new face: its person (>= 0), unassigned (-1) or new person number g (``-2 - g``), and the similarity to
    its person's center; per new person, the indexed faces that join it."""

    labels: list[int]
    sims: list[float]
    adopted: dict[int, list[int]] = field(default_factory=dict)   # new person label -> indexed face ids

    def new_persons(self) -> list[int]:
        return sorted({lab for lab in self.labels if lab <= -2}, reverse=True)


def decide(rule: AssignRule, photos: Sequence[str], neighbours: Sequence[Sequence[Neighbour]],
           center_sim: Callable[[int, int], float]) -> Decision:
    """The rule above for a batch, face by face in order (a batch mate decided earlier counts with its person).

    ``neighbours[i]``: face i's candidates (any order, any similarity; batch mates included, ``mate`` = index);
    ``center_sim(i, person)``: cosine of face i to the person's center.
    """
    labels = [UNASSIGNED] * len(photos)
    sims = [float("nan")] * len(photos)
    out = Decision(labels, sims)
    claimed: dict[int, int] = {}   # indexed face -> the new person an earlier face of the batch took it into
    for i, photo in enumerate(photos):
        if labels[i] != UNASSIGNED:
            continue  # joined a new person started by an earlier face of the batch
        linked = [n for n in neighbours[i] if n.sim >= rule.link and n.photo != photo and n.mate != i]
        linked = [replace(n, person=claimed[n.face]) if n.face in claimed else n for n in linked]
        current = [labels[n.mate] if n.mate >= 0 else n.person for n in linked]
        taken = {labels[j] for j, p in enumerate(photos) if p == photo and j != i and labels[j] != UNASSIGNED}
        person = _agreed(rule, linked, current)
        if person is not None:
            if person not in taken:
                sim = center_sim(i, person) if person >= 0 else float("nan")
                if person <= -2 or sim >= rule.min_center:
                    labels[i], sims[i] = person, sim
            continue
        if any(c != UNASSIGNED for c in current):
            continue  # neighbours with persons that do not agree: the recluster decides
        group = _free_group(linked, photo)
        if 1 + len(group) >= rule.min_faces:
            label = -2 - len(out.new_persons())
            labels[i] = label
            out.adopted[label] = [n.face for n in group if n.face >= 0]
            claimed.update((face, label) for face in out.adopted[label])
            for n in group:
                if n.mate >= 0:
                    labels[n.mate] = label
    return out


def _agreed(rule: AssignRule, linked: list[Neighbour], current: list[int]) -> int | None:
    """The person most linked neighbours name, if they are ``agree`` of those with a person; else None."""
    votes: dict[int, tuple[int, float]] = {}
    for n, person in zip(linked, current, strict=True):
        if person != UNASSIGNED:
            count, total = votes.get(person, (0, 0.0))
            votes[person] = (count + 1, total + n.sim)
    if not votes:
        return None
    person, (count, _) = max(votes.items(), key=lambda kv: kv[1])
    return person if count >= rule.agree * sum(c for c, _ in votes.values()) else None


def _free_group(linked: list[Neighbour], photo: str) -> list[Neighbour]:
    """The free linked neighbours, nearest first, at most one per photo (and none of ``photo``)."""
    group, photos = [], {photo}
    for n in sorted(linked, key=lambda n: -n.sim):
        if n.free and n.person == UNASSIGNED and n.mate < 0 and n.photo not in photos:
            group.append(n)
            photos.add(n.photo)
    for n in sorted(linked, key=lambda n: -n.sim):   # batch mates not yet decided
        if n.mate >= 0 and n.photo not in photos:
            group.append(n)
            photos.add(n.photo)
    return group


@dataclass
class Plan:
    """A batch's decision, settled inside its write transaction (again from scratch if the transaction retries)."""

    faces: list[NewFace]
    decision: Decision
    vectors: np.ndarray
    store_vectors: dict[int, np.ndarray]   # float32 vectors of the indexed faces it may adopt

    def settle(self, store: FaceStore, txn) -> None:
        from indexer.persons.apply import next_person_id

        first = next_person_id(store, txn, [store.highest_person(txn)])
        ids = {label: first + n for n, label in enumerate(self.decision.new_persons())}
        for label, person in ids.items():
            members = {f: rec for f in self.decision.adopted.get(label, [])
                       if (rec := _still_free(store, txn, f)) is not None}
            rows = [i for i, lab in enumerate(self.decision.labels) if lab == label]
            center = self.vectors[rows].astype(np.float64).sum(0)
            for f in members:
                center += self.store_vectors[f]
            center = center / max(float(np.linalg.norm(center)), 1e-12)
            for f, rec in members.items():
                store.put_face(txn, replace(rec, cluster=person, suggested=None,
                                            similarity=float(self.store_vectors[f] @ center)),
                               old=placed(rec), vector=self.store_vectors[f])
            for i in rows:
                self.decision.sims[i] = float(self.vectors[i] @ center)
        if ids:
            store.put_meta(txn, "next_person_id", first + len(ids))
        for face, label, sim in zip(self.faces, self.decision.labels, self.decision.sims, strict=True):
            face.cluster, face.similarity = (ids[label] if label <= -2 else label), sim


def _still_free(store: FaceStore, txn, face_id: int) -> FaceRecord | None:
    """The face's record if it may still join a new person (no person, not ignored, not tied), else None."""
    rec = store.get_face(face_id, txn)
    return rec if rec is not None and rec.cluster == UNASSIGNED and _free_word(store, txn, face_id) else None


def _free_word(store: FaceStore, txn, face_id: int) -> bool:
    """The user said nothing that keeps this face out of a new person (it is not ignored, nor tied to one)."""
    said = store.face_word(txn, face_id) or {}
    return not said.get("ignored") and said.get("person") is None


class KnnAssigner:
    """``plan(faces, photos)`` outside the write transaction (search and decide), ``Plan.settle`` inside it."""

    def __init__(self, store: FaceStore, rule: AssignRule, search: Callable[[], Search | None]) -> None:
        self.store, self.rule, self.search = store, rule, search
        self.seconds = 0.0   # spent planning (benchmarks read it)

    def plan(self, faces: list[NewFace], photos: list[str]) -> Plan | None:
        started = time.perf_counter()
        try:
            return self._plan(faces, photos)
        finally:
            self.seconds += time.perf_counter() - started

    def _plan(self, faces: list[NewFace], photos: list[str]) -> Plan | None:
        if not faces:
            return None
        x = np.stack([np.asarray(f.vector, np.float32) for f in faces])
        with self.store.read() as txn:
            if self.store.get_meta("clustering", None, txn) is None:
                return None   # persons start with the first clustering
            search = self.search()
            sims, ids = search(x, self.rule.k) if search is not None else (np.zeros((len(x), 0)),) * 2
            neighbours, vectors = self._neighbours(txn, x, photos, sims, ids)
            centers: dict[int, np.ndarray] = {}

            def center_sim(i: int, person: int) -> float:
                if person not in centers:
                    row = self.store.person_row(person, txn)
                    centers[person] = row.center if row is not None else np.zeros(x.shape[1], np.float32)
                return float(x[i] @ centers[person])

            decision = decide(self.rule, photos, neighbours, center_sim)
        return Plan(faces, decision, x, vectors)

    def _neighbours(self, txn, x: np.ndarray, photos: list[str], sims: np.ndarray, ids: np.ndarray
                    ) -> tuple[list[list[Neighbour]], dict[int, np.ndarray]]:
        records, vectors = {}, {}
        for f in {int(f) for f in ids[sims >= self.rule.link].ravel() if f >= 0}:
            rec = self.store.get_face(f, txn)
            vector = self.store.get_vector(f, txn) if rec is not None and rec.cluster == UNASSIGNED else None
            if rec is not None and (rec.cluster != UNASSIGNED or vector is not None):  # a damaged vector: skipped
                records[f] = (rec.cluster, rec.path, _free_word(self.store, txn, f))
                if vector is not None:
                    vectors[f] = vector
        mates = x @ x.T
        out = []
        for i in range(len(x)):
            row = [Neighbour(float(s), records[f][0], records[f][1], records[f][2], face=f)
                   for s, f in zip(sims[i].tolist(), ids[i].tolist(), strict=True) if f in records]
            row += [Neighbour(float(mates[i, j]), UNASSIGNED, photos[j], mate=j) for j in range(len(x)) if j != i]
            out.append(row)
        return out, vectors


def knn_assigner(store: FaceStore, settings, search: Callable[[], Search | None]) -> KnnAssigner:
    """The live assigner for ``ClusterSettings`` ``settings`` over ``search`` (the pipeline's FAISS index)."""
    return KnnAssigner(store, AssignRule(k=settings.assign_neighbours, link=settings.assign_link,
                                         min_center=settings.assign_min_similarity,
                                         min_faces=settings.assign_min_faces), search)
