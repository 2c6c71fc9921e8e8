"""Nearest neighbours for clustering: exact on small sets, an inverted file above, similarities always exact."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.cluster import neighbors
from indexer.cluster.neighbors import plan_search, search
from indexer.cluster.stable import match_ids


def people(n_people: int, per_person: int, dim: int = 512, spread: float = 0.6, seed: int = 0,
           rank: int = 64) -> np.ndarray:
    """Unit rows, ``per_person`` around each of ``n_people`` centres. Like face embeddings, most of the variance
    lies in few directions (``rank``), with a little in all the others."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T.astype(np.float32)
    n = n_people * per_person
    centres = rng.standard_normal((n_people, rank)).astype(np.float32)
    inner = np.repeat(centres, per_person, axis=0) + spread * rng.standard_normal((n, rank), dtype=np.float32)
    x = inner @ basis + 0.02 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n_base,n_queries,kind,nlist", [
    (100, 100, "exact", 0),
    (10_000, 10_000, "exact", 0),          # 1e8 pairs: at the limit (LFW dev-train, 9,525 faces, stays exact)
    (10_001, 10_001, "ivf", 256),          # 2 sqrt(10k) = 200 -> 256 lists
    (20_001, 20_001, "ivf", 256),          # 283 -> 256
    (100_000, 100_000, "ivf", 512),
    (1_000_000, 1_000_000, "ivf", 2048),
    (30_000_000, 30_000_000, "ivf", 4096),  # capped
    (5_000, 1_000_000, "exact", 0),        # too few rows to train lists on: exact whatever the queries
    (90_000, 1_000, "exact", 0),           # 9e7 pairs
])
def test_plan_search_table(n_base, n_queries, kind, nlist):
    plan = plan_search(n_base, n_queries, 512)
    assert (plan.kind, plan.nlist) == (kind, nlist), plan.reason
    assert plan.reason and (plan.dims == (512 if kind == "exact" else 128))
    assert plan.nprobe == (0 if kind == "exact" else neighbors.NPROBE)


def test_exact_search_leaves_each_row_out_of_its_own_answer():
    x = people(5, 4)
    x = np.vstack([x, x[:1]])                    # a duplicate of row 0 stays in row 0's answer
    sims, idx = search(x, None, 3)
    assert sims.shape == idx.shape == (len(x), 3)
    assert not np.any(idx == np.arange(len(x))[:, None])
    assert idx[0, 0] == len(x) - 1 and sims[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)
    assert search(x[:2], None, 5)[1].shape == (2, 1)    # capped at the rows there are


def test_the_inverted_file_finds_the_exact_neighbours_and_exact_similarities():
    x = people(800, 8, dim=256, spread=0.7)      # 6,400 rows: forced onto the inverted file below
    exact_sims, exact_idx = search(x, None, 10)
    plan = plan_search(len(x), len(x), x.shape[1], exact_max_pairs=0)
    assert plan.kind == "ivf" and plan.dims == 128
    sims, idx = search(x, None, 10, plan=plan)
    # What clustering needs are the close neighbours (its graph keeps cosine >= 0.55): most of them are found.
    close = exact_sims >= 0.5
    found_close = [len(set(e[m].tolist()) & set(i.tolist())) for e, i, m in zip(exact_idx, idx, close, strict=True)]
    assert sum(found_close) / close.sum() >= 0.9   # 0.96 when written (16 of 128 lists scanned)
    found = idx >= 0
    np.testing.assert_allclose(sims[found], np.einsum("ij,ij->i", np.repeat(x, 10, axis=0)[found.ravel()],
                                                      x[idx[found]]), atol=1e-5)
    # Each row's own person: its 7 others are its nearest rows (exact: 0.995, here 0.96 when written).
    assert np.mean(idx[:, :7] // 8 == np.arange(len(x))[:, None] // 8) >= 0.9


def test_sparse_id_matching_agrees_with_the_dense_one(monkeypatch):
    rng = np.random.default_rng(4)
    old = people(300, 1, seed=2)
    order = rng.permutation(300)[:250]
    new = old[order] + 0.05 * rng.standard_normal((250, 512), dtype=np.float32)   # 250 persons kept, moved a little
    new = np.vstack([new, people(20, 1, seed=9)])                                  # and 20 newcomers
    old_ids = np.arange(1000, 1300)
    dense, _ = match_ids(old, old_ids, new)
    monkeypatch.setattr("indexer.cluster.stable.DENSE_MAX_PAIRS", 0)
    sparse, log = match_ids(old, old_ids, new)
    assert np.array_equal(dense, sparse)
    assert np.array_equal(sparse[:250], old_ids[order]) and np.all(sparse[250:] >= 1300)
    assert any("no old cluster at cosine >= 0.50" in line for line in log)
