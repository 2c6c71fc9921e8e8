"""``ingest --engine ray``: the pool sizing tables, shards, and the real thing on a local Ray.

One local Ray session (module fixture) serves every test that needs one; after it is shut down no process of it
may be left. Against it: LFW photos give the same faces as the single-machine ingest; a merging process killed with
SIGKILL mid-merge (``FACEINDEX_FAULT=kill@commit:N``, a separate CLI process connected with ``--address``) is
resumed by the next run with nothing merged twice and nothing lost; the hostile corpus (tests/corpus) is recorded
exactly as the local path records it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from benchmarks.lfw_data import lfw_images
from indexer.library import FaceIndex, OpenMode
from indexer.pipeline.merge import SHARD_KEY, SHARD_PREFIX
from indexer.pipeline.ray_pool import GIB, ClusterResources, choose_pool, choose_shard_size
from indexer.pipeline.records import FaceItem, ReadItem, Verdict
from indexer.pipeline.shards import read_shard, shard_name, start_run, write_shard
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import NewFace
from tests.conftest import REPO, cli, settings_for
from tests.corpus.make_corpus import build
from tests.faults.helpers import Child
from tests.faults.test_hostile_input import check_outcomes
from tests.test_ingest import consistency

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # Ray Data's own fields

EVERY_NTH_LFW = 40   # 9,525 dev-train photos -> 239
KILLED_FILES = 96    # the kill -9 test's share of them: 6 shards of 16
SHUTDOWN_WAIT_S = 60


# ---------------------------------------------------------------------------------------------- pure tables
@pytest.mark.parametrize("res,actors,cpus,gpus,why", [
    (ClusterResources(2, 0, 20 * GIB), 1, 2, 0, "the driver shares the cores"),            # this machine
    (ClusterResources(1, 0, 8 * GIB), 1, 1, 0, "1 core per actor"),
    (ClusterResources(16, 0, 64 * GIB), 7, 2, 0, "one core kept for the driver"),          # 15 spare cores
    (ClusterResources(16, 0, 12 * GIB), 4, 2, 0, "capped by memory"),                      # 12 GiB / 3
    (ClusterResources(4, 0, 1 * GIB), 1, 2, 0, "one runs anyway"),
    (ClusterResources(16, 0, 0), 7, 2, 0, "one core kept"),                                # memory not reported
    (ClusterResources(64, 8, 512 * GIB), 8, 4, 1, "one actor per GPU, 4 cores"),
    (ClusterResources(8, 4, 64 * GIB), 4, 1, 1, "one actor per GPU, 1 core each"),             # 7 spare cores
    (ClusterResources(2, 4, 64 * GIB), 2, 1, 1, "one actor per GPU"),                      # fewer cores than GPUs
    (ClusterResources(64, 8, 6 * GIB), 2, 4, 1, "capped by memory"),
])
def test_choose_pool_table(res, actors, cpus, gpus, why):
    plan = choose_pool(res)
    assert (plan.actors, plan.cpus, plan.gpus) == (actors, cpus, gpus)
    assert why in plan.reason and plan.reason.startswith(res.describe())
    assert plan.actors * plan.cpus <= max(res.cpus, plan.cpus) and plan.actors * plan.gpus <= res.gpus


@pytest.mark.parametrize("files,actors,batch,requested,size,why", [
    (239, 1, 16, 0, 64, "4 shards per actor"),     # ceil(239 / 4) = 60 -> a multiple of 16
    (10, 1, 16, 0, 16, "4 shards per actor"),      # never less than one batch
    (0, 3, 16, 0, 16, "4 shards per actor"),
    (100_000, 8, 16, 0, 256, "the cap"),
    (100_000, 8, 24, 0, 240, "the cap"),           # the largest multiple of 24 within 256
    (1_000, 2, 300, 0, 300, "4 shards per actor"),  # a batch over the cap is one shard
    (239, 1, 16, 16, 16, "set by --shard-size"),
])
def test_choose_shard_size_table(files, actors, batch, requested, size, why):
    got, reason = choose_shard_size(files, actors, batch, requested)
    assert got == size and why in reason
    if not requested:
        assert got % batch == 0


def test_shard_round_trip_keeps_names_vectors_and_failures(tmp_path):
    rng = np.random.default_rng(7)
    latin1 = os.fsdecode(b"/photos/caf\xe9.jpg")
    vectors = rng.standard_normal((3, 512)).astype(np.float32)
    faces = [NewFace(box=[1.5, 2.25, 30.0, 40.0], prob=0.99, landmarks=[[3.0, 4.0]] * 5, vector=v,
                     thumbnail=bytes([i]) * 10) for i, v in enumerate(vectors)]
    items = [FaceItem(ReadItem(latin1, 10, 20, "ab" * 32, orig_size=(250, 250)), faces[:2]),
             FaceItem(ReadItem("/photos/bad.jpg", 5, 6, error="corrupt image: truncated")),
             FaceItem(ReadItem("/photos/b.jpg", 7, 8, "cd" * 32, orig_size=(9, 9)), faces[2:]),
             FaceItem(ReadItem("/photos/copy.jpg", 7, 9, "cd" * 32, Verdict.COPY, source="/photos/b.jpg"))]
    path = tmp_path / shard_name(3, [fi.read.path for fi in items])
    write_shard(path, items, "casia-webface:1234")
    shard = read_shard(path)
    assert (shard.name, shard.model) == (path.name, "casia-webface:1234")
    assert [fi.read for fi in shard.items] == [fi.read for fi in items]
    got = [f for fi in shard.items for f in fi.faces]
    assert [len(fi.faces) for fi in shard.items] == [2, 0, 1, 0]
    assert np.array_equal(np.stack([f.vector for f in got]), vectors)  # bit for bit
    assert [(f.box, f.prob, f.landmarks, f.thumbnail) for f in got] == \
        [(f.box, f.prob, f.landmarks, f.thumbnail) for f in faces]
    assert list(tmp_path.iterdir()) == [path]  # no temp file left beside it


# ---------------------------------------------------------------------------------------------- without Ray
def test_resume_merges_what_earlier_runs_left_once(tmp_path):
    """No Ray needed: nothing is left to send. An earlier run left a shard (merged now), a shard whose id the
    store already holds (killed between its commit and its deletion: not merged again), a damaged shard and a
    worker's temp file (dropped)."""
    photos, index = tmp_path / "photos", tmp_path / "index"
    photos.mkdir()
    files = [photos / "a.jpg", photos / "b.jpg"]
    for f in files:
        f.write_text("not a photo")
    items = [FaceItem(ReadItem(str(f), f.stat().st_size, f.stat().st_mtime_ns, "ab" * 32, error="not an image"))
             for f in files]
    with FaceIndex(settings_for(index), OpenMode.WRITE) as fi:
        folder = start_run(index / "staging", "earlier", fi.dir)
        fresh, merged = (folder / shard_name(n, [str(f)]) for n, f in enumerate(files))
        write_shard(fresh, items[:1], "casia-webface:0")
        write_shard(merged, items[1:], "casia-webface:0")
        fi.store.transact(lambda txn: fi.store.put_meta(txn, SHARD_KEY.format(run="earlier", name=merged.name), {}))
        (folder / "shard-000002-0000000000000000.parquet").write_bytes(b"PAR1 damaged")
        (folder / ".shard-000003-0000000000000000.parquet.x1.tmp").write_bytes(b"half written")
        run = fi.ingest_ray([], progress=False)
    assert (run.resumed_shards, run.resumed.files, run.resumed.failed, run.shards) == (3, 1, 1, 0)
    assert run.to_dict()["resumed"]["failures"] == [{"path": str(files[0]), "reason": "not an image"}]
    assert {rel: (status, reason) for rel, (status, reason, _) in faces_of(index, photos).items()} == \
        {"a.jpg": ("failed", "not an image")}
    assert not any((index / "staging").iterdir()) and _shard_keys(index) == 0


def test_plain_ingest_imports_neither_ray_nor_pyarrow():
    code = ("import sys; import indexer.cli, indexer.library, indexer.pipeline.runner; "
            "sys.exit(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow'))[:3] or 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_unreachable_address_is_one_line(tmp_path):
    proc = cli("ingest", "--engine", "ray", "--address", "127.0.0.1:9", "--index", str(tmp_path / "ix"),
               str(REPO / "samples"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "no Ray cluster answers at 127.0.0.1:9" in proc.stderr


def test_missing_ray_or_a_bad_address_is_an_engine_error(monkeypatch):
    from indexer.errors import EngineError
    from indexer.pipeline.ray_engine import ray_session

    with pytest.raises(EngineError, match="expected HOST:PORT"), ray_session("nohost"):
        pass
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(EngineError, match=r"needs Ray Data: `pip install 'ray\[data\]'`"), ray_session(None):
        pass


def test_ray_options_need_the_ray_engine(tmp_path):
    proc = cli("ingest", "--shard-size", "8", "--index", str(tmp_path / "ix"), str(REPO / "samples"), check=False)
    assert proc.returncode == 2 and "go with --engine ray" in proc.stderr


# ---------------------------------------------------------------------------------------------- on a local Ray
def _alive_children() -> list[psutil.Process]:
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray for the module (its GCS address, for a second driver); afterwards, none of its processes."""
    from indexer.pipeline.ray_engine import ray_session

    before = {p.pid for p in _alive_children()}
    with ray_session(None) as ray:
        yield ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + SHUTDOWN_WAIT_S
    while (left := [p for p in _alive_children() if p.pid not in before]) and time.monotonic() < deadline:
        psutil.wait_procs(left, timeout=1)
    assert not left, f"Ray left processes behind: {[p.cmdline()[:3] for p in left]}"


@pytest.fixture(scope="module")
def lfw_photos(shared_data, tmp_path_factory) -> Path:
    """Every 40th LFW dev-train photo (239), copied as <person>/<file>."""
    root = tmp_path_factory.mktemp("lfw") / "photos"
    for path, person in list(zip(*lfw_images(shared_data), strict=True))[::EVERY_NTH_LFW]:
        (root / person).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / person)
    return root


def faces_of(index: Path, root: Path) -> dict[str, tuple[str, str, list[tuple[list[float], np.ndarray, int]]]]:
    """relative path -> (status, reason, [(box, vector, face id)] sorted by box) of every stored file."""
    store = FaceStore(index, readonly=True)
    try:
        with store.read() as txn:
            out = {}
            for rec in store.iter_files(txn):
                faces = [(store.get_face(i, txn).box, store.get_vector(i, txn).copy(), i) for i in rec.face_ids]
                out[os.path.relpath(rec.path, root)] = (rec.status, rec.reason, sorted(faces, key=lambda f: f[0]))
            return out
    finally:
        store.close()


def assert_same_faces(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for rel, (status, reason, faces) in want.items():
        g_status, g_reason, g_faces = got[rel]
        assert (g_status, g_reason, len(g_faces)) == (status, reason, len(faces)), rel
        for (box, vec, _), (g_box, g_vec, _) in zip(faces, g_faces, strict=True):
            assert np.allclose(g_box, box, atol=0.011), (rel, box, g_box)   # to_record rounds to 0.01 px
            assert float(vec @ g_vec) >= 0.9999, (rel, float(vec @ g_vec))


@pytest.fixture(scope="module")
def local_reference(lfw_photos, tmp_path_factory, detector, embedder):
    index = tmp_path_factory.mktemp("local") / "index"
    with FaceIndex(settings_for(index), OpenMode.WRITE, detector=detector, embedder=embedder) as fi:
        summary = fi.ingest([lfw_photos], progress=False)
    assert summary.indexed > 200
    return faces_of(index, lfw_photos)


def _shard_keys(index: Path) -> int:
    store = FaceStore(index, readonly=True)
    try:
        with store.read() as txn:
            cursor = txn.cursor(db=store.db["meta"])
            return sum(1 for key, _ in cursor if key.startswith(SHARD_PREFIX.encode()))
    finally:
        store.close()


@pytest.mark.lfw
@pytest.mark.slow
def test_ray_gives_the_faces_of_the_single_machine_ingest(ray_address, lfw_photos, local_reference, tmp_path):
    index = tmp_path / "index"
    with FaceIndex(settings_for(index), OpenMode.WRITE) as fi:
        run = fi.ingest_ray([lfw_photos], progress=False)
    assert (run.shards, run.shard_size, run.pool.actors) == (4, 64, 1)  # choose_shard_size's row for 239 files
    # The workers' stage seconds include their reader threads' (read + hash, decode), as a local ingest's do.
    assert {"read", "decode", "detect", "embed", "merge"} <= set(run.summary.stages), run.summary.stages
    assert_same_faces(faces_of(index, lfw_photos), local_reference)
    assert consistency(index)["_faces"] == sum(len(f) for _, _, f in local_reference.values())
    assert not any((index / "staging").iterdir()) and _shard_keys(index) == 0
    with FaceIndex(settings_for(index), OpenMode.WRITE) as fi:  # again: nothing changed, nothing is sent
        again = fi.ingest_ray([lfw_photos], progress=False)
    assert (again.summary.unchanged, again.shards, again.summary.faces) == (len(local_reference), 0, 0)


@pytest.mark.lfw
@pytest.mark.slow
def test_kill9_mid_merge_then_rerun_merges_each_shard_once(ray_address, lfw_photos, local_reference, tmp_path):
    photos, index = tmp_path / "photos", tmp_path / "index"
    for rel in sorted(local_reference)[:KILLED_FILES]:
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lfw_photos / rel, photos / rel)
    child = Child(["ingest", "--engine", "ray", "--address", ray_address, "--shard-size", "16", "--index",
                   str(index), str(photos)], env={"FACEINDEX_FAULT": "kill@commit:4"})
    try:
        child.expect("fault injected: kill at commit #4")
        assert child.wait() == -signal.SIGKILL
    finally:
        child.kill()
    before = faces_of(index, photos)
    assert 0 < len(before) < KILLED_FILES, "the kill was not mid-merge"
    assert _shard_keys(index) >= 1
    with FaceIndex(settings_for(index), OpenMode.WRITE) as fi:
        run = fi.ingest_ray([photos], progress=False)
    assert run.resumed_shards >= 1   # at least the shard whose merge was killed
    # The scan after the resume counts what was merged before the kill and by the resume as unchanged.
    assert run.summary.files == KILLED_FILES and run.summary.unchanged == len(before) + run.resumed.files
    after = faces_of(index, photos)
    assert_same_faces(after, {rel: local_reference[rel] for rel in after})
    assert len(after) == KILLED_FILES
    # Merged once: the faces committed before the kill kept their ids; no face twice, store and FAISS agree.
    assert {rel: [f[2] for f in faces] for rel, (_, _, faces) in before.items()} == \
        {rel: [f[2] for f in after[rel][2]] for rel in before}
    consistency(index)
    assert not any((index / "staging").iterdir()) and _shard_keys(index) == 0


def test_hostile_files_are_recorded_as_the_local_path_records_them(ray_address, tmp_path, detector, embedder):
    corpus = build(tmp_path / "photos")
    local, ray_index = tmp_path / "local", tmp_path / "ray"
    with FaceIndex(settings_for(local), OpenMode.WRITE, detector=detector, embedder=embedder) as fi:
        want = fi.ingest([corpus.root], progress=False)
    with FaceIndex(settings_for(ray_index), OpenMode.WRITE) as fi:
        got = fi.ingest_ray([corpus.root], progress=False).summary
    as_root = os.geteuid() == 0
    check_outcomes(ray_index, corpus, as_root=as_root)
    assert_same_faces(faces_of(ray_index, corpus.root), faces_of(local, corpus.root))
    counts = ("files", "indexed", "no_face", "failed", "faces")
    assert {k: getattr(got, k) for k in counts} == {k: getattr(want, k) for k in counts}
    # A copy of a file in the batch before is read by the local path while that batch is still in the models (the
    # read-ahead): not yet a twin in the store, it is embedded again (same faces, counted as indexed). The writer
    # classifies at merge time, after the earlier shard is in: it reuses the faces and counts a duplicate.
    assert got.duplicates >= want.duplicates
    assert sorted(map(str, got.failures)) == sorted(map(str, want.failures))
