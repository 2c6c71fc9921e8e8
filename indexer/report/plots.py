"""Plots of a clustering: cluster sizes, and 2-D t-SNE / PCA projections of a stratified sample of the embeddings.

Everything renders with matplotlib's Agg backend (set before pyplot is imported) so reports build on headless
machines. Projections run on a sample capped at ``projection_sample`` faces, drawn per cluster, so that a report of a
million faces takes seconds and small clusters still show up in the picture instead of being drowned by big ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

UNASSIGNED = -1
UNASSIGNED_COLOUR = "#9e9e9e"
# Above this many clusters a legend is unreadable; points are still coloured, and named persons annotated.
LEGEND_MAX = 20
# t-SNE needs a few points around each one; below this it is skipped (PCA still runs from 2 points on).
TSNE_MIN_POINTS = 4
# t-SNE's cost grows with the input dimension; 50 PCA components keep nearly all the structure of face embeddings
# (the usual pre-reduction in the t-SNE literature) and make the neighbour search several times faster.
TSNE_PRE_DIMS = 50


def cluster_label(cluster: int, names: dict[int, str]) -> str:
    if cluster == UNASSIGNED:
        return "unassigned"
    return names.get(cluster) or f"#{cluster}"


def stratified_sample(clusters: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``cap`` rows, drawn per cluster in proportion to its size, at least one each.

    When there are more clusters than ``cap`` the largest clusters get one point each (ties by cluster id).
    """
    clusters = np.asarray(clusters)
    n = len(clusters)
    if n <= cap:
        return np.arange(n)
    if cap <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    labels, inverse, counts = np.unique(clusters, return_inverse=True, return_counts=True)
    if len(labels) >= cap:
        order = np.lexsort((labels, -counts))[:cap]
        quota = np.zeros(len(labels), dtype=np.int64)
        quota[order] = 1
    else:
        share = counts * (cap / n)
        quota = np.minimum(counts, np.maximum(1, np.floor(share))).astype(np.int64)
        # Largest-remainder rounding: hand out what flooring lost to the clusters that lost most and have room.
        left = cap - int(quota.sum())
        for i in np.argsort(-(share - np.floor(share)), kind="stable"):
            if left <= 0:
                break
            if quota[i] < counts[i]:
                quota[i] += 1
                left -= 1
        # The minimum of one can overshoot the cap: take back from the biggest quotas.
        while quota.sum() > cap:
            quota[int(np.argmax(quota))] -= 1
    picked = [rng.choice(np.flatnonzero(inverse == i), size=int(q), replace=False)
              for i, q in enumerate(quota) if q > 0]
    return np.sort(np.concatenate(picked))


def plot_cluster_sizes(path: Path, clusters: np.ndarray, names: dict[int, str], top_n: int = 40) -> dict:
    """Horizontal bars of the ``top_n`` largest clusters (largest on top), unassigned faces as a separate grey bar.

    Horizontal bars keep person names readable; capping keeps the figure legible with hundreds of clusters, and the
    title says how many clusters and faces were left out.
    """
    clusters = np.asarray(clusters)
    assigned = clusters[clusters != UNASSIGNED]
    n_unassigned = int((clusters == UNASSIGNED).sum())
    labels, counts = np.unique(assigned, return_counts=True)
    order = np.lexsort((labels, -counts))
    shown = order[:top_n]
    bars = [(cluster_label(int(labels[i]), names), int(counts[i]), "#3b6ea8") for i in shown]
    if n_unassigned:
        bars.append(("unassigned", n_unassigned, UNASSIGNED_COLOUR))

    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.28 * len(bars) + 1.6)), dpi=100)
    if bars:
        y = np.arange(len(bars))[::-1]
        ax.barh(y, [b[1] for b in bars], color=[b[2] for b in bars])
        ax.set_yticks(y, [_shorten(b[0]) for b in bars], fontsize=8)
        for yi, (_, count, _) in zip(y, bars, strict=True):
            ax.text(count, yi, f" {count:,}", va="center", fontsize=7)
        ax.set_xlabel("faces")
        ax.margins(x=0.12)
    else:
        ax.text(0.5, 0.5, "no faces", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    title = f"Cluster sizes: {len(labels):,} clusters, {len(clusters):,} faces"
    hidden = len(labels) - len(shown)
    if hidden:
        rest = int(counts[order[top_n:]].sum())
        title += f"\n(top {len(shown)} shown; {hidden:,} smaller clusters with {rest:,} faces not drawn)"
    if n_unassigned:
        title += f"\n{n_unassigned:,} unassigned faces (grey)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"clusters": len(labels), "bars": len(shown), "hidden_clusters": hidden, "unassigned": n_unassigned}


def plot_projections(out_dir: Path, vectors: np.ndarray, clusters: np.ndarray, names: dict[int, str], *,
                     sample: int, seed: int) -> dict:
    """Write ``pca.png`` and ``tsne.png`` of a stratified sample; returns sizes, perplexity and what was skipped."""
    vectors = np.asarray(vectors, dtype=np.float32)
    clusters = np.asarray(clusters)
    idx = stratified_sample(clusters, sample, seed)
    x, c = vectors[idx], clusters[idx]
    n = len(idx)
    result: dict = {"sample": n, "of": len(clusters), "perplexity": None, "files": {}, "skipped": {}}

    if n >= 2:
        pca = PCA(n_components=2, random_state=seed)
        # Identical vectors (the same photo twice) have zero variance: the ratio is 0/0, reported as n/a.
        with np.errstate(invalid="ignore", divide="ignore"):
            xy = pca.fit_transform(x)
            explained = float(np.sum(pca.explained_variance_ratio_))
        share = f"{explained:.0%} of variance" if math.isfinite(explained) else "no variance"
        _scatter(out_dir / "pca.png", xy, c, names, f"PCA of {n:,} of {len(clusters):,} faces ({share})")
        result["files"]["pca"] = "pca.png"
    else:
        result["skipped"]["pca"] = f"needs at least 2 faces, got {n}"

    if n >= TSNE_MIN_POINTS:
        perplexity = min(30.0, (n - 1) / 3)
        reduced = x
        if x.shape[1] > TSNE_PRE_DIMS and n > TSNE_PRE_DIMS:
            reduced = PCA(n_components=TSNE_PRE_DIMS, random_state=seed).fit_transform(x)
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        # One OpenMP thread: Barnes-Hut on a few thousand points gains little from more, and its threads spin-wait
        # badly on busy cores (an ingest running beside the report): 11 points took 15-40 s with 2 threads on a
        # shared 2-core machine, 0.05 s with one; 2,000 points 17 s vs 9 s.
        with threadpool_limits(limits=1, user_api="openmp"):
            xy = tsne.fit_transform(reduced)
        _scatter(out_dir / "tsne.png", xy, c, names,
                 f"t-SNE of {n:,} of {len(clusters):,} faces (perplexity {perplexity:.1f})")
        result["files"]["tsne"] = "tsne.png"
        result["perplexity"] = round(perplexity, 3)
    else:
        result["skipped"]["tsne"] = f"needs at least {TSNE_MIN_POINTS} faces, got {n}"
    return result


def _scatter(path: Path, xy: np.ndarray, clusters: np.ndarray, names: dict[int, str], title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    labels = sorted(set(clusters.tolist()) - {UNASSIGNED})
    cmap = plt.get_cmap("tab20")
    # tab20 pairs a dark and a light shade of each hue; all dark ones first keeps neighbouring clusters distinct.
    palette = [cmap(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
    size = 30 if len(clusters) <= 200 else 12
    if UNASSIGNED in clusters:
        m = clusters == UNASSIGNED
        ax.scatter(xy[m, 0], xy[m, 1], s=size, c=UNASSIGNED_COLOUR, marker="x", linewidths=0.8, label="unassigned")
    for rank, label in enumerate(labels):
        m = clusters == label
        ax.scatter(xy[m, 0], xy[m, 1], s=size, color=palette[rank % 20], alpha=0.85, edgecolors="none",
                   label=cluster_label(label, names))
        # Colours repeat after 20 clusters: naming persons at their centroid keeps them identifiable.
        if label in names and len(labels) > LEGEND_MAX:
            cx, cy = xy[m].mean(axis=0)
            ax.annotate(_shorten(names[label], 18), (cx, cy), fontsize=6, ha="center")
    if 0 < len(labels) <= LEGEND_MAX:
        ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    elif labels:
        title += f"\n{len(labels):,} clusters (colours repeat; no legend)"
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _shorten(text: str, limit: int = 28) -> str:
    # Long names squeeze the bars out of the figure; the full name is in the gallery.
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: scores that could not be computed are written as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
