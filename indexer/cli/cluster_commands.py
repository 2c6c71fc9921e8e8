"""``faceindex`` commands about clustering: cluster, export, assign, report, eval.

The same rules as the index commands: parse, one library call, print (text or --json).
"""

from __future__ import annotations

import sys

import click

from indexer.cli.options import emit, fmt, index_options, json_option, method_option, open_index, run, weights_option
from indexer.config import Settings


def parse_k(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor 'auto'", param_hint="--k") from None
    if k < 1:
        raise click.BadParameter("k must be >= 1", param_hint="--k")
    return k


@click.command()
@method_option
@click.option("--k", "k", default=None, help="K-Means only: number of clusters, or 'auto' (silhouette).")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=None,
              help="Cosine threshold for the graph / linkage methods (default: config).")
@click.option("--local", is_flag=True,
              help="Only the faces added since the last recluster and the persons they are in or near (what the "
                   "daemon runs); the method and threshold are the last full recluster's.")
@index_options
@json_option
def cluster(method: str | None, k: str | None, threshold: float | None, local: bool, settings: Settings,
            as_json: bool) -> None:
    """(Re)cluster the indexed faces now; cluster ids and names are kept across reclusterings."""
    k_value = parse_k(k)
    if k_value is not None and (method or settings.cluster.method) != "kmeans":
        raise click.UsageError("--k applies to --method kmeans only")
    if local and (method or k or threshold is not None):
        raise click.UsageError("--local reuses the last full recluster's method and threshold; drop --method, --k "
                               "and --threshold")
    with open_index(settings, "edit") as fi:
        result = fi.cluster(method, k_value, threshold, local=local)
    emit(result, as_json, _local_text if local else _cluster_text)


def _local_text(r: dict) -> str:
    if not r.get("faces"):
        return "nothing to recluster locally: no face arrived since the last recluster (or no clustering yet)"
    return (f"local recluster: {r['fresh']} new faces, {r['faces']} faces in scope ({r['persons_before']} persons), "
            f"{r['clusters']} clusters, {r['rederived']} faces re-derived in {r['seconds']} s")


def _cluster_text(r: dict) -> str:
    m = r["metrics"]
    lines = []
    if r.get("k_table"):
        lines.append("   k    inertia  silhouette")
        lines += [f"  {row['k']:>3}  {row['inertia']:>9.1f}  {fmt(row['silhouette'])}" for row in r["k_table"]]
    lines.append(f"{r['method']}: {r['k']} clusters over {r['n_faces']} faces ({r['unassigned']} unassigned) "
                 f"in {r['seconds']} s")
    lines.append(f"silhouette {fmt(m.get('silhouette'))} (on {m.get('silhouette_sample', 0)} faces), "
                 f"Davies-Bouldin {fmt(m.get('davies_bouldin'))}, "
                 f"Calinski-Harabasz {fmt(m.get('calinski_harabasz'))}")
    kept = sum(1 for line in r["mapping"] if "keeps id" in line)
    if kept:
        lines.append(f"{kept} clusters kept their id (see --json for the mapping)")
    return "\n".join(lines)


@click.command()
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Folder to write into.")
@index_options
@json_option
def export(out: str, settings: Settings, as_json: bool) -> None:
    """Write cluster_centers.npy, train_assignments.json and metrics.json."""
    run(settings, lambda fi: fi.export(out), as_json,
        lambda r: f"wrote {', '.join(r['files'])} to {r['out']} ({r['k']} clusters, {r['faces']} faces)")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="test_assignments.json to write.")
@index_options
@weights_option
@json_option
def assign(paths: tuple[str, ...], out: str, settings: Settings, as_json: bool) -> None:
    """Assign the faces of other photos to the current cluster centers (the index is not changed)."""
    run(settings, lambda fi: fi.assign(list(paths), out, progress=sys.stderr.isatty()), as_json,
        lambda r: f"assigned {r['faces']} faces from {r['files']} files to {r['k']} clusters: {r['out']}"
                  + (f" ({len(r['failures'])} files failed)" if r["failures"] else ""))


@click.command()
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Folder to write into.")
@click.option("--open", "open_browser", is_flag=True, help="Open the gallery in a browser.")
@index_options
@json_option
def report(out: str, open_browser: bool, settings: Settings, as_json: bool) -> None:
    """Plots (cluster sizes, t-SNE, PCA) and a browsable HTML gallery of the clusters."""
    run(settings, lambda fi: fi.report(out, open_browser=open_browser), as_json,
        lambda r: f"wrote {r['index']} ({r['faces']} faces in {r['clusters']} clusters)")


@click.command("eval")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@method_option
@click.option("--threshold", type=click.FloatRange(-1, 1), default=None, help="Cosine threshold (default: config).")
@index_options
@weights_option
@json_option
def evaluate(folder: str, method: str | None, threshold: float | None, settings: Settings, as_json: bool) -> None:
    """Score clustering on a folder-per-person tree: pairwise and BCubed F1, NMI, ARI, clusters vs people."""
    from indexer.evaluate import evaluate_folder

    index_given = click.get_current_context().params.get("index_dir") is not None
    result = evaluate_folder(settings, folder, method=method, threshold=threshold, scratch=not index_given,
                             progress=sys.stderr.isatty())
    emit(result, as_json, _eval_text)


def _eval_text(r: dict) -> str:
    return (f"{r['method']} on {r['n_faces']} labelled faces of {r['n_people']} people: "
            f"{r['n_clusters']} clusters\n"
            f"pairwise precision {r['pairwise_precision']:.4f} recall {r['pairwise_recall']:.4f} "
            f"F1 {r['pairwise_f1']:.4f}\n"
            f"BCubed precision {r['bcubed_precision']:.4f} recall {r['bcubed_recall']:.4f} F1 {r['bcubed_f1']:.4f}\n"
            f"NMI {r['nmi']:.4f}  ARI {r['ari']:.4f}  photos without a detected face: {r['files_without_face']}")
