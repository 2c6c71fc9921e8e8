"""Pipeline stages: read (hash + decode, in a thread pool) -> faces (detect + crop + embed, batched) -> commit.

Stages exchange plain records. Each stage is a small class that can be timed; the runner (ingest.py) and the
daemon (watch.py) compose them with bounded queues.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from indexer.config import Settings
from indexer.errors import ImageError
from indexer.images import DecodedImage, decode
from indexer.models.detector import DetectedFace, FaceDetector
from indexer.models.embedder import FaceEmbedder
from indexer.store.lmdb_store import FaceStore, FileRecord, NewFace


@dataclass
class ReadItem:
    """One file after the read stage."""

    path: str
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""
    image: DecodedImage | None = None
    error: str | None = None            # -> status failed, with this reason
    same_as_stored: bool = False        # content unchanged since the store saw this path (only stat changed)
    duplicate_of: str | None = None     # byte-identical to this already indexed file: reuse its faces
    orig_size: tuple[int, int] = (0, 0)  # (width, height) once decoded


@dataclass
class FaceItem:
    """One file after the model stage: its faces with vectors and thumbnails."""

    read: ReadItem
    faces: list[NewFace] = field(default_factory=list)


class StageTimer:
    """Seconds spent per stage, for the per-batch log line and the benchmark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] += time.perf_counter() - started

    def summary(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Reader:
    """Stat, read, hash and decode one file. Runs in worker threads: no model, one short read transaction."""

    def __init__(self, settings: Settings, store: FaceStore) -> None:
        self.settings = settings
        self.store = store
        # Draft mode may shrink big JPEGs, but never below twice what the detector looks at.
        self.min_side = 2 * settings.detector.max_side

    def __call__(self, path: str) -> ReadItem:
        item = ReadItem(path)
        try:
            st = os.stat(path)
            item.size, item.mtime_ns = st.st_size, st.st_mtime_ns
            cap_mb = self.settings.ingest.max_file_mb
            if st.st_size > cap_mb * 2**20:
                item.error = f"too large: {st.st_size / 2**20:.0f} MB > ingest.max_file_mb {cap_mb}"
                return item
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            item.error = "vanished before it could be read"
            return item
        except PermissionError:
            item.error = "unreadable: permission denied"
            return item
        except OSError as exc:
            item.error = f"unreadable: {exc.strerror or exc}"
            return item
        if len(data) != item.size:
            # Still being written (or truncated) while we read: the watcher retries once it is stable.
            item.size = len(data)
        item.sha256 = file_sha256(data)
        with self.store.read() as txn:
            stored = self.store.get_file(path, txn)
            if stored is not None and stored.sha256 == item.sha256 and stored.status != "failed":
                item.same_as_stored = True
                return item
            for other in self.store.paths_with_sha(item.sha256, txn):
                rec = self.store.get_file(other, txn)
                if other != path and rec is not None and rec.status in ("indexed", "no_face"):
                    item.duplicate_of = other
                    return item
        if not data:
            item.error = "empty file (0 bytes)"
            return item
        try:
            item.image = decode(io.BytesIO(data), self.settings.ingest.max_pixels, self.min_side, name=path)
            item.orig_size = item.image.orig_size
        except ImageError as exc:
            item.error = str(exc)
        return item


class ReadAhead:
    """The daemon's read stage: files are read in a thread pool while the models work on the previous batch.

    ``take`` returns the reads of a batch (reading what was not asked for ahead); ``ahead`` starts reading the
    next batch's files and forgets reads of any others (bounded memory). A read is used only while the file's
    size and mtime are still the ones read; otherwise it is read again.
    """

    def __init__(self, reader: Callable[[str], ReadItem], workers: int) -> None:
        self.reader = reader
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="read")
        self.futures: dict[str, Future[ReadItem]] = {}

    def _start(self, paths: list[str]) -> None:
        for path in paths:
            if path not in self.futures:
                self.futures[path] = self.pool.submit(self.reader, path)

    def take(self, paths: list[str]) -> list[ReadItem]:
        self._start(paths)
        items = []
        for path in paths:
            item = self.futures.pop(path).result()
            try:
                st = os.stat(path)
                fresh = (st.st_size, st.st_mtime_ns) == (item.size, item.mtime_ns)
            except OSError:
                fresh = False
            items.append(item if fresh else self.reader(path))
        return items

    def ahead(self, paths: list[str]) -> None:
        wanted = set(paths)
        for path in [p for p in self.futures if p not in wanted]:
            self.futures.pop(path).cancel()
        self._start(paths)

    def close(self) -> None:
        for future in self.futures.values():
            future.cancel()
        self.futures.clear()
        self.pool.shutdown(wait=True)


class FaceStage:
    """Detect, crop, embed and thumbnail the faces of a batch of decoded images."""

    def __init__(self, settings: Settings, detector: FaceDetector, embedder: FaceEmbedder) -> None:
        self.settings = settings
        self.detector = detector
        self.embedder = embedder

    def __call__(self, items: list[ReadItem], timer: StageTimer | None = None) -> list[FaceItem]:
        timer = timer or StageTimer()
        todo = [it for it in items if it.image is not None]
        started = time.perf_counter()
        detections = self.detector.detect([it.image for it in todo]) if todo else []
        timer.add("detect", started)
        started = time.perf_counter()
        crops, owners = [], []
        for i, (item, faces) in enumerate(zip(todo, detections, strict=True)):
            for face in faces:
                crops.append(self.detector.crop(item.image, face))
                owners.append((i, face))
        timer.add("crop", started)
        started = time.perf_counter()
        vectors = self.embedder.embed(crops) if crops else np.zeros((0, 512), np.float32)
        timer.add("embed", started)
        started = time.perf_counter()
        out = {id(it): FaceItem(it) for it in items}
        for (i, face), vector in zip(owners, vectors, strict=True):
            item = todo[i]
            out[id(item)].faces.append(self._new_face(item.image, face, vector))
        for item in todo:
            item.image = None  # free the pixels as soon as the faces are out
        timer.add("thumbnail", started)
        return [out[id(it)] for it in items]

    def _new_face(self, image: DecodedImage, face: DetectedFace, vector: np.ndarray) -> NewFace:
        buf = io.BytesIO()
        self.detector.thumbnail(image, face, self.settings.ingest.thumbnail_size).save(buf, "JPEG", quality=85)
        rec = face.to_record()
        return NewFace(box=rec["box"], prob=rec["prob"], landmarks=rec["landmarks"], vector=vector,
                       thumbnail=buf.getvalue())


def record_for(item: ReadItem, n_faces: int) -> FileRecord:
    if item.error is not None:
        status = "failed"
    else:
        status = "indexed" if n_faces else "no_face"
    width, height = item.orig_size
    return FileRecord(path=item.path, size=item.size, mtime_ns=item.mtime_ns, sha256=item.sha256, status=status,
                      reason=item.error or "", width=width, height=height)
