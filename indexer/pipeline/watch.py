"""The watch daemon: a watchdog observer feeding the ingest pipeline, until SIGINT/SIGTERM.

The watchdog handler runs on the observer's single thread, so it only filters and enqueues (watchdog's own advice);
all work happens on the daemon's loop:

- created / modified files wait in ``pending`` until their size and mtime stay unchanged for ``watch.settle_s``
  (half-copied files are never read; a burst of events for one file collapses into one entry);
- settled files are indexed in batches of up to ``watch.batch_size``, or after ``watch.max_wait_ms`` when fewer;
- deletes and moves are applied at once: a moved file keeps its faces (and ids), a deleted folder takes everything
  under it out of the store and the index.

On start the observer is started first, then a catch-up scan reconciles the folder with the store (new, changed,
removed and moved files since the last run), so no event is lost between the two. Periodic work that is not the
pipeline's (reclustering) is the caller's ``on_idle`` hook, called between batches.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from indexer.errors import NotFoundError
from indexer.pipeline.runner import IngestSummary, Pipeline
from indexer.pipeline.scan import ignored, scan
from indexer.store.daemon import write_daemon_status

log = logging.getLogger("faceindex.watch")
POLL_S = 0.05
# The events the daemon acts on. Without a filter watchdog also asks inotify for every open, read-only close and
# directory listing, our own reads and scans included: the soak (benchmarks/bench_soak.py) overflowed the kernel's
# queue (16,384 events) 28 times in 1,500 file operations, and every overflow loses events.
EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileDeletedEvent, FileMovedEvent, DirCreatedEvent,
          DirDeletedEvent, DirMovedEvent]
WATCHDOG_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")


@dataclass
class Pending:
    size: int
    mtime_ns: int
    stable_since: float
    first_seen: float


class EnqueueHandler(FileSystemEventHandler):
    """Filters events and puts (kind, src, dest, is_dir) on a queue; nothing else (it runs on the observer thread)."""

    def __init__(self, events: queue.Queue, root: Path, extensions: tuple[str, ...], ignore: tuple[str, ...]) -> None:
        self.events = events
        self.root = root
        self.extensions = extensions
        self.ignore = ignore

    def wanted(self, path: str, is_dir: bool) -> bool:
        rel = Path(path).relative_to(self.root) if path.startswith(str(self.root)) else Path(path)
        if any(ignored(part, self.ignore) for part in rel.parts):
            return False
        return is_dir or Path(path).suffix.lower() in self.extensions

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path) if getattr(event, "dest_path", "") else ""
        if event.event_type in ("created", "modified", "closed"):
            if not event.is_directory and self.wanted(src, False):
                self.events.put(("changed", src, "", False))
            elif event.is_directory and event.event_type == "created":
                self.events.put(("dir_created", src, "", True))
        elif event.event_type == "deleted":
            self.events.put(("deleted", src, "", event.is_directory))
        elif event.event_type == "moved":
            src_ok, dest_ok = self.wanted(src, event.is_directory), self.wanted(dest, event.is_directory)
            if src_ok and dest_ok:
                self.events.put(("moved", src, dest, event.is_directory))
            elif src_ok:  # renamed to something we ignore: as good as deleted
                self.events.put(("deleted", src, "", event.is_directory))
            elif dest_ok:  # e.g. "photo.jpg.part" -> "photo.jpg": a new file
                self.events.put(("dir_created" if event.is_directory else "changed", dest, "", event.is_directory))


class OverflowAlarm(logging.Handler):
    """Watchdog tells of a kernel queue overflow (events lost) only in a log record: turn it into a rescan request
    on the daemon's queue (from watchdog's thread: it only enqueues)."""

    def __init__(self, events: queue.Queue) -> None:
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.events.put(("rescan", "", "", True))


class Watcher:
    """The daemon's loop over one folder, driving ``pipeline``; ``run`` returns when ``pipeline.stop`` is set."""

    def __init__(self, pipeline: Pipeline, root: str | Path, once: bool = False,
                 on_idle: Callable[[bool], None] | None = None) -> None:
        self.pipeline = pipeline
        self.store = pipeline.store
        self.settings = pipeline.settings
        self.root = Path(root).expanduser().absolute()
        if not self.root.is_dir():
            raise NotFoundError(f"{self.root} is not a folder")
        self.once = once
        self.on_idle = on_idle or (lambda wait: None)
        self.events: queue.Queue = queue.Queue()
        self.pending: dict[str, Pending] = {}
        self.ready: dict[str, float] = {}   # settled path -> when it settled
        self.stop = pipeline.stop
        self.summary = IngestSummary()
        self.last_event: str | None = None
        self._status_at = 0.0
        self._vanished: list[str] = []   # stored paths missing at catch-up, dropped once the queue is indexed
        self._rescan = False             # events were lost: reconcile with the folder again

    # ------------------------------------------------------------------ main loop
    def run(self) -> IngestSummary:
        started = time.perf_counter()
        observer = None
        alarm = OverflowAlarm(self.events)
        try:
            if not self.once:
                for name in WATCHDOG_LOGGERS:
                    logging.getLogger(name).addHandler(alarm)
                observer = Observer()
                handler = EnqueueHandler(self.events, self.root, self.settings.ingest.extensions,
                                         self.settings.watch.ignore)
                observer.schedule(handler, str(self.root), recursive=True, event_filter=EVENTS)
                observer.start()
            self.pipeline.faces.warm_up()
            self.catch_up()
            self._loop()
        finally:
            if observer is not None:
                observer.stop()
                observer.join()
            for name in WATCHDOG_LOGGERS:
                logging.getLogger(name).removeHandler(alarm)
            self.pipeline.close()
            self._write_status(force=True, running=False)
        self.summary.seconds = time.perf_counter() - started
        self.summary.stages = self.pipeline.timer.summary()
        return self.summary

    def _loop(self) -> None:
        busy = False
        while not self.stop.is_set():
            # Right after a batch, look for events without waiting: a 50 ms wait per batch added up to 5 % of
            # a burst's time. Otherwise wait for them (no busy loop while a batch fills up or all is quiet).
            self._drain(timeout=0.0 if busy else POLL_S)
            if self._rescan:
                self._rescan = False
                log.warning("file events were lost (inotify queue overflow): rescanning %s", self.root)
                self.catch_up(count=False)
            self._settle()
            busy = self._maybe_process()
            self.on_idle(False)
            self._write_status()
            if self.once and not self.pending and not self.ready:
                self._drop_vanished()
                self.on_idle(True)
                return
        if self.ready and not self.once:
            log.info("stopping: %d settled files left for the next start", len(self.ready))

    # ------------------------------------------------------------------ catch-up
    def catch_up(self, count: bool = True) -> None:
        """Reconcile the folder with the store: queue new and changed files, drop records of vanished ones.

        Vanished files are dropped only after the files queued now are indexed, so that a file moved while the
        daemon was stopped is recognised by its sha256 and keeps its faces instead of being embedded again.
        Run at start, and again whenever file events were lost (``count``: whether unchanged files are counted).
        """
        on_disk = list(scan([self.root], self.settings.ingest.extensions, self.settings.watch.ignore))
        todo, unchanged = self.pipeline.needs_reading(on_disk)
        if count:
            self.summary.files += unchanged  # the others are counted as they are processed
            self.summary.unchanged += unchanged
        now = time.monotonic()
        for path in todo:
            self._touch(path, now)
        present = set(on_disk)
        prefix = str(self.root) + os.sep
        with self.store.read() as txn:
            self._vanished = [r.path for r in self.store.iter_files(txn, prefix) if r.path not in present]
        if not todo:
            self._drop_vanished()

    def _drop_vanished(self) -> None:
        gone = [p for p in self._vanished if not os.path.isfile(p)]  # gone, or no longer a regular file
        self._vanished = []
        if gone:
            self._remove(gone)

    # ------------------------------------------------------------------ events
    def _drain(self, timeout: float) -> None:
        try:
            event = self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, src: str, dest: str, is_dir: bool) -> None:
        self.last_event = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        now = time.monotonic()
        if kind == "changed":
            self._touch(src, now)
        elif kind == "rescan":
            self._rescan = True
        elif kind == "dir_created":
            # A folder moved in from outside, or created with files already in it: scan it (unless it is gone
            # again: a temporary folder must not stop the daemon).
            try:
                for path in scan([src], self.settings.ingest.extensions, self.settings.watch.ignore):
                    self._touch(path, now)
            except NotFoundError:
                pass
        elif kind == "deleted":
            self._forget_pending(src, is_dir)
            self._remove_under(src) if is_dir else self._remove([src])
        elif kind == "moved":
            self._move(src, dest, is_dir, now)

    def _touch(self, path: str, now: float) -> None:
        try:
            st = os.stat(path)
        except OSError:
            self.pending.pop(path, None)
            return
        if not stat.S_ISREG(st.st_mode):  # a FIFO, socket, device or folder named like a photo: never opened
            self.pending.pop(path, None)
            if self.store.get_file(path) is not None:
                self._remove([path])  # it replaced a photo: that photo is gone
            return
        self.ready.pop(path, None)
        prev = self.pending.get(path)
        first = prev.first_seen if prev else now
        self.pending[path] = Pending(st.st_size, st.st_mtime_ns, now, first)

    def _forget_pending(self, path: str, is_dir: bool) -> None:
        for table in (self.pending, self.ready):
            for p in [p for p in table if p == path or (is_dir and p.startswith(path + os.sep))]:
                table.pop(p)

    def _settle(self) -> None:
        """Move files whose size and mtime held still for settle_s from pending to ready."""
        now = time.monotonic()
        settle = self.settings.watch.settle_s
        for path, p in list(self.pending.items()):
            try:
                st = os.stat(path)
            except OSError:
                self.pending.pop(path)  # vanished before it settled; a delete event may follow
                continue
            if not stat.S_ISREG(st.st_mode):
                self.pending.pop(path)
                continue
            if (st.st_size, st.st_mtime_ns) != (p.size, p.mtime_ns):
                p.size, p.mtime_ns, p.stable_since = st.st_size, st.st_mtime_ns, now
            elif now - p.stable_since >= settle:
                self.pending.pop(path)
                self.ready[path] = now

    def _maybe_process(self) -> bool:
        """Process one batch of settled files if one is due; returns whether it did."""
        if not self.ready:
            if not self.pending and self._vanished:
                self._drop_vanished()
            return False
        size = self.settings.watch.batch_size
        oldest = min(self.ready.values())
        waited = time.monotonic() - oldest
        if len(self.ready) < size and waited < self.settings.watch.max_wait_ms / 1000 and self.pending:
            return False
        order = sorted(self.ready, key=self.ready.get)
        batch = order[:size]
        for path in batch:
            self.ready.pop(path)
        # The next batch is read while the models work on this one.
        self.pipeline.process(batch, self.summary, ahead=order[size:2 * size])
        return True

    # ------------------------------------------------------------------ removals and moves
    def _remove(self, paths: list[str]) -> None:
        store = self.store

        def drop(txn) -> int:
            removed = 0
            for path in paths:
                if store.get_file(path, txn) is not None:
                    store.remove_file(txn, path)
                    removed += 1
            return removed

        removed = store.transact(drop)
        if removed:
            self.summary.removed += removed
            self.pipeline.index.catch_up()
            log.info("removed files=%d", removed)

    def _remove_under(self, folder: str) -> None:
        with self.store.read() as txn:
            paths = [r.path for r in self.store.iter_files(txn, folder.rstrip(os.sep) + os.sep)]
        if paths:
            self._remove(paths)

    def _move(self, src: str, dest: str, is_dir: bool, now: float) -> None:
        store = self.store
        if is_dir:
            prefix = src.rstrip(os.sep) + os.sep
            with store.read() as txn:
                pairs = [(r.path, dest + os.sep + r.path[len(prefix):]) for r in store.iter_files(txn, prefix)]
            for old in [p for p in list(self.pending) + list(self.ready) if p.startswith(prefix)]:
                self._forget_pending(old, False)
                self._touch(dest + os.sep + old[len(prefix):], now)
        else:
            pairs = [(src, dest)]
            if src in self.pending or src in self.ready:
                self._forget_pending(src, False)
                self._touch(dest, now)

        stale: list[str] = []

        def apply(txn) -> int:
            moved = 0
            stale.clear()
            for old, new in pairs:
                rec = store.get_file(old, txn)
                if rec is not None:
                    st = _stat_or_none(new)
                    moved += store.move_file(txn, old, new, st.st_mtime_ns if st else None)
                    # A record that is not of these bytes (a failed read: "vanished" when the rename raced the
                    # read, found by bench_soak) moves too, and the file is read again under its new name.
                    if rec.status == "failed" or st is None or rec.size != st.st_size:
                        stale.append(new)
            return moved

        moved = store.transact(apply)
        self.summary.moved += moved
        for path in stale:
            self._touch(path, now)
        if not is_dir and moved == 0 and dest not in self.pending:
            self._touch(dest, now)  # not indexed under its old name (or not at all): index the new one
        elif moved:
            self.pipeline.index.catch_up()
            log.info("moved files=%d", moved)

    # ------------------------------------------------------------------ status
    def _write_status(self, force: bool = False, running: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._status_at < 0.5:
            return
        self._status_at = now
        write_daemon_status(self.store.index_dir, pid=os.getpid(), root=str(self.root), running=running,
                            backlog=len(self.pending) + len(self.ready) + self.events.qsize(),
                            last_event=self.last_event, faces_added=self.summary.faces)


def _stat_or_none(path: str):
    try:
        return os.stat(path)
    except OSError:
        return None
