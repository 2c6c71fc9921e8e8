"""What a user's persons operations cost on a big index (bench_persons_scale's second half, issue 24 items 2 and 5).

``build`` writes the generated faces into a real index (one photo per face, a small JPEG thumbnail each, in
transactions of ``BATCH``) and applies the recluster's result exactly as ``faceindex cluster`` does
(``persons.recluster.apply``: stable ids, the user's word, the person tables), and saves the FAISS snapshot as
ingest does. ``measure`` then times, one after
the other:
- whole processes of the real CLI, start-up included: ``status``, ``people list --limit 120``,
  ``people show --limit 96`` of the largest person, and edits (name, move, remove, ignore, undo; a merge of the two
  largest persons and its undo) on persons of distinct identities (``distinct_people``);
- the real server (``faceindex serve``, models loaded first): the People page, the largest person's page, and the
  same edits through the JSON API (``edit_p50_ms`` / ``edit_p95_ms`` over all of them, the merge apart).
``assign_new`` then times the live assignment of 1% of the faces arriving again as new photos, and the local
recluster after them.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 5_000
ASSIGN_BATCH = 32   # images per batch while streaming (WatchSettings.batch_size)
REPO = Path(__file__).resolve().parents[1]


def build(index: Path, x: np.ndarray, computed, settings) -> dict:
    """A real index of ``x`` with the persons of ``computed``; seconds to write and to apply."""
    from benchmarks.bench_serve import thumbnail
    from indexer.config import IndexSettings
    from indexer.persons.recluster import apply
    from indexer.store.lmdb_store import FaceStore
    from indexer.store.records import FileRecord, NewFace
    from indexer.store.sync import SyncedIndex

    thumb = thumbnail()
    store = FaceStore(index)
    started = time.perf_counter()
    for start in range(0, len(x), BATCH):
        def fill(txn, start: int = start) -> None:
            for i in range(start, min(start + BATCH, len(x))):
                face = NewFace(box=[0, 0, 96, 96], prob=1.0, landmarks=[[0, 0]] * 5, vector=x[i], thumbnail=thumb)
                store.put_file(txn, FileRecord(f"/bench/{i:07d}.jpg", 1, 1, f"{i:064x}", "indexed"), [face])

        store.transact(fill)
    written = time.perf_counter() - started
    started = time.perf_counter()
    apply(store, computed, settings)
    applied = time.perf_counter() - started
    started = time.perf_counter()
    SyncedIndex(store, IndexSettings()).save(force=True)  # the FAISS snapshot ingest leaves behind
    snapshot = time.perf_counter() - started
    store.close()
    return {"write_s": round(written, 1), "apply_s": round(applied, 1), "snapshot_s": round(snapshot, 1)}


def _cli(index: Path, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "indexer", *args, "--index", str(index)], capture_output=True,
                          text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"faceindex {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return seconds, proc.stdout


def _median(values: list[float], scale: float = 1.0) -> float:
    return round(statistics.median(values) * scale, 3)


def _p95(values: list[float], scale: float = 1.0) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * scale, 3)


def identities(index: Path, persons: list[int], truth: np.ndarray) -> dict[int, int]:
    """{person: the generator's identity most of its faces have} (rows from the photos' names)."""
    from indexer.store.lmdb_store import FaceStore

    store = FaceStore(index, readonly=True)
    out = {}
    try:
        with store.read() as txn:
            for person in persons:
                rows = [int(store.get_face(f, txn).path.rsplit("/", 1)[1][:7])
                        for f, _ in store.member_similarities(person, txn)]
                out[person] = int(np.bincount(truth[rows]).argmax())
    finally:
        store.close()
    return out


def distinct_people(rows: list[dict], identity: dict[int, int]) -> list[dict]:
    """The rows of the list's second half whose identity no other listed person shares.

    A user corrects persons that are different people. Two listed persons of one identity are pieces of it that the
    recluster left apart; naming one and moving a face into the other would tell every later recluster that the
    pieces are two people (derive_persons keeps the user's persons apart), which no user means."""
    shared = np.bincount([identity[r["id"]] for r in rows])
    return [r for r in rows[len(rows) // 2:] if shared[identity[r["id"]]] == 1]


def _edits(rows: list[dict], faces: dict[int, list[int]]) -> list[tuple[str, str, dict, list[str]]]:
    """(kind, API path, JSON body, CLI args) for each edit measured, on ``rows`` (persons of distinct identities,
    ``distinct_people``)."""
    out = []
    for n in range(4):  # the CLI edits the first group, the server the three others
        a, b = rows[3 * n], rows[3 * n + 1]
        fa = faces[a["id"]]
        out += [("name", f"/api/people/{a['id']}/name", {"name": f"Bench {n}"}, ["people", "name", str(a["id"]),
                                                                                f"Bench {n}"]),
                ("move", f"/api/people/{b['id']}/move", {"faces": fa[:1]}, ["people", "move", str(fa[0]), "--to",
                                                                             str(b["id"])]),
                ("remove", f"/api/people/{a['id']}/remove", {"faces": fa[1:2]},
                 ["people", "remove", str(a["id"]), str(fa[1])]),
                ("ignore", "/api/faces/ignore", {"faces": fa[-1:], "ignored": True},
                 ["people", "ignore", str(fa[-1])])]
    return out


def assign_new(index: Path, x: np.ndarray, truth: np.ndarray, share: float = 0.01, seed: int = 0) -> dict:
    """The live assignment and the local recluster at this size: ``share`` of the faces leave the index (one
    transaction), then come back as new photos in batches of ``ASSIGN_BATCH`` through the real assigner (plan
    before, settle inside each batch's transaction, the real FAISS index caught up after each) as ingest runs it;
    then one local recluster (persons/local.py) as the daemon runs it. ``assign_ms_per_face``: plan + settle per
    face; ``assign_same_person``: share of them placed where the recluster had them; ``local_recluster_s``,
    ``local_scope``; pairwise F1 of the whole index after the arrivals and after the local recluster."""
    from indexer.config import ClusterSettings, IndexSettings
    from indexer.persons.assign import knn_assigner
    from indexer.persons.local import local_recluster
    from indexer.store.lmdb_store import FaceStore
    from indexer.store.records import FileRecord, NewFace
    from indexer.store.sync import SyncedIndex

    store = FaceStore(index)
    synced = SyncedIndex(store, IndexSettings())
    rows = np.random.default_rng(seed).choice(len(x), max(ASSIGN_BATCH, int(len(x) * share)), replace=False)
    before: dict[int, int] = {}

    def drop(txn) -> None:
        for i in rows.tolist():
            record = store.get_file(f"/bench/{i:07d}.jpg", txn)
            before[i] = store.get_face(record.face_ids[0], txn).cluster
            store.remove_file(txn, record.path)

    store.transact(drop)
    synced.catch_up()
    assigner = knn_assigner(store, ClusterSettings(), lambda: synced.index.search)
    settle_s, thumb = 0.0, b"\xff\xd8\xff\xd9"
    for start in range(0, len(rows), ASSIGN_BATCH):
        batch = rows[start:start + ASSIGN_BATCH].tolist()
        faces = [NewFace([0, 0, 96, 96], 1.0, [[0, 0]] * 5, x[i], thumb) for i in batch]
        plan = assigner.plan(faces, [f"/bench/new/{i:07d}.jpg" for i in batch])

        def commit(txn, faces=faces, batch=batch, plan=plan) -> float:
            started = time.perf_counter()
            if plan is not None:
                plan.settle(store, txn)
            seconds = time.perf_counter() - started
            for face, i in zip(faces, batch, strict=True):
                store.put_file(txn, FileRecord(f"/bench/new/{i:07d}.jpg", 1, 1, f"n{i:063x}", "indexed"), [face])
            return seconds

        settle_s += store.transact(commit)
        synced.catch_up()
    with store.read() as txn:
        after = {i: store.get_face(store.get_file(f"/bench/new/{i:07d}.jpg", txn).face_ids[0], txn).cluster
                 for i in rows.tolist()}
    arrived = _pairwise(store, truth)
    started = time.perf_counter()
    done = local_recluster(store, ClusterSettings(), synced.index.search) or {}
    local_s = time.perf_counter() - started
    result = {"assign_ms_per_face": round(1000 * (assigner.seconds + settle_s) / len(rows), 3),
              "assign_faces": int(len(rows)), "assign_index": synced.index.choice.key,
              "assign_same_person": round(sum(after[i] == before[i] for i in after) / len(after), 4),
              "arrived_pairwise_f1": arrived, "local_recluster_s": round(local_s, 2),
              "local_scope": done.get("faces", 0), "local_pairwise_f1": _pairwise(store, truth)}
    store.close()
    return result


def _pairwise(store, truth: np.ndarray) -> float:
    """Pairwise F1 of every face's person against the generator's identities (row from the photo's name)."""
    from indexer.cluster import external_scores

    labels = np.full(len(truth), -1, np.int64)
    with store.read() as txn:
        for face in store.iter_faces(txn):
            labels[int(face.path.rsplit("/", 1)[1][:7])] = face.cluster
    return round(float(external_scores(truth, labels, information=False)["pairwise_f1"]), 4)


def measure(index: Path, truth: np.ndarray, repeats: int = 3) -> dict:
    from benchmarks.bench_serve import PHOTO, p50_ms, start_server

    status = [_cli(index, "status", "--json")[0] for _ in range(repeats)]
    listed = [_cli(index, "people", "list", "--limit", "120", "--json") for _ in range(repeats)]
    rows = json.loads(listed[-1][1])
    rows = [r for r in rows if r["size"] >= 3]
    largest, second = rows[0]["id"], rows[1]["id"]
    shown = [_cli(index, "people", "show", str(largest), "--limit", "96", "--json")[0] for _ in range(repeats)]
    chosen = distinct_people(rows, identities(index, [r["id"] for r in rows], truth))
    if len(chosen) < 12:
        raise SystemExit(f"only {len(chosen)} listed persons of distinct identities to edit; 12 are needed")
    faces = {r["id"]: [f["face_id"] for f in json.loads(_cli(index, "people", "show", str(r["id"]), "--json")[1])[
        "faces"]] for r in chosen[:12]}
    edits = _edits(chosen, faces)
    cli_edits = [_cli(index, *args)[0] for _, _, _, args in edits[:4]]
    edits = edits[4:]
    cli_edits.append(_cli(index, "people", "undo")[0])
    cli_merge = _cli(index, "people", "merge", str(largest), str(second))[0]
    cli_edits.append(_cli(index, "people", "undo")[0])
    result = {"status_s": _median(status), "people_list_cli_s": _median([s for s, _ in listed]),
              "person_show_cli_s": _median(shown), "edit_cli_p50_s": _median(cli_edits),
              "edit_cli_p95_s": _p95(cli_edits), "merge_largest_cli_s": round(cli_merge, 3),
              "largest_persons": [rows[0]["size"], rows[1]["size"]]}
    result.update(_server(index, edits, largest, second, repeats, PHOTO, p50_ms, start_server))
    return result


def _server(index: Path, edits, largest: int, second: int, repeats: int, photo: Path, p50_ms, start_server) -> dict:
    import httpx

    proc, base = start_server(index)
    try:
        with httpx.Client(base_url=base, timeout=600) as client:
            files = {"image": ("photo.jpg", photo.read_bytes(), "image/jpeg")}
            client.post("/api/search", files=files).raise_for_status()  # waits for the models loaded at start
            people_ms, _ = p50_ms(client, 10 * repeats, "GET", "/people")
            person_ms, _ = p50_ms(client, 10 * repeats, "GET", f"/people/{largest}")
            times = []
            for _, path, body, _ in edits:
                started = time.perf_counter()
                client.post(path, json=body).raise_for_status()
                times.append(time.perf_counter() - started)
            started = time.perf_counter()
            client.post(f"/api/people/{largest}/merge", json={"other": second}).raise_for_status()
            merge_s = time.perf_counter() - started
            client.post("/api/undo").raise_for_status()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return {"people_page_ms": people_ms, "person_page_ms": person_ms, "edit_p50_ms": _median(times, 1000),
            "edit_p95_ms": _p95(times, 1000), "merge_largest_ms": round(merge_s * 1000, 1), "edits": len(times)}
