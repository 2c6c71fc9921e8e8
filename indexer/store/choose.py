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
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class IndexChoice:
    key: str         # "Flat", "PCA128,IVF4096,SQ8,RFlat" (re-ranked by the exact store) or "PCA128,IVF4096,SQ8"
    nlist: int       # inverted lists (0 for Flat)
    nprobe: int      # lists read per query (0 for Flat)
    reason: str      # one line for `status`
    refine: int = 0  # candidates per wanted result re-scored exactly (0: none)


def index_kind(key: str) -> str:
    """The family of a key, ignoring sizes: "Flat", "PCA,IVF,SQ8,RFlat", "PCA,IVF,SQ8"."""
    return ",".join(part.rstrip("0123456789") if part[:3] in ("PCA", "IVF") else part for part in key.split(","))


def pca_dim(dim: int) -> int:
    """Dimensions kept for the coarse search: a quarter (512 -> 128), measured to lose little recall at 1M."""
    return max(1, dim // 4)


def ivf_nlist(n_vectors: int) -> int:
    """About 4*sqrt(n) lists (faiss's guideline), as the nearest power of two, with >= 39 training points each."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n_vectors, 1))))
    # A power of two at or below n/39 keeps k-means meaningful on small n.
    trainable = 2 ** int(math.log2(max(n_vectors // MIN_POINTS_PER_LIST, 1)))
    return max(MIN_NLIST, min(nlist, trainable, MAX_NLIST))


def ivf_nprobe(nlist: int, target_recall: float) -> tuple[int, float, int] | None:
    """(nprobe, recall measured, nlist measured at) of the first calibration point >= target + margin, or None.

    An nlist without its own row takes the same fraction of lists as the nearest calibrated one (in log scale).
    """
    calibrated = min(NPROBE_RECALL, key=lambda c: (abs(math.log2(c / nlist)), -c))
    for nprobe, recall in NPROBE_RECALL[calibrated]:
        if recall >= min(target_recall + RECALL_MARGIN, 1.0):
            return max(1, min(math.ceil(nprobe * nlist / calibrated), nlist)), recall, calibrated
    return None


def _vectors(n: int) -> str:
    return f"{n:,} vector{'' if n == 1 else 's'}"


def ranked_candidates(n_vectors: int, dim: int = 512, *, exact_max_vectors: int = EXACT_MAX_VECTORS,
                      target_recall: float = TARGET_RECALL,
                      memory_budget_bytes: int | None = None) -> list[IndexChoice]:
    """Every index that can hold ``n_vectors`` within the budget, best first (may be empty)."""
    n = max(n_vectors, 0)
    p, nlist = pca_dim(dim), ivf_nlist(n)
    exact_bytes = n * (4 * dim + BYTES_PER_ID)
    codes_bytes = n * (p + BYTES_PER_ID) + 4 * (nlist * p + p * dim)   # 8-bit codes, centroids, projection
    fits_exact = memory_budget_bytes is None or exact_bytes <= memory_budget_bytes
    fits_refined = memory_budget_bytes is None or exact_bytes + codes_bytes <= memory_budget_bytes
    fits_codes = memory_budget_bytes is None or codes_bytes <= memory_budget_bytes
    trainable = n >= MIN_POINTS_PER_LIST * nlist     # k-means needs enough points per list
    tuned = ivf_nprobe(nlist, target_recall)
    ann = f"PCA{p},IVF{nlist},SQ8"
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
    if fits_exact and n >= exact_max_vectors:
        # Large but exact: slow, yet the only way to the target when no measured setting reaches it or there are
        # too few vectors to train the lists; otherwise it ranks behind the refined IVF.
        why = f"too few vectors to train IVF{nlist}" if not trainable else \
            f"no measured IVF setting reaches recall@10 {target_recall:g}" if tuned is None else "exact"
        out.append(IndexChoice("Flat", 0, 0, f"{_vectors(n)}: exact search (Flat), slow from "
                                             f"{exact_max_vectors:,} vectors but {why}"))
    if not fits_exact and fits_codes and trainable:
        # Over the memory budget as float32: keep only the 8-bit codes (a sixteenth of the space), without the
        # exact re-ranking, so recall is lower and not calibrated; nprobe as calibrated (else an eighth of the lists).
        nprobe = tuned[0] if tuned else nlist // 8
        out.append(IndexChoice(ann, nlist, nprobe,
                               f"{_vectors(n)}: {ann} without exact re-ranking because float32 vectors need "
                               f"{exact_bytes:,} bytes, over the budget of {memory_budget_bytes:,}"))
    return out


def choose_index(n_vectors: int, dim: int = 512, *, exact_max_vectors: int = EXACT_MAX_VECTORS,
                 target_recall: float = TARGET_RECALL, memory_budget_bytes: int | None = None) -> IndexChoice:
    """The best index for ``n_vectors`` (see ``ranked_candidates``); ConfigError when nothing fits the budget."""
    candidates = ranked_candidates(n_vectors, dim, exact_max_vectors=exact_max_vectors, target_recall=target_recall,
                                   memory_budget_bytes=memory_budget_bytes)
    if not candidates:
        raise ConfigError(f"{n_vectors:,} vectors of {dim} dimensions do not fit a memory budget of "
                          f"{memory_budget_bytes:,} bytes even as 8-bit codes; raise the budget")
    return candidates[0]
