"""Indexes past RAM through the real library: the running index (SyncedIndex) built from the LMDB store in chunks
under a tiny memory budget, re-ranked with vectors read from the store, kept in step (add, remove, snapshot); the
store's mapped pages dropped from RSS; and an ingest of the sample photos whose answers equal Flat's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.config import IndexSettings
from indexer.store.choose import index_kind, ivf_nlist, memory_needed
from indexer.store.compressed import MapTrimmer, StoreVectors, _mappings_of
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import FileRecord, NewFace
from indexer.store.sync import SyncedIndex
from indexer.store.vectors import VectorIndex
from tests.conftest import SAMPLES, cli, cli_json

N = 3_000              # enough to train PCAR128,IVF64,PQ64x4fs (>= 39 points a list)
EXACT_MAX = 1_000      # so that N is past exact search


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
    assert info["type"] == index.choice.key and "read from the store" in info["reason"]
    assert info["memory_budget_mb"] == pytest.approx(tiny_budget().memory_budget_mb, abs=0.1)
    # Face ids are 1..N (file i holds face i + 1). Scores are exact cosines, read back from LMDB.
    queries = x[::150]
    sims, ids = index.search(queries, 10)
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", queries, x[ids - 1]), atol=1e-5)
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
    # Between a commit and catch_up the index may still hold a removed face; re-ranking reads the store, which no
    # longer has its vector, so it cannot come back as a match.
    x = faces(N)
    put(store, x)
    synced = SyncedIndex(store, tiny_budget())
    remove(store, range(0, 10))
    _, ids = synced.index.search(x[:10], 5)          # no catch_up: the index still holds faces 1..10
    assert not np.isin(ids, np.arange(1, 11)).any()
    assert np.all(ids[:, 0] > 0)


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
