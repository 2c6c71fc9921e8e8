"""The index choice under a memory budget (issue 16, "Indexes past RAM"): a pure, reasoned function of (n, dim,
recall target, budget), table-tested; and the budget itself from ``index.memory_budget_mb`` and the machine."""

from __future__ import annotations

import pytest

from indexer.errors import ConfigError
from indexer.store.choose import (
    AUTO_BUDGET_SHARE,
    PACKED_ID_BYTES,
    PQ_NPROBE_RECALL,
    PQ_OVERHEAD_BYTES,
    RECALL_MARGIN,
    STORE_REFINE_FACTOR,
    TARGET_RECALL,
    choose_index,
    index_kind,
    memory_budget,
    memory_needed,
    ranked_candidates,
)
from indexer.store.sync import uses_packed

GiB, MiB = 2**30, 2**20
FLAT_BYTES = 4 * 512 + 64        # a float32 vector and its id entry


@pytest.mark.parametrize("n, budget, kind, nlist, in_reason", [
    (100, None, "Flat", 0, "fast enough"),                               # no budget: as before
    (100, 100 * FLAT_BYTES, "Flat", 0, "fast enough"),                    # exactly fits
    (100, 100 * FLAT_BYTES - 1, "SQ8,RLMDB", 0, "8-bit codes of every vector"),  # one byte short: codes
    (40_000, 64 * MiB, "SQ8,RLMDB", 0, "over the budget of 67,108,864"),
    (1_000_000, 4 * GiB, "PCA,IVF,SQ8,RFlat", 4096, "re-ranked exactly"),  # today's choice still fits
    (1_000_000, 1 * GiB, "PCAR,IVF,PQx4fs,RLMDB", 4096, "read from a packed file"),  # float32 alone: 2.1 GB
    (2_000_000, 4 * GiB, "PCAR,IVF,PQx4fs,RLMDB", 4096, "over the budget"),      # float32 fits, not with IVF
    (5_000_000, 1 * GiB, "PCAR,IVF,PQx4fs,RLMDB", 8192, "reading 1536 of 8192 lists"),  # its own measured row
    (100_000_000, 8 * GiB, "PCAR,IVF,PQx4fs,RLMDB", 32768, "same fraction of lists"),
])
def test_choice_under_a_budget(n: int, budget: int | None, kind: str, nlist: int, in_reason: str) -> None:
    choice = choose_index(n, memory_budget_bytes=budget)
    assert (index_kind(choice.key), choice.nlist) == (kind, nlist)
    assert in_reason in choice.reason and f"{n:,} vector" in choice.reason and "\n" not in choice.reason
    if budget is not None:
        assert memory_needed(choice.key, n, 512, choice.nlist) <= budget
    if choice.key.endswith(",RLMDB"):   # re-ranked from the store: candidates per result as the kind needs
        assert choice.refine == (STORE_REFINE_FACTOR if choice.nlist else 10)
    assert choose_index(n, memory_budget_bytes=budget) == choice   # pure: same question, same answer


@pytest.mark.parametrize("n, budget", [
    (100, 100),                        # not even 8-bit codes of 100 vectors
    (1_000, 1_000 * 512),              # too few to train inverted lists, 8-bit codes over the budget
    (100_000_000, 1 * GiB),            # 4-bit codes of 100M vectors alone are 4.8 GB
])
def test_nothing_fits_is_a_config_error_naming_the_setting(n: int, budget: int) -> None:
    assert ranked_candidates(n, memory_budget_bytes=budget) == []
    with pytest.raises(ConfigError, match="index.memory_budget_mb"):
        choose_index(n, memory_budget_bytes=budget)


def test_compressed_ranks_ahead_of_slow_exact_search() -> None:
    # 1M float32 vectors fit 2.3 GiB, but not with the in-RAM IVF beside them: 4-bit codes re-ranked from the store
    # meet the recall target in a few ms, exact search takes ~85 ms a query.
    kinds = [index_kind(c.key) for c in ranked_candidates(1_000_000, memory_budget_bytes=int(2.3 * GiB))]
    assert kinds == ["PCAR,IVF,PQx4fs,RLMDB", "Flat"]


def test_compressed_nprobe_is_the_first_measured_row_over_the_target() -> None:
    nprobe, recall = next((p, r) for p, r in PQ_NPROBE_RECALL[4096] if r >= TARGET_RECALL + RECALL_MARGIN)
    choice = choose_index(1_000_000, memory_budget_bytes=GiB)
    assert choice.nprobe == nprobe and f"recall@10 {recall:.3f} measured at nlist 4096;" in choice.reason
    # No measured setting reaches 0.9999, and float32 does not fit: nothing to offer.
    assert ranked_candidates(1_000_000, target_recall=0.9999, memory_budget_bytes=GiB) == []


@pytest.mark.parametrize("setting_mb, ram, budget, in_reason", [
    (0, 24 * GiB, 6 * GiB, "1/4 of this machine's 24,576 MiB"),
    (0, 8 * GiB, 2 * GiB, "index.memory_budget_mb = 0"),
    (1024, 24 * GiB, GiB, "index.memory_budget_mb = 1024"),
    (0.5, None, 512 * 1024, "index.memory_budget_mb = 0.5"),
    (0, None, None, "no budget"),
])
def test_memory_budget(setting_mb: float, ram: int | None, budget: int | None, in_reason: str) -> None:
    assert AUTO_BUDGET_SHARE == 4
    got, reason = memory_budget(setting_mb, ram)
    assert got == budget and in_reason in reason


def test_codes_past_ram_count_the_packed_files_ids() -> None:
    # Past the first PCA/k-means sample sizes, each further vector costs its 32 bytes of codes, the lists' overhead
    # and the packed re-rank file's int64 id held in RAM (its float16 rows stay on disk).
    key = "PCAR128,IVF8192,PQ64x4fs,RLMDB"
    per_vector = (memory_needed(key, 4_000_000, 512, 8192) - memory_needed(key, 2_000_000, 512, 8192)) / 2_000_000
    assert PACKED_ID_BYTES == 8 and per_vector == 32 + PQ_OVERHEAD_BYTES + PACKED_ID_BYTES


@pytest.mark.parametrize("n, budget, packed", [
    (5_000_000, 1 * GiB, True),        # inverted lists past RAM: the packed float16 file
    (40_000, 64 * MiB, False),         # SQ8 past RAM: the store (small: its pages stay cached; exact similarities)
    (1_000_000, 4 * GiB, False),       # in RAM
    (100, None, False),
])
def test_which_kinds_rerank_from_the_packed_file(n: int, budget: int | None, packed: bool) -> None:
    assert uses_packed(choose_index(n, memory_budget_bytes=budget)) is packed
