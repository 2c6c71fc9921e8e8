"""Indexes past RAM through the real library: the running index (SyncedIndex) built from the LMDB store in chunks
under a tiny memory budget, re-ranked with vectors read from the store, kept in step (add, remove, snapshot); the
store's mapped pages dropped from RSS; and an ingest of the sample photos whose answers equal Flat's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.config import IndexSettings
from indexer.errors import IndexFileError
from indexer.fsutil import leftover_temp_files
from indexer.store.choose import index_kind, ivf_nlist, memory_needed
from indexer.store.compressed import MapTrimmer, StoreVectors, _mappings_of
from indexer.store.lmdb_store import FaceStore
from indexer.store.packed import HEADER_BYTES, PackedVectors, PackedWriter
from indexer.store.records import FileRecord, NewFace
from indexer.store.sync import SyncedIndex
from indexer.store.vectors import VectorIndex
from tests.conftest import SAMPLES, cli, cli_json

N = 3_000              # enough to train PCAR128,IVF64,PQ64x4fs (>= 39 points a list)
EXACT_MAX = 1_000      # so that N is past exact search
# A cosine with a float16 copy of a unit vector: each component off by at most 2^-11 of itself, so |error| <=
# 2^-11 * sum |q_i v_i| <= 2^-11 (Cauchy-Schwarz); measured ~1e-5.
F16_ATOL = 2**-11


def faces(n: int, seed: int = 7) -> np.ndarray:
    """Unit 512-d vectors near a 16-d subspace (face embeddings' variance lies in few directions: PCA to 128 keeps
    what decides their neighbours), so that recall measures the index, not noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 16)) @ np.random.default_rng(0).standard_normal((16, 512))
    x += 0.05 * rng.standard_normal((n, 512))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def put(store: FaceStore, vectors: np.ndarray, first: int = 0) -> None:
    def fill(txn) -> None:
        for i, v in enumerate(vectors, start=first):
            face = NewFace(box=[0, 0, 1, 1], prob=1.0, landmarks=[[0, 0]] * 5, vector=v, thumbnail=b"")
            store.put_file(txn, FileRecord(f"/p/{i}.jpg", 1, 1, f"{i:064x}", "indexed"), [face])
    store.transact(fill)


def remove(store: FaceStore, files: range) -> None:
    store.transact(lambda txn: [store.remove_file(txn, f"/p/{i}.jpg") for i in files])


@pytest.fixture
def store(tmp_path: Path):
    s = FaceStore(tmp_path / "index")
    yield s
    s.close()


def tiny_budget() -> IndexSettings:
    budget = memory_needed("PCAR128,IVF,PQ64x4fs,RLMDB", N + 200, 512, ivf_nlist(N + 200))
    return IndexSettings(exact_max_vectors=EXACT_MAX, memory_budget_mb=budget / 2**20)


def recall(index: VectorIndex, queries: np.ndarray, truth: np.ndarray) -> float:
    _, ids = index.search(queries, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)]))


def test_synced_index_past_ram_streams_reranks_and_stays_in_step(store: FaceStore) -> None:
    x = faces(N)
    put(store, x)
    synced = SyncedIndex(store, tiny_budget())
    index = synced.index
    assert index_kind(index.choice.key) == "PCAR,IVF,PQx4fs,RLMDB" and len(index) == N
    info = synced.info()
    assert info["type"] == index.choice.key and "read from a packed file" in info["reason"]
    assert info["memory_budget_mb"] == pytest.approx(tiny_budget().memory_budget_mb, abs=0.1)
    # The rebuild wrote the packed re-rank file in its own pass over the store.
    assert info["rerank_file"] == {"path": str(synced.packed_path), "vectors": N, "seq": N, "changed_since": 0}
    # Face ids are 1..N (file i holds face i + 1). Scores are cosines with float16 copies of the vectors.
    queries = x[::150]
    sims, ids = index.search(queries, 10)
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", queries, x[ids - 1]), atol=F16_ATOL)
    flat = VectorIndex.build(np.arange(1, N + 1), x)
    assert flat.choice.key == "Flat"
    _, truth = flat.search(queries, 10)
    assert recall(index, queries, truth) >= 0.8   # most true neighbours (8 of 64 lists read; cf. test_vectors)

    # Add and remove through the store's change log; then a snapshot round trip.
    put(store, faces(100, seed=8), first=N)
    remove(store, range(0, 50))
    assert synced.catch_up() == 150 and len(synced.index) == N + 50
    _, ids = synced.index.search(x[:50], 5)
    assert not np.isin(ids, np.arange(1, 51)).any()
    assert synced.save(force=True)
    reopened = SyncedIndex(store, tiny_budget())
    assert reopened.index.choice == synced.index.choice and len(reopened.index) == N + 50
    for a, b in zip(synced.index.search(queries, 10), reopened.index.search(queries, 10), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_face_gone_from_the_store_is_never_a_result(store: FaceStore) -> None:
    # Between a commit and catch_up the index may still hold a removed face. Re-ranked from the store, which no
    # longer has its vector, it cannot come back as a match; re-ranked from the packed file, it cannot once the
    # change is known (catch_up marks it before the index lets it go; every library search catches up first).
    x = faces(N)
    put(store, x)
    synced = SyncedIndex(store, tiny_budget())
    remove(store, range(0, 10))
    synced.packed.mark_changed(range(1, 11))         # as catch_up's replay does; the index still holds faces 1..10
    _, ids = synced.index.search(x[:10], 5)
    assert not np.isin(ids, np.arange(1, 11)).any()
    assert np.all(ids[:, 0] > 0)
    synced.index.attach(StoreVectors(store))         # the store alone: the same, with no marks needed
    _, ids = synced.index.search(x[:10], 5)
    assert not np.isin(ids, np.arange(1, 11)).any() and np.all(ids[:, 0] > 0)


def test_build_streams_in_chunks_of_the_store(store: FaceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.store.compressed as compressed

    x = faces(N)
    put(store, x)
    monkeypatch.setattr(compressed, "CHUNK_VECTORS", 512)
    seen: list[int] = []
    chunks = StoreVectors.chunks

    def spy(self, size: int = 512):
        for ids, vectors in chunks(self, 512):
            seen.append(len(ids))
            yield ids, vectors
    monkeypatch.setattr(StoreVectors, "chunks", spy)
    synced = SyncedIndex(store, tiny_budget())
    assert max(seen) == 512 and sum(seen) == N and len(synced.index) == N
    assert set(synced.index.ids().tolist()) == set(range(1, N + 1))


def mapped_rss(path: str) -> int:
    """kB of ``path``'s mappings resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = line.rstrip("\n").endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only: /proc/self/smaps")
def test_the_stores_pages_leave_this_process_after_a_trim(store: FaceStore) -> None:
    put(store, faces(N))
    trimmer = MapTrimmer(store)
    with store.read() as txn:
        assert _mappings_of(trimmer.path)
        for _ in StoreVectors(store, txn).chunks(N):   # one chunk, under TRIM_EVERY_BYTES: nothing trimmed yet
            pass
        before = mapped_rss(trimmer.path)
        assert before >= N * 4       # 4 KiB a vector (one overflow page each)
        assert trimmer.trim() > 0
        after = mapped_rss(trimmer.path)
    assert after < before / 10, (before, after)


@pytest.mark.slow
def test_ingest_under_a_tiny_budget_answers_as_flat(sample_index: Path, tmp_path: Path) -> None:
    # 16 faces: Flat needs 33,792 bytes, 8-bit codes 9,216; a budget of 16 KiB takes the compressed path.
    config = tmp_path / "config.toml"
    config.write_text("[index]\nmemory_budget_mb = 0.015625\n")
    index = tmp_path / "index"
    cli("ingest", "--index", str(index), "--config", str(config), str(SAMPLES))
    status = cli_json("status", "--index", str(index), "--config", str(config))
    assert status["index"]["type"] == "SQ8,RLMDB" and status["index"]["vectors"] == 16
    assert "over the budget of 16,384" in status["index"]["reason"] and status["index"]["memory_budget_mb"] == 0.016
    text = cli("status", "--index", str(index), "--config", str(config)).stdout
    assert "vectors    SQ8,RLMDB, 16 vectors" in text and "index budget 0.016 MiB" in text
    flat_status = cli_json("status", "--index", str(sample_index))
    assert flat_status["index"]["type"] == "Flat"
    photo = str(SAMPLES / "group" / "kit_with_rose.jpg")
    ours = cli_json("query", "--index", str(index), "--config", str(config), "-k", "10", photo)
    flat = cli_json("query", "--index", str(sample_index), "-k", "10", photo)
    assert [[(m["path"], m["box"], m["similarity"]) for m in face["matches"]] for face in ours] == \
        [[(m["path"], m["box"], m["similarity"]) for m in face["matches"]] for face in flat]


# -- the packed re-rank file (store/packed.py) ------------------------------------------------------------------
def replace(store: FaceStore, face_ids: range, vectors: np.ndarray) -> None:
    def fill(txn) -> None:
        for face_id, v in zip(face_ids, vectors, strict=True):
            store.replace_face(txn, face_id, NewFace(box=[0, 0, 1, 1], prob=1.0, landmarks=[[0, 0]] * 5, vector=v,
                                                     thumbnail=b""))
    store.transact(fill)


def store_vectors(store: FaceStore) -> dict[int, np.ndarray]:
    with store.read() as txn:
        ids, vectors = store.all_vectors(txn)
    return dict(zip(ids.tolist(), vectors, strict=True))


def assert_scores_are_the_stores(index: VectorIndex, store: FaceStore, queries: np.ndarray) -> None:
    """Every result's score is its cosine with the store's current vector (within float16 rounding)."""
    sims, ids = index.search(queries, 10)
    current = store_vectors(store)
    assert (ids > 0).all()
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", queries, np.stack([[current[i] for i in row]
                                                                               for row in ids.tolist()])),
                               atol=F16_ATOL)


def test_packed_rerank_answers_as_the_float32_rerank(store: FaceStore) -> None:
    x = faces(N)
    put(store, x)
    synced = SyncedIndex(store, tiny_budget())
    assert isinstance(synced.index._source, PackedVectors) and not _mappings_of(str(synced.packed_path))  # pread
    queries = faces(100, seed=11)
    packed_sims, packed_ids = synced.index.search(queries, 10)
    synced.index.attach(StoreVectors(store))
    sims, ids = synced.index.search(queries, 10)
    # The same candidates re-scored: the same answers but for the order of near-ties (float16 rounding may swap two
    # faces whose cosines differ by less than it). Rank by rank, the exact cosine of the face found is the float32
    # re-rank's within that rounding; and almost every position is the same face.
    exact = np.einsum("qd,qkd->qk", queries, x[packed_ids - 1])
    np.testing.assert_allclose(exact, sims, atol=F16_ATOL)
    np.testing.assert_allclose(packed_sims, exact, atol=F16_ATOL)
    assert (packed_ids == ids).mean() >= 0.99
    assert 0 < np.abs(packed_sims - exact).max() < 1e-4    # float16 copies indeed, and close ones


def test_a_stale_packed_file_is_detected_never_used_and_rewritten(store: FaceStore,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    x = faces(N)
    put(store, x)
    synced = SyncedIndex(store, tiny_budget())
    assert synced.save(force=True)
    old = synced.packed_path.read_bytes()              # reflects seq N
    # Faces 1..40 get other vectors (ingest --rebuild logs 'u'); the next snapshot rewrites the file (merged).
    replace(store, range(1, 41), x[2000:2040])
    synced.catch_up()
    assert synced.packed.changed == set(range(1, 41))
    assert_scores_are_the_stores(synced.index, store, x[2000:2040])   # changed faces: read from the store
    assert synced.save(force=True) and synced.packed.seq == synced.seq == N + 40 and not synced.packed.changed
    assert_scores_are_the_stores(synced.index, store, x[2000:2040])
    # The old file back in place: older than the snapshot, it cannot say which faces changed since (the log is
    # truncated): a reader must not use it. Used, faces 1..40 would score with their old vectors.
    synced.packed_path.write_bytes(old)
    monkeypatch.setattr(store, "readonly", True)       # a reader process (one environment per process in LMDB)
    reader = SyncedIndex(store, tiny_budget())
    assert reader.packed is None and isinstance(reader.index._source, StoreVectors)
    assert_scores_are_the_stores(reader.index, store, x[2000:2040])
    assert not reader.save_packed()                    # a reader never writes it
    # The writer's next snapshot writes it whole from the store; then it serves again.
    monkeypatch.setattr(store, "readonly", False)
    (store.index_dir / ".vectors.f16.killed.tmp").write_bytes(b"\0" * 4096)   # a killed writer's temp file
    writer = SyncedIndex(store, tiny_budget())
    assert writer.packed is None and writer.save(force=True) is False   # nothing new to snapshot, file rewritten
    assert writer.packed is not None and writer.packed.seq == N + 40
    assert not leftover_temp_files(writer.packed_path)
    assert_scores_are_the_stores(writer.index, store, x[2000:2040])
    # A reader opened after changes newer than the file: it marks them from the log and reads them from the store.
    replace(store, range(41, 61), x[2100:2120])
    monkeypatch.setattr(store, "readonly", True)
    reader = SyncedIndex(store, tiny_budget())
    assert reader.packed is not None and reader.packed.changed == set(range(41, 61))
    assert_scores_are_the_stores(reader.index, store, x[2100:2120])


def test_a_damaged_packed_file_costs_speed_never_results(store: FaceStore, caplog) -> None:
    x = faces(N)
    put(store, x)
    synced = SyncedIndex(store, tiny_budget())
    assert synced.save(force=True)
    path, data = synced.packed_path, synced.packed_path.read_bytes()
    for damaged in (data[:-8], data[:20] + b"X" + data[21:], data[:-1] + bytes([data[-1] ^ 1])):  # short, header, ids
        path.write_bytes(damaged)
        reopened = SyncedIndex(store, tiny_budget())
        assert reopened.packed is None and "re-rank file unusable" in caplog.text
        assert_scores_are_the_stores(reopened.index, store, x[::300])
        caplog.clear()
    # Garbage in the rows of faces 1..3 (not hashed, for speed): their norms give them away; the store answers.
    path.write_bytes(data[:HEADER_BYTES] + b"\x7b" * 3 * 1024 + data[HEADER_BYTES + 3 * 1024:])
    reopened = SyncedIndex(store, tiny_budget())
    assert reopened.packed is not None
    vectors, found = reopened.packed.fetch(np.array([1, 2, 3, 4]))
    assert found.all()
    np.testing.assert_allclose(vectors[:3], x[:3], atol=1e-7)     # float32, from the store
    np.testing.assert_allclose(vectors[3], x[3], atol=1e-3)       # float16, from the file


def test_merged_rewrite_equals_a_whole_write(store: FaceStore, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.store.packed as packed

    monkeypatch.setattr(packed, "CHUNK_VECTORS", 64)   # many chunk boundaries, changes on either side of them
    x = faces(N)
    put(store, x)
    synced = SyncedIndex(store, tiny_budget())
    replace(store, range(100, 400, 7), x[-43:])
    remove(store, range(500, 700))
    put(store, faces(300, seed=9), first=N)
    synced.catch_up()
    assert synced.save(force=True)            # merged: the old file's rows, changed faces from the store
    merged = PackedVectors.open(synced.packed_path, 512)
    with store.read() as txn:
        assert packed.write_all(tmp_path / "whole.f16", StoreVectors(store, txn), 512, 0, None)
    whole = PackedVectors.open(tmp_path / "whole.f16", 512)
    np.testing.assert_array_equal(merged.ids, whole.ids)
    assert len(merged) == N + 300 - 200
    np.testing.assert_array_equal(merged.read_rows(np.arange(len(merged))), whole.read_rows(np.arange(len(whole))))


WRITER = """
import sys
import numpy as np
from indexer.store.packed import PackedWriter
with PackedWriter(sys.argv[1], 512, 7, "m") as w:
    for start in range(0, 4096, 1024):
        w.add(np.arange(start, start + 1024), np.full((1024, 512), 2 ** -4.5, np.float32))
        w._fh.flush()
    print("written", flush=True)
    sys.stdin.readline()          # killed here: every row written, the header not yet
"""


def test_a_killed_write_leaves_no_usable_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "vectors.f16"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline() == "written\n"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdin.close()
        proc.stdout.close()
    assert not path.exists() and PackedVectors.open(path, 512) is None
    (leftover,) = leftover_temp_files(path)          # the whole payload, under a temp name only
    assert leftover.stat().st_size >= 4096 * 1024
    with pytest.raises(IndexFileError, match="bad magic"):
        PackedVectors.open(leftover, 512)


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    path = tmp_path / "vectors.f16"
    with PackedWriter(path, 512, 1, "m") as w:
        w.add(np.arange(3), faces(3))
    before = path.read_bytes()
    with PackedWriter(path, 512, 2, "m") as w:
        w.add(np.arange(3), faces(3))
        monkeypatch.setattr(w, "_fh", _FullDisk(w._fh))
        w.add(np.arange(3, 6), faces(3))
    assert w.failed and "could not write" in caplog.text
    assert path.read_bytes() == before and not leftover_temp_files(path)
    assert PackedVectors.open(path, 512).seq == 1


class _FullDisk:
    def __init__(self, fh) -> None:
        self.fh = fh

    def write(self, data) -> int:
        raise OSError(28, "No space left on device")

    def __getattr__(self, name: str):
        return getattr(self.fh, name)
