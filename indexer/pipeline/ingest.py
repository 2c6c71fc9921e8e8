"""The ingest runner: scan -> read (thread pool, bounded) -> faces (batched models) -> commit (one txn per batch).

Used by ``faceindex ingest`` for whole folders and by the watch daemon for each batch of settled files.
Re-running is incremental: unchanged files (size + mtime, then sha256) are skipped, changed files are re-indexed
(their old faces removed in the same transaction), byte-identical copies reuse the stored faces.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
from tqdm import tqdm

from indexer.config import Settings
from indexer.errors import NotFoundError
from indexer.pipeline.stages import FaceItem, FaceStage, Reader, ReadItem, StageTimer, record_for
from indexer.store.lmdb_store import FaceStore, NewFace
from indexer.store.sync import SyncedIndex

log = logging.getLogger("faceindex.ingest")


def _load_malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim, or a no-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0) and None
    except (OSError, AttributeError):
        return lambda: None


def resident_bytes() -> int:
    return psutil.Process().memory_info().rss


class MemoryTrimmer:
    """Hands freed heap memory back to the OS when resident memory creeps ``slack`` bytes above its steady level.

    glibc keeps freed memory in its arenas; with tensors of many sizes they fragment and resident memory grows
    without a leak (MTCNN's RNet/ONet batches are padded to few sizes for this reason, see mtcnn_fast). Trimming
    after every batch keeps memory flat but cost ~30 % of ingest throughput: each batch's working set (~250 MB of
    activations) went back to the OS and was page-faulted in again by the next batch. So the steady level is the
    resident size one batch after a trim (the working set back in), and the next trim waits until memory has
    grown ``slack`` above it.
    """

    def __init__(self, slack: int = 256 * 2**20, trim: Callable[[], None] | None = None,
                 rss: Callable[[], int] = resident_bytes) -> None:
        self.slack, self.rss = slack, rss
        self.trim = trim or _load_malloc_trim()
        self.level: int | None = None  # None: measure it at the next call
        self.trims = 0

    def __call__(self) -> None:
        now = self.rss()
        if self.level is None:
            self.level = now
        elif now > self.level + self.slack:
            self.trim()
            self.trims += 1
            self.level = None


release_memory = MemoryTrimmer()  # one per process: resident memory is the process's

# Assigns new faces to cluster centers: vectors [n, 512] -> (cluster ids [n], similarities [n]).
Assigner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class IngestSummary:
    files: int = 0                 # candidate image files seen
    unchanged: int = 0             # skipped: same size + mtime (or same sha256) as stored
    indexed: int = 0               # files with >= 1 face committed in this run
    no_face: int = 0
    failed: int = 0
    duplicates: int = 0            # byte-identical copies whose faces were reused, not recomputed
    moved: int = 0                 # files found under a new name (same sha256, old path gone): faces kept
    removed: int = 0               # files gone from disk whose faces left the store (watch)
    faces: int = 0                 # faces committed in this run
    seconds: float = 0.0
    interrupted: bool = False
    failures: list[dict[str, str]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        processed = self.files - self.unchanged
        return processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["images_per_s"] = round(self.images_per_s, 2)
        d["seconds"] = round(self.seconds, 2)
        return d


def ignored(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def scan(paths: Iterable[str | Path], extensions: tuple[str, ...], ignore: tuple[str, ...] = ()) -> Iterator[str]:
    """Absolute paths of image files under ``paths`` (files or folders, recursive, sorted).

    Symlinked folders are not followed (a link could lead out of the tree or into a cycle); symlinked files are
    followed only when they resolve inside one of the given roots.
    """
    for root in paths:
        root = Path(root).expanduser()
        if not root.exists():
            raise NotFoundError(f"{root} does not exist")
        root = root.absolute()
        if root.is_file():
            yield str(root)
            continue
        real_root = root.resolve()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not ignored(d, ignore))
            for name in sorted(filenames):
                if ignored(name, ignore) or Path(name).suffix.lower() not in extensions:
                    continue
                full = os.path.join(dirpath, name)
                if os.path.islink(full) and not Path(full).resolve().is_relative_to(real_root):
                    continue
                yield full


def trap_stop_signals(stop: threading.Event) -> Callable[[], None]:
    """Ctrl-C / SIGTERM set ``stop`` (the current batch is committed, then the run ends cleanly).

    Returns the function that puts the previous handlers back. Off the main thread signals cannot be trapped,
    and nothing is changed.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: stop.set())

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


class Ingestor:
    """Owns the stages for one index; ``run`` does a whole ingest, ``process`` one batch of paths."""

    def __init__(self, settings: Settings, store: FaceStore, index: SyncedIndex, faces: FaceStage,
                 fingerprint: str, assigner: Assigner | None = None) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.faces = faces
        self.fingerprint = fingerprint
        self.assigner = assigner
        self.reader = Reader(settings, store)
        self.timer = StageTimer()
        self.stop = threading.Event()

    # ------------------------------------------------------------------ whole runs
    def changed(self, paths: Iterable[str]) -> tuple[list[str], int]:
        """Paths whose size or mtime differ from the store's record; and how many were unchanged."""
        todo, same = [], 0
        with self.store.read() as txn:
            for path in paths:
                rec = self.store.get_file(path, txn)
                try:
                    st = os.stat(path)
                except OSError:
                    todo.append(path)  # vanished: the reader records it
                    continue
                if rec is not None and rec.size == st.st_size and rec.mtime_ns == st.st_mtime_ns:
                    same += 1
                else:
                    todo.append(path)
        return todo, same

    def run(self, paths: Iterable[str | Path], progress: bool = True) -> IngestSummary:
        started = time.perf_counter()
        ingest = self.settings.ingest
        candidates = list(scan(paths, ingest.extensions, self.settings.watch.ignore))
        todo, unchanged = self.changed(candidates)
        summary = IngestSummary(files=len(candidates), unchanged=unchanged)
        batch_size = max(self.settings.detector.batch_size, 1)
        bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True, desc="ingest")
        restore = trap_stop_signals(self.stop)
        try:
            for batch in self._read_ahead(todo, batch_size, ingest.decode_workers, ingest.queue_size):
                self.process_items(batch, summary)
                bar.update(len(batch))
                bar.set_postfix(faces=summary.faces, failed=summary.failed, refresh=False)
                if self.stop.is_set():
                    summary.interrupted = True
                    break
        finally:
            restore()
            bar.close()
            self.index.save(force=True)
        summary.seconds = time.perf_counter() - started
        summary.stages = self.timer.summary()
        return summary

    def _read_ahead(self, paths: list[str], batch_size: int, workers: int, depth: int) -> Iterator[list[ReadItem]]:
        """Read and decode in a thread pool, at most ``depth`` files ahead of the models (bounded memory)."""
        pending: deque[Future[ReadItem]] = deque()
        it = iter(paths)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read") as pool:
            def fill() -> None:
                while len(pending) < depth and not self.stop.is_set():
                    path = next(it, None)
                    if path is None:
                        return
                    pending.append(pool.submit(self.reader, path))

            fill()
            batch: list[ReadItem] = []
            while pending:
                started = time.perf_counter()
                batch.append(pending.popleft().result())
                self.timer.add("read_wait", started)
                fill()
                if len(batch) == batch_size or not pending:
                    yield batch
                    batch = []
                    if self.stop.is_set():
                        for fut in pending:
                            fut.cancel()
                        return

    # ------------------------------------------------------------------ one batch
    def process(self, paths: list[str], summary: IngestSummary | None = None) -> IngestSummary:
        """Read (in a pool), embed and commit one batch of paths."""
        summary = summary or IngestSummary()
        summary.files += len(paths)
        with ThreadPoolExecutor(max_workers=self.settings.ingest.decode_workers) as pool:
            items = list(pool.map(self.reader, paths))
        self.process_items(items, summary)
        return summary

    def process_items(self, items: list[ReadItem], summary: IngestSummary) -> None:
        batch_started = time.perf_counter()
        first_of: dict[str, str] = {}
        for item in items:  # byte-identical files inside one batch: embed the first, copy the rest
            if item.image is not None and item.sha256:
                if item.sha256 in first_of:
                    item.duplicate_of, item.image = first_of[item.sha256], None
                else:
                    first_of[item.sha256] = item.path
        face_items = self.faces(items, self.timer)
        if self.assigner is not None:
            self._assign(face_items)
        started = time.perf_counter()
        counts, failures = self.store.transact(self._commit, face_items)
        # Counted once the transaction committed: a retry after MapFullError must not count twice.
        for key, value in counts.items():
            setattr(summary, key, getattr(summary, key) + value)
        summary.failures.extend(failures)
        self.timer.add("commit", started)
        started = time.perf_counter()
        self.index.catch_up()
        self.index.save()
        release_memory()
        self.timer.add("index", started)
        n_faces = sum(len(fi.faces) for fi in face_items)
        log.info("batch files=%d faces=%d failed=%d latency=%.3fs", len(items), n_faces,
                 sum(1 for it in items if it.error), time.perf_counter() - batch_started)

    def _assign(self, face_items: list[FaceItem]) -> None:
        faces = [f for fi in face_items for f in fi.faces]
        if faces:
            clusters, sims = self.assigner(np.stack([f.vector for f in faces]))
            for face, c, s in zip(faces, clusters, sims, strict=True):
                face.cluster, face.similarity = int(c), float(s)

    def _commit(self, txn, face_items: list[FaceItem]) -> tuple[dict[str, int], list[dict[str, str]]]:
        self.store.check_model(self.fingerprint, txn)
        counts = {"indexed": 0, "no_face": 0, "failed": 0, "faces": 0, "duplicates": 0, "unchanged": 0, "moved": 0}
        failures = []
        for fi in face_items:
            item = fi.read
            if item.same_as_stored:
                self.store.touch_file(txn, item.path, item.size, item.mtime_ns)
                counts["unchanged"] += 1
                continue
            faces = fi.faces
            if item.duplicate_of is not None and not os.path.exists(item.duplicate_of):
                # The original is gone and an identical file appeared: a move. Keep the faces and their ids.
                self.store.move_file(txn, item.duplicate_of, item.path, item.mtime_ns)
                counts["moved"] += 1
                continue
            if item.duplicate_of is not None:
                faces = self._stored_faces(txn, item.duplicate_of)
                original = self.store.get_file(item.duplicate_of, txn)
                item.orig_size = (original.width, original.height) if original else item.orig_size
                counts["duplicates"] += 1
            record = record_for(item, len(faces))
            self.store.put_file(txn, record, faces)
            counts[record.status] += 1
            counts["faces"] += len(faces)
            if record.status == "failed":
                failures.append({"path": item.path, "reason": record.reason})
        return counts, failures

    def _stored_faces(self, txn, path: str) -> list[NewFace]:
        rec = self.store.get_file(path, txn)
        faces = []
        for face_id in rec.face_ids if rec else []:
            face = self.store.get_face(face_id, txn)
            faces.append(NewFace(box=face.box, prob=face.prob, landmarks=face.landmarks,
                                 vector=self.store.get_vector(face_id, txn).copy(),
                                 thumbnail=self.store.get_thumbnail(face_id, txn) or b"",
                                 cluster=face.cluster, similarity=face.similarity))
        return faces
