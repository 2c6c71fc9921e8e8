"""Signals always work: SIGINT/SIGTERM stop ingest and the daemon whatever a reader thread is doing.

What really blocks is a read (or open, or stat) of a file on a dead NFS or FUSE mount: the thread sleeps in the
kernel and nothing in Python can wake it. ``FACEINDEX_FAULT=stall@read:N`` makes a reader thread do exactly that
(block forever) in the real CLI; the in-process tests block a reader on an event.
"""

from __future__ import annotations

import shutil
import signal
import threading

import pytest

from indexer.errors import ReadStalledError
from indexer.pipeline.read import ReadAhead
from indexer.pipeline.records import ReadItem
from tests.conftest import SAMPLES
from tests.faults.helpers import Child
from tests.test_ingest import consistency

PHOTO = SAMPLES / "photos" / "obama" / "obama_small.jpg"


class StuckReader:
    """Reads return at once, except for paths named ``stuck*``: those block until ``release`` (a dead mount)."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.stuck_started = threading.Event()

    def __call__(self, path: str) -> ReadItem:
        if path.startswith("stuck"):
            self.stuck_started.set()
            self.released.wait()
        if path == "buggy":
            raise ZeroDivisionError("a reader bug")
        return ReadItem(path, size=1, mtime_ns=1)

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def stuck_reader():
    reader = StuckReader()
    yield reader
    reader.release()  # let abandoned threads finish so none outlives the test


def test_a_hung_read_times_out_and_the_batch_goes_on(stuck_reader, monkeypatch):
    monkeypatch.setattr("indexer.pipeline.read._still_as_read", lambda item: True)
    ahead = ReadAhead(stuck_reader, workers=2, timeout_s=0.5)
    try:
        items = ahead.take(["a", "stuck", "b", "buggy"])
        assert [i.path for i in items] == ["a", "stuck", "b", "buggy"]
        assert items[1].error.startswith("read timed out") and (items[1].size, items[1].mtime_ns) == (0, 0)
        assert items[0].error is None and items[2].error is None
        assert items[3].error == "read failed: ZeroDivisionError: a reader bug"
        assert ahead.stalled == 1 and len(ahead.workers) == 2  # the stuck thread was replaced
    finally:
        ahead.close()


def test_stop_while_a_read_hangs_returns_what_is_read(stuck_reader, monkeypatch):
    monkeypatch.setattr("indexer.pipeline.read._still_as_read", lambda item: True)
    stop = threading.Event()
    ahead = ReadAhead(stuck_reader, workers=1, stop=stop, timeout_s=3600)
    stopper = threading.Thread(target=lambda: stuck_reader.stuck_started.wait(60) and stop.set())
    stopper.start()
    try:
        items = ahead.take(["a", "stuck", "b"])  # returns once stop is set, not after the hour
        assert [i.path for i in items] == ["a"]
    finally:
        stopper.join()
        ahead.close()  # does not wait for the stuck thread


def test_reads_that_keep_hanging_end_the_run_with_one_error(stuck_reader, monkeypatch):
    monkeypatch.setattr("indexer.pipeline.read._still_as_read", lambda item: True)
    ahead = ReadAhead(stuck_reader, workers=2, timeout_s=0.2, max_stalled=2)
    try:
        with pytest.raises(ReadStalledError, match="3 reads hung"):
            ahead.take(["stuck1", "stuck2", "stuck3", "a"])
    finally:
        ahead.close()


def photos(folder, n: int = 4):
    folder.mkdir()
    for i in range(n):  # distinct bytes (a comment each), so none is a copy of another
        data = PHOTO.read_bytes()
        (folder / f"p{i}.jpg").write_bytes(data[:2] + b"\xff\xfe\x00\x05c" + bytes([i]) + b"\x00" + data[2:])
    return folder


def test_sigterm_stops_ingest_while_a_reader_hangs(tmp_path):
    folder, index = photos(tmp_path / "photos"), tmp_path / "ix"
    child = Child(["ingest", "--index", str(index), str(folder)], env={"FACEINDEX_FAULT": "stall@read:2"})
    try:
        child.expect("fault injected: stall at read")
        child.proc.send_signal(signal.SIGTERM)
        assert child.wait() == 130, "".join(child.stderr)
    finally:
        child.kill()
    view = consistency(index)
    assert len(view) - 1 < 4  # the hung file (and those after it) are left for the next run


def test_sigterm_stops_the_daemon_while_a_reader_hangs(tmp_path):
    folder, index = tmp_path / "photos", tmp_path / "ix"
    folder.mkdir()
    config = tmp_path / "config.toml"
    config.write_text("[watch]\nsettle_s = 0.2\n")
    child = Child(["watch", str(folder), "--index", str(index), "--config", str(config)],
                  env={"FACEINDEX_FAULT": "stall@read:1"})
    try:
        shutil.copy(PHOTO, folder / "a.jpg")
        child.expect("fault injected: stall at read")
        child.proc.send_signal(signal.SIGTERM)
        assert child.wait() == 0, "".join(child.stderr)
    finally:
        child.kill()
    consistency(index)


def test_a_process_stuck_for_good_is_gone_within_the_grace_time(tmp_path):
    """The main thread itself hangs (here: saving the FAISS snapshot): the signal's deadline ends the process."""
    folder, index = photos(tmp_path / "photos", 2), tmp_path / "ix"
    config = tmp_path / "config.toml"
    config.write_text("[ingest]\nstop_grace_s = 2.0\n")
    args = ["ingest", "--index", str(index), "--config", str(config), str(folder)]
    child = Child(args, env={"FACEINDEX_FAULT": "stall@snapshot:1"})
    try:
        child.expect("fault injected: stall at snapshot")
        child.proc.send_signal(signal.SIGTERM)
        assert child.wait() == 128 + signal.SIGTERM
        assert any("did not stop within 2 s" in line for line in child.stderr)
    finally:
        child.kill()
    # A second signal does not wait for the grace time at all.
    child = Child([*args[:-1], str(folder)], env={"FACEINDEX_FAULT": "stall@snapshot:1"})
    try:
        child.expect("fault injected: stall at snapshot")
        child.proc.send_signal(signal.SIGINT)
        child.expect("SIGINT: finishing the current batch")
        child.proc.send_signal(signal.SIGINT)
        assert child.wait() == 128 + signal.SIGINT
        assert any("second signal" in line for line in child.stderr)
    finally:
        child.kill()
    assert consistency(index)["_faces"] == 2  # committed before the snapshot hung: nothing lost


STUCK_ON_STDERR = """
import logging, sys, threading
from indexer.pipeline.runner import trap_stop_signals
logging.basicConfig(stream=sys.stderr)
def flood():  # ends up blocked in write(2), holding the logging handler's lock: nobody reads our stderr
    while True:
        logging.getLogger("flood").warning("x" * 1000)
threading.Thread(target=flood, daemon=True).start()
trap_stop_signals(threading.Event(), grace_s=2.0)
print("ready", flush=True)
threading.Event().wait()  # the main thread never finishes its batch
"""


def test_the_deadline_holds_when_stderr_is_a_full_pipe(tmp_path):
    """Found by bench_soak: a daemon whose stderr nobody read blocked in a log write, and the signal watcher then
    blocked on the logging lock, so SIGTERM never ended it. The watcher must never block."""
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.Popen([sys.executable, "-c", STUCK_ON_STDERR], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM  # 2 s of grace; 120 s only tells a hang apart
    finally:
        proc.kill()
        proc.wait()
