"""Disk and store faults: a full LMDB map, a full disk, a read-only index, damaged records, a newer schema, two
writers and the lock of a dead one, and an index readable by its owner only."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import lmdb
import pytest

from indexer.library import FaceIndex, OpenMode
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import pack, u64
from tests.conftest import REPO, SAMPLES, cli, cli_json, settings_for
from tests.faults.helpers import Runner, public_tmp
from tests.test_ingest import consistency

PHOTO = SAMPLES / "photos" / "obama" / "obama_small.jpg"
TINY_MAP = 64 * 1024


def distinct_photos(folder: Path, n: int) -> Path:
    """``n`` copies of one small photo, each with a different JPEG comment (so none is a copy of another)."""
    folder.mkdir(parents=True)
    data = PHOTO.read_bytes()
    for i in range(n):
        (folder / f"p{i:02d}.jpg").write_bytes(data[:2] + b"\xff\xfe\x00\x06c" + i.to_bytes(2, "big") + b"\x00"
                                              + data[2:])
    return folder


def test_the_map_grows_while_reader_threads_read(tmp_path, monkeypatch):
    """Growing the map unmaps it; reads in other threads wait for it instead of failing (store/mapguard.py)."""
    monkeypatch.setattr("indexer.store.lmdb_store._INITIAL_MAP", TINY_MAP)
    store = FaceStore(tmp_path / "ix")
    done, errors = threading.Event(), []

    def read_all() -> None:
        # Each read holds its transaction a few milliseconds (like a reader classifying a file), so the map grows
        # while some are open. (Readers going flat out instead make py-lmdb's abort of the full write transaction
        # crawl: 17 s measured, outside faceindex's code.)
        while not done.is_set():
            try:
                with store.read() as txn:
                    done.wait(0.005)
                    sum(1 for _ in txn.cursor(db=store.db["meta"]).iternext(values=False))
                    txn.get(b"k0", db=store.db["meta"])
            except Exception as exc:  # the failure this test is about
                errors.append(repr(exc))

    readers = [threading.Thread(target=read_all) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        blob = bytes(range(256)) * 192  # 48 KiB: 120 of them grow the 64 KiB map seven times
        for i in range(120):
            store.transact(lambda txn, i=i: txn.put(b"k%d" % i, blob, db=store.db["meta"]))
    finally:
        done.set()
        for t in readers:
            t.join()
    assert store.env.info()["map_size"] > TINY_MAP and not errors, errors[:3]
    store.close()


def test_ingest_into_a_tiny_map_grows_it_and_loses_nothing(tmp_path, detector, embedder, monkeypatch):
    monkeypatch.setattr("indexer.store.lmdb_store._INITIAL_MAP", TINY_MAP)
    fi = FaceIndex(settings_for(tmp_path / "ix", detector={"batch_size": 4}), OpenMode.WRITE, detector=detector,
                   embedder=embedder)
    try:
        summary = fi.ingest([SAMPLES], progress=False)
        assert (summary.indexed, summary.failed, summary.faces) == (13, 0, 16)
        assert fi.store.env.info()["map_size"] > TINY_MAP
    finally:
        fi.close()
    assert consistency(tmp_path / "ix")["_faces"] == 16


@pytest.fixture
def small_disk():
    """A 300 KiB tmpfs (root only); yields (mount point, remount(options))."""
    with public_tmp() as scratch:
        mnt = scratch / "disk"
        mnt.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k,mode=0755", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")

        def remount(options: str) -> None:
            subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)

        try:
            yield mnt, scratch, remount
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_then_read_only_disk(small_disk):
    """Disk full: one clear line, nothing corrupt, and the next run resumes once there is space. Read-only: one
    line for a writer, while status still reads it."""
    mnt, scratch, remount = small_disk
    photos = distinct_photos(scratch / "photos", 40)  # an index of ~600 KB: twice the disk
    config = scratch / "config.toml"
    config.write_text("[detector]\nbatch_size = 4\n")
    index = mnt / "ix"
    proc = cli("ingest", "--index", str(index), "--config", str(config), str(photos), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "the disk is full" in errors[0], proc.stderr
    partial = consistency(index)  # what was committed is whole: files, faces, vectors and FAISS agree
    assert 0 < partial["_faces"] < 40
    remount("size=16m")
    again = json.loads(cli("ingest", "--index", str(index), "--config", str(config), "--json", str(photos)).stdout)
    assert again["unchanged"] == partial["_faces"] and again["faces"] == 40 - partial["_faces"]
    assert consistency(index)["_faces"] == 40
    remount("ro")
    proc = cli("ingest", "--index", str(index), str(photos), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("Error: cannot write to the index folder") and "read-only" in proc.stderr
    assert cli_json("status", "--index", str(index))["faces"] == 40


def test_an_index_folder_we_may_not_write_is_one_line(sample_index):
    with public_tmp() as scratch:
        runner = Runner(scratch)
        if runner.is_root:
            pytest.skip(f"root writes anywhere: {runner.why_root}")
        index = scratch / "ix"
        shutil.copytree(sample_index, index)  # owned by root, 0700 folders: nobody may not even look
        os.chmod(index, 0o755)
        proc = runner.run("ingest", "--index", str(index), str(PHOTO))
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "Traceback" not in err and err.count("\n") == 1, err
        assert "read-only or not yours" in err


def _damage(index: Path, **tables: bool) -> list[int]:
    """Garble the record of one face in each table named (faces, vectors, thumbs); returns their face ids."""
    garbage = {"faces": b"\xc1\xc1 not msgpack", "vectors": b"\x00" * 100, "thumbs": b"\xff\xd8 half a JPEG"}
    env = lmdb.open(str(index / "store.lmdb"), max_dbs=20)
    with env.begin(write=True) as txn:
        ids = [int.from_bytes(k, "big") for k, _ in txn.cursor(db=env.open_db(b"faces", txn=txn))]
        for face_id, table in zip(ids, [t for t in garbage if tables.get(t)], strict=False):
            txn.put(u64(face_id), garbage[table], db=env.open_db(table.encode(), txn=txn))
    env.close()
    return ids[:len([t for t in tables if tables[t]])]


def test_damaged_face_records_and_thumbnails_are_skipped_with_a_warning(copy_index, tmp_path):
    bad_face, bad_thumb = _damage(copy_index, faces=True, thumbs=True)
    # status reads no record: it says the index was never checked, until `faceindex check` has read them all.
    assert cli_json("status", "--index", str(copy_index))["damaged"]["checked_at"] is None
    assert "checked    never" in cli("status", "--index", str(copy_index)).stdout
    found = cli_json("check", "--index", str(copy_index))
    assert {k: found[k] for k in ("faces", "vectors", "thumbnails", "face_ids")} == \
        {"faces": 1, "vectors": 0, "thumbnails": 1, "face_ids": [bad_face, bad_thumb]}
    assert "damaged 1 face records, 0 vectors, 1 thumbnails" in cli("check", "--index", str(copy_index)).stdout
    status = cli_json("status", "--index", str(copy_index))
    assert {k: status["damaged"][k] for k in ("faces", "vectors", "thumbnails", "face_ids")} == \
        {"faces": 1, "vectors": 0, "thumbnails": 1, "face_ids": [bad_face, bad_thumb]}
    assert status["damaged"]["checked_at"].endswith("Z")
    assert "damaged 1 face records, 0 vectors, 1 thumbnails" in cli("status", "--index", str(copy_index)).stdout
    assert cli_json("query", "--index", str(copy_index), "--face-id", str(bad_thumb), "-k", "3")[0]["matches"]
    assert "damaged face record" in cli("cluster", "--index", str(copy_index)).stderr
    proc = cli("report", "--index", str(copy_index), "--out", str(tmp_path / "report"))
    assert "stored thumbnail is damaged" in proc.stderr
    assert not (tmp_path / "report" / "thumbs" / f"{bad_thumb}.jpg").exists()
    assert (tmp_path / "report" / "index.html").exists()


def test_a_damaged_vector_is_left_out_of_the_rebuilt_index(copy_index):
    (bad,) = _damage(copy_index, vectors=True)
    (copy_index / "vectors.faiss").unlink()  # the rebuild reads every vector
    assert cli_json("check", "--index", str(copy_index))["vectors"] == 1
    status = cli_json("status", "--index", str(copy_index))
    assert status["damaged"]["vectors"] == 1 and status["index"]["vectors"] == status["faces"] - 1
    hits = cli_json("query", "--index", str(copy_index), "-k", "20", str(PHOTO))
    assert all(m["face_id"] != bad for h in hits for m in h["matches"])


def test_a_damaged_vector_costs_its_face_only_in_every_command(copy_index, tmp_path):
    """Persons, report, export and a stored-face query read vectors one by one: the damaged one is left out."""
    (bad,) = _damage(copy_index, vectors=True)
    index = ["--index", str(copy_index)]
    clustered = cli("cluster", *index, "--json")
    assert clustered.returncode == 0 and "Traceback" not in clustered.stderr, clustered.stderr
    assert "damaged vector record of face" in clustered.stderr
    people = cli_json("people", "list", *index)
    first = people[0]["id"]
    for args in (("people", "name", str(first), "Kit"), ("people", "undo"),
                 ("report", "--out", str(tmp_path / "report")), ("export", "--out", str(tmp_path / "export"))):
        proc = cli(*args, *index)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr)
    exported = json.loads((tmp_path / "export" / "train_assignments.json").read_text())
    placed = {f["face_id"]: f["cluster_id"] for f in exported["faces"]}
    assert placed[bad] == -1 and any(c >= 0 for c in placed.values())
    proc = cli("query", *index, "--face-id", str(bad), check=False)
    assert proc.returncode != 0 and "no usable vector" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("version, says", [(99, "upgrade faceindex"), (0, "re-ingest into a new --index")])
def test_an_index_of_another_schema_is_refused_clearly(copy_index, version, says):
    env = lmdb.open(str(copy_index / "store.lmdb"), max_dbs=20)
    with env.begin(write=True) as txn:
        txn.put(b"schema", pack(version), db=env.open_db(b"meta", txn=txn))
    env.close()
    for args in (["status"], ["ingest", str(PHOTO)]):
        proc = cli(*args, "--index", str(copy_index), check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"schema version {version}" in proc.stderr and says in proc.stderr


def test_the_lock_of_a_killed_writer_is_taken_over(tmp_path):
    """flock is dropped by the kernel when its holder dies, even by kill -9: no stale lock to clean up."""
    from indexer.errors import IndexLockedError
    from indexer.store.lock import WriterLock, is_held

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from indexer.store.lock import WriterLock; "
                               f"WriterLock({str(tmp_path)!r}, 'watch').acquire(); print('held', flush=True); "
                               "time.sleep(600)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_held(tmp_path)["pid"] == holder.pid
        with pytest.raises(IndexLockedError, match=f"pid {holder.pid}"):
            WriterLock(tmp_path, "ingest").acquire()
    finally:
        holder.kill()
        holder.wait()
    assert is_held(tmp_path) is None  # the file still names the dead holder; nobody holds it
    with WriterLock(tmp_path, "ingest"):
        assert is_held(tmp_path)["pid"] == os.getpid()


def test_the_index_is_readable_by_its_owner_only(sample_index):
    """Faces are personal data: the index folder and every file in it are 0700 / 0600 (SECURITY.md)."""
    loose = []
    for path in [sample_index, *sample_index.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            loose.append(f"{path.relative_to(sample_index.parent)} {oct(mode)}")
    assert not loose, loose
