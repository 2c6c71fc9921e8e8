"""Crop margin x flip-averaged embeddings on LFW dev-train (issue 11): what we feed the fixed embedder.

Each photo's face (the detected face nearest the image centre, as in ``lfw_data``) is detected once; its box is
cached. For every margin the face is cropped again from the decoded photo exactly as ingest does
(``FaceDetector.crop`` with ``detector.margin``) and embedded with its mirror image in the same forward passes
(``FaceEmbedder.embed_views``, the code ``embedder.flip`` runs). Both views are cached per margin and model, so a
setting is (margin, flip): flip off takes the plain rows, flip on their normalised mean (``flip_average``).

Caches live under ``$FACEINDEX_CACHE/bench`` (default ``~/.cache/faceindex/bench``), never in the repository:
``lfw-devtrain-boxes.npz`` (boxes of the centre faces) and ``lfw-devtrain-<model>-<precision>-m<margin>-views.npz``.

Scores of a setting: verification (10-fold on pairsDevTrain, threshold chosen on 9 folds), rank-1 identification
(leave-one-out nearest neighbour among the photos of people with >= 2 photos), and the default clustering method's
pairwise and BCubed F1 at its configured parameters and at the best threshold of a sweep (the cosine scale moves
with the preprocessing: flip-averaged rows are closer to each other, so a fixed threshold alone would be unfair).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.lfw_data import centre_boxes, margin_views, ten_fold_accuracy

MARGINS = (0, 14, 24, 32, 40, 48)      # pixels of the 160 px crop; 14 was facenet-pytorch's default and ours
SMOKE_MARGINS = (14, 32)
SWEEP = tuple(round(t, 2) for t in np.arange(0.45, 0.701, 0.01))  # thresholds for the best-of-sweep columns


def rank1(x: np.ndarray, people: np.ndarray) -> float:
    """Leave-one-out nearest-neighbour accuracy among the photos of people with >= 2 photos."""
    names, inverse, counts = np.unique(people, return_inverse=True, return_counts=True)
    rows = np.flatnonzero(counts[inverse] >= 2)
    if len(rows) < 2:
        return float("nan")
    sims = x[rows] @ x[rows].T
    np.fill_diagonal(sims, -np.inf)
    nearest = rows[np.argmax(sims, axis=1)]
    return float(np.mean(people[nearest] == people[rows]))


def clustering_scores(x: np.ndarray, people: np.ndarray, threshold: float, pair_margin: float) -> dict:
    """The adaptive method's pairwise / BCubed F1 at (threshold, pair_margin), and at the best threshold of
    ``SWEEP`` (by their mean) with the same pair margin."""
    from indexer.cluster import external_scores
    from indexer.cluster.identity import average_linkage_forest, renumber

    forest = average_linkage_forest(x, min(SWEEP[0], threshold))

    def score(t: float) -> dict:
        s = external_scores(people, renumber(forest.cut(t, pair_margin), 2), information=False)
        return {"pairwise_f1": round(s["pairwise_f1"], 4), "bcubed_f1": round(s["bcubed_f1"], 4)}

    at_default = score(threshold)
    swept = {t: score(t) for t in SWEEP}
    best = max(swept, key=lambda t: swept[t]["pairwise_f1"] + swept[t]["bcubed_f1"])
    return {**at_default, "best_threshold": best, "pairwise_f1_best": swept[best]["pairwise_f1"],
            "bcubed_f1_best": swept[best]["bcubed_f1"]}


def grid(root: Path, rel_paths: list[str], people: np.ndarray, pairs: list[tuple[str, str, bool]], embedder,
         margins: tuple[int, ...] = MARGINS, cache: bool = True) -> list[dict]:
    """One row of scores per (margin, flip)."""
    from indexer.config import ClusterSettings
    from indexer.models.embedder import flip_average

    cluster = ClusterSettings()
    boxes, _ = centre_boxes(root, rel_paths, cache)
    where = {p.split("lfw-devtrain/")[-1]: i for i, p in enumerate(rel_paths)}
    a = np.array([where[p[0]] for p in pairs])
    b = np.array([where[p[1]] for p in pairs])
    same = np.array([p[2] for p in pairs])
    rows = []
    for margin in margins:
        plain, mirrored = margin_views(root, rel_paths, boxes, margin, embedder, cache)
        for flip in (False, True):
            x = flip_average(plain, mirrored) if flip else plain
            acc, std, _ = ten_fold_accuracy((x[a] * x[b]).sum(axis=1), same)
            rows.append({"margin": margin, "flip": flip, "verification_acc": round(acc, 4),
                         "verification_std": round(std, 4), "rank1": round(rank1(x, people), 4),
                         **clustering_scores(x, people, cluster.threshold, cluster.pair_margin)})
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["  margin  flip   verification    rank-1   pairwise F1  BCubed F1   | best threshold: t, pairwise, BCubed"]
    for r in rows:
        lines.append(f"  {r['margin']:>6d}  {'on ' if r['flip'] else 'off'}   {r['verification_acc']:.4f}+-"
                     f"{r['verification_std']:.4f}  {r['rank1']:.4f}   {r['pairwise_f1']:.4f}      "
                     f"{r['bcubed_f1']:.4f}     | {r['best_threshold']:.2f}, {r['pairwise_f1_best']:.4f}, "
                     f"{r['bcubed_f1_best']:.4f}")
    return lines
