"""Which FAISS index to build for n vectors: a pure function of (n, dimension, recall target, memory budget).

``ranked_candidates`` lists every index that can hold the vectors, best first, each with a one-line reason;
``choose_index`` takes the first. Every branch says why. The constants below were measured by
``benchmarks/bench_query.py`` on the 2-core development machine (faiss 1.15, 512-d, one query at a time on one
thread, synthetic vectors drawn to match LFW face embeddings of this model); results in
benchmarks/results/bench_query.txt. Rerun it on other hardware and adjust.

Exact search (``Flat``) reads every vector per query, so its latency grows linearly with n: single-query p50 of
0.16 ms at 5,000 vectors, 1.2 ms at 20,000, 3.9 ms at 50,000, 5.8 ms at 70,000, 8.8 ms at 100,000, 85 ms at
1,000,000. 50,000 is the largest measured size within the 5 ms query budget (the same as the IVF target, so both
sides of the threshold meet it), hence ``EXACT_MAX_VECTORS``; under load from other work one run measured 6.4 ms
at 50,000, so it is a threshold with no margin to spare.

Above that, candidates come from a compressed inverted file and are re-ranked exactly (``PCA128,IVF4096,SQ8,RFlat``
at 1M): vectors projected on their top principal directions (dim/4 = 128, which hold 99.99% of the variance of this
model's embeddings: 99% lies in 75 directions), split into ~4*sqrt(n) lists, stored as 8-bit codes (128 bytes a
vector instead of 2,048), of which the ``nprobe`` lists nearest the query are scanned for ``k * REFINE_FACTOR``
candidates that are then re-scored against the full float32 vectors. Scanning 16x fewer bytes is what makes recall
0.95 affordable: at 1M, nprobe 512 gives recall@10 0.964 on held-out queries at 2.9 ms p50, built in 30-60 s.
Tried alongside on the same data and machine (one-off runs, under load from other work): ``IVF4096,Flat`` reaches
0.95 only at nprobe 384, reading ~190 MB a query (over 10 ms); ``HNSW32`` took 13 minutes to build on 2 cores,
reached 0.92 at efSearch 128, and supports no removal; PCA to 64 lost recall (0.953 where 128 gives 0.970). This
index keeps removal: the inverted lists and the exact store both remove by id.

Past the memory budget (``index.memory_budget_mb``; see ``memory_budget``) the float32 vectors stay on disk: LMDB
holds every one of them anyway. The index then keeps only compact codes in RAM and re-ranks its candidates with
float32 vectors read from the store (key suffix ``,RLMDB``): below the exact threshold ``SQ8`` (8-bit codes of
every vector, scanned exhaustively: a quarter of the float32 bytes), above it ``PCAR128,IVF<nlist>,PQ64x4fs``
(PCA to 128 dimensions and a random rotation, inverted lists, 64 sub-quantizers of 4 bits: 32 bytes a vector,
scanned with SIMD "fast-scan"). Measured by ``benchmarks/bench_scale.py`` (results/bench_scale.txt) and a one-off
sweep beside it at 1M synthetic face vectors, 200 queries, one query at a time on one thread: PCAR128 beat plain
PCA128 (recall@10 0.958 vs 0.923 at nprobe 512, 200 candidates: the rotation spreads PCA's unequal variances over
the sub-quantizers) and PQ32x4fs (16 bytes) topped out at 0.82. Reading a candidate from LMDB costs far more than
scanning codes (a page fault and a lookup each), hence 20 x k candidates and a wider probe rather than more of them.
The inverted-list kind re-ranks from a packed float16 copy of the vectors (store/packed.py: 1 KiB a face back to
back, where LMDB spends a 4 KiB page on each; 5M faces are a 5 GiB file that the page cache can keep, not a 19 GiB
store that it could not: bench_scale's 5M p50 was 14.1 ms reading LMDB).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from indexer.errors import ConfigError

# Largest measured size whose exact single-query p50 is within the 5 ms budget (bench "Exact search" table).
EXACT_MAX_VECTORS = 50_000
EXACT_MEASURED = "measured p50 3.9 ms per query at 50,000, 5.8 ms at 70,000"
TARGET_RECALL = 0.95
# Recall@10 measured on 200 queries has a standard error near 0.005: ask the calibration for a little more.
RECALL_MARGIN = 0.01
# Candidates re-scored exactly per result wanted: 10 x k lifted recall@10 by ~0.01 over 5 x k for ~0.1 ms.
REFINE_FACTOR = 10
# nlist -> ((nprobe, recall@10), ...) for PCA128,IVF<nlist>,SQ8 refined 10x, increasing nprobe, measured by the
# bench at a size where choose_index picks that nlist. The fraction of lists needed for a recall is not constant
# (0.95 takes 1/8 of the lists at 100k but 3/32 at 1M), so each nlist gets its own row; other nlists (10M: 16,384)
# take the fraction of the nearest row, an extrapolation the reason says.
NPROBE_RECALL: dict[int, tuple[tuple[int, float], ...]] = {
    1024: ((64, 0.881), (96, 0.927), (128, 0.950), (192, 0.970), (256, 0.987), (384, 0.998)),   # at 100,000
    2048: ((96, 0.855), (128, 0.895), (192, 0.941), (256, 0.964), (384, 0.983), (512, 0.992)),  # at 300,000
    4096: ((192, 0.883), (256, 0.910), (384, 0.949), (512, 0.969), (768, 0.985), (1024, 0.990)),  # at 1,000,000
}
# faiss warns below 39 training points per list: k-means centroids from fewer are noise.
MIN_POINTS_PER_LIST = 39
MIN_NLIST = 64           # fewer lists than this and an IVF reads so much of the data that Flat is as fast
MAX_NLIST = 65_536       # beyond this the coarse quantizer (a flat scan of the centroids) dominates each query
BYTES_PER_ID = 64        # int64 id, plus the id -> row map of the exact store (a hash map entry)

# -- past the memory budget: codes in RAM, re-ranked with float32 vectors read from LMDB -------------------------
STORE_RERANK = ",RLMDB"
# Candidates per wanted result read from LMDB and re-scored: 4-bit codes order candidates coarsely, so 20 x k
# (200 at k = 10), twice the in-RAM kind's. Each candidate is an LMDB read and, past RAM, a page fault: 40 x k
# bought +0.009 recall (0.972 vs 0.963 at nprobe 512, 1M) for twice the reads; a wider probe buys it for less.
STORE_REFINE_FACTOR = 20
PQ_M = 64                # sub-quantizers: 2 of the 128 PCA dimensions each, 4 bits (16 centroids) a sub-quantizer
# RAM per vector of PCAR128,IVF,PQ64x4fs besides its m/2 bytes of codes: the 8-byte id in the inverted lists and
# what the lists' growth costs; measured by bench_scale as the RSS growth of the build over n (bench_scale.txt).
PQ_OVERHEAD_BYTES = 16
# The packed re-rank file's sorted ids, held in RAM to find a candidate's row (int64; the float16 rows stay on disk,
# read with pread: page cache, not this process's memory).
PACKED_ID_BYTES = 8
# Training, transient: the PCA on PCA_TRAIN_POINTS float32 vectors, then k-means and the sub-quantizers on
# TRAIN_POINTS_PER_LIST x nlist projected (128-d) vectors. 32,768 points (64 per dimension) pin down the top 128
# principal directions, which is all the projection keeps.
PCA_TRAIN_POINTS = 32_768
TRAIN_POINTS_PER_LIST = 40
# nlist -> ((nprobe, recall@10), ...) for PCAR128,IVF<nlist>,PQ64x4fs re-ranked 20x from the store, measured at the
# size where choose_index picks that nlist (other nlists take the fraction of lists of the nearest row, as above).
# 1M: 200 stored vectors as queries, each left out of its own results (bench_query's generator; a first sweep on the
# same data measured 0.958 at 512: k-means on 2 threads is not bit-reproducible); bench_scale.txt re-measures it.
PQ_NPROBE_RECALL: dict[int, tuple[tuple[int, float], ...]] = {
    4096: ((256, 0.905), (384, 0.943), (512, 0.963), (768, 0.974), (1024, 0.980)),    # at 1,000,000
    # at 5,000,000, 250 held-out queries (bench_scale.txt: the run itself probed 1024, extrapolated from 4096's row,
    # and measured 0.955 on its other 250 queries)
    8192: ((512, 0.910), (768, 0.941), (1024, 0.952), (1536, 0.960), (2048, 0.964)),
}
# 0 = a quarter of physical memory: the index is derived data beside the models (~1.4 GB resident in the daemon),
# the LMDB page cache and the user's own programs; a quarter keeps the in-RAM refined index up to ~2.7M faces on
# 24 GB (~0.9M on 8 GB) and past that costs ~1 ms a query, not recall. A fixed number would fit no machine.
AUTO_BUDGET_SHARE = 4


@dataclass(frozen=True)
class IndexChoice:
    key: str         # "Flat", "PCA128,IVF4096,SQ8,RFlat" (re-ranked in RAM), "SQ8,RLMDB" or
                     # "PCAR128,IVF16384,PQ64x4fs,RLMDB" (re-ranked with vectors read from LMDB)
    nlist: int       # inverted lists (0 for Flat)
    nprobe: int      # lists read per query (0 for Flat)
    reason: str      # one line for `status`
    refine: int = 0  # candidates per wanted result re-scored exactly (0: none)


def index_kind(key: str) -> str:
    """The family of a key, ignoring sizes: "Flat", "PCA,IVF,SQ8,RFlat", "PCAR,IVF,PQx4fs,RLMDB"."""
    return ",".join(re.sub(r"^(PCAR?|IVF|PQ)\d+", r"\1", part) for part in key.split(","))


def pca_dim(dim: int) -> int:
    """Dimensions kept for the coarse search: a quarter (512 -> 128), measured to lose little recall at 1M."""
    return max(1, dim // 4)


def pq_m(dim: int) -> int:
    """Sub-quantizers of the PQ codes: PQ_M, or one per PCA dimension when fewer (small test vectors)."""
    return min(PQ_M, pca_dim(dim))


def ivf_nlist(n_vectors: int) -> int:
    """About 4*sqrt(n) lists (faiss's guideline), as the nearest power of two, with >= 39 training points each."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n_vectors, 1))))
    # A power of two at or below n/39 keeps k-means meaningful on small n.
    trainable = 2 ** int(math.log2(max(n_vectors // MIN_POINTS_PER_LIST, 1)))
    return max(MIN_NLIST, min(nlist, trainable, MAX_NLIST))


def ivf_nprobe(nlist: int, target_recall: float,
               table: dict[int, tuple[tuple[int, float], ...]] = NPROBE_RECALL) -> tuple[int, float, int] | None:
    """(nprobe, recall measured, nlist measured at) of the first calibration point >= target + margin, or None.

    An nlist without its own row in ``table`` takes the same fraction of lists as the nearest calibrated one (in log
    scale).
    """
    calibrated = min(table, key=lambda c: (abs(math.log2(c / nlist)), -c))
    for nprobe, recall in table[calibrated]:
        if recall >= min(target_recall + RECALL_MARGIN, 1.0):
            return max(1, min(math.ceil(nprobe * nlist / calibrated), nlist)), recall, calibrated
    return None


def memory_budget(setting_mb: float, total_ram_bytes: int | None) -> tuple[int | None, str]:
    """(budget in bytes or None for none, why) from ``index.memory_budget_mb`` and the machine's memory."""
    if setting_mb > 0:
        return int(setting_mb * 2**20), f"index.memory_budget_mb = {setting_mb:g}"
    if not total_ram_bytes:
        return None, "no budget: index.memory_budget_mb = 0 and this system does not tell its memory size"
    return total_ram_bytes // AUTO_BUDGET_SHARE, (f"1/{AUTO_BUDGET_SHARE} of this machine's "
                                                  f"{total_ram_bytes / 2**20:,.0f} MiB (index.memory_budget_mb = 0)")


def memory_needed(key: str, n: int, dim: int, nlist: int) -> int:
    """Bytes of RAM an index of this family needs for ``n`` vectors: what it holds, plus its training set."""
    p, n_train = pca_dim(dim), min(n, TRAIN_POINTS_PER_LIST * nlist)
    exact = n * (4 * dim + BYTES_PER_ID)
    sq8_coarse = n * (p + BYTES_PER_ID) + 4 * (nlist * p + p * dim) + 4 * n_train * dim
    return {
        "Flat": exact,
        "PCA,IVF,SQ8,RFlat": exact + sq8_coarse,
        "SQ8,RLMDB": n * (dim + BYTES_PER_ID),
        "PCAR,IVF,PQx4fs,RLMDB": n * (pq_m(dim) // 2 + PQ_OVERHEAD_BYTES + PACKED_ID_BYTES) + 4 * (nlist * p + p * dim)
        + 4 * (min(n, PCA_TRAIN_POINTS) * dim + n_train * p),
    }[index_kind(key)]


def _vectors(n: int) -> str:
    return f"{n:,} vector{'' if n == 1 else 's'}"


def _store_reranked(n: int, dim: int, nlist: int, exact_max_vectors: int, target_recall: float,
                    budget: int | None, over: str) -> list[IndexChoice]:
    """The kinds that keep only codes in RAM and re-rank from the store, best first, for ``over`` (why not RAM)."""
    out: list[IndexChoice] = []
    if n < exact_max_vectors and memory_needed("SQ8,RLMDB", n, dim, 0) <= (budget or 0):
        # Small enough to scan every code: 8-bit codes of all vectors, the best 10 x k re-scored from LMDB.
        out.append(IndexChoice("SQ8" + STORE_RERANK, 0, 0, f"{_vectors(n)}: 8-bit codes of every vector scanned "
                               f"({n * (dim + BYTES_PER_ID):,} bytes), {REFINE_FACTOR}x k candidates re-ranked with "
                               f"float32 vectors read from the store, because {over}", REFINE_FACTOR))
    tuned = ivf_nprobe(nlist, target_recall, PQ_NPROBE_RECALL)
    key = f"PCAR{pca_dim(dim)},IVF{nlist},PQ{pq_m(dim)}x4fs{STORE_RERANK}"
    if n >= MIN_POINTS_PER_LIST * nlist and tuned and memory_needed(key, n, dim, nlist) <= (budget or 0):
        # Large: 4-bit PQ codes in inverted lists; candidates re-ranked with float32 vectors read from LMDB.
        nprobe, recall, calibrated = tuned
        measured = f"measured at nlist {calibrated}" + ("" if calibrated == nlist else ", same fraction of lists")
        out.append(IndexChoice(key, nlist, nprobe, f"{_vectors(n)}: {key.removesuffix(STORE_RERANK)} "
                               f"({memory_needed(key, n, dim, nlist):,} bytes with training) reading {nprobe} of "
                               f"{nlist} lists, {STORE_REFINE_FACTOR}x k candidates re-ranked with float16 copies of "
                               f"the vectors read from a packed file (store/packed.py; the store's float32 where "
                               f"that lags) (recall@10 {recall:.3f} {measured}; target {target_recall:g}), "
                               f"because {over}", STORE_REFINE_FACTOR))
    return out


def ranked_candidates(n_vectors: int, dim: int = 512, *, exact_max_vectors: int = EXACT_MAX_VECTORS,
                      target_recall: float = TARGET_RECALL,
                      memory_budget_bytes: int | None = None) -> list[IndexChoice]:
    """Every index that can hold ``n_vectors`` within the budget, best first (may be empty)."""
    n = max(n_vectors, 0)
    p, nlist = pca_dim(dim), ivf_nlist(n)
    ann = f"PCA{p},IVF{nlist},SQ8"
    need_exact, need_refined = (memory_needed(k, n, dim, nlist) for k in ("Flat", f"{ann},RFlat"))
    fits_exact = memory_budget_bytes is None or need_exact <= memory_budget_bytes
    fits_refined = memory_budget_bytes is None or need_refined <= memory_budget_bytes
    trainable = n >= MIN_POINTS_PER_LIST * nlist     # k-means needs enough points per list
    tuned = ivf_nprobe(nlist, target_recall)
    out: list[IndexChoice] = []

    if fits_exact and n < exact_max_vectors:
        # Small: exact search is fast enough, perfect, and needs no training.
        out.append(IndexChoice("Flat", 0, 0, f"{_vectors(n)}: exact search (Flat) is fast enough below "
                                             f"{exact_max_vectors:,} vectors ({EXACT_MEASURED})"))
    if fits_refined and trainable and tuned is not None:
        # Large: scan 8-bit codes of the nprobe nearest lists, then re-rank the candidates exactly.
        nprobe, recall, calibrated = tuned
        measured = f"measured at nlist {calibrated}" if calibrated == nlist else \
            f"measured at nlist {calibrated}, same fraction of lists"
        out.append(IndexChoice(f"{ann},RFlat", nlist, nprobe,
                               f"{_vectors(n)}: {ann} reading {nprobe} of {nlist} lists, {REFINE_FACTOR}x k "
                               f"candidates re-ranked exactly (recall@10 {recall:.3f} {measured}; target "
                               f"{target_recall:g}); exact search is too slow from {exact_max_vectors:,} vectors",
                               REFINE_FACTOR))
    if not fits_exact or (n >= exact_max_vectors and not fits_refined):
        # Over the budget in RAM: codes only, re-ranked from LMDB (which holds every vector anyway). Ahead of a slow
        # exact search: these meet the recall target at a few ms, Flat needs ~85 ms a query at 1M.
        held = need_exact if not fits_exact else need_refined
        out += _store_reranked(n, dim, nlist, exact_max_vectors, target_recall, memory_budget_bytes,
                               f"keeping float32 vectors in RAM needs {held:,} bytes, over the budget of "
                               f"{memory_budget_bytes:,}")
    if fits_exact and n >= exact_max_vectors:
        # Large but exact: slow, yet the only way to the target when no measured setting reaches it or there are
        # too few vectors to train the lists; otherwise it ranks behind the IVF kinds.
        why = f"too few vectors to train IVF{nlist}" if not trainable else \
            f"no measured IVF setting reaches recall@10 {target_recall:g}" if tuned is None else "exact"
        out.append(IndexChoice("Flat", 0, 0, f"{_vectors(n)}: exact search (Flat), slow from "
                                             f"{exact_max_vectors:,} vectors but {why}"))
    return out


def choose_index(n_vectors: int, dim: int = 512, *, exact_max_vectors: int = EXACT_MAX_VECTORS,
                 target_recall: float = TARGET_RECALL, memory_budget_bytes: int | None = None) -> IndexChoice:
    """The best index for ``n_vectors`` (see ``ranked_candidates``); ConfigError when nothing fits the budget."""
    candidates = ranked_candidates(n_vectors, dim, exact_max_vectors=exact_max_vectors, target_recall=target_recall,
                                   memory_budget_bytes=memory_budget_bytes)
    if not candidates:
        raise ConfigError(f"{n_vectors:,} vectors of {dim} dimensions do not fit a memory budget of "
                          f"{memory_budget_bytes:,} bytes even as compressed codes; raise index.memory_budget_mb")
    return candidates[0]
