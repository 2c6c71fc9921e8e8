"""The faceindex library: one object per open index, one method per CLI command.

``FaceIndex(settings, writer=True)`` takes the index's writer lock (ingest, watch, cluster, people edits);
``writer=False`` opens the store read-only for queries, which keep working while another process writes.
"""

from __future__ import annotations

import json
import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from indexer.config import Settings
from indexer.errors import IndexMismatchError, NotFoundError
from indexer.images import decode
from indexer.models.detector import FaceDetector
from indexer.models.embedder import FaceEmbedder
from indexer.pipeline.ingest import Ingestor, IngestSummary
from indexer.pipeline.stages import FaceStage
from indexer.store import lock as lock_mod
from indexer.store.lmdb_store import FaceStore
from indexer.store.sync import SyncedIndex

log = logging.getLogger("faceindex")
DAEMON_FILE = "daemon.json"


class FaceIndex:
    def __init__(self, settings: Settings, writer: bool = False, command: str = "ingest",
                 detector: FaceDetector | None = None, embedder: FaceEmbedder | None = None,
                 edit: bool = False) -> None:
        """Open an index.

        ``writer``: take the writer lock (ingest, watch: they own the FAISS snapshot). ``edit``: open the store
        read-write without the lock (cluster, people): LMDB serialises those transactions with a running daemon's.
        ``detector`` / ``embedder``: already loaded models to reuse (tests, benchmarks); else built on demand.
        """
        self.settings = settings
        if detector is not None:
            self.__dict__["detector"] = detector
        if embedder is not None:
            self.__dict__["embedder"] = embedder
        self.dir = settings.index_path
        self.lock = lock_mod.WriterLock(self.dir, command).acquire() if writer else None
        try:
            if edit and not writer and not (self.dir / "store.lmdb" / "data.mdb").exists():
                raise NotFoundError(f"no index at {self.dir}; run `faceindex ingest PATH --index {self.dir}`")
            self.store = FaceStore(self.dir, readonly=not (writer or edit))
            if writer:
                # A writer killed while saving a snapshot leaves its temp file; only a writer saves, and we hold
                # the lock, so any temp file here is such a leftover.
                for leftover in self.dir.glob(".vectors.faiss.*.tmp"):
                    leftover.unlink(missing_ok=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "store", None) is not None:
            self.store.close()
            self.store = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> FaceIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ lazily built parts
    @cached_property
    def embedder(self) -> FaceEmbedder:
        stored = self.store.get_meta("model")
        return FaceEmbedder(self.settings.embedder, prefer=stored.split(":")[0] if stored else None)

    def _check_model(self, embedder: FaceEmbedder) -> None:
        """Refuse to embed for an index built with other weights (checked where vectors are made or compared)."""
        stored = self.store.get_meta("model")
        if stored and embedder.fingerprint != stored:
            raise IndexMismatchError(
                f"index {self.dir} was built with model {stored}, but the configured weights are "
                f"{embedder.fingerprint}; use --weights {stored.split(':')[0]} or a new --index"
            )

    @cached_property
    def detector(self) -> FaceDetector:
        return FaceDetector(self.settings.detector, device=self.embedder.device)

    @cached_property
    def vectors(self) -> SyncedIndex:
        return SyncedIndex(self.store, self.settings.index)

    def ingestor(self) -> Ingestor:
        self._check_model(self.embedder)
        return Ingestor(self.settings, self.store, self.vectors, FaceStage(self.settings, self.detector, self.embedder),
                        self.embedder.fingerprint, assigner=self.assigner())

    def assigner(self):
        """Nearest-center assignment for new faces, once a clustering exists (see indexer/store/clusters.py)."""
        from indexer.store.clusters import live_assigner

        return live_assigner(self.store, self.settings.cluster)

    # ------------------------------------------------------------------ commands
    def ingest(self, paths: list[str | Path], progress: bool = True) -> IngestSummary:
        return self.ingestor().run(paths, progress=progress)

    def embed_image(self, path: str | Path) -> list[tuple[dict[str, Any], np.ndarray]]:
        """Faces of a photo that is not (necessarily) indexed: (record, vector) for each."""
        if not Path(path).is_file():
            raise NotFoundError(f"{path} does not exist")
        self._check_model(self.embedder)
        image = decode(str(path), self.settings.ingest.max_pixels, 2 * self.settings.detector.max_side)
        faces = self.detector.detect([image])[0]
        vectors = self.embedder.embed([self.detector.crop(image, f) for f in faces])
        return [(f.to_record(), v) for f, v in zip(faces, vectors, strict=True)]

    def query(self, image: str | Path | None = None, face_id: int | None = None, k: int = 10,
              min_similarity: float | None = None) -> list[dict[str, Any]]:
        """For each face in ``image`` (or the stored face ``face_id``), the ``k`` nearest indexed faces."""
        if face_id is not None:
            with self.store.read() as txn:
                face = self.store.get_face(face_id, txn)
                if face is None:
                    raise NotFoundError(f"no face with id {face_id} in {self.dir}")
                vector = self.store.get_vector(face_id, txn).copy()
            queries = [({"face_id": face_id, "path": face.path, "box": face.box, "prob": face.prob}, vector)]
        else:
            queries = self.embed_image(image)
        index = self.vectors
        index.catch_up()
        results = []
        if not queries:
            return results
        # Ask for one more when querying a stored face: it finds itself first and is left out.
        extra = 1 if face_id is not None else 0
        sims, ids = index.index.search(np.stack([v for _, v in queries]), k + extra)
        with self.store.read() as txn:
            for (rec, _), row_s, row_i in zip(queries, sims, ids, strict=True):
                matches = []
                for s, i in zip(row_s, row_i, strict=True):
                    if i < 0 or i == face_id or (min_similarity is not None and s < min_similarity):
                        continue
                    face = self.store.get_face(int(i), txn)
                    if face is None:
                        continue
                    matches.append({"face_id": int(i), "path": face.path, "box": face.box,
                                    "similarity": round(float(s), 4), "cluster": face.cluster})
                results.append({**{k_: rec[k_] for k_ in ("box", "prob") if k_ in rec}, "matches": matches[:k]})
        return results

    def status(self) -> dict[str, Any]:
        counts = self.store.counts()
        index = self.vectors
        from indexer.store.clusters import load_clustering

        clustering = load_clustering(self.store)
        return {
            "index_dir": str(self.dir),
            "files": counts["files"],
            "faces": counts["faces"],
            "model": counts["model"],
            "index": {**_index_info_for(index.index, self.settings.index), "snapshot_seq": index.saved_seq,
                      "store_seq": counts["seq"]},
            "clusters": clustering.summary() if clustering else {"method": None, "k": 0},
            "daemon": daemon_status(self.dir),
            "store_bytes": self.store.disk_bytes(),
            "failures": counts["failures"],
        }


def _index_info_for(index, settings) -> dict[str, Any]:
    """The index's info, with the reason restated for its current size when the choice for that size agrees."""
    from indexer.store.choose import choose_index

    info = dict(index.info)
    now = choose_index(len(index), exact_max_vectors=settings.exact_max_vectors,
                       target_recall=settings.target_recall)
    if now.key == info["type"]:
        info["reason"] = now.reason
    return info


def daemon_status(index_dir: Path) -> dict[str, Any]:
    """Whether a watch daemon holds the index now, its pid, backlog and last event (from its status file)."""
    holder = lock_mod.is_held(index_dir)
    info: dict[str, Any] = {}
    try:
        info = json.loads((Path(index_dir) / DAEMON_FILE).read_text())
    except (OSError, ValueError):
        info = {}
    running = holder is not None and holder.get("command") == "watch"
    out = {"running": running, "pid": holder.get("pid") if running else None,
           "backlog": info.get("backlog", 0) if running else 0, "last_event": info.get("last_event")}
    if holder is not None and not running:
        out["writer"] = holder
    return out


def write_daemon_status(index_dir: Path, **info: Any) -> None:
    path = Path(index_dir) / DAEMON_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "updated": time.time()}))
    tmp.replace(path)


class ClusterCommands:
    """cluster / people / export / assign / report / eval: the library calls behind those commands."""

    def __init__(self, fi: FaceIndex) -> None:
        self.fi = fi
        self.store = fi.store
        self.settings = fi.settings

    def cluster(self, method: str | None = None, k: int | str | None = None,
                threshold: float | None = None) -> dict[str, Any]:
        from indexer import clustering

        return clustering.recluster(self.store, self.settings.cluster, method, k, threshold)

    def export(self, out: str | Path) -> dict[str, Any]:
        from indexer.artefacts import export

        return export(self.store, out)

    def assign(self, paths: list[str | Path], out: str | Path, progress: bool = False) -> dict[str, Any]:
        from tqdm import tqdm

        from indexer.artefacts import assign
        from indexer.errors import ImageError
        from indexer.pipeline.ingest import scan

        files = list(scan(paths, self.settings.ingest.extensions, self.settings.watch.ignore))
        faces, failures = [], []
        for path in tqdm(files, unit="img", disable=not progress, desc="assign"):
            try:
                faces += [(path, rec, vec) for rec, vec in self.fi.embed_image(path)]
            except ImageError as exc:
                failures.append({"path": path, "reason": str(exc)})
        return {**assign(self.store, faces, out), "files": len(files), "failures": failures}

    def report(self, out: str | Path, open_browser: bool = False) -> dict[str, Any]:
        from indexer.clustering import require_clustering
        from indexer.report import ReportFace, build_report

        clustering = require_clustering(self.store)
        faces, vectors = [], []
        with self.store.read() as txn:
            for f in self.store.iter_faces(txn):
                faces.append(ReportFace(face_id=f.face_id, path=f.path, box=tuple(f.box), cluster=f.cluster,
                                        similarity=f.similarity, thumbnail=self.store.get_thumbnail(f.face_id, txn)))
                vectors.append(self.store.get_vector(f.face_id, txn))
        matrix = np.stack(vectors) if vectors else np.zeros((0, 512), np.float32)
        return build_report(Path(out), faces, matrix, names=clustering.names, metrics=dict(clustering.metrics),
                            title=f"faceindex: {self.fi.dir}", seed=self.settings.cluster.seed,
                            open_browser=open_browser)
