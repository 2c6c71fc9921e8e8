"""Shards: what a Ray worker hands the single writer, one Parquet file per batch of files, written atomically.

A shard holds one row per file sent to a worker: its stat, sha256 and what the read found (``error``: the reason
it failed, as the local path records it), with the file's faces nested in it (box, probability, landmarks, the
float32 vector, the JPEG thumbnail). No pickle: Parquet (pyarrow) only, paths as the raw bytes the filesystem holds
(``os.fsencode``), so a name that is not UTF-8 comes back as the same ``str`` (surrogateescape).

A shard file appears complete or not at all (``fsutil.atomic_writer``: temp file, fsync, rename); a worker killed
while writing leaves a ``.*.tmp`` that the writer removes. The file's metadata names the shard and the model that
embedded its faces, which the writer checks against the index before merging.

A staging folder holds one folder per run: ``<staging>/<run id>/run.json`` (which index it is for) and the run's
``shard-NNNNNN-<hash>.parquet`` files. The hash is of the shard's paths: a shard redone (a Ray task retried) gets
the same name and replaces the first copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.embedding import EMBEDDING_DIM
from indexer.fsutil import atomic_write, atomic_writer, private_dir
from indexer.pipeline.records import FaceItem, ReadItem, Verdict
from indexer.store.records import NewFace

FORMAT = "1"
RUN_FILE = "run.json"
SUFFIX = ".parquet"
_META_MODEL, _META_SHARD, _META_FORMAT = b"faceindex.model", b"faceindex.shard", b"faceindex.format"

FACE_TYPE = pa.struct([
    ("box", pa.list_(pa.float64())),
    ("prob", pa.float64()),
    ("landmarks", pa.list_(pa.list_(pa.float64()))),
    ("vector", pa.list_(pa.float32(), EMBEDDING_DIM)),
    ("thumbnail", pa.binary()),
])
SCHEMA = pa.schema([
    ("path", pa.binary()),
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("sha256", pa.string()),
    ("verdict", pa.string()),
    ("source", pa.binary()),       # a copy found inside the shard's batch: the file whose faces it takes
    ("error", pa.string()),        # null unless the file failed: the reason recorded
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("faces", pa.list_(FACE_TYPE)),
])


@dataclass(frozen=True)
class Shard:
    """A shard read back: its name, the model fingerprint of its vectors, its files with their faces."""

    name: str
    model: str
    items: list[FaceItem]


def shard_name(number: int, paths: Sequence[str]) -> str:
    digest = hashlib.sha256(b"\0".join(os.fsencode(p) for p in paths)).hexdigest()[:16]
    return f"shard-{number:06d}-{digest}{SUFFIX}"


def write_shard(path: Path, items: Sequence[FaceItem], model: str) -> None:
    """Write ``items`` as the shard file ``path``, atomically."""
    table = pa.table(_columns(items), schema=SCHEMA).replace_schema_metadata(
        {_META_MODEL: model.encode(), _META_SHARD: path.name.encode(), _META_FORMAT: FORMAT.encode()})
    with atomic_writer(path) as fh:
        pq.write_table(table, fh)


def _columns(items: Sequence[FaceItem]) -> dict[str, pa.Array]:
    reads = [fi.read for fi in items]
    faces = [face for fi in items for face in fi.faces]
    offsets = np.cumsum([0] + [len(fi.faces) for fi in items], dtype=np.int32)
    vectors = np.ascontiguousarray(np.stack([f.vector for f in faces]) if faces
                                   else np.zeros((0, EMBEDDING_DIM)), dtype=np.float32)
    face_structs = pa.StructArray.from_arrays([
        pa.array([[float(v) for v in f.box] for f in faces], FACE_TYPE.field("box").type),
        pa.array([float(f.prob) for f in faces], pa.float64()),
        pa.array([[[float(x), float(y)] for x, y in f.landmarks] for f in faces], FACE_TYPE.field("landmarks").type),
        pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), EMBEDDING_DIM),
        pa.array([f.thumbnail for f in faces], pa.binary()),
    ], fields=list(FACE_TYPE))
    return {
        "path": pa.array([os.fsencode(r.path) for r in reads], pa.binary()),
        "size": pa.array([r.size for r in reads], pa.int64()),
        "mtime_ns": pa.array([r.mtime_ns for r in reads], pa.int64()),
        "sha256": pa.array([r.sha256 for r in reads], pa.string()),
        "verdict": pa.array([r.verdict.value for r in reads], pa.string()),
        "source": pa.array([None if r.source is None else os.fsencode(r.source) for r in reads], pa.binary()),
        "error": pa.array([r.error for r in reads], pa.string()),
        "width": pa.array([r.orig_size[0] for r in reads], pa.int32()),
        "height": pa.array([r.orig_size[1] for r in reads], pa.int32()),
        "faces": pa.ListArray.from_arrays(pa.array(offsets), face_structs),
    }


def read_shard(path: Path) -> Shard:
    """A shard file back as face items (their pixels were never stored: ``image`` is None)."""
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if meta.get(_META_FORMAT) != FORMAT.encode():
        raise ValueError(f"{path.name}: not a faceindex shard of format {FORMAT}")
    rows = table.drop_columns(["faces"]).to_pylist()
    faces = table.column("faces").combine_chunks()
    offsets = faces.offsets.to_numpy()
    flat = faces.flatten()  # the struct array of every face, file after file
    vectors = flat.field("vector").flatten().to_numpy().reshape(-1, EMBEDDING_DIM).astype(np.float32, copy=False)
    boxes, probs = flat.field("box").to_pylist(), flat.field("prob").to_pylist()
    landmarks, thumbs = flat.field("landmarks").to_pylist(), flat.field("thumbnail").to_pylist()
    items = []
    for n, row in enumerate(rows):
        read = ReadItem(os.fsdecode(row["path"]), size=row["size"], mtime_ns=row["mtime_ns"], sha256=row["sha256"],
                        verdict=Verdict(row["verdict"]),
                        source=None if row["source"] is None else os.fsdecode(row["source"]),
                        error=row["error"], orig_size=(row["width"], row["height"]))
        span = range(offsets[n], offsets[n + 1])
        items.append(FaceItem(read, [NewFace(box=boxes[i], prob=probs[i], landmarks=landmarks[i],
                                             vector=vectors[i].copy(), thumbnail=thumbs[i]) for i in span]))
    return Shard(meta.get(_META_SHARD, path.name.encode()).decode(), meta[_META_MODEL].decode(), items)


# ---------------------------------------------------------------------------------------------- staging folders
def start_run(staging: Path, run_id: str, index_dir: Path) -> Path:
    """The folder of a new run, with its ``run.json`` naming the index it is for."""
    folder = private_dir(private_dir(staging) / run_id)
    atomic_write(folder / RUN_FILE, json.dumps({"index": str(index_dir), "run": run_id, "format": FORMAT}))
    return folder


def runs_for(staging: Path, index_dir: Path) -> list[Path]:
    """Run folders left in ``staging`` for this index (oldest first); runs of other indexes are not ours."""
    if not staging.is_dir():
        return []
    runs = []
    for folder in sorted(p for p in staging.iterdir() if p.is_dir()):
        try:
            run = json.loads((folder / RUN_FILE).read_text())
        except (OSError, ValueError):
            continue  # no run.json: a run that died before its first shard, or not a run folder at all
        if run.get("index") == str(index_dir):
            runs.append(folder)
    return runs


def shard_files(folder: Path) -> list[Path]:
    """The complete shards of a run folder, in order; temp files of killed writers are removed."""
    for leftover in folder.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    return sorted(folder.glob(f"shard-*{SUFFIX}"))


def remove_run(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink(missing_ok=True)
    folder.rmdir()
