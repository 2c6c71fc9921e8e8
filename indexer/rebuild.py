"""``faceindex ingest --rebuild``: embed an index's photos again, from their files, with the configured models.

Why: vectors made with another crop margin, flip or weights cannot be compared with new ones (indexer/fingerprint.py),
so an index whose preprocessing differs from the configuration is refused until it is rebuilt.

What it does, batch by batch (one LMDB transaction each, like ingest): every indexed file (and every file recorded
without a face) is read again from its path, its faces detected and embedded again. Each new face is matched to the
file's stored faces (same file, box IoU >= ``MATCH_IOU``, one to one by the highest IoU): a matched face keeps its id,
so everything the user said of it (persons/word.py: tied to a person, confirmed, removed from persons, ignored) still
applies to it, and only its box, vector and thumbnail change. A stored face that matches nothing leaves; a new face
that matches nothing is added. A file gone from disk, or that cannot be read now, leaves the index (its faces' old
vectors cannot be kept beside the new ones) and is reported. The user's word is never deleted: the entries of faces
that could not be matched stay in the store (``people history`` and ``undo`` still show and restore them) and are
listed in the output, since they no longer apply to any face.

While it runs the store records what it makes (``rebuild_to``); every other writer refuses the index until the rebuild
completes, so a stopped rebuild (Ctrl-C, a crash) leaves the index refused, and running it again finishes it. At the
end the index records the new fingerprint and, when persons exist, reclusters (the centers were made of old vectors):
the recluster obeys the user's word as every recluster does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexer import fingerprint as fp
from indexer.config import Settings
from indexer.pipeline.faces import FaceStage, StageTimer
from indexer.pipeline.read import ReadAhead, Reader
from indexer.pipeline.records import REUSABLE, FaceItem, ReadItem, Verdict, record_for
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import NewFace

log = logging.getLogger("faceindex.rebuild")
MATCH_IOU = 0.5   # same face: the new box overlaps the stored one at least this much (intersection over union)


class RereadAll(Reader):
    """The ingest reader, except that every file needs its faces again, whatever the store holds."""

    def classify(self, item: ReadItem) -> tuple[Verdict, str | None]:
        return Verdict.CHANGED, None


@dataclass
class RebuildSummary:
    previous: str | None = None           # what the index held
    model: str = ""                       # what it holds now
    files: int = 0                        # stored files read again
    faces_kept: int = 0                   # matched: same id, new vector, the user's word still applies
    faces_added: int = 0                  # found now, matching no stored face
    faces_dropped: int = 0                # stored, matching no face found now
    gone: list[str] = field(default_factory=list)              # files no longer on disk: left the index
    failed: list[dict[str, str]] = field(default_factory=list)  # files that cannot be read now: left the index
    unmatched_word: list[dict[str, Any]] = field(default_factory=list)  # user's word on dropped faces
    interrupted: bool = False
    recluster: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [n, 4] with every box in ``b`` [m, 4] (x1, y1, x2, y2): [n, m]."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area = lambda r: (r[:, 2] - r[:, 0]).clip(0) * (r[:, 3] - r[:, 1]).clip(0)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_faces(old_boxes: list[list[float]], new_boxes: list[list[float]]) -> list[tuple[int, int]]:
    """(old index, new index) pairs, one to one, each with IoU >= ``MATCH_IOU``, best overlaps first."""
    if not old_boxes or not new_boxes:
        return []
    iou = box_iou(np.array(old_boxes), np.array(new_boxes))
    pairs = []
    for flat in np.argsort(-iou, axis=None):
        i, j = divmod(int(flat), iou.shape[1])
        if iou[i, j] < MATCH_IOU:
            break
        if all(i != p and j != q for p, q in pairs):
            pairs.append((i, j))
    return pairs


class Rebuild:
    """One rebuild of ``store`` to ``fingerprint`` with the models of ``faces``."""

    def __init__(self, settings: Settings, store: FaceStore, faces: FaceStage, fingerprint: Callable[[], str],
                 stop: threading.Event | None = None) -> None:
        self.settings, self.store, self.faces, self.fingerprint = settings, store, faces, fingerprint
        self.stop = stop or threading.Event()
        self.summary = RebuildSummary()
        self.timer = StageTimer()

    def run(self, progress: bool = False) -> RebuildSummary:
        from tqdm import tqdm

        started = time.perf_counter()
        target = self.fingerprint()  # loads the models: a rebuild always embeds
        with self.store.read() as txn:
            paths = [r.path for r in self.store.iter_files(txn) if r.status in REUSABLE]
            self.summary.previous = fp.normalised(self.store.get_meta("model", txn=txn))
        self.summary.model = target
        self.store.transact(lambda txn: self.store.put_meta(txn, fp.REBUILD_KEY, target))
        size = self.settings.detector.batch_size or self.faces.detector.batch_size
        batches = [paths[i:i + size] for i in range(0, len(paths), size)]
        ahead = ReadAhead(RereadAll(self.settings, self.store), self.settings.ingest.decode_workers, stop=self.stop,
                          timeout_s=self.settings.ingest.read_timeout_s)
        try:
            with tqdm(total=len(paths), unit="img", disable=not progress, desc="rebuild") as bar:
                for n, batch in enumerate(batches):
                    if self.stop.is_set():
                        break
                    present = [p for p in batch if os.path.lexists(p)]
                    items = ahead.take(present)
                    ahead.ahead(batches[n + 1] if n + 1 < len(batches) else [])
                    self.store.transact(self._commit, self.faces(items, self.timer),
                                        [p for p in batch if p not in present])
                    bar.update(len(batch))
        finally:
            ahead.close()
        self.summary.interrupted = self.stop.is_set()
        if not self.summary.interrupted:
            self.store.transact(self._finish, target)
        self.summary.seconds = time.perf_counter() - started
        return self.summary

    def _commit(self, txn, face_items: list[FaceItem], gone: list[str]) -> None:
        for path in gone:
            self._drop(txn, path, self.store.get_file(path, txn).face_ids)
            self.store.remove_file(txn, path)
            self.summary.gone.append(path)
        for fi in face_items:
            stored = self.store.get_file(fi.read.path, txn)
            old_ids = stored.face_ids if stored is not None else []
            self.summary.files += 1
            if fi.read.error is not None:
                self._drop(txn, fi.read.path, old_ids)
                self.store.put_file(txn, record_for(fi.read, 0))
                self.summary.failed.append({"path": fi.read.path, "reason": fi.read.error})
                continue
            old_boxes = [face.box if (face := self.store.get_face(i, txn)) else [0, 0, 0, 0] for i in old_ids]
            pairs = match_faces(old_boxes, [f.box for f in fi.faces])
            kept: dict[int, NewFace] = {old_ids[i]: fi.faces[j] for i, j in pairs}
            new = [f for j, f in enumerate(fi.faces) if j not in {q for _, q in pairs}]
            self._drop(txn, fi.read.path, [i for i in old_ids if i not in kept])
            self.store.rewrite_file(txn, record_for(fi.read, len(fi.faces)), kept, new)
            self.summary.faces_kept += len(kept)
            self.summary.faces_added += len(new)

    def _drop(self, txn, path: str, face_ids: list[int]) -> None:
        """Count faces that leave, and list those the user had said something about (their word stays stored)."""
        self.summary.faces_dropped += len(face_ids)
        for face_id in face_ids:
            said = self.store.face_word(txn, face_id)
            if said is not None:
                self.summary.unmatched_word.append({"face_id": face_id, "path": path, "word": said})

    def _finish(self, txn, target: str) -> None:
        self.store.put_meta(txn, "model", target)
        self.store.delete_meta(txn, fp.REBUILD_KEY)


def finish(store: FaceStore, settings: Settings, summary: RebuildSummary) -> RebuildSummary:
    """After a completed rebuild, recluster when persons exist (their centers were made of the old vectors)."""
    from indexer.persons.recluster import recluster
    from indexer.persons.state import load_clustering

    if not summary.interrupted and load_clustering(store) is not None:
        done = recluster(store, settings.cluster)
        summary.recluster = {k: done[k] for k in ("method", "k", "mapping", "unassigned") if k in done}
    log.info("rebuild: %d files, %d faces kept, %d added, %d dropped, %d gone, %d failed", summary.files,
             summary.faces_kept, summary.faces_added, summary.faces_dropped, len(summary.gone), len(summary.failed))
    return summary
