"""The seed's artefacts: cluster_centers.npy, train_assignments.json, test_assignments.json, metrics.json.

Formats are those of shared/DESIGN.md. ``cluster_centers.npy`` is float32 [k, 512] with row i = cluster i: stable
cluster ids can have gaps (a person merged away keeps its id retired), so the artefacts number clusters by row, in
order of stable id, and say which stable id each row is (``cluster_ids``) and each face's ``cluster_id``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.cluster import assign_to_centers
from indexer.embedding import stack_vectors
from indexer.fsutil import atomic_write
from indexer.persons.state import Clustering, require_clustering
from indexer.persons.word import load_word
from indexer.store.lmdb_store import FaceStore

if TYPE_CHECKING:
    from indexer.report.gallery import ReportFace


def _rows(clustering: Clustering) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    order = np.argsort(clustering.ids)
    ids = clustering.ids[order]
    return ids, clustering.centers[order].astype(np.float32), {int(cid): i for i, cid in enumerate(ids.tolist())}


def _header(store: FaceStore, clustering: Clustering, ids: np.ndarray) -> dict[str, Any]:
    return {"model": store.get_meta("model"), "method": clustering.method, "k": int(len(ids)),
            "cluster_ids": ids.tolist(),
            "names": {str(i): clustering.names[int(cid)] for i, cid in enumerate(ids.tolist())
                      if int(cid) in clustering.names}}


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, allow_nan=False), mode=0o644)


def _write_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, buf.getvalue(), mode=0o644)


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else round(float(x), 4)


def export(store: FaceStore, out_dir: str | Path) -> dict[str, Any]:
    clustering = require_clustering(store)
    ids, centers, row_of = _rows(clustering)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_npy(out / "cluster_centers.npy", centers)
    with store.read() as txn:
        faces = [{"face_id": f.face_id, "path": f.path, "box": [round(v, 1) for v in f.box], "prob": round(f.prob, 4),
                  "cluster": row_of.get(f.cluster, -1), "cluster_id": f.cluster, "similarity": _num(f.similarity)}
                 for f in store.iter_faces(txn)]
    _write_json(out / "train_assignments.json", {**_header(store, clustering, ids), "faces": faces})
    metrics = {k: v for k, v in clustering.metrics.items()}
    metrics.update({"n_faces": len(faces), "k": int(len(ids)), "method": clustering.method,
                    "sampling": f"silhouette on {metrics.get('silhouette_sample', 0)} faces, Davies-Bouldin on "
                                f"{metrics.get('davies_bouldin_clusters', 0)} clusters (uniform, seeded), "
                                "Calinski-Harabasz on all"})
    _write_json(out / "metrics.json", metrics)
    return {"out": str(out), "files": ["cluster_centers.npy", "train_assignments.json", "metrics.json"],
            "k": int(len(ids)), "faces": len(faces), "metrics": metrics}


def assign(store: FaceStore, faces: list[tuple[str, dict[str, Any], np.ndarray]], out: str | Path,
           min_similarity: float = -1.0) -> dict[str, Any]:
    """``faces``: (path, detection record, vector) of photos outside the index. Writes test_assignments.json."""
    clustering = require_clustering(store)
    ids, centers, _ = _rows(clustering)
    vectors = stack_vectors([v for _, _, v in faces])
    rows, sims = assign_to_centers(vectors, centers, min_similarity)
    records = [{"face_id": None, "path": str(Path(path).absolute()), "box": [round(v, 1) for v in rec["box"]],
                "prob": rec["prob"], "cluster": int(row), "cluster_id": int(ids[row]) if row >= 0 else -1,
                "similarity": _num(float(sim))}
               for (path, rec, _), row, sim in zip(faces, rows.tolist(), sims.tolist(), strict=True)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out, {**_header(store, clustering, ids), "faces": records})
    return {"out": str(out), "faces": len(records), "k": int(len(ids))}


def report_faces(store: FaceStore) -> tuple[Clustering, list[ReportFace], np.ndarray]:
    """The clustering, every face but the ignored ones as a report record, and their vectors (rows aligned), for
    ``indexer.report``."""
    from indexer.report.gallery import ReportFace  # here: matplotlib loads with the report package

    clustering = require_clustering(store)
    faces, vectors = [], []
    with store.read() as txn:
        ignored = {f for f, w in load_word(store, txn).faces.items() if w.ignored}
        for f in store.iter_faces(txn):
            vector = store.get_vector(f.face_id, txn)
            if f.face_id in ignored or vector is None:  # None: a damaged vector, warned about (integrity.py)
                continue
            faces.append(ReportFace(face_id=f.face_id, path=f.path, box=tuple(f.box), cluster=f.cluster,
                                    similarity=f.similarity, thumbnail=store.get_thumbnail(f.face_id, txn)))
            vectors.append(vector)
    return clustering, faces, stack_vectors(vectors)
