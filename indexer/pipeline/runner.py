"""The one runner: read (thread pool, one batch ahead) -> faces (batched models) -> assign -> commit -> index.

``Pipeline.process`` does one batch of paths; ``Pipeline.ingest`` feeds it a whole scan. The watch daemon feeds it
its settled files, batch by batch. Re-running is incremental: unchanged files (size + mtime, then sha256) are
skipped, changed files are re-indexed (their old faces removed in the same transaction), byte-identical copies reuse
the stored faces, and moved files keep them.

The stages are plain objects holding their settings and models, built by the caller (``indexer.library``), so the
same ones can be built inside other workers (a Ray actor) from the settings alone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import psutil
from tqdm import tqdm

from indexer.config import Settings
from indexer.embedding import stack_vectors
from indexer.pipeline.commit import Committer
from indexer.pipeline.faces import FaceStage, StageTimer
from indexer.pipeline.read import ReadAhead, Reader
from indexer.pipeline.records import FaceItem, ReadItem, Verdict, classify
from indexer.store.lmdb_store import FaceStore
from indexer.store.sync import SyncedIndex

log = logging.getLogger("faceindex.ingest")

# Assigns new faces to person centers: vectors [n, 512] -> (cluster ids [n], similarities [n]).
Assigner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


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


def dedupe_batch(items: list[ReadItem]) -> list[ReadItem]:
    """Byte-identical files inside one batch: embed the first, the others are copies of it."""
    first_of: dict[str, str] = {}
    out = []
    for item in items:
        if item.needs_faces and item.sha256 in first_of:
            item = replace(item, verdict=Verdict.COPY, source=first_of[item.sha256], image=None)
        elif item.needs_faces:
            first_of[item.sha256] = item.path
        out.append(item)
    return out


class Pipeline:
    """The stages for one index, run one batch at a time; ``close`` (or ``with``) saves the index."""

    def __init__(self, settings: Settings, store: FaceStore, index: SyncedIndex, faces: FaceStage,
                 fingerprint: Callable[[], str], assigner: Assigner | None = None,
                 stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.faces = faces
        self.assigner = assigner
        self.commit = Committer(store, fingerprint)
        self.reader = Reader(settings, store)
        self.read_ahead = ReadAhead(self.reader, settings.ingest.decode_workers)
        self.timer = StageTimer()
        self.stop = stop or threading.Event()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.read_ahead.close()
        self.index.save(force=True)

    def needs_reading(self, paths: Iterable[str]) -> tuple[list[str], int]:
        """Paths whose stat differs from the store's record (they must be read); and how many were unchanged."""
        todo, same = [], 0
        with self.store.read() as txn:
            for path in paths:
                try:
                    st = os.stat(path)
                except OSError:
                    todo.append(path)  # vanished: the reader records it
                    continue
                verdict, _ = classify(st.st_size, st.st_mtime_ns, None, self.store.get_file(path, txn))
                if verdict is Verdict.UNCHANGED:
                    same += 1
                else:
                    todo.append(path)
        return todo, same

    def ingest(self, candidates: list[str], progress: bool = False) -> IngestSummary:
        """Index every candidate path that changed since the store saw it, until done or ``stop`` is set."""
        started = time.perf_counter()
        todo, unchanged = self.needs_reading(candidates)
        summary = IngestSummary(files=unchanged, unchanged=unchanged)
        size = max(self.settings.detector.batch_size, 1)
        batches = [todo[i:i + size] for i in range(0, len(todo), size)]
        with tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True, desc="ingest") as bar:
            for n, batch in enumerate(batches):
                self.process(batch, summary, ahead=batches[n + 1] if n + 1 < len(batches) else [])
                bar.update(len(batch))
                bar.set_postfix(faces=summary.faces, failed=summary.failed, refresh=False)
                if self.stop.is_set():
                    summary.interrupted = True
                    break
        summary.seconds = time.perf_counter() - started
        summary.stages = self.timer.summary()
        return summary

    def process(self, paths: list[str], summary: IngestSummary | None = None,
                ahead: list[str] | None = None) -> IngestSummary:
        """Read, embed, commit and index one batch; ``ahead``: the next batch, read while the models work."""
        summary = summary if summary is not None else IngestSummary()
        batch_started = started = time.perf_counter()
        items = self.read_ahead.take(paths)
        self.timer.add("read_wait", started)
        self.read_ahead.ahead(ahead or [])
        face_items = self.faces(dedupe_batch(items), self.timer)
        if self.assigner is not None:
            self._assign(face_items)
        started = time.perf_counter()
        counts, failures = self.store.transact(self.commit, face_items)
        # Counted once the transaction committed: a retry after MapFullError must not count twice.
        summary.files += len(paths)
        for key, value in counts.items():
            setattr(summary, key, getattr(summary, key) + value)
        summary.failures.extend(failures)
        self.timer.add("commit", started)
        started = time.perf_counter()
        self.index.catch_up()
        self.index.save()
        release_memory()
        self.timer.add("index", started)
        log.info("batch files=%d faces=%d failed=%d latency=%.3fs", len(items), counts["faces"], counts["failed"],
                 time.perf_counter() - batch_started)
        return summary

    def _assign(self, face_items: list[FaceItem]) -> None:
        faces = [f for fi in face_items for f in fi.faces]
        if faces:
            clusters, sims = self.assigner(stack_vectors([f.vector for f in faces]))
            for face, c, s in zip(faces, clusters, sims, strict=True):
                face.cluster, face.similarity = int(c), float(s)
