"""Reports of a clustering: plots (cluster sizes, t-SNE, PCA), metrics.json and a static HTML gallery.

The report works on plain :class:`ReportFace` records and their vectors, not on the store, so it can be built from
anything that yields faces with a cluster, a similarity and a thumbnail. It reads nothing but its arguments and
writes only into ``out_dir``; the page links to the original photos by file:// URI without reading them.
"""

from __future__ import annotations

import json
import webbrowser
from pathlib import Path

import numpy as np

from indexer.fsutil import atomic_write
from indexer.report.gallery import ReportFace, plan_sections, render_html, write_thumbnails
from indexer.report.plots import finite_or_none, plot_cluster_sizes, plot_projections

__all__ = ["ReportFace", "build_report"]

SCORES = ("silhouette", "davies_bouldin", "calinski_harabasz")


def build_report(out_dir: Path, faces: list[ReportFace], vectors: np.ndarray, *, names: dict[int, str],
                 metrics: dict, title: str = "faceindex report", seed: int = 1234, max_per_cluster: int = 48,
                 projection_sample: int = 2000, open_browser: bool = False) -> dict:
    """Write cluster_sizes.png, pca.png, tsne.png, metrics.json, index.html and thumbs/ into ``out_dir``.

    ``vectors`` is float32 [len(faces), 512] with unit rows aligned with ``faces``; ``names`` maps cluster id to
    person name. Returns what was written: file names (relative to ``out_dir``), sample sizes, perplexity, counts,
    and the plots skipped with their reasons (t-SNE needs a few faces, PCA two).
    """
    out_dir = Path(out_dir)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(faces):
        raise ValueError(f"vectors must be [len(faces)={len(faces)}, d], got shape {vectors.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    clusters = np.array([int(f.cluster) for f in faces], dtype=np.int64)

    sizes = plot_cluster_sizes(out_dir / "cluster_sizes.png", clusters, names)
    projection = plot_projections(out_dir, vectors, clusters, names, sample=projection_sample, seed=seed)
    plots = {"cluster sizes": "cluster_sizes.png"}
    plots.update({name: rel for name, rel in (("t-SNE", projection["files"].get("tsne")),
                                                ("PCA", projection["files"].get("pca"))) if rel})

    sections = plan_sections(faces, names, max_per_cluster)
    thumbs = write_thumbnails(out_dir, sections)

    samples = {"projection": projection["sample"], "projection_of": projection["of"],
               "perplexity": projection["perplexity"], "seed": seed, "gallery_thumbnails": len(thumbs),
               "max_per_cluster": max_per_cluster}
    written_metrics = _jsonable({**{k: None for k in SCORES}, **metrics, "report_samples": samples})
    atomic_write(out_dir / "metrics.json", json.dumps(written_metrics, indent=2, allow_nan=False) + "\n", mode=0o644)

    page = render_html(title=title, sections=sections, thumbs=thumbs, metrics=metrics, plots=plots,
                       skipped=projection["skipped"], n_faces=len(faces), projection=projection)
    index = out_dir / "index.html"
    atomic_write(index, page, mode=0o644)
    if open_browser:
        webbrowser.open(index.resolve().as_uri())

    return {
        "out_dir": str(out_dir),
        "index": str(index),
        "files": {"index": "index.html", "metrics": "metrics.json", "cluster_sizes": "cluster_sizes.png",
                  **projection["files"], "thumbs": [thumbs[i] for i in sorted(thumbs)]},
        "faces": len(faces),
        "clusters": sizes["clusters"],
        "unassigned": sizes["unassigned"],
        "thumbnails": len(thumbs),
        "capped_clusters": sum(1 for s in sections if len(s.shown) < s.size),
        "projection": {"sample": projection["sample"], "of": projection["of"], "perplexity": projection["perplexity"]},
        "skipped": projection["skipped"],
    }


def _jsonable(value: object) -> object:
    """Plain JSON: numpy scalars and arrays become numbers and lists, NaN/inf (a score not computed) null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, Path):
        return str(value)
    return value
