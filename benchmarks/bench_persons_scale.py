"""Persons at scale (issue 24): the full recluster on 10^5-10^6 face-like vectors, its time and peak memory.

Run: ``python benchmarks/bench_persons_scale.py [--json] [--smoke] [--sizes 100000,300000,1000000]`` from any
folder (LFW from $FACEINDEX_DATA or ../shared/data: the synthetic faces are bench_query's generator, fitted to the
LFW dev-train embeddings of this model, from the benchmarks' embedding cache or computed once).

For each size and each spread of photos over people, a child process generates the faces (chunk by chunk), then
runs the recluster exactly as ``faceindex cluster`` computes it (``persons.recluster.compute`` with the default
settings: the adaptive method, its k-nearest-neighbour graph, exact linkage per component, the recall passes,
centers and the internal scores) and reports its seconds and its peak resident memory (VmHWM, the vectors
included: 2 GB of float32 at 1M), the size of the largest person it made against the largest true one, and
pairwise / BCubed F1 against the generator's identities. Spreads:

- ``geometric``: photos per person drawn from a geometric distribution, mean 4 (bench_query's);
- ``family``: 5 people with 4% of the faces each, 50 with 0.2% each, the rest strangers with 1-3 photos.

The k-NN graph's recall is measured on 300 sampled faces: the share of their true neighbours at cosine >= the
linkage floor (exact search) that the graph holds.

Then (``--no-ops`` skips it) the same child writes the faces into a real index, applies the recluster's persons as
``faceindex cluster`` does, and times the real CLI (whole processes: ``status``, ``people list``, ``people show``,
edits, a merge of the two largest persons) and the real server (People page, Person page, edits through the API);
last, 1% of the faces leave and arrive again as new photos through the live assignment (``assign_ms_per_face``),
and one local recluster follows (``local_recluster_s``), each with the index's pairwise F1 after it:
benchmarks/persons_ops.py. With --smoke, for the geometric spread only.

``--smoke``: 20,000 faces, both spreads; seconds to a minute, checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # `python benchmarks/bench_x.py` from any folder: put the repo root first, so `benchmarks` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FULL_SIZES, SMOKE_SIZES = (100_000, 300_000, 1_000_000), (20_000,)
SPREADS = ("geometric", "family")
CHUNK = 100_000
RECALL_QUERIES = 300
OPS_KEYS = ("edit_p50_ms", "edit_p95_ms", "people_page_ms", "person_page_ms", "status_s",
            "assign_ms_per_face", "local_recluster_s")
TARGETS_1M = {"recluster_s": 600.0, "recluster_rss_mb": 4096.0}


def family_counts(n: int, rng: np.random.Generator) -> np.ndarray:
    """Photos per identity of a family library: 5 people with 4% each, 50 with 0.2% each, strangers with 1-3."""
    big, medium = [int(0.04 * n)] * 5, [int(0.002 * n)] * 50
    rest = n - sum(big) - sum(medium)
    strangers = rng.integers(1, 4, size=rest)            # at most `rest` strangers of 1-3 photos: cut to fit
    strangers = strangers[: int(np.searchsorted(np.cumsum(strangers), rest)) + 1]
    strangers[-1] -= int(strangers.sum()) - rest
    return np.array(big + medium + [int(s) for s in strangers if s > 0], np.int64)


def identity_counts(n: int, spread: str, rng: np.random.Generator) -> np.ndarray:
    if spread == "family":
        return family_counts(n, rng)
    counts = rng.geometric(1 / 4.0, size=int(n / 4.0 * 1.2) + 10)
    cut = int(np.searchsorted(np.cumsum(counts), n))
    counts = counts[: cut + 1].copy()
    counts[-1] -= int(counts.sum()) - n
    return counts[counts > 0]


def generate(model: dict[str, np.ndarray], counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """Unit float32 faces [sum(counts), d] and their identities, CHUNK rows at a time (identities are contiguous, so
    a chunk needs the centres of its own identities only, the one it shares with the chunk before carried over)."""
    n, d = int(counts.sum()), model["mean"].shape[0]
    labels = np.repeat(np.arange(len(counts)), counts)
    between, within = model["between"].T.astype(np.float32), model["within"].T.astype(np.float32)
    mean = model["mean"].astype(np.float32)
    out = np.empty((n, d), np.float32)
    carried_id, carried = -1, np.zeros((0, d), np.float32)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        lo, hi = int(labels[start]), int(labels[stop - 1])
        first_new = lo + 1 if lo == carried_id else lo
        drawn = mean + rng.standard_normal((hi - first_new + 1, d), dtype=np.float32) @ between
        centres = np.vstack([carried, drawn]) if lo == carried_id else drawn
        rows = centres[labels[start:stop] - lo] + rng.standard_normal((stop - start, d), dtype=np.float32) @ within
        out[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        carried_id, carried = hi, centres[-1:]
    return out, labels


def peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def graph_recall(x: np.ndarray, floor: float, rng: np.random.Generator) -> float:
    """The share of sampled faces' true neighbours at cosine >= floor (exact) that the k-NN graph holds."""
    import faiss

    from indexer.cluster.identity import KNN_NEIGHBORS, knn_graph

    rows = np.sort(rng.choice(len(x), size=min(RECALL_QUERIES, len(x)), replace=False))
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    sims, idx = exact.search(x[rows], KNN_NEIGHBORS + 1)
    _, graph_idx = knn_graph(x)
    wanted = found = 0
    for r, s, i in zip(rows.tolist(), sims, idx, strict=True):
        truth = {int(j) for j, v in zip(i, s, strict=True) if j != r and v >= floor}
        wanted += len(truth)
        found += len(truth & set(graph_idx[r].tolist()))
    return found / wanted if wanted else 1.0


def child(n: int, spread: str, seed: int, model_path: str, ops: bool) -> dict:
    """One size and spread in this process: generate, recluster, report (printed as one JSON line); ``ops``: then
    write a real index of these faces and time the CLI and the server on it (persons_ops.py)."""
    from indexer.cluster import external_scores
    from indexer.cluster.identity import DEFAULT_THRESHOLD
    from indexer.config import ClusterSettings
    from indexer.persons.recluster import compute

    rng = np.random.default_rng(seed)
    with np.load(model_path) as data:
        model = {k: data[k] for k in data.files}
    started = time.perf_counter()
    x, truth = generate(model, identity_counts(n, spread, rng), rng)
    gen_s, rss_vectors = time.perf_counter() - started, peak_rss_mb()
    ids = np.arange(1, len(x) + 1, dtype=np.int64)
    started = time.perf_counter()
    computed = compute(ids, x, ClusterSettings())
    seconds = time.perf_counter() - started
    rss = peak_rss_mb()
    labels = computed.labels
    scores = external_scores(truth, labels, information=False)
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(1, np.int64)
    return {"n": len(x), "spread": spread, "recluster_s": round(seconds, 1), "recluster_rss_mb": round(rss),
            "rss_with_vectors_mb": round(rss_vectors), "generate_s": round(gen_s, 1),
            "persons": int(len(computed.centers)), "true_persons": int(len(np.unique(truth))),
            "largest_person": int(sizes.max()), "true_largest_person": int(np.bincount(truth).max()),
            "unassigned": int((labels < 0).sum()), "pairwise_f1": round(float(scores["pairwise_f1"]), 4),
            "bcubed_f1": round(float(scores["bcubed_f1"]), 4),
            "graph_recall": round(graph_recall(x, DEFAULT_THRESHOLD["adaptive"], rng), 4),
            **{key: None for key in OPS_KEYS}, **(_ops(x, truth, computed) if ops else {})}


def _ops(x: np.ndarray, truth: np.ndarray, computed) -> dict:
    from benchmarks.persons_ops import assign_new, build, measure
    from indexer.config import ClusterSettings

    with tempfile.TemporaryDirectory(prefix="bench-persons-index-") as tmp:
        built = build(Path(tmp) / "index", x, computed, ClusterSettings())
        return {**built, **measure(Path(tmp) / "index", truth), **assign_new(Path(tmp) / "index", x, truth)}


def cached_views() -> dict | None:
    """LFW dev-train embeddings of the default model and preprocessing from the benchmarks' cache, whatever
    precision made them (the face model's statistics do not see a cosine of 0.9999); None when there are none."""
    from benchmarks.lfw_data import _cached, default_preprocessing, views_cache
    from indexer.models.embedder import FaceEmbedder, flip_average

    embedder = FaceEmbedder()
    margin, flip = default_preprocessing(embedder)
    wanted = views_cache(embedder, margin)
    pattern = wanted.name.replace(f"-{embedder.precision}-", "-*-")
    boxes = _cached(wanted.parent / "lfw-devtrain-boxes.npz", None)
    for path in sorted(wanted.parent.glob(pattern), key=lambda p: (p != wanted, -p.stat().st_mtime)):
        views = _cached(path, None)
        if views is not None and boxes is not None and views["paths"].tolist() == boxes["paths"].tolist():
            vectors = flip_average(views["plain"], views["mirrored"]) if flip else views["plain"]
            people = np.array([p.split("/")[-2] for p in views["paths"].tolist()])
            return {"vectors": vectors, "people": people, "found": boxes["found"], "source": path.name}
    return None


def fit_model(smoke: bool, out: Path) -> str:
    from benchmarks.bench_query import SMOKE_PHOTOS, fit_face_model
    from benchmarks.lfw_data import lfw_embeddings, lfw_sample, require_data, smoke_photos

    lfw = None if smoke else cached_views()
    if lfw is None and smoke:
        root = require_data()
        lfw = lfw_sample(root, smoke_photos(root, **SMOKE_PHOTOS))
    elif lfw is None:
        lfw = lfw_embeddings()
    model = fit_face_model(lfw["vectors"][lfw["found"]], lfw["people"][lfw["found"]])
    np.savez(out, mean=model.mean, between=model.between, within=model.within)
    return f"{int(lfw['found'].sum())} LFW faces" + (f" ({lfw['source']})" if "source" in lfw else "")


def run(sizes: list[int], seed: int, say, ops: bool = True) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-persons-") as tmp:
        model_path = Path(tmp) / "face_model.npz"
        source = fit_model(max(sizes) <= SMOKE_SIZES[0], model_path)
        say(f"Face model fitted to {source}; each row is one child process ({os.cpu_count()} cores, 1-minute load "
            f"{os.getloadavg()[0]:.1f})")
        say(f"  {'n':>9} {'spread':<10}{'recluster s':>12}{'peak MiB':>10}{'(vectors)':>10}{'persons':>9}"
            f"{'(true)':>9}{'largest':>9}{'(true)':>8}{'pairwise':>9}{'BCubed':>8}{'graph rec.':>11}")
        for n in sizes:
            for spread in SPREADS:
                with_ops = ops and (spread == "geometric" or n > SMOKE_SIZES[0])  # smoke: one spread suffices
                proc = subprocess.run([sys.executable, __file__, "--child", str(n), spread, str(seed),
                                       str(model_path), str(int(with_ops))], capture_output=True, text=True, cwd=REPO)
                if proc.returncode != 0:
                    raise SystemExit(f"child {n} {spread} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(r)
                say(f"  {r['n']:>9,} {spread:<10}{r['recluster_s']:>12.1f}{r['recluster_rss_mb']:>10,}"
                    f"{r['rss_with_vectors_mb']:>10,}{r['persons']:>9,}{r['true_persons']:>9,}"
                    f"{r['largest_person']:>9,}{r['true_largest_person']:>8,}{r['pairwise_f1']:>9.4f}"
                    f"{r['bcubed_f1']:>8.4f}{r['graph_recall']:>11.4f}")
                if r.get("status_s") is not None:
                    say(f"      index written {r['write_s']} s, persons applied {r['apply_s']} s, snapshot "
                        f"{r['snapshot_s']} s; CLI: status "
                        f"{r['status_s']} s, people list {r['people_list_cli_s']} s, people show "
                        f"{r['person_show_cli_s']} s, edit p50 {r['edit_cli_p50_s']} s p95 {r['edit_cli_p95_s']} s,"
                        f" merge of the two largest ({r['largest_persons']}) {r['merge_largest_cli_s']} s")
                    say(f"      server: People page {r['people_page_ms']} ms, Person page {r['person_page_ms']} ms,"
                        f" edit p50 {r['edit_p50_ms']} ms p95 {r['edit_p95_ms']} ms ({r['edits']} edits), merge "
                        f"of the two largest {r['merge_largest_ms']} ms")
                    say(f"      live assignment of {r['assign_faces']:,} faces arriving again ({r['assign_index']}): "
                        f"{r['assign_ms_per_face']} ms per face, {r['assign_same_person']:.1%} where the recluster"
                        f" had them; pairwise F1 {r['arrived_pairwise_f1']:.4f}; then a local recluster over "
                        f"{r['local_scope']:,} faces: {r['local_recluster_s']} s, pairwise F1 "
                        f"{r['local_pairwise_f1']:.4f}")
    at_1m = [r for r in rows if r["n"] >= 1_000_000]
    met = {key: all(r[key] <= limit for r in at_1m) for key, limit in TARGETS_1M.items()} if at_1m else None
    if met is not None:
        say(f"  targets at 1M (recluster <= 600 s, peak <= 4096 MiB): {met}")
    return {"sizes": rows, "targets_met_1m": met}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (table on stderr)")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_SIZES[0]:,} faces only: checks it runs")
    parser.add_argument("--sizes", default=None, help="comma-separated face counts (default 100000,300000,1000000)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="also write bench_persons_scale.json/.txt here")
    parser.add_argument("--no-ops", action="store_true", help="the recluster only: no index, CLI or server timed")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        n, spread, seed, model, ops = args.child
        print(json.dumps(child(int(n), spread, int(seed), model, ops == "1")))
        return
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(SMOKE_SIZES if args.smoke else
                                                                             FULL_SIZES)
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    result = {**run(sizes, args.seed, say, ops=not args.no_ops), "smoke": bool(args.smoke)}
    if args.json:
        print(json.dumps(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_persons_scale.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "bench_persons_scale.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
