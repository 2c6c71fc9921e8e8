"""Ingest and query end to end: real models, real LMDB, real FAISS, real photos."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.library import FaceIndex, OpenMode
from indexer.store.lmdb_store import FaceStore
from tests.conftest import REPO, SAMPLES, cli, cli_json, settings_for

OBAMA = SAMPLES / "photos" / "obama" / "obama1.jpg"
BIDEN = SAMPLES / "photos" / "biden" / "biden2.jpg"


@pytest.fixture
def open_index(detector, embedder):
    """FaceIndex on a folder, reusing the session's loaded models."""
    opened = []

    def make(index_dir: Path, writer: bool = True, **sections) -> FaceIndex:
        mode = OpenMode.WRITE if writer else OpenMode.READ
        fi = FaceIndex(settings_for(index_dir, **sections), mode, detector=detector, embedder=embedder)
        opened.append(fi)
        return fi

    yield make
    for fi in opened:
        fi.close()


def consistency(index_dir: Path) -> dict:
    """Check the store's invariants and that the FAISS index holds exactly the stored faces."""
    from indexer.config import IndexSettings
    from indexer.store.sync import SyncedIndex

    store = FaceStore(index_dir, readonly=True)
    try:
        with store.read() as txn:
            files = list(store.iter_files(txn))
            faces = {f.face_id: f for f in store.iter_faces(txn)}
            ids, _ = store.all_vectors(txn)
        owned = [fid for rec in files for fid in rec.face_ids]
        assert len(owned) == len(set(owned)), "a face belongs to two files"
        assert set(owned) == set(faces), "faces without a file, or files pointing at missing faces"
        assert set(ids.tolist()) == set(faces), "vectors and face records disagree"
        for rec in files:
            assert all(faces[f].path == rec.path for f in rec.face_ids)
        synced = SyncedIndex(store, IndexSettings())
        assert set(synced.index.ids().tolist()) == set(faces), "FAISS index differs from the store"
        return {rec.path: len(rec.face_ids) for rec in files} | {"_faces": len(faces)}
    finally:
        store.close()


def test_ingest_then_reingest_skips_everything(sample_index):
    status = cli_json("status", "--index", str(sample_index))
    assert status["files"] == {"indexed": 13, "no_face": 0, "failed": 0}
    assert status["faces"] == 16  # 11 single-person photos + 2 + 3 in the group photos
    assert status["model"].startswith("casia-webface:")
    assert status["index"]["type"] == "Flat" and status["index"]["vectors"] == 16
    again = cli_json("ingest", "--index", str(sample_index), str(SAMPLES))
    assert again["unchanged"] == 13 and again["faces"] == 0 and again["indexed"] == 0
    consistency(sample_index)


def test_query_finds_the_same_person_first(sample_index):
    results = cli_json("query", "--index", str(sample_index), "-k", "3", str(SAMPLES / "group" / "kit_with_rose.jpg"))
    assert len(results) == 2
    for face in results:
        # The face itself (the group photo is indexed) comes first, then the same person's single photos.
        top = [Path(m["path"]).parent.name for m in face["matches"]]
        assert face["matches"][0]["path"].endswith("kit_with_rose.jpg")
        assert top[1] == top[2] and top[1] in ("kit_harington", "rose_leslie")
        assert face["matches"][0]["similarity"] >= face["matches"][1]["similarity"]


def test_query_by_face_id_and_min_similarity(sample_index):
    first = cli_json("query", "--index", str(sample_index), "--face-id", "1", "-k", "5")
    assert len(first) == 1 and all(m["face_id"] != 1 for m in first[0]["matches"])
    strict = cli_json("query", "--index", str(sample_index), "--face-id", "1", "-k", "5", "--min-similarity", "0.6")
    assert all(m["similarity"] >= 0.6 for m in strict[0]["matches"])
    assert len(strict[0]["matches"]) < len(first[0]["matches"])


def test_changed_file_is_reindexed_and_old_faces_removed(tmp_path, open_index):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(OBAMA, photos / "a.jpg")
    shutil.copy(SAMPLES / "group" / "kit_with_rose.jpg", photos / "b.jpg")
    fi = open_index(tmp_path / "ix")
    assert fi.ingest([photos], progress=False).faces == 3
    old_ids = fi.store.get_file(str(photos / "b.jpg")).face_ids
    shutil.copy(BIDEN, photos / "b.jpg")  # overwrite with a different photo (one face)
    summary = fi.ingest([photos], progress=False)
    assert (summary.indexed, summary.unchanged, summary.faces) == (1, 1, 1)
    rec = fi.store.get_file(str(photos / "b.jpg"))
    assert len(rec.face_ids) == 1 and not set(rec.face_ids) & set(old_ids)
    assert all(fi.store.get_face(i) is None for i in old_ids)
    hits = fi.query(image=BIDEN, k=1)
    assert hits[0]["matches"][0]["path"] == str(photos / "b.jpg")
    fi.close()
    assert consistency(tmp_path / "ix")["_faces"] == 2


def test_touched_file_is_not_recomputed(tmp_path, open_index):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(OBAMA, photos / "a.jpg")
    fi = open_index(tmp_path / "ix")
    fi.ingest([photos], progress=False)
    os.utime(photos / "a.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))
    summary = fi.ingest([photos], progress=False)
    assert summary.unchanged == 1 and summary.faces == 0
    assert fi.ingest([photos], progress=False).unchanged == 1  # the new mtime was remembered


def test_byte_identical_copies_reuse_faces_without_embedding(tmp_path, open_index, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(SAMPLES / "group" / "kit_with_rose.jpg", photos / "orig.jpg")
    fi = open_index(tmp_path / "ix")
    fi.ingest([photos], progress=False)
    shutil.copy(photos / "orig.jpg", photos / "copy1.jpg")
    shutil.copy(photos / "orig.jpg", photos / "copy2.jpg")  # two copies in one batch
    calls = []
    real_embed = fi.embedder.embed
    monkeypatch.setattr(fi.embedder, "embed", lambda crops: calls.append(len(crops)) or real_embed(crops))
    summary = fi.ingest([photos], progress=False)
    assert summary.duplicates == 2 and summary.faces == 4 and sum(calls) == 0
    with fi.store.read() as txn:
        orig = fi.store.get_file(str(photos / "orig.jpg"), txn)
        copy = fi.store.get_file(str(photos / "copy2.jpg"), txn)
        for a, b in zip(orig.face_ids, copy.face_ids, strict=True):
            assert a != b
            assert np.array_equal(fi.store.get_vector(a, txn), fi.store.get_vector(b, txn))


def test_bad_inputs_are_recorded_and_skipped(tmp_path, open_index):
    photos = tmp_path / "photos"
    photos.mkdir()
    good = OBAMA.read_bytes()
    (photos / "good.jpg").write_bytes(good)
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "not_an_image.jpg").write_text("hello, I am a text file with a .jpg name\n" * 20)
    (photos / "empty.png").write_bytes(b"")
    Image.new("RGB", (3000, 2000)).save(photos / "bomb.png")  # 6 Mpx > the 5 Mpx cap set below
    Image.new("RGB", (640, 480), (90, 140, 200)).save(photos / "sky.jpg")  # no face
    fi = open_index(tmp_path / "ix", ingest={"max_pixels": 5_000_000})
    summary = fi.ingest([photos], progress=False)
    assert (summary.indexed, summary.no_face, summary.failed) == (1, 1, 4)
    reasons = {Path(f["path"]).name: f["reason"] for f in summary.failures}
    assert reasons["truncated.jpg"].startswith("corrupt or truncated")
    assert reasons["not_an_image.jpg"].startswith("not an image")
    assert reasons["empty.png"].startswith("empty file")
    assert reasons["bomb.png"].startswith("too large")
    assert fi.store.get_file(str(photos / "sky.jpg")).status == "no_face"
    listed = {Path(f["path"]).name: f["reason"] for f in fi.status()["failures"]}
    assert listed == reasons
    # A file that vanishes between the scan and the read, and one that cannot be read.
    with fi.pipeline() as pipeline:
        vanished = pipeline.process([str(photos / "gone.jpg")])
    assert vanished.failures[0]["reason"].startswith("vanished")
    assert fi.store.get_file(str(photos / "gone.jpg")).status == "failed"
    if os.geteuid() != 0:  # root reads anything: the permission case only means something for users
        (photos / "locked.jpg").write_bytes(good)
        (photos / "locked.jpg").chmod(0)
        with fi.pipeline() as pipeline:
            locked = pipeline.process([str(photos / "locked.jpg")])
        assert "permission" in locked.failures[0]["reason"]


def test_deleted_or_corrupt_faiss_file_is_rebuilt_with_identical_answers(copy_index):
    query = ["query", "--index", str(copy_index), "-k", "5", str(SAMPLES / "group" / "obama_and_biden.jpg"), "--json"]
    before = json.loads(cli(*query).stdout)
    (copy_index / "vectors.faiss").unlink()
    proc = cli(*query)
    assert json.loads(proc.stdout) == before
    data = (copy_index / "vectors.faiss")
    cli("ingest", "--index", str(copy_index), str(SAMPLES))  # the writer saves a fresh snapshot
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    proc = cli(*query)
    assert json.loads(proc.stdout) == before
    assert "rebuilding" in proc.stderr
    data.write_bytes(bytes(raw[:100]))  # truncated
    assert json.loads(cli(*query).stdout) == before


def test_other_model_is_refused_naming_both_fingerprints(copy_index, tmp_path):
    from indexer.models import weights as weights_mod

    state = weights_mod.load_state(weights_mod.cache_dir() / "casia-webface.npz")
    state["last_bn.bias"] = state["last_bn.bias"] + 0.01
    other = tmp_path / "tuned.npz"
    np.savez(other, **state)
    proc = cli("ingest", "--index", str(copy_index), "--weights", str(other), str(OBAMA), check=False)
    assert proc.returncode == 1
    assert "casia-webface:" in proc.stderr and "tuned:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_second_writer_is_refused_with_the_holder(copy_index):
    from indexer.errors import IndexLockedError
    from indexer.store.lock import WriterLock

    with WriterLock(copy_index, "watch"):
        proc = cli("ingest", "--index", str(copy_index), str(OBAMA), check=False)
        assert proc.returncode == 1 and f"pid {os.getpid()}" in proc.stderr and "watch" in proc.stderr
        with pytest.raises(IndexLockedError):
            WriterLock(copy_index, "ingest").acquire()
    assert cli_json("status", "--index", str(copy_index))["daemon"]["running"] is False


def lfw_folder(shared_data: Path, tmp: Path, people: int, per_person: int) -> tuple[Path, dict[str, str]]:
    """Copy some LFW photos into a temporary folder (LFW never enters the repository)."""
    root = shared_data / "lfw-devtrain"
    chosen = [p for p in sorted(os.listdir(root)) if len(os.listdir(root / p)) >= per_person][:people]
    folder = tmp / "lfw"
    labels = {}
    for person in chosen:
        (folder / person).mkdir(parents=True)
        for name in sorted(os.listdir(root / person))[:per_person]:
            shutil.copy(root / person / name, folder / person / name)
            labels[str(folder / person / name)] = person
    return folder, labels


@pytest.mark.lfw
def test_lfw_query_by_held_back_photo_returns_that_person_first(shared_data, tmp_path, open_index):
    folder, labels = lfw_folder(shared_data, tmp_path, people=50, per_person=5)  # 250 photos
    held = {}
    for person in sorted({p for p in labels.values()})[:10]:
        photo = sorted(folder.joinpath(person).iterdir())[-1]
        held[person] = tmp_path / f"held_{photo.name}"
        shutil.move(photo, held[person])
    fi = open_index(tmp_path / "ix")
    summary = fi.ingest([folder], progress=False)
    assert summary.indexed >= 235
    hits = 0
    for person, photo in held.items():
        results = fi.query(image=photo, k=4)
        centre = min(results, key=lambda r: abs((r["box"][0] + r["box"][2]) / 2 - 125))  # LFW's labelled face
        top = [Path(m["path"]).parent.name for m in centre["matches"]]
        hits += top[0] == person
        assert top.count(person) >= 3 or top[0] == person
    assert hits >= 9


@pytest.mark.lfw
@pytest.mark.slow
def test_kill_9_at_random_moments_loses_and_duplicates_nothing(shared_data, tmp_path):
    folder, _ = lfw_folder(shared_data, tmp_path, people=30, per_person=3)  # 90 photos
    reference = tmp_path / "reference"
    cli("ingest", "--index", str(reference), str(folder))
    expected = consistency(reference)
    rng = random.Random(20261128)
    for trial in range(3):
        index = tmp_path / f"trial{trial}"
        proc = subprocess.Popen([sys.executable, "-m", "indexer", "ingest", "--index", str(index), str(folder)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = rng.randint(1, 80)  # kill once at least this many files are committed, plus a random delay
        while proc.poll() is None and _committed_files(index) < target:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cli("ingest", "--index", str(index), str(folder))
        assert consistency(index) == expected


def _committed_files(index: Path) -> int:
    if not (index / "store.lmdb" / "data.mdb").exists():
        return 0
    try:
        store = FaceStore(index, readonly=True)
    except Exception:  # created but not initialised yet
        return 0
    try:
        with store.read() as txn:
            return txn.stat(store.db["files"])["entries"]
    finally:
        store.close()


@pytest.mark.lfw
def test_sigint_commits_the_current_batch_and_exits_130(shared_data, tmp_path):
    folder, _ = lfw_folder(shared_data, tmp_path, people=40, per_person=2)
    index = tmp_path / "ix"
    proc = subprocess.Popen([sys.executable, "-m", "indexer", "ingest", "--index", str(index), str(folder)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and _committed_files(index) < 16:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate()
    assert proc.returncode == 130 and "interrupted" in out
    partial = consistency(index)
    assert 16 <= len(partial) - 1 < 80
    cli("ingest", "--index", str(index), str(folder))
    assert len(consistency(index)) - 1 == 80


def test_writer_removes_snapshot_temp_files_left_by_a_crash(copy_index, open_index):
    leftover = copy_index / ".vectors.faiss.abc123.tmp"
    leftover.write_bytes(b"half a snapshot")
    open_index(copy_index)
    assert not leftover.exists() and (copy_index / "vectors.faiss").exists()


@pytest.mark.parametrize("rss_mb,trims_after", [
    # The first call measures the level (100); trims only above level + slack (50), then the level is re-measured.
    ([100, 120, 149, 150, 151, 90, 130, 141], [0, 0, 0, 0, 1, 1, 1, 2]),
    ([300, 200, 100, 349, 351, 80], [0, 0, 0, 0, 1, 1]),
])
def test_memory_trimmer_trims_only_when_memory_creeps_above_its_level(rss_mb, trims_after):
    from indexer.pipeline.runner import MemoryTrimmer

    calls = iter(rss_mb)
    trimmed = []
    trimmer = MemoryTrimmer(slack=50, trim=lambda: trimmed.append(1), rss=lambda: next(calls))
    seen = []
    for _ in rss_mb:
        trimmer()
        seen.append(len(trimmed))
    assert seen == trims_after


def test_images_smaller_than_the_minimum_face_are_no_face_not_a_crash(tmp_path, open_index):
    """An icon or thumbnail below detector.min_face_size (MTCNN has no scale for it) is recorded as no_face."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(OBAMA, photos / "a.jpg")
    Image.open(OBAMA).resize((15, 12)).save(photos / "icon.png")
    Image.new("RGB", (1, 1)).save(photos / "pixel.png")
    fi = open_index(tmp_path / "ix")
    summary = fi.ingest([photos], progress=False)
    assert (summary.indexed, summary.no_face, summary.failed, summary.faces) == (1, 2, 0, 1)
    assert fi.store.get_file(str(photos / "icon.png")).status == "no_face"
    fi.close()
