"""Query latency and recall of the vector index at scale, on synthetic vectors shaped like real face embeddings.

Run from the checkout: ``.venv/bin/python -m benchmarks.bench_query [--n 1000000] [--queries 200] [--json]``.

Why synthetic, and how: a million real faces are not at hand, and the stand-ins decide the answer. Uniform random
unit vectors have no neighbourhood structure (every point is about equally far from all others) and make IVF look
far worse than on faces; tight toy clusters make it look far better. So the generator is fitted to LFW embeddings of
this model: identity centres are drawn from a Gaussian with the covariance of the real identity centroids (corrected
for the noise of averaging few photos), faces around each centre from a Gaussian with the covariance of the real
within-identity residuals (people with >= 2 photos), and each row is L2-normalised. Photos per identity are
geometric with mean ``--photos-per-id``. The run prints the real and synthetic figures side by side.

Then: exact (Flat) single-query latency against n (justifies ``EXACT_MAX_VECTORS`` in indexer/store/choose.py);
recall@10 and latency against nprobe for the index ``VectorIndex.build`` picks at 100k and 300k (prefixes of the
same vectors) and at ``--n`` (justifies ``NPROBE_RECALL`` in choose.py, one row per list count); and the chosen
index at ``--n``: build time, recall@10 and p50/p99 latency on a second, held-out query set. Queries are stored
vectors searched one at a time at k=10 through ``VectorIndex.search``; each query's own id is dropped from its
results and from the ground truth (exact inner product, all queries in one batch).
Results go to benchmarks/results/bench_query.{txt,json} (``--out ''`` to skip). About 3 minutes on 2 cores at 1M.

``--smoke`` checks that the script works, in seconds: the face model fitted to ``SMOKE_PHOTOS`` LFW photos (not all
of LFW), ``EXACT_MAX_VECTORS + SMOKE_N_OVER_EXACT`` vectors (60,000: just above the exact threshold, so an IVF
index is built and its nprobe swept), ``SMOKE_QUERIES`` queries, one thread; nothing is written unless ``--out``
is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # `python benchmarks/bench_x.py` from any folder: put the repo root first, so `benchmarks` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss
import numpy as np

REPO = Path(__file__).resolve().parent.parent
K = 10
THREADS = 2                      # the development machine's cores; faiss would otherwise guess
LATENCY_TARGET_MS = 5.0          # p50 per single query: the goal for IVF, and the budget that ends exact search
EXACT_SIZES = (5_000, 10_000, 20_000, 30_000, 40_000, 50_000, 70_000, 100_000, 200_000, 500_000, 1_000_000)
NPROBES = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# Sizes where choose_index picks other list counts (1,024 and 2,048) than at 1M (4,096), for their own nprobe rows.
CALIBRATION_SIZES = (100_000, 300_000)
EXACT_TIME_PER_SIZE_S = 2.0      # enough single queries for a stable median without minutes at 1M
FULL_N, FULL_QUERIES = 1_000_000, 200
SMOKE_N_OVER_EXACT = 10_000      # --smoke: EXACT_MAX_VECTORS + this, the smallest size that still takes the IVF path
SMOKE_QUERIES = 20
# --smoke photos for the face model: 20 people x 4 photos (the within-person spread needs repeats) + 40 strangers.
SMOKE_PHOTOS = {"people": 20, "per_person": 4, "others": 40}


@dataclass
class FaceModel:
    """Gaussian model of face embeddings: identity centres, and faces around them."""
    mean: np.ndarray             # [d] mean identity centre
    between: np.ndarray          # [d, d] factor L with L @ L.T = covariance of identity centres
    within: np.ndarray           # [d, d] factor with factor @ factor.T = covariance of faces around their centre


def _factor(cov: np.ndarray) -> np.ndarray:
    """A square-root factor of a covariance; negative eigenvalues (from the noise correction) are clipped to 0."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    return vectors * np.sqrt(np.clip(values, 0, None))


def fit_face_model(vectors: np.ndarray, people: np.ndarray) -> FaceModel:
    _, person, counts = np.unique(people, return_inverse=True, return_counts=True)
    keep = counts[person] >= 2
    x, person = vectors[keep].astype(np.float64), person[keep]
    _, person = np.unique(person, return_inverse=True)
    m = np.bincount(person).astype(np.float64)
    centroids = np.zeros((len(m), x.shape[1]))
    np.add.at(centroids, person, x)
    centroids /= m[:, None]
    # Residuals around a centroid of m photos are shrunk by (m-1)/m: undo it for the within-identity spread.
    residuals = (x - centroids[person]) * np.sqrt(m / (m - 1))[person, None]
    within = residuals.T @ residuals / len(x)
    # A centroid of m photos carries within/m of photo noise on top of the spread of true identity centres.
    between = np.cov(centroids.T) - np.mean(1 / m) * within
    return FaceModel(centroids.mean(axis=0), _factor(between), _factor(within))


def sample_faces(model: FaceModel, n: int, photos_per_id: float, rng: np.random.Generator,
                 chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors [n, d] float32 and their identity labels."""
    counts = rng.geometric(1 / photos_per_id, size=int(n / photos_per_id * 1.2) + 10)
    labels = np.repeat(np.arange(len(counts)), counts)[:n]
    n_ids = int(labels[-1]) + 1 if n else 0
    d = len(model.mean)
    centres = (model.mean + rng.standard_normal((n_ids, d)) @ model.between.T).astype(np.float32)
    out = np.empty((n, d), np.float32)
    within = model.within.T.astype(np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = centres[labels[start:stop]] + rng.standard_normal((stop - start, d), dtype=np.float32) @ within
        out[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out, labels


def face_figures(vectors: np.ndarray, labels: np.ndarray, rng: np.random.Generator, keep: int) -> dict[str, float]:
    """Random-pair and same-person cosine, principal directions holding 90% of the variance, variance in ``keep``."""
    n = len(vectors)
    i, j = rng.integers(0, n, 200_000), rng.integers(0, n, 200_000)
    ok = (i != j) & (labels[i] != labels[j])
    random_cos = np.einsum("ij,ij->i", vectors[i[ok]], vectors[j[ok]])
    # Same-person pairs: a random person (with >= 2 photos), then two distinct photos of them; every person counts
    # once, so a few heavily photographed people do not dominate.
    order = np.argsort(labels, kind="stable")
    ids, first, counts = np.unique(labels[order], return_index=True, return_counts=True)
    multi = np.flatnonzero(counts >= 2)
    who = rng.choice(multi, 50_000)
    a = rng.integers(0, counts[who])
    b = (a + rng.integers(1, counts[who])) % counts[who]
    same_cos = np.einsum("ij,ij->i", vectors[order[first[who] + a]], vectors[order[first[who] + b]])
    sample = vectors[rng.choice(n, min(n, 20_000), replace=False)].astype(np.float64)
    variances = np.linalg.eigvalsh(np.cov(sample.T))[::-1]
    cumulative = np.cumsum(variances) / variances.sum()
    dims90, dims99 = (int(np.searchsorted(cumulative, share) + 1) for share in (0.9, 0.99))
    return {"random_pair_cos_mean": float(random_cos.mean()), "random_pair_cos_std": float(random_cos.std()),
            "same_person_cos_mean": float(same_cos.mean()), "same_person_cos_std": float(same_cos.std()),
            "dims_90pct_variance": dims90, "dims_99pct_variance": dims99,
            "variance_in_kept_dims": float(cumulative[keep - 1]), "photos_per_person": float(n / len(ids))}


def _percentiles(times_s: list[float]) -> tuple[float, float]:
    ms = np.asarray(times_s) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def exact_latency(index, xb: np.ndarray, queries: np.ndarray, sizes: list[int]) -> list[dict]:
    """Single-query latency of the exact index (``VectorIndex`` Flat) at each size, filling it as it goes."""
    rows = []
    for size in sizes:
        index.add(np.arange(len(index), size), xb[len(index):size])
        times: list[float] = []
        began = time.perf_counter()
        for q in queries:
            t = time.perf_counter()
            index.search(q[None], K + 1)
            times.append(time.perf_counter() - t)
            if len(times) >= 10 and time.perf_counter() - began > EXACT_TIME_PER_SIZE_S:
                break
        p50, p99 = _percentiles(times)
        rows.append({"n": size, "p50_ms": p50, "p99_ms": p99, "queries": len(times)})
    return rows


def exact_threshold(rows: list[dict]) -> tuple[int, int]:
    """(largest measured n whose exact single-query p50 is within the target, n where a line through 0 crosses it)."""
    within = [r["n"] for r in rows if r["p50_ms"] <= LATENCY_TARGET_MS]
    n = np.array([r["n"] for r in rows], float)
    ms = np.array([r["p50_ms"] for r in rows])
    return (max(within) if within else 0), int(LATENCY_TARGET_MS / float(n @ ms / (n @ n)))


def drop_self(ids: np.ndarray, self_ids: np.ndarray) -> np.ndarray:
    """The first K ids of each row other than the query's own id."""
    out = np.full((len(ids), K), -1, np.int64)
    for r, (row, own) in enumerate(zip(ids, self_ids, strict=True)):
        rest = row[row != own][:K]
        out[r, :len(rest)] = rest
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t[t >= 0])) / K for f, t in zip(found, truth, strict=True)]))


def timed_search(index, xq: np.ndarray, self_ids: np.ndarray, nprobe: int | None = None):
    """Search one query at a time (how `query` and the daemon ask); (ids without self, p50 ms, p99 ms)."""
    rows, times = [], []
    for q in xq:  # one at a time, as `query` and the daemon ask
        t = time.perf_counter()
        _, ids = index.search(q[None], K + 1, nprobe=nprobe)
        times.append(time.perf_counter() - t)
        rows.append(ids[0])
    return drop_self(np.array(rows), self_ids), *_percentiles(times)


def ground_truth(xb: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """Exact top-K of each query without itself: faiss's flat inner-product kernel, all queries in one BLAS batch."""
    _, ids = faiss.knn(xb[query_ids], xb, K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return drop_self(ids, query_ids)


def evaluate(index, xb: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, nprobe: int | None = None) -> dict:
    """recall@10 against ``truth`` and single-query p50/p99 of ``index``."""
    ids, p50, p99 = timed_search(index, xb[query_ids], query_ids, nprobe)
    return {"recall_at_10": recall_at_k(ids, truth), "p50_ms": p50, "p99_ms": p99}


def sweep_nprobe(index, xb: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, say) -> list[dict]:
    """recall@10 and single-query latency at each nprobe, printed as a table."""
    say(f"  {'nprobe':>7}{'recall@10':>11}{'p50 ms':>9}{'p99 ms':>9}")
    rows = []
    for nprobe in [p for p in NPROBES if p <= index.choice.nlist]:
        rows.append({"nprobe": nprobe, **evaluate(index, xb, query_ids, truth, nprobe)})
        say(f"  {nprobe:>7}{rows[-1]['recall_at_10']:>11.3f}{rows[-1]['p50_ms']:>9.2f}{rows[-1]['p99_ms']:>9.2f}")
    return rows


def run(args: argparse.Namespace, say) -> dict:
    from benchmarks.lfw_data import SMOKE_THREADS, lfw_embeddings, lfw_sample, require_data, smoke_photos
    from indexer.store.choose import EXACT_MAX_VECTORS, NPROBE_RECALL, choose_index, pca_dim
    from indexer.store.vectors import VectorIndex

    threads = SMOKE_THREADS if args.smoke else THREADS
    faiss.omp_set_num_threads(threads)
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(args.seed)
    if args.smoke:
        root = require_data()
        lfw = lfw_sample(root, smoke_photos(root, **SMOKE_PHOTOS))
    else:
        lfw = lfw_embeddings()
    real, people = lfw["vectors"][lfw["found"]], lfw["people"][lfw["found"]]
    model = fit_face_model(real, people)
    t = time.perf_counter()
    xb, labels = sample_faces(model, args.n, args.photos_per_id, rng)
    gen_s = time.perf_counter() - t
    keep = pca_dim(xb.shape[1])
    figures = {"real (LFW)": face_figures(real, people, rng, keep), "synthetic": face_figures(xb, labels, rng, keep)}
    say(f"Face statistics, real LFW ({len(real):,} photos with a detected face) vs synthetic "
        f"({args.n:,} generated in {gen_s:.1f} s); 1-minute load average {load_before:.1f} on {os.cpu_count()} cores:")
    say(f"  {'':12}{'random-pair cos':>17}{'same-person cos':>17}{'dims 90% var':>14}{'dims 99% var':>14}"
        f"{f'var in {keep} dims':>16}{'photos/person':>15}")
    for name, f in figures.items():
        say(f"  {name:12}{f['random_pair_cos_mean']:>9.3f} +- {f['random_pair_cos_std']:.3f}"
            f"{f['same_person_cos_mean']:>9.3f} +- {f['same_person_cos_std']:.3f}{f['dims_90pct_variance']:>14}"
            f"{f['dims_99pct_variance']:>14}{f['variance_in_kept_dims']:>16.5f}{f['photos_per_person']:>15.2f}")

    # Two disjoint query sets: nprobe is calibrated on one and the chosen index judged on the other.
    picked = rng.choice(args.n, min(2 * args.queries, args.n), replace=False)
    calibration_ids, validation_ids = picked[:len(picked) // 2], picked[len(picked) // 2:]
    sizes = sorted({s for s in EXACT_SIZES if s < args.n} | {args.n})
    exact = VectorIndex.empty(xb.shape[1])
    exact_rows = exact_latency(exact, xb, xb[validation_ids], sizes)
    del exact
    within, crossing = exact_threshold(exact_rows)
    say(f"\nExact search (VectorIndex Flat = IndexIDMap2(IndexFlatIP)), one query at a time, k={K}:")
    say(f"  {'n':>10}{'p50 ms':>10}{'p99 ms':>10}{'queries':>9}")
    for r in exact_rows:
        say(f"  {r['n']:>10,}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['queries']:>9}")
    say(f"  -> largest measured n with p50 <= {LATENCY_TARGET_MS:g} ms: {within:,} (a line through 0 fitted to all "
        f"sizes crosses it at {crossing:,}); choose.py EXACT_MAX_VECTORS = {EXACT_MAX_VECTORS:,}")

    # nprobe calibration at smaller sizes (other nlists): an index on a prefix of the same vectors.
    calibration: dict[int, list[dict]] = {}
    for size in [s for s in CALIBRATION_SIZES if s < args.n and choose_index(s).nlist]:
        sub, ids = xb[:size], rng.choice(size, args.queries, replace=False)
        t = time.perf_counter()
        small = VectorIndex.build(np.arange(size, dtype=np.int64), sub, target_recall=args.target_recall,
                                  seed=args.seed)
        say(f"\n{small.choice.key} at n={size:,} (built in {time.perf_counter() - t:.1f} s), {args.queries} "
            f"calibration queries:")
        calibration[small.choice.nlist] = sweep_nprobe(small, sub, ids, ground_truth(sub, ids), say)
        del small

    truth = ground_truth(xb, picked)
    calibration_truth, validation_truth = truth[:len(calibration_ids)], truth[len(calibration_ids):]
    t = time.perf_counter()
    index = VectorIndex.build(np.arange(args.n, dtype=np.int64), xb, target_recall=args.target_recall,
                              seed=args.seed)
    build_s = time.perf_counter() - t
    choice = index.choice
    say(f"\nVectorIndex.build at n={args.n:,}: {choice.key} nprobe={choice.nprobe} refine={choice.refine}x in "
        f"{build_s:.1f} s ({threads} thread{'s' if threads > 1 else ''})\n  reason: {choice.reason}")
    if choice.nlist:
        say(f"{choice.key}, {len(calibration_ids)} calibration queries:")
        calibration[choice.nlist] = sweep_nprobe(index, xb, calibration_ids, calibration_truth, say)
    measured = {nlist: tuple((r["nprobe"], round(r["recall_at_10"], 3)) for r in rows)
                for nlist, rows in sorted(calibration.items())}
    say(f"\nMeasured (nlist -> (nprobe, recall@10), ...): {measured}")
    say(f"choose.py NPROBE_RECALL:                      {NPROBE_RECALL}")

    final = evaluate(index, xb, validation_ids, validation_truth)
    met = final["recall_at_10"] >= args.target_recall and final["p50_ms"] <= LATENCY_TARGET_MS
    say(f"\nChosen index {choice.key} (nprobe {choice.nprobe}, refine {choice.refine}x) at n={args.n:,}, "
        f"{len(validation_ids)} validation queries: recall@{K} {final['recall_at_10']:.3f}, p50 "
        f"{final['p50_ms']:.2f} ms, p99 {final['p99_ms']:.2f} ms, build {build_s:.1f} s -> target (recall >= "
        f"{args.target_recall:g}, p50 <= {LATENCY_TARGET_MS:g} ms) {'met' if met else 'NOT met'}")
    assert choose_index(args.n, target_recall=args.target_recall) == choice, "build must follow choose_index"
    load_after = os.getloadavg()[0]
    say(f"1-minute load average at the end: {load_after:.1f} (other work on the machine inflates latencies)")
    return {"n": args.n, "index": choice.key, "nprobe": choice.nprobe, "refine": choice.refine,
            "build_s": round(build_s, 2), "recall_at_10": round(final["recall_at_10"], 4),
            "p50_ms": round(final["p50_ms"], 3), "p99_ms": round(final["p99_ms"], 3), "target_met": met,
            "queries": len(validation_ids), "threads_build": threads, "faiss": faiss.__version__,
            "load_average": [load_before, load_after], "exact_latency": exact_rows,
            "exact_max_measured_within_target": within,
            "exact_fit_crosses_target_at": crossing, "nprobe_calibration": calibration, "figures": figures,
            "reason": choice.reason, **({"smoke": True} if args.smoke else {})}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None,
                        help=f"vectors in the index (default {FULL_N:,}; --smoke: EXACT_MAX_VECTORS + "
                             f"{SMOKE_N_OVER_EXACT:,})")
    parser.add_argument("--queries", type=int, default=None,
                        help=f"single queries timed per setting (default {FULL_QUERIES}; --smoke: {SMOKE_QUERIES})")
    parser.add_argument("--photos-per-id", type=float, default=5.0, help="mean photos per synthetic identity")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")
    parser.add_argument("--out", default=None,
                        help="folder for bench_query.txt/.json (default benchmarks/results, none with --smoke); "
                             "'' to skip")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds): checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        from indexer.store.choose import EXACT_MAX_VECTORS

        args.n = args.n if args.n is not None else EXACT_MAX_VECTORS + SMOKE_N_OVER_EXACT
        args.queries = args.queries if args.queries is not None else SMOKE_QUERIES
        # A smoke run's figures must never replace the recorded ones.
        args.out = args.out if args.out is not None else ""
    else:
        args.n = args.n if args.n is not None else FULL_N
        args.queries = args.queries if args.queries is not None else FULL_QUERIES
        args.out = args.out if args.out is not None else str(REPO / "benchmarks" / "results")
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    if args.smoke:
        from benchmarks.lfw_data import SMOKE_NOTE

        say(SMOKE_NOTE)
    result = run(args, say)
    if args.json:
        print(json.dumps(result))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_query.txt").write_text("\n".join(lines) + "\n")
        (out / "bench_query.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
