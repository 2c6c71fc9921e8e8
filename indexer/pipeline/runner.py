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
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace

import psutil
from tqdm import tqdm

from indexer.config import Settings
from indexer.persons.assign import KnnAssigner, Plan
from indexer.pipeline.commit import Committer
from indexer.pipeline.faces import FaceStage, StageTimer
from indexer.pipeline.read import ReadAhead, Reader
from indexer.pipeline.records import FaceItem, ReadItem, Verdict, classify
from indexer.store.lmdb_store import FaceStore
from indexer.store.sync import SyncedIndex

log = logging.getLogger("faceindex.ingest")

# Assigns new faces to person centers: vectors [n, 512] -> (cluster ids [n], similarities [n]).


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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def trap_stop_signals(stop: threading.Event, grace_s: float = 60.0) -> Callable[[], None]:
    """Ctrl-C / SIGTERM set ``stop``: reads in flight are dropped, the current batch is committed, the run ends.

    Whatever the process is doing, it is gone ``grace_s`` seconds after the first signal (a second one: at once),
    exiting 128 + the signal's number; committed work is safe at any moment (see README: Reliability). The
    signals reach a thread of ours through ``signal.set_wakeup_fd``, written by the C-level handler the moment a
    signal arrives: a Python handler would only run once the main thread executes bytecode again, which it does
    not while blocked in a system call (a stat on a dead network mount).

    Returns the function that puts the previous handlers back. Off the main thread signals cannot be trapped,
    and nothing is changed.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: stop.set())  # the watcher below does the rest
    watcher = threading.Thread(target=_watch_signals, args=(read_fd, stop, grace_s), name="signals", daemon=True)
    watcher.start()

    def restore() -> None:
        signal.set_wakeup_fd(previous_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        os.write(write_fd, b"\0")  # not a signal number: tells the watcher to go
        watcher.join()
        os.close(read_fd)
        os.close(write_fd)

    return restore


def _watch_signals(read_fd: int, stop: threading.Event, grace_s: float) -> None:
    """First stop signal: set ``stop`` and start the clock; a second signal or ``grace_s`` later: exit now."""
    first: int | None = None
    deadline = None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([read_fd], [], [], timeout)
        if not ready:
            _exit_now(first, f"did not stop within {grace_s:.0f} s of the signal")
        for signum in os.read(read_fd, 64):
            if signum == 0:
                return
            if signum not in STOP_SIGNALS:
                continue
            if first is not None:
                _exit_now(first, "second signal")
            first, deadline = signum, time.monotonic() + grace_s
            stop.set()
            # Told from a thread of its own: logging can block (its lock held by a thread stuck writing to a full
            # stderr pipe, found by bench_soak), and this thread must never block, or the deadline goes with it.
            threading.Thread(target=log.warning, daemon=True, name="signals-log",
                             args=("%s: finishing the current batch (at most %.0f s; again to stop at once)",
                                   signal.Signals(signum).name, grace_s)).start()


def _exit_now(signum: int, why: str) -> None:
    # os._exit: no atexit handlers, no joining threads (one may be stuck for good). LMDB commits and the FAISS
    # snapshot are atomic, so what is committed stays committed and the rest is redone by the next run. The last
    # word is written without blocking: stderr may be a pipe nobody reads any more.
    try:
        os.set_blocking(2, False)
        os.write(2, f"faceindex: {why}; exiting now (committed work is safe)\n".encode())
    except OSError:
        pass
    os._exit(128 + signum)


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
                 fingerprint: Callable[[], str], assigner: KnnAssigner | None = None,
                 stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.faces = faces
        self.assigner = assigner
        self.commit = Committer(store, fingerprint)
        self.reader = Reader(settings, store)
        self.timer = StageTimer()
        self.stop = stop or threading.Event()
        self.read_ahead = ReadAhead(self.reader, settings.ingest.decode_workers, stop=self.stop,
                                    timeout_s=settings.ingest.read_timeout_s)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.read_ahead.close()
        self.index.save(force=True)  # a failure is a warning: the store's change log replays it next time

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
        # detector.batch_size 0 means "the detector chooses for its device": ask it only when there is work
        # (asking loads the models).
        size = self.settings.detector.batch_size or (self.faces.detector.batch_size if todo else 1)
        batches = [todo[i:i + size] for i in range(0, len(todo), size)]
        with tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True, desc="ingest") as bar:
            for n, batch in enumerate(batches):
                if self.stop.is_set():
                    summary.interrupted = True
                    break
                self.process(batch, summary, ahead=batches[n + 1] if n + 1 < len(batches) else [])
                bar.update(len(batch))
                bar.set_postfix(faces=summary.faces, failed=summary.failed, refresh=False)
            summary.interrupted = summary.interrupted or self.stop.is_set()
        summary.seconds = time.perf_counter() - started
        summary.stages = self.timer.summary()
        return summary

    def process(self, paths: list[str], summary: IngestSummary | None = None,
                ahead: list[str] | None = None, again: bool = True) -> IngestSummary:
        """Read, embed, commit and index one batch; ``ahead``: the next batch, read while the models work."""
        summary = summary if summary is not None else IngestSummary()
        batch_started = started = time.perf_counter()
        items = self.read_ahead.take(paths)  # fewer than asked for when stopping: the rest is left for next time
        self.timer.add("read_wait", started)
        for item in items:  # the reader threads' own time (read + hash, decode), spent beside the models
            for stage, seconds in item.seconds:
                self.timer.add_seconds(stage, seconds)
        if not items:
            return summary
        self.read_ahead.ahead([] if self.stop.is_set() else (ahead or []))
        face_items = self._faces(dedupe_batch(items))
        plan = plan_faces(self.assigner, face_items)
        started = time.perf_counter()
        counts, failures, reread = self.store.transact(self._commit, plan, face_items)
        # Counted once the transaction committed: a retry after MapFullError must not count twice.
        summary.files += len(items) - len(reread)
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
        if reread and again:  # copies whose twin left the store meanwhile: now they are new files (once only)
            self.process(reread, summary, ahead=ahead, again=False)
        return summary

    def _commit(self, txn, plan: Plan | None, face_items: list[FaceItem]) -> tuple:
        """The batch's transaction: the plan's persons settled first (new ids, neighbours adopted), then the files."""
        if plan is not None:
            plan.settle(self.store, txn)
        return self.commit(txn, face_items)

    def _faces(self, items: list[ReadItem]) -> list[FaceItem]:
        return faces_or_failures(self.faces, items, self.timer)


def faces_or_failures(stage: FaceStage, items: list[ReadItem], timer: StageTimer) -> list[FaceItem]:
    """The model stage over a batch; if it fails, file by file, so that one odd image costs only itself (the local
    pipeline and the Ray engine's workers both go through here)."""
    try:
        return stage(items, timer)
    except Exception:
        log.exception("the model stage failed on a batch of %d files; retrying them one by one", len(items))
    out = []
    for item in items:
        try:
            out += stage([item], timer)
        except Exception as exc:
            # Recorded without its stat, so the next run tries this file again (the cause may be passing).
            reason = f"face detection failed: {type(exc).__name__}: {str(exc)[:160]}"
            out.append(FaceItem(replace(item, image=None, size=0, mtime_ns=0, error=reason)))
    return out


def plan_faces(assigner: KnnAssigner | None, face_items: list[FaceItem]) -> Plan | None:
    """Each new face's person (persons/assign.py), decided before the batch's write transaction."""
    if assigner is None:
        return None
    new = [(f, fi.read.path) for fi in face_items if fi.read.verdict.needs_faces for f in fi.faces]
    return assigner.plan([f for f, _ in new], [p for _, p in new])


