"""Scale: indexes past RAM (1M and 5M face-like vectors under a 1 GB budget) and Ray backfill vs single-process ingest.

Run: ``python benchmarks/bench_scale.py [--json] [--smoke]`` from any folder (LFW from $FACEINDEX_DATA or
../shared/data; the LFW embedding cache of bench_query calibrates the synthetic vectors).

(1) ``ray_vs_single_ratio``: images/s of ``faceindex ingest --engine ray`` over images/s of plain
    ``faceindex ingest``, the same LFW photos each into a fresh --index, as subprocesses one after the other
    (whole-process wall time: model loading and, for Ray, starting its local cluster are part of what a user
    waits for). On a 2-core machine Ray's workers share the same two cores: the figure shows its overhead, not a
    speed-up. ``null`` with the reason when the installed faceindex has no ``--engine ray``.
(2) ``indexes``: for each size, synthetic face-like vectors (``bench_query``'s generator, fitted to LFW embeddings
    of this model) are written in chunks into a real LMDB store (``FaceStore``, the ``vectors`` table in its own
    record layout: big-endian u64 face id -> 2,048 raw float32 bytes) under ``--tmp``, minus ``--queries``
    held-out faces (new photos of people in the index) used as queries. Exact ground truth: brute force over the
    stored vectors, read back in chunks. Then a child process opens the store for writing and builds the running
    index exactly as the ``faceindex`` writer does (``SyncedIndex`` with ``index.memory_budget_mb = --budget-mb``;
    past RAM its rebuild also writes the packed float16 re-rank file, store/packed.py, in the same pass: part of
    ``build_s``), sweeps nprobe x candidates per result on half the queries and measures the chosen setting on the
    other half, one query at a time (k = 10). Its peak resident memory (VmHWM of the process holding the index,
    Python and faiss included) is what must stay under the budget. The store is deleted at the end.

``--smoke``: 60,000 vectors under a 100 MiB budget (the compressed path), 40 queries, 6 photos for the ingest
ratio; seconds to a minute, checks that the script runs; nothing is written unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # `python benchmarks/bench_x.py` from any folder: put the repo root first, so `benchmarks` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

REPO = Path(__file__).resolve().parent.parent
K = 10
FULL_SIZES, SMOKE_SIZES = (1_000_000, 5_000_000), (60_000,)
FULL_BUDGET_MB, SMOKE_BUDGET_MB = 1024.0, 100.0
FULL_QUERIES, SMOKE_QUERIES = 500, 40
FULL_PHOTOS, SMOKE_PHOTOS = 200, 6
WRITE_CHUNK = 65_536             # vectors generated and committed per LMDB transaction (128 MiB of float32)
# nprobe swept, as fractions of nlist (1/16 .. 1/4): the rows of choose.PQ_NPROBE_RECALL at this nlist.
SWEEP_FRACTIONS = (1 / 16, 3 / 32, 1 / 8, 3 / 16, 1 / 4)
# Candidates re-ranked per result, swept at each nprobe: with the packed float16 file a candidate costs one pread
# (~1 us), so fewer or more than the chosen 20 x k are worth measuring.
SWEEP_REFINES = (10, 20, 40)
RECALL_TARGET, LATENCY_TARGET_MS = 0.95, 10.0


# -- (1) Ray vs single-process ingest -----------------------------------------------------------------------------
def ray_available() -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-m", "indexer", "ingest", "--help"], capture_output=True, text=True,
                          cwd=REPO)
    if "--engine" not in proc.stdout:
        return False, "this faceindex has no `ingest --engine ray` yet (its --help lists no --engine)"
    try:
        import ray  # noqa: F401
    except ImportError:
        return False, "ray is not installed in this environment"
    return True, ""


def ingest_ips(folder: Path, index: Path, n: int, extra: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(images/s, wall s) of one ``faceindex ingest`` subprocess over ``folder``."""
    cmd = [sys.executable, "-m", "indexer", "ingest", str(folder), "--index", str(index), "--no-progress", *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return n / wall, wall


def ray_vs_single(n_photos: int, tmp: Path, say) -> dict:
    from benchmarks.lfw_data import lfw_images, require_data

    ok, why = ray_available()
    if not ok:
        say(f"Ray vs single-process ingest: not measured: {why}")
        return {"ray_vs_single_ratio": None, "ray_reason": why}
    paths, _ = lfw_images(require_data())
    step = max(1, len(paths) // n_photos)
    folder = tmp / "photos"
    folder.mkdir()
    for i, path in enumerate(paths[::step][:n_photos]):   # copies: ingest does not follow links out of the tree
        shutil.copyfile(path, folder / f"{i:05d}_{Path(path).name}")
    env = dict(os.environ)
    single_ips, single_s = ingest_ips(folder, tmp / "single", n_photos, [], env)
    ray_ips, ray_s = ingest_ips(folder, tmp / "ray", n_photos, ["--engine", "ray"], env)
    ratio = ray_ips / single_ips
    say(f"Ray vs single-process ingest, {n_photos} LFW photos, whole processes one after the other: single "
        f"{single_ips:.1f} images/s ({single_s:.1f} s), Ray local mode {ray_ips:.1f} images/s ({ray_s:.1f} s): "
        f"ratio {ratio:.2f} (on {os.cpu_count()} cores Ray's workers share the same cores: overhead, not speed-up)")
    return {"ray_vs_single_ratio": round(ratio, 3), "single_ips": round(single_ips, 2),
            "ray_ips": round(ray_ips, 2), "single_s": round(single_s, 1), "ray_s": round(ray_s, 1),
            "photos": n_photos}


# -- (2) synthetic vectors into LMDB, ground truth ---------------------------------------------------------------
def cached_embeddings() -> dict | None:
    """LFW dev-train embeddings of this model from the benchmarks' cache (~/.cache/faceindex/bench, as bench_query
    made them), newest first; None when there is none (then they are computed)."""
    from indexer.models.weights import cache_dir

    for path in sorted((cache_dir() / "bench").glob("lfw-devtrain-*.npz"), key=lambda p: -p.stat().st_mtime):
        with np.load(path, allow_pickle=False) as data:
            if {"vectors", "people", "found"} <= set(data.files):
                return {"vectors": data["vectors"], "people": data["people"], "found": data["found"],
                        "source": f"cache {path.name}"}
    return None


def face_chunks(model, n: int, photos_per_id: float, seed: int, chunk: int):
    """``sample_faces`` of bench_query, generated ``chunk`` rows at a time (never all n in RAM)."""
    rng = np.random.default_rng(seed)
    counts = rng.geometric(1 / photos_per_id, size=int(n / photos_per_id * 1.2) + 10)
    labels = np.repeat(np.arange(len(counts)), counts)[:n]
    d = len(model.mean)
    within, between = model.within.T.astype(np.float32), model.between.T.astype(np.float64)
    centres: dict[int, np.ndarray] = {}
    for start in range(0, n, chunk):
        lab = labels[start:start + chunk]
        new = [i for i in range(int(lab[0]), int(lab[-1]) + 1) if i not in centres]
        drawn = (model.mean + rng.standard_normal((len(new), d)) @ between).astype(np.float32)
        centres = {i: centres[i] for i in centres if i >= lab[0]} | dict(zip(new, drawn, strict=True))
        rows = np.stack([centres[int(i)] for i in lab]) + rng.standard_normal((len(lab), d), dtype=np.float32) @ within
        yield rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_store(index_dir: Path, model, n: int, n_queries: int, seed: int, say) -> tuple[np.ndarray, float]:
    """n vectors into a FaceStore (face ids 1..n), holding ``n_queries`` faces out; (queries, seconds)."""
    from indexer.store.lmdb_store import FaceStore
    from indexer.store.records import u64

    total = n + n_queries
    held = set(np.random.default_rng(seed + 1).choice(total, n_queries, replace=False).tolist())
    store = FaceStore(index_dir)
    queries, next_id, position = [], 1, 0
    started = time.perf_counter()
    for rows in face_chunks(model, total, 5.0, seed, WRITE_CHUNK):
        keep = []
        for r in range(len(rows)):
            (queries.append(rows[r]) if position + r in held else keep.append(r))
        position += len(rows)

        def put(txn, rows=rows, keep=keep, first=next_id) -> None:
            cursor = txn.cursor(db=store.db["vectors"])
            for j, r in enumerate(keep):
                cursor.put(u64(first + j), rows[r].tobytes(), append=True)
        store.transact(put)
        next_id += len(keep)
    seconds = time.perf_counter() - started
    size = (index_dir / "store.lmdb" / "data.mdb").stat().st_size
    store.close()
    say(f"  wrote {n:,} vectors into LMDB in {seconds:.0f} s ({size / 2**30:.1f} GiB on disk, "
        f"{size / n:,.0f} bytes a vector: each 2 KiB vector fills a 4 KiB overflow page)")
    return np.stack(queries), seconds


def ground_truth(index_dir: Path, queries: np.ndarray) -> np.ndarray:
    """Exact top-K ids of each query: brute force over the stored vectors, read back in chunks."""
    import faiss

    from indexer.store.compressed import StoreVectors
    from indexer.store.lmdb_store import FaceStore

    store = FaceStore(index_dir, readonly=True)
    best_s = np.full((len(queries), K), -np.inf, np.float32)
    best_i = np.full((len(queries), K), -1, np.int64)
    with store.read() as txn:
        for ids, vectors in StoreVectors(store, txn).chunks():
            s, i = faiss.knn(queries, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)
            all_s, all_i = np.hstack([best_s, s]), np.hstack([best_i, ids[i]])
            order = np.argsort(-all_s, axis=1, kind="stable")[:, :K]
            best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    store.close()
    return best_i


# -- (2) the child: the running index over the store, as faceindex builds it -------------------------------------
def proc_status() -> dict[str, float]:
    """VmHWM (peak), VmRSS, RssAnon, RssFile of this process, in MiB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def timed_queries(index, queries: np.ndarray, truth: np.ndarray, nprobe: int | None = None,
                  refine: int | None = None) -> dict:
    """recall@K against ``truth`` and single-query latency (p50, p99 ms), one query at a time as `query` asks."""
    found, times = [], []
    for q in queries:
        t = time.perf_counter()
        _, ids = index.search(q[None], K, nprobe=nprobe, refine=refine)
        times.append(time.perf_counter() - t)
        found.append(ids[0])
    recall = float(np.mean([len(set(f[f >= 0]) & set(t)) / K for f, t in zip(found, truth, strict=True)]))
    ms = np.asarray(times) * 1000
    return {"recall_at_10": recall, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def prefetch_effect(index, queries: np.ndarray, truth: np.ndarray) -> dict | None:
    """The chosen setting's p50 with the packed file's rows announced before they are read (posix_fadvise
    WILLNEED, store/packed.py) and read one after another without it, each pass starting with the file out of the
    page cache (POSIX_FADV_DONTNEED): side by side in one run. None when the index reads no packed file."""
    from indexer.store.packed import PackedVectors

    packed = getattr(index, "_source", None)
    if not isinstance(packed, PackedVectors) or not hasattr(os, "posix_fadvise"):
        return None
    out = {}
    for prefetch in (True, False):
        os.posix_fadvise(packed._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        packed.prefetch = prefetch
        out["p50_ms_announced" if prefetch else "p50_ms_one_by_one"] = round(
            timed_queries(index, queries, truth)["p50_ms"], 2)
    packed.prefetch = True
    return out


def child(args: argparse.Namespace) -> None:
    """Build the running index over the store under the budget, sweep nprobe, measure; one JSON line on stdout."""
    import faiss

    from indexer.config import IndexSettings
    from indexer.store.lmdb_store import FaceStore
    from indexer.store.sync import SyncedIndex

    faiss.omp_set_num_threads(args.threads)
    data = np.load(args.child_data)
    queries, truth = data["queries"], data["truth"]
    # Opened for writing, as the running writer (ingest, watch) opens it: its rebuild writes the packed re-rank file
    # (store/packed.py) in the same pass over the store; a read-only process would re-rank from LMDB.
    store = FaceStore(args.child)
    before = proc_status()
    started = time.perf_counter()
    synced = SyncedIndex(store, IndexSettings(memory_budget_mb=args.budget_mb))
    build_s = time.perf_counter() - started
    index, after_build = synced.index, proc_status()
    half = len(queries) // 2
    sweep = []
    for fraction in SWEEP_FRACTIONS if index.choice.nlist else ():
        nprobe = max(1, round(index.choice.nlist * fraction))
        for refine in SWEEP_REFINES if index.choice.refine else (None,):
            sweep.append({"nprobe": nprobe, "refine": refine,
                          **timed_queries(index, queries[:half], truth[:half], nprobe, refine)})
    final = timed_queries(index, queries[half:], truth[half:])
    prefetch = prefetch_effect(index, queries[half:], truth[half:])
    rerank = synced.info().get("rerank_file")
    after_queries = proc_status()
    code_bytes = len(faiss.serialize_index(index._coarse if index._coarse is not None else index._exact))
    print(json.dumps({
        "n": len(index), "index": index.choice.key, "nprobe": index.choice.nprobe, "refine": index.choice.refine,
        "reason": index.choice.reason, "memory_budget_mb": args.budget_mb,
        "bytes_per_vector": round(code_bytes / max(len(index), 1), 1),
        "rss_growth_per_vector": round((after_build["VmRSS"] - before["VmRSS"]) * 2**20 / max(len(index), 1), 1),
        "build_s": round(build_s, 1), "peak_rss_mb": round(after_queries["VmHWM"], 1),
        "peak_rss_after_build_mb": round(after_build["VmHWM"], 1), "rss_before_build_mb": round(before["VmRSS"], 1),
        "rss_end_mb": {k: round(v, 1) for k, v in after_queries.items()},
        "rerank_file": rerank, "rerank_file_bytes": Path(rerank["path"]).stat().st_size if rerank else None,
        **{k: round(v, 4) for k, v in final.items()}, "queries": len(queries) - half, "sweep": sweep,
        "prefetch_effect": prefetch,
        "sweep_queries": half,
    }))


def measure_size(n: int, model, args: argparse.Namespace, tmp: Path, say) -> dict:
    index_dir = tmp / f"store-{n}"
    say(f"\n{n:,} vectors, memory budget {args.budget_mb:g} MiB:")
    queries, write_s = write_store(index_dir, model, n, args.queries, args.seed, say)
    started = time.perf_counter()
    truth = ground_truth(index_dir, queries)
    say(f"  exact ground truth for {len(queries)} held-out queries, brute force over the store in chunks: "
        f"{time.perf_counter() - started:.0f} s")
    np.savez(tmp / "child.npz", queries=queries, truth=truth)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(index_dir), "--child-data",
           str(tmp / "child.npz"), "--budget-mb", str(args.budget_mb), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    shutil.rmtree(index_dir)
    if proc.returncode != 0:
        raise RuntimeError(f"child for n={n} exited {proc.returncode}: {proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["write_s"] = round(write_s, 1)
    say(f"  {row['index']} (nprobe {row['nprobe']}, {row['refine']}x k re-ranked)\n  reason: {row['reason']}")
    if row["rerank_file"]:
        say(f"  re-ranked from the packed float16 file: {row['rerank_file']['vectors']:,} vectors, "
            f"{row['rerank_file_bytes'] / 2**30:.2f} GiB on disk (written in the build's pass over the store)")
    if row["sweep"]:
        say(f"  nprobe x candidates sweep on {row['sweep_queries']} queries:")
        for nprobe in dict.fromkeys(s["nprobe"] for s in row["sweep"]):
            say(f"    nprobe {nprobe}: " + ", ".join(
                f"{s['refine'] or row['refine']}x k recall {s['recall_at_10']:.3f} p50 {s['p50_ms']:.2f} ms"
                for s in row["sweep"] if s["nprobe"] == nprobe))
    say(f"  built in {row['build_s']:.0f} s; {row['bytes_per_vector']:.1f} bytes/vector serialised "
        f"(RSS grew {row['rss_growth_per_vector']:.1f} bytes/vector); peak RSS {row['peak_rss_mb']:.0f} MiB "
        f"(before the build {row['rss_before_build_mb']:.0f} MiB; at the end {row['rss_end_mb']})")
    say(f"  {row['queries']} validation queries: recall@10 {row['recall_at_10']:.3f}, p50 {row['p50_ms']:.2f} ms, "
        f"p99 {row['p99_ms']:.2f} ms")
    if row.get("prefetch_effect"):
        effect = row["prefetch_effect"]
        say(f"  the same queries, the packed file out of the page cache before each pass: p50 "
            f"{effect['p50_ms_announced']:.2f} ms with a query's rows announced first (posix_fadvise WILLNEED), "
            f"{effect['p50_ms_one_by_one']:.2f} ms read one after another")
    return row


def run(args: argparse.Namespace, say) -> dict:
    from benchmarks.bench_query import SMOKE_PHOTOS as QUERY_SMOKE_PHOTOS
    from benchmarks.bench_query import fit_face_model
    from benchmarks.lfw_data import lfw_embeddings, lfw_sample, require_data, smoke_photos

    load_before = os.getloadavg()[0]
    say(f"bench_scale: {os.cpu_count()} CPUs, 1-minute load average {load_before:.1f} at the start "
        f"(other work on this shared machine slows every figure below)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale-", dir=args.tmp))
    try:
        ray = ray_vs_single(args.photos, tmp, say)
        lfw = cached_embeddings()
        if lfw is None and args.smoke:
            root = require_data()
            lfw = lfw_sample(root, smoke_photos(root, **QUERY_SMOKE_PHOTOS))
        elif lfw is None:
            lfw = lfw_embeddings()
        say(f"face model fitted to {int(lfw['found'].sum()):,} LFW embeddings ({lfw.get('source', 'embedded now')})")
        model = fit_face_model(lfw["vectors"][lfw["found"]], lfw["people"][lfw["found"]])
        rows = [measure_size(n, model, args, tmp, say) for n in args.sizes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"\n{'n':>10}  {'index':<34}{'bytes/vec':>10}{'build s':>9}{'peak RSS MiB':>14}{'recall@10':>11}"
        f"{'p50 ms':>8}")
    for r in rows:
        say(f"{r['n']:>10,}  {r['index']:<34}{r['bytes_per_vector']:>10.1f}{r['build_s']:>9.0f}"
            f"{r['peak_rss_mb']:>14.0f}{r['recall_at_10']:>11.3f}{r['p50_ms']:>8.2f}")
    met = all(r["recall_at_10"] >= RECALL_TARGET and r["p50_ms"] <= LATENCY_TARGET_MS
              and r["peak_rss_mb"] <= args.budget_mb for r in rows)
    load_after = os.getloadavg()[0]
    say(f"targets (recall@10 >= {RECALL_TARGET}, p50 <= {LATENCY_TARGET_MS:g} ms, peak RSS <= {args.budget_mb:g} "
        f"MiB): {'met' if met else 'NOT met'}; 1-minute load average {load_after:.1f} at the end")
    return {**ray, "indexes": rows, "memory_budget_mb": args.budget_mb, "targets_met": met,
            "load_average": [load_before, load_after], **({"smoke": True} if args.smoke else {})}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated vector counts (default {','.join(map(str, FULL_SIZES))}; --smoke: "
                             f"{','.join(map(str, SMOKE_SIZES))})")
    parser.add_argument("--budget-mb", type=float, default=None,
                        help=f"index.memory_budget_mb (default {FULL_BUDGET_MB:g}; --smoke: {SMOKE_BUDGET_MB:g})")
    parser.add_argument("--queries", type=int, default=None, help=f"held-out queries (default {FULL_QUERIES})")
    parser.add_argument("--photos", type=int, default=None, help=f"LFW photos per ingest (default {FULL_PHOTOS})")
    parser.add_argument("--threads", type=int, default=2, help="faiss threads for the build")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tmp", default="/tmp", help="where the LMDB stores go (5M vectors: ~20 GiB), deleted after")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")
    parser.add_argument("--out", default=None, help="folder for bench_scale.txt/.json (default benchmarks/results, "
                                                    "none with --smoke); '' to skip")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds): checks the script runs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    smoke = args.smoke
    args.sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else list(SMOKE_SIZES if smoke else FULL_SIZES)
    args.budget_mb = args.budget_mb if args.budget_mb is not None else SMOKE_BUDGET_MB if smoke else FULL_BUDGET_MB
    args.queries = args.queries or (SMOKE_QUERIES if smoke else FULL_QUERIES)
    args.photos = args.photos or (SMOKE_PHOTOS if smoke else FULL_PHOTOS)
    args.out = args.out if args.out is not None else "" if smoke else str(REPO / "benchmarks" / "results")
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    if smoke:
        from benchmarks.lfw_data import SMOKE_NOTE

        say(SMOKE_NOTE)
    result = run(args, say)
    if args.json:
        print(json.dumps(result))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_scale.txt").write_text("\n".join(lines) + "\n")
        (out / "bench_scale.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
