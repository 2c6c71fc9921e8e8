"""Live assignment by nearest faces (indexer/persons/assign.py) on LFW dev-train: faces arriving batch by batch.

Run from the repository root:  .venv/bin/python -m benchmarks.bench_assign [--json] [--out DIR] [--smoke]

The photos are shuffled; the first ``--base`` share (default half) is clustered at once with the default method,
as ``faceindex cluster`` would; the rest arrive in batches of 32, as ingest and the daemon commit them, and each
batch is placed by the live rule: the same ``decide`` the pipeline runs, over an exact FAISS index of every face
indexed so far, with centers kept as vector sums like the store's person tables. No recluster runs in between.

Printed, side by side on the same data: the pairwise and BCubed F1 of the whole library after the last batch for
the nearest-faces rule (a sweep of ``k``, ``link`` and ``min_faces``; the defaults marked), for the nearest-center
rule it replaced (``assign_min_similarity``), and for one batch clustering of everything (a full recluster).
Then the real thing: an LMDB store, a FAISS index, the real assigner and, after the last batch, one local recluster
(persons/local.py, what the daemon runs), the library scored after each.
``--json`` keys: ``batch``, ``centers``, ``knn`` (the defaults' row), ``sweep`` (every row), ``real_live``,
``real_local``; each row with ``pairwise_f1``, ``bcubed_f1``, ``unassigned`` (share of faces with no person),
``ms_per_face`` (search and rule; for ``real_local``, the local recluster's seconds per new face).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if not __package__:  # `python benchmarks/bench_x.py` from any folder: put the repo root first, so `benchmarks` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.lfw_data import SMOKE_NOTE, Recorder, lfw_embeddings, lfw_sample, require_data, smoke_photos
from indexer.cluster import assign_to_centers, cluster_identities, external_scores
from indexer.config import ClusterSettings
from indexer.persons.assign import AssignRule, Neighbour, decide

SEED = 1234
BATCH = 32
# (k, link, min_faces): the link and density sweep at k=10, then k either side of the defaults
SWEEP = [(10, link, m) for link in (0.55, 0.6, 0.65, 0.7) for m in (2, 3)] + [(5, 0.65, 2), (20, 0.65, 2)]
SMOKE_PHOTOS = {"people": 15, "per_person": 5, "others": 45}


class Library:
    """What the store and its FAISS index hold, in memory: labels, person sums, an exact index."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, base: int) -> None:
        self.x, self.labels = x, np.full(len(x), -1, np.int64)
        self.labels[:base] = labels
        self.sums = {int(p): x[:base][labels == p].astype(np.float64).sum(0) for p in np.unique(labels) if p >= 0}
        self.next_id = max(self.sums, default=-1) + 1
        self.index = faiss.IndexFlatIP(x.shape[1])
        self.index.add(x[:base])

    def center_sim(self, q: np.ndarray):
        def sim(i: int, person: int) -> float:
            s = self.sums[person]
            return float(q[i] @ (s / np.linalg.norm(s)))
        return sim

    def join(self, row: int, person: int) -> None:
        self.labels[row] = person
        self.sums[person] = self.sums.get(person, 0.0) + self.x[row]

    def knn_batch(self, rule: AssignRule, start: int, stop: int) -> None:
        q = self.x[start:stop]
        sims, ids = self.index.search(q, rule.k)
        photos = [str(r) for r in range(start, stop)]   # LFW: one face per photo
        mates = q @ q.T
        neighbours = [[Neighbour(float(s), int(self.labels[f]), str(f), face=int(f))
                       for s, f in zip(sims[i], ids[i], strict=True) if f >= 0]
                      + [Neighbour(float(mates[i, j]), -1, photos[j], mate=j) for j in range(len(q)) if j != i]
                      for i in range(len(q))]
        decision = decide(rule, photos, neighbours, self.center_sim(q))
        new = {label: self.next_id + n for n, label in enumerate(decision.new_persons())}
        self.next_id += len(new)
        for label, person in new.items():
            for f in decision.adopted[label]:
                if self.labels[f] == -1:
                    self.join(f, person)
        for i, label in enumerate(decision.labels):
            if label != -1:
                self.join(start + i, new.get(label, label))
        self.index.add(q)

    def centers_batch(self, min_similarity: float, start: int, stop: int) -> None:
        ids = np.array(sorted(self.sums), np.int64)
        centers = np.stack([self.sums[p] / np.linalg.norm(self.sums[p]) for p in ids]).astype(np.float32)
        labels, _ = assign_to_centers(self.x[start:stop], centers, min_similarity, ids=ids)
        for i, label in enumerate(labels.tolist()):
            if label != -1:
                self.join(start + i, label)


def row(people: np.ndarray, labels: np.ndarray, seconds: float, n_timed: int, **extra) -> dict:
    s = external_scores(people, labels, information=False)
    return {**extra, "pairwise_f1": round(s["pairwise_f1"], 4), "bcubed_f1": round(s["bcubed_f1"], 4),
            "unassigned": round(float((labels == -1).mean()), 4),
            "ms_per_face": round(1000 * seconds / max(n_timed, 1), 3)}


def stream(x: np.ndarray, base_labels: np.ndarray, base: int, place) -> tuple[np.ndarray, float]:
    lib = Library(x, base_labels, base)
    started = time.perf_counter()
    for start in range(base, len(x), BATCH):
        place(lib, start, min(start + BATCH, len(x)))
    return lib.labels, time.perf_counter() - started


def real_store(x: np.ndarray, people: np.ndarray, base: int) -> dict:
    """The real thing on the same data: an LMDB store and a FAISS index; the first ``base`` faces ingested and
    reclustered as ``faceindex cluster`` does, the rest arriving through the real live assigner (plan, then settle
    in each batch's transaction), then one local recluster as the daemon runs it. Rows ``real_live`` and
    ``real_local`` (the whole library scored after each)."""
    import tempfile

    from indexer.config import ClusterSettings
    from indexer.persons.assign import knn_assigner
    from indexer.persons.local import local_recluster
    from indexer.persons.recluster import recluster
    from indexer.store.lmdb_store import FaceStore
    from indexer.store.records import FileRecord, NewFace
    from indexer.store.vectors import VectorIndex

    settings = ClusterSettings()

    def photo(i: int) -> FileRecord:
        return FileRecord(f"/lfw/{i:05d}.jpg", 1, 1, f"{i:064x}", "indexed")

    def face(i: int) -> NewFace:
        return NewFace([0, 0, 96, 96], 1.0, [[0, 0]] * 5, x[i], b"\xff\xd8\xff\xd9")

    def labels(store: FaceStore) -> np.ndarray:
        out = np.full(len(x), -1, np.int64)
        with store.read() as txn:
            for f in store.iter_faces(txn):
                out[int(f.path[5:10])] = f.cluster
        return out

    with tempfile.TemporaryDirectory(prefix="bench-assign-") as tmp:
        store = FaceStore(tmp)
        store.transact(lambda txn: [store.put_file(txn, photo(i), [face(i)]) for i in range(base)])
        recluster(store, settings)
        index = VectorIndex.build(np.arange(1, base + 1), x[:base])   # face ids 1.. in row order
        assigner = knn_assigner(store, settings, lambda: index.search)
        started = time.perf_counter()
        for start in range(base, len(x), BATCH):
            rows = list(range(start, min(start + BATCH, len(x))))
            faces = [face(i) for i in rows]
            plan = assigner.plan(faces, [photo(i).path for i in rows])

            def commit(txn, rows=rows, faces=faces, plan=plan) -> list[int]:
                if plan is not None:
                    plan.settle(store, txn)
                return [store.put_file(txn, photo(i), [f])[0] for i, f in zip(rows, faces, strict=True)]

            index.add(np.array(store.transact(commit), np.int64), x[rows])
        live = row(people, labels(store), time.perf_counter() - started, len(x) - base)
        started = time.perf_counter()
        done = local_recluster(store, settings, index.search) or {}
        local = row(people, labels(store), time.perf_counter() - started, len(x) - base, scope=done.get("faces", 0))
        store.close()
    return {"real_live": live, "real_local": local}


def run(x: np.ndarray, people: np.ndarray, base_share: float, say) -> dict:
    settings = ClusterSettings()
    order = np.random.default_rng(SEED).permutation(len(x))
    x, people = x[order], people[order]
    base = int(len(x) * base_share)
    n_new = len(x) - base
    started = time.perf_counter()
    everything = cluster_identities(x, "adaptive", threshold=settings.threshold)
    result = {"faces": len(x), "base": base, "batch": row(people, everything, time.perf_counter() - started, len(x))}
    base_labels = cluster_identities(x[:base], "adaptive", threshold=settings.threshold)
    labels, secs = stream(x, base_labels, base, lambda lib, a, b: lib.centers_batch(settings.assign_min_similarity,
                                                                                     a, b))
    result["centers"] = row(people, labels, secs, n_new)
    result["sweep"] = []
    for k, link, min_faces in SWEEP:
        rule = AssignRule(k=k, link=link, min_center=settings.assign_min_similarity, min_faces=min_faces)
        labels, secs = stream(x, base_labels, base, lambda lib, a, b, rule=rule: lib.knn_batch(rule, a, b))
        result["sweep"].append(row(people, labels, secs, n_new, k=k, link=link, min_faces=min_faces))
        if (k, link, min_faces) == (settings.assign_neighbours, settings.assign_link, settings.assign_min_faces):
            result["knn"] = result["sweep"][-1]
    result.update(real_store(x, people, base))
    say(f"LFW dev-train, {len(x):,} faces shuffled: {base:,} clustered at once, {n_new:,} arriving in batches of "
        f"{BATCH} with no recluster (seed {SEED})")
    say(f"{'placement of the new faces':<52}{'pairwise F1':>12}{'BCubed F1':>11}{'unassigned':>12}{'ms/face':>9}")
    lines = [("one batch clustering of all (reference)", result["batch"]),
             (f"nearest center >= {settings.assign_min_similarity}", result["centers"])]
    lines += [(f"nearest faces k={r['k']} link={r['link']} min_faces={r['min_faces']}"
               + (" (default)" if r is result.get("knn") else ""), r) for r in result["sweep"]]
    lines += [("real store and FAISS, the default rule", result["real_live"]),
              (f"  then one local recluster ({result['real_local']['scope']:,} faces)", result["real_local"])]
    for name, r in lines:
        say(f"{name:<52}{r['pairwise_f1']:>12.4f}{r['bcubed_f1']:>11.4f}{r['unassigned']:>12.1%}"
            f"{r['ms_per_face']:>9.3f}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table: stderr)")
    parser.add_argument("--out", type=Path, help="write bench_assign.txt and bench_assign.json into this folder")
    parser.add_argument("--base", type=float, default=0.5, help="share of the photos clustered at once (0.5)")
    parser.add_argument("--smoke", action="store_true", help="a few LFW photos (seconds): checks the script runs")
    args = parser.parse_args(argv)
    rec = Recorder(str(args.out) if args.out else None, "bench_assign")
    rec.table_to_stderr = args.json   # stdout stays one JSON object
    if args.smoke:
        rec.print(SMOKE_NOTE)
        root = require_data()
        data = lfw_sample(root, smoke_photos(root, **SMOKE_PHOTOS))
    else:
        data = lfw_embeddings()
    with threadpool_limits(limits=2):
        result = run(np.ascontiguousarray(data["vectors"], np.float32), data["people"], args.base, rec.print)
    result["smoke"] = bool(args.smoke)
    rec.json(result, to_stdout=args.json)
    rec.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
