"""choose_index (table-driven) and VectorIndex: add/search/remove, padding, persistence, corruption, rebuild hints."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from indexer.errors import ConfigError, IndexFileError
from indexer.store.choose import (
    EXACT_MAX_VECTORS,
    NPROBE_RECALL,
    RECALL_MARGIN,
    TARGET_RECALL,
    IndexChoice,
    choose_index,
    index_kind,
    ivf_nlist,
    memory_needed,
    ranked_candidates,
)
from indexer.store.vectors import MAGIC, VectorIndex

DIM = 32                 # small vectors keep IVF training instant; the logic does not depend on the dimension
IVF_N = 5_000            # enough to train IVF lists at this size (>= 39 points per list)
IVF_EXACT_MAX = 1_000    # so that IVF_N picks IVF


def unit(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, seed: int = 1) -> np.ndarray:
    """Unit vectors near a 6-d subspace, like face embeddings' few dominant directions (PCA to DIM/4 keeps them)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)) @ rng.standard_normal((6, DIM)) + 0.05 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def calibrated_nprobe(nlist: int, target: float = TARGET_RECALL) -> int:
    return next(p for p, r in NPROBE_RECALL[nlist] if r >= target + RECALL_MARGIN)


# -- choose_index ------------------------------------------------------------------------------------------------
T = EXACT_MAX_VECTORS


@pytest.mark.parametrize("n, key, nlist", [
    (0, "Flat", 0),
    (1, "Flat", 0),
    (100, "Flat", 0),
    (T - 1, "Flat", 0),
    (T, None, None),                      # IVF from the threshold on; nlist ~ 4 sqrt(n) as a power of two
    (1_000_000, "PCA128,IVF4096,SQ8,RFlat", 4096),
    (10_000_000, "PCA128,IVF16384,SQ8,RFlat", 16384),
])
def test_choose_index_table(n: int, key: str | None, nlist: int | None) -> None:
    choice = choose_index(n)
    if key is None:
        assert index_kind(choice.key) == "PCA,IVF,SQ8,RFlat"
        assert choice.nlist & (choice.nlist - 1) == 0 and n >= 39 * choice.nlist
    else:
        assert (choice.key, choice.nlist) == (key, nlist)
    assert (choice.nprobe == 0) == (choice.refine == 0) == (choice.key == "Flat")
    assert f"{n:,} vector" in choice.reason and "\n" not in choice.reason
    assert choose_index(n) == choice  # pure: same question, same answer


@pytest.mark.parametrize("nlist", sorted(NPROBE_RECALL))
def test_choose_index_uses_the_measured_nprobe(nlist: int) -> None:
    n = next(n for n in range(EXACT_MAX_VECTORS, 10**8, 1000) if choose_index(n).nlist == nlist)
    choice = choose_index(n)
    assert choice.nprobe == calibrated_nprobe(nlist) and f"measured at nlist {nlist};" in choice.reason


@pytest.mark.parametrize("kwargs, n, key_kind, in_reason", [
    ({"target_recall": 0.9999}, 1_000_000, "Flat", "no measured IVF setting"),   # only exact reaches it
    ({"exact_max_vectors": 10}, 100, "Flat", "too few vectors"),                  # cannot train lists on 100
    ({"memory_budget_bytes": 10**9}, 1_000_000, "PCAR,IVF,PQx4fs,RLMDB", "over the budget"),  # float32: ~2 GB
    ({"exact_max_vectors": 50}, 100_000, "PCA,IVF,SQ8,RFlat", "exact search is too slow"),
])
def test_choose_index_branches(kwargs: dict, n: int, key_kind: str, in_reason: str) -> None:
    choice = choose_index(n, **kwargs)
    assert index_kind(choice.key) == key_kind
    assert in_reason in choice.reason


def test_choose_index_nothing_fits_budget() -> None:
    with pytest.raises(ConfigError):
        choose_index(1_000_000, memory_budget_bytes=1000)


def test_ranked_candidates_put_exact_behind_ivf_when_large() -> None:
    keys = [c.key for c in ranked_candidates(1_000_000)]
    assert keys == ["PCA128,IVF4096,SQ8,RFlat", "Flat"]


# -- VectorIndex -------------------------------------------------------------------------------------------------
def build_ivf(key_kind: str = "PCA,IVF,SQ8,RFlat") -> tuple[VectorIndex, np.ndarray]:
    x = clustered(IVF_N)
    # No budget: in RAM; else room for the 4-bit codes and their training only (float32 needs IVF_N * 192 bytes).
    compressed = memory_needed("PCAR8,IVF,PQ8x4fs,RLMDB", IVF_N, DIM, ivf_nlist(IVF_N))
    budget = None if key_kind.endswith("RFlat") else compressed
    index = VectorIndex.build(np.arange(IVF_N) + 100, x, exact_max_vectors=IVF_EXACT_MAX, memory_budget_bytes=budget)
    assert index_kind(index.choice.key) == key_kind
    return index, x


def test_flat_add_search_remove() -> None:
    index = VectorIndex.empty(DIM)
    x = unit(50)
    index.add(np.arange(50) + 1000, x)
    assert len(index) == 50 and sorted(index.ids().tolist()) == list(range(1000, 1050))
    sims, ids = index.search(x[:3], 5)
    assert sims.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (3, 5)
    assert ids[:, 0].tolist() == [1000, 1001, 1002]
    np.testing.assert_allclose(sims[:, 0], 1, atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)   # best first
    assert index.remove(np.array([1000, 1001, 99999])) == 2
    assert index.remove(np.array([1000])) == 0
    _, ids = index.search(x[:1], 50)
    assert 1000 not in ids and len(index) == 48
    assert index.info == {"type": "Flat", "vectors": 48, "reason": index.choice.reason, "nlist": 0, "nprobe": 0,
                          "refine": 0}


@pytest.mark.parametrize("size", [0, 3])
def test_padding_when_fewer_than_k(size: int) -> None:
    index = VectorIndex.empty(DIM)
    index.add(np.arange(size), unit(size))
    sims, ids = index.search(unit(2, seed=9), 5)
    assert np.all(ids[:, size:] == -1) and np.all(np.isneginf(sims[:, size:]))
    assert np.all(ids[:, :size] >= 0) and np.all(np.isfinite(sims[:, :size]))


@pytest.mark.parametrize("key_kind", ["PCA,IVF,SQ8,RFlat", "PCAR,IVF,PQx4fs,RLMDB"])
def test_ivf_build_search_remove(key_kind: str) -> None:
    index, x = build_ivf(key_kind)
    assert index.choice.nprobe >= 1 and len(index) == IVF_N
    _, ids = index.search(x[:20], 3)
    assert ids[:, 0].tolist() == list(range(100, 120))   # a stored vector finds itself (its own list is probed)
    assert index.remove(np.arange(100, 110)) == 10
    assert len(index) == IVF_N - 10 and not np.isin(np.arange(100, 110), index.ids()).any()
    _, ids = index.search(x[:10], 3)
    assert not np.isin(ids, np.arange(100, 110)).any()


def test_refined_ivf_scores_exactly_and_finds_most_true_neighbours() -> None:
    index, x = build_ivf()
    queries = x[::250]
    sims, ids = index.search(queries, 10)
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", queries, x[ids - 100]), atol=1e-5)  # exact cosines
    exact = VectorIndex.build(np.arange(IVF_N) + 100, x, exact_max_vectors=10 * IVF_N)
    assert exact.choice.key == "Flat"
    _, truth = exact.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= 0.8, recall


@pytest.mark.parametrize("kind", ["Flat", "PCA,IVF,SQ8,RFlat", "PCAR,IVF,PQx4fs,RLMDB", "SQ8,RLMDB"])
def test_save_load_roundtrip(tmp_path: Path, kind: str) -> None:
    if kind in ("Flat", "SQ8,RLMDB"):
        x = unit(40)
        index = VectorIndex.build(np.arange(40), x, memory_budget_bytes=None if kind == "Flat" else 40 * (DIM + 64))
    else:
        index, x = build_ivf(kind)
    assert index_kind(index.choice.key) == kind
    path = tmp_path / "vectors.fidx"
    index.save(path, {"model": "test:1234", "watermark": 42})
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.fidx"]   # no temp file left behind
    loaded, meta = VectorIndex.load(path, source=index._source)
    assert meta == {"model": "test:1234", "watermark": 42}
    assert loaded.choice == index.choice and loaded.info == index.info
    for a, b in zip(index.search(x[:10], 7), loaded.search(x[:10], 7), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.sort(loaded.ids()), np.sort(index.ids()))
    loaded.add(np.array([10**9]), unit(1, seed=5))   # still a working index
    assert len(loaded) == len(index) + 1


def corrupt_cases(data: bytes) -> dict[str, bytes]:
    header_end = len(MAGIC) + 8 + int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
    flipped_payload = bytearray(data)
    flipped_payload[(header_end + len(data)) // 2] ^= 0x01
    cases = {}
    # Flips across the JSON header: in meta, in numbers, in the digest; each must be caught, parseable or not.
    for at in range(len(MAGIC) + 8, header_end, max(1, (header_end - len(MAGIC) - 8) // 25)):
        flipped = bytearray(data)
        flipped[at] ^= 0x01
        cases[f"header flip at {at}"] = bytes(flipped)
    for at in range(len(MAGIC), len(MAGIC) + 8):
        flipped = bytearray(data)
        flipped[at] ^= 0x01
        cases[f"length flip at {at}"] = bytes(flipped)
    return cases | {
        "empty": b"", "in magic": data[:3], "in length": data[:len(MAGIC) + 4], "in header": data[:header_end - 10],
        "in payload": data[:len(data) - 100], "one byte short": data[:-1],
        "payload bit flip": bytes(flipped_payload),
        "bad magic": b"FIDXV9\n" + data[len(MAGIC):], "extra bytes": data + b"\0",
    }


def test_damaged_files_raise_index_file_error(tmp_path: Path) -> None:
    path = tmp_path / "vectors.fidx"
    VectorIndex.build(np.arange(30), unit(30)).save(path, {"model": "test:1234", "watermark": 42})
    data = path.read_bytes()
    for name, damaged in corrupt_cases(data).items():
        path.write_bytes(damaged)
        with pytest.raises(IndexFileError):
            VectorIndex.load(path)
            pytest.fail(f"{name}: loaded a damaged file")
    with pytest.raises(IndexFileError):
        VectorIndex.load(tmp_path / "missing.fidx")


def test_should_rebuild() -> None:
    flat = VectorIndex.build(np.arange(10), unit(10), exact_max_vectors=IVF_EXACT_MAX)
    assert not flat.should_rebuild(IVF_EXACT_MAX - 1)
    assert flat.should_rebuild(IVF_N)                  # grew past the exact threshold
    ivf, _ = build_ivf()
    assert not ivf.should_rebuild(IVF_N * 2)
    assert ivf.should_rebuild(IVF_EXACT_MAX // 2)      # shrank back below it
    assert ivf.should_rebuild(IVF_N * 64)              # lists would be 16x longer than intended


def test_rejects_bad_input() -> None:
    index = VectorIndex.empty(DIM)
    with pytest.raises(ValueError, match="L2-normalised"):
        index.add(np.arange(2), unit(2) * 2)
    with pytest.raises(ValueError, match=r"\[n, 32\]"):
        index.add(np.arange(2), unit(2, dim=8))
    with pytest.raises(ValueError, match="ids"):
        index.add(np.arange(3), unit(2))
    with pytest.raises(ValueError, match="k must be"):
        index.search(unit(1), 0)
    with pytest.raises(ValueError, match="VectorIndex.build"):
        VectorIndex.empty(DIM, IndexChoice("PCA8,IVF64,SQ8,RFlat", 64, 4, "test", 10))


def test_concurrent_add_and_search() -> None:
    index = VectorIndex.empty(DIM)
    x = unit(400, seed=3)
    errors: list[BaseException] = []

    def adder() -> None:
        for i in range(0, 400, 20):
            index.add(np.arange(i, i + 20), x[i:i + 20])

    def searcher() -> None:
        try:
            for _ in range(50):
                _, ids = index.search(x[:4], 5)
                assert ids.shape == (4, 5)
        except BaseException as err:  # noqa: BLE001 - reported on the test thread
            errors.append(err)

    threads = [threading.Thread(target=adder), threading.Thread(target=searcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(index) == 400
