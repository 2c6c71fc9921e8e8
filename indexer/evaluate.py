"""``faceindex eval DIR``: how well clustering recovers the people of a folder-per-person tree.

Each photo's labelled face is the one nearest the image centre (LFW's convention; other faces in the photo are
clustered too but not scored). Photos without a detected face are counted, not scored.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from indexer.cluster import external_scores
from indexer.config import Settings
from indexer.library import FaceIndex, OpenMode
from indexer.persons.recluster import compute, snapshot


def labelled_faces(fi: FaceIndex, root: Path) -> tuple[dict[int, str], int]:
    """{face_id: person} of each photo's centre face under ``root``, and the number of photos without a face."""
    labels, missing = {}, 0
    prefix = str(root) + "/"
    with fi.store.read() as txn:
        for rec in fi.store.iter_files(txn, prefix):
            person = Path(rec.path).relative_to(root).parts[0]
            if not rec.face_ids:
                missing += 1
                continue
            cx, cy = rec.width / 2, rec.height / 2
            faces = [fi.store.get_face(i, txn) for i in rec.face_ids]
            centre = min(faces, key=lambda f, cx=cx, cy=cy: ((f.box[0] + f.box[2]) / 2 - cx) ** 2
                         + ((f.box[1] + f.box[3]) / 2 - cy) ** 2)
            labels[centre.face_id] = person
    return labels, missing


def evaluate_folder(settings: Settings, folder: str | Path, method: str | None = None,
                    threshold: float | None = None, scratch: bool = True, progress: bool = False) -> dict[str, Any]:
    root = Path(folder).absolute()
    with tempfile.TemporaryDirectory(prefix="faceindex-eval-") as tmp:
        if scratch:
            settings = replace(settings, index_dir=tmp)
        with FaceIndex(settings, OpenMode.WRITE, command="eval") as fi:
            fi.ingest([root], progress=progress)
            labels, missing = labelled_faces(fi, root)
            ids, x = snapshot(fi.store)
            computed = compute(ids, x, settings.cluster, method=method, threshold=threshold)
    row = {int(i): n for n, i in enumerate(ids.tolist())}
    scored = sorted(labels)
    truth = np.array([labels[i] for i in scored])
    _, truth_ids = np.unique(truth, return_inverse=True)
    predicted = computed.labels[[row[i] for i in scored]]
    scores = external_scores(truth_ids, predicted)
    return {"method": computed.method, "params": computed.params, "n_faces": len(scored),
            "files_without_face": missing, **scores}
