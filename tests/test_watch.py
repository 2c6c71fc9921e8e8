"""The watch daemon as a user runs it: a real subprocess, a real watchdog observer, real file operations."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indexer.store.lmdb_store import FaceStore
from tests.conftest import REPO, SAMPLES, cli, cli_json
from tests.test_ingest import consistency, lfw_folder

SETTLE_S = 1.0


def wait_for(predicate, timeout: float = 180.0, what: str = "condition"):
    """Poll until ``predicate()`` is truthy; fail (not hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def store_view(index: Path) -> dict[str, int]:
    """{path: face count} for every file record (read-only, from this process)."""
    if not (index / "store.lmdb" / "data.mdb").exists():
        return {}
    try:
        store = FaceStore(index, readonly=True)
    except Exception:
        return {}
    try:
        with store.read() as txn:
            return {r.path: (len(r.face_ids) if r.status != "failed" else -1) for r in store.iter_files(txn)}
    finally:
        store.close()


class Daemon:
    def __init__(self, folder: Path, index: Path, config: Path) -> None:
        self.args = [sys.executable, "-m", "indexer", "watch", str(folder), "--index", str(index),
                     "--config", str(config)]
        self.index = index
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: self.status_running() or self.proc.poll() is not None, what="daemon start")
        assert self.proc.poll() is None, self.proc.communicate()
        return self

    def status_running(self) -> bool:
        from indexer.store.daemon import daemon_status

        return daemon_status(self.index)["running"]

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=120)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"[watch]\nsettle_s = {SETTLE_S}\nmax_wait_ms = 200\nbatch_size = 16\n")
    return path


@pytest.fixture
def daemon(tmp_path, config):
    folder = tmp_path / "photos"
    folder.mkdir()
    d = Daemon(folder, tmp_path / "index", config)
    d.folder = folder
    yield d
    d.kill()


def expect(index: Path, expected: dict[str, int], what: str) -> None:
    wait_for(lambda: store_view(index) == expected, what=what)


def test_daemon_follows_a_living_folder(daemon, shared_data, tmp_path):
    from indexer.store.daemon import daemon_status

    folder, index = daemon.folder, daemon.index
    # 1. one file written slowly, in chunks: never indexed half-written. A daemon holding files for 60 s watches
    # the writes (with the 1 s settle a stalled test process let the daemon settle a half-written file).
    hold_config = tmp_path / "hold.toml"
    hold_config.write_text("[watch]\nsettle_s = 60\nmax_wait_ms = 200\nbatch_size = 16\n")
    holder = Daemon(folder, index, hold_config).start()
    try:
        data = (SAMPLES / "group" / "obama_and_biden.jpg").read_bytes()
        slow = folder / "slow.jpg"
        with open(slow, "wb") as fh:
            for i in range(0, len(data), len(data) // 8):
                fh.write(data[i:i + len(data) // 8])
                fh.flush()
                if i == 0:  # the daemon has seen the half-written file and holds it
                    wait_for(lambda: daemon_status(index)["backlog"] == 1, what="slow file pending")
                time.sleep(0.1)
                assert str(slow) not in store_view(index), "a half-written file was indexed"
        assert holder.stop()[0] == 0
    finally:
        holder.kill()
    # Complete now: the daemon with the test's settle time indexes all of it.
    daemon.start()
    wait_for(lambda: store_view(index).get(str(slow)) == 3, what="slow file indexed with its 3 faces")

    # 2. a burst of 50 LFW photos
    lfw, _ = lfw_folder(shared_data, tmp_path / "src", people=25, per_person=2)
    burst = folder / "burst"
    shutil.copytree(lfw, burst)
    wait_for(lambda: len(store_view(index)) == 51, what="50 burst photos indexed")
    view = store_view(index)
    assert all(n >= 1 for n in view.values()), "every LFW photo has a face"
    # A query from another process while the daemon runs.
    some = sorted(burst.rglob("*.jpg"))[0]
    hits = cli_json("query", "--index", str(index), "-k", "1", str(some))
    assert any(h["matches"][0]["path"] == str(some) for h in hits)

    # 3. rename a folder: faces keep their ids, paths follow
    store = FaceStore(index, readonly=True)
    before = {r.path: r.face_ids for r in _files(store)}
    store.close()
    burst.rename(folder / "renamed")
    expected = {p.replace(str(burst), str(folder / "renamed")): n for p, n in store_view(index).items()}
    expect(index, expected, "renamed folder")
    store = FaceStore(index, readonly=True)
    after = {r.path: r.face_ids for r in _files(store)}
    store.close()
    for old, ids in before.items():
        assert after[old.replace(str(burst), str(folder / "renamed"))] == ids

    # 4. overwrite a file with a different photo
    target = sorted((folder / "renamed").rglob("*.jpg"))[0]
    old_ids = after[str(target)]
    shutil.copy(SAMPLES / "group" / "kit_with_rose.jpg", target)
    wait_for(lambda: store_view(index).get(str(target)) == 2, what="overwritten file re-indexed")
    store = FaceStore(index, readonly=True)
    assert not set(store.get_file(str(target)).face_ids) & set(old_ids)
    store.close()

    # 5. delete files and a folder
    person = sorted((folder / "renamed").iterdir())[1]
    shutil.rmtree(person)
    slow.unlink()
    wait_for(lambda: not any(p.startswith(str(person)) or p == str(slow) for p in store_view(index)),
             what="deleted files and folder removed")
    status = cli_json("status", "--index", str(index))
    assert status["daemon"]["running"] and status["daemon"]["pid"] == daemon.proc.pid
    assert status["faces"] == sum(store_view(index).values())
    code, err = daemon.stop(signal.SIGINT)
    assert code == 0, err
    assert not cli_json("status", "--index", str(index))["daemon"]["running"]

    # 6. files created and removed while the daemon is stopped
    shutil.copy(SAMPLES / "photos" / "rose_leslie" / "img1.jpg", folder / "new.jpg")
    moved_from = sorted((folder / "renamed").rglob("*.jpg"))[-1]
    kept_ids = store_view(index)[str(moved_from)]
    moved_to = folder / "moved_while_stopped.jpg"
    shutil.move(moved_from, moved_to)
    gone = sorted((folder / "renamed").rglob("*.jpg"))[0]
    gone.unlink()
    proc = cli("watch", str(folder), "--index", str(index), "--once", "--json")
    assert '"moved": 1' in proc.stdout
    view = store_view(index)
    assert view[str(folder / "new.jpg")] == 1 and str(gone) not in view and str(moved_from) not in view
    assert view[str(moved_to)] == kept_ids
    on_disk = {str(p) for p in folder.rglob("*.jpg")}
    assert set(view) == on_disk
    consistency(index)


def _files(store: FaceStore):
    with store.read() as txn:
        return list(store.iter_files(txn))


def test_ignored_and_temporary_files_are_not_indexed(daemon):
    daemon.start()
    src = SAMPLES / "photos" / "obama" / "obama_small.jpg"
    shutil.copy(src, daemon.folder / ".hidden.jpg")
    shutil.copy(src, daemon.folder / "download.jpg.part")
    shutil.copy(src, daemon.folder / "edit.jpg~")
    shutil.copy(src, daemon.folder / "real.jpg")
    expect(daemon.index, {str(daemon.folder / "real.jpg"): 1}, "only real.jpg indexed")
    # A finished download renamed from .part to .jpg is indexed under its final name.
    (daemon.folder / "download.jpg.part").rename(daemon.folder / "download.jpg")
    both = {str(daemon.folder / "real.jpg"): 1, str(daemon.folder / "download.jpg"): 1}
    expect(daemon.index, both, "renamed download")
    assert daemon.stop()[0] == 0


def test_second_daemon_is_refused(daemon):
    daemon.start()
    proc = cli("watch", str(daemon.folder), "--index", str(daemon.index), check=False)
    assert proc.returncode == 1 and f"pid {daemon.proc.pid}" in proc.stderr


@pytest.mark.slow
def test_kill_9_during_a_burst_loses_and_duplicates_nothing(shared_data, tmp_path, config):
    rng = random.Random(4242)
    lfw, _ = lfw_folder(shared_data, tmp_path / "src", people=30, per_person=2)
    for trial in range(3):
        folder = tmp_path / f"photos{trial}"
        folder.mkdir()
        d = Daemon(folder, tmp_path / f"index{trial}", config)
        try:
            d.start()
            shutil.copytree(lfw, folder / "burst")
            target = rng.randint(1, 55)
            wait_for(lambda d=d, target=target: len(store_view(d.index)) >= target or d.proc.poll() is not None,
                     what="some commits")
            time.sleep(rng.uniform(0, 0.3))
            d.kill()
            # Meanwhile, some photos are deleted and others added.
            victims = sorted(folder.rglob("*.jpg"))[:: 7]
            for v in victims:
                v.unlink()
            shutil.copy(SAMPLES / "photos" / "biden" / "biden2.jpg", folder / "late.jpg")
            cli("watch", str(folder), "--index", str(d.index), "--config", str(d.args[-1]), "--once")
            view = consistency(d.index)
            on_disk = {str(p) for p in folder.rglob("*.jpg")}
            assert set(view) - {"_faces"} == on_disk
            assert all(view[p] >= 1 for p in on_disk)
        finally:
            d.kill()


def test_read_ahead_rereads_a_file_that_changed_after_it_was_read(tmp_path):
    import os

    from indexer.pipeline.read import ReadAhead
    from indexer.pipeline.records import ReadItem

    reads: list[str] = []

    def reader(path: str) -> ReadItem:
        st = os.stat(path)
        reads.append(path)
        return ReadItem(path, size=st.st_size, mtime_ns=st.st_mtime_ns)

    a, b, c = (tmp_path / n for n in ("a.jpg", "b.jpg", "c.jpg"))
    for f in (a, b, c):
        f.write_bytes(b"x")
    ahead = ReadAhead(reader, workers=2)
    try:
        ahead.ahead([str(a), str(b)])
        first = ahead.take([str(a)])  # b stays read ahead
        assert [i.path for i in first] == [str(a)]
        assert ahead.futures[str(b)].done.wait(30)  # b's read-ahead has happened...
        b.write_bytes(b"longer")  # ...and then b changed: it must be read again
        second = ahead.take([str(b), str(c)])
        assert [i.size for i in second] == [6, 1]
        assert reads.count(str(b)) == 2 and reads.count(str(a)) == 1
        ahead.ahead([str(c)])
        ahead.ahead([])  # reads nobody wants any more are dropped
        assert ahead.futures == {}
    finally:
        ahead.close()
