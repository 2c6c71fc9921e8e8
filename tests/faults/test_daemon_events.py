"""The daemon when file events go wrong (both found by benchmarks/bench_soak.py): lost events after an inotify
queue overflow, and a rename that raced the read of the file renamed."""

from __future__ import annotations

import logging
import shutil

import pytest

from indexer.library import FaceIndex, OpenMode
from indexer.pipeline.watch import EVENTS, WATCHDOG_LOGGERS, OverflowAlarm, Watcher
from indexer.store.records import FileRecord
from tests.conftest import SAMPLES, settings_for

PHOTO = SAMPLES / "photos" / "obama" / "obama_small.jpg"
OTHER = SAMPLES / "photos" / "biden" / "biden2.jpg"


@pytest.fixture
def watcher(tmp_path, detector, embedder):
    folder = tmp_path / "photos"
    folder.mkdir()
    fi = FaceIndex(settings_for(tmp_path / "ix", watch={"settle_s": 0.0}), OpenMode.WRITE, detector=detector,
                   embedder=embedder)
    pipeline = fi.pipeline()
    yield Watcher(pipeline, folder, once=True), folder, fi
    pipeline.close()
    fi.close()


def records(fi: FaceIndex) -> dict[str, tuple[str, int]]:
    with fi.store.read() as txn:
        return {r.path: (r.status, len(r.face_ids)) for r in fi.store.iter_files(txn)}


def test_an_overflow_warning_makes_the_daemon_rescan(watcher):
    w, folder, fi = watcher
    shutil.copy(PHOTO, folder / "a.jpg")
    w.catch_up()
    w._loop()
    assert records(fi) == {str(folder / "a.jpg"): ("indexed", 1)}
    # Changes the daemon never hears of: the kernel dropped their events.
    shutil.copy(OTHER, folder / "b.jpg")
    (folder / "a.jpg").unlink()
    alarm = OverflowAlarm(w.events)
    source = logging.getLogger(WATCHDOG_LOGGERS[0])
    source.addHandler(alarm)
    try:  # what watchdog logs when the kernel queue overflowed
        source.warning("Inotify queue overflowed; filesystem events were lost")
    finally:
        source.removeHandler(alarm)
    w._loop()
    assert records(fi) == {str(folder / "b.jpg"): ("indexed", 1)}


def test_a_failed_record_that_moves_is_read_again_under_its_new_name(watcher):
    """A rename raced the read: the old name got "vanished", the move event then carried that record over."""
    w, folder, fi = watcher
    old, new = folder / "a.jpg", folder / "renamed.jpg"
    shutil.copy(PHOTO, new)
    fi.store.transact(lambda txn: fi.store.put_file(txn, FileRecord(
        path=str(old), size=0, mtime_ns=0, sha256="", status="failed", reason="vanished before it could be read")))
    w._apply("moved", str(old), str(new), False)
    w._loop()
    assert records(fi) == {str(new): ("indexed", 1)}


def test_the_daemon_asks_inotify_only_for_what_it_uses():
    """No open, read-only close or directory-listing events: our own reads would flood the kernel's queue."""
    from watchdog.events import DirModifiedEvent, FileClosedNoWriteEvent, FileOpenedEvent

    assert not {FileOpenedEvent, FileClosedNoWriteEvent, DirModifiedEvent} & set(EVENTS)


def test_a_folder_gone_before_its_event_is_handled_does_not_stop_the_daemon(watcher):
    w, folder, fi = watcher
    w._apply("dir_created", str(folder / "tmp-folder-already-gone"), "", True)  # created and removed at once
    assert w.pending == {}
