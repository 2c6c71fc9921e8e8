"""The faceindex library: one object per open index, one method per command (the CLI and the web app call these).

``FaceIndex(settings, OpenMode.WRITE)`` takes the index's writer lock (ingest, watch: they own the FAISS snapshot);
``OpenMode.EDIT`` opens the store read-write without the lock (cluster, people edits: LMDB serialises their
transactions with a running daemon's); ``OpenMode.READ`` opens it read-only for queries, which keep working while
another process writes. Models are loaded only by the methods that embed photos: `status`, `people` and
`query --face-id` never import torch.
"""

from __future__ import annotations

import logging
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer import fingerprint as fp
from indexer.config import Settings
from indexer.errors import NotFoundError
from indexer.fsutil import leftover_temp_files
from indexer.library_persons import PersonsFacade
from indexer.store import lock as lock_mod
from indexer.store.daemon import daemon_status
from indexer.store.lmdb_store import SNAPSHOT_FILE, FaceStore, store_exists

if TYPE_CHECKING:
    from indexer.models.detector import FaceDetector
    from indexer.models.embedder import FaceEmbedder
    from indexer.pipeline.ray_engine import RayRun
    from indexer.pipeline.runner import IngestSummary, Pipeline
    from indexer.store.sync import SyncedIndex

log = logging.getLogger("faceindex")


class OpenMode(Enum):
    READ = "read"    # queries: read-only, alongside any writer
    EDIT = "edit"    # clustering and people edits: read-write transactions, no writer lock
    WRITE = "write"  # ingest, watch: the writer lock, the FAISS snapshot


class FaceIndex(PersonsFacade):
    def __init__(self, settings: Settings, mode: OpenMode = OpenMode.READ, command: str = "ingest",
                 detector: FaceDetector | None = None, embedder: FaceEmbedder | None = None) -> None:
        """Open an index. ``detector`` / ``embedder``: already loaded models to reuse (tests, benchmarks, the
        web app); else built on first use."""
        self.settings = settings
        self.mode = mode
        if detector is not None:
            self.__dict__["detector"] = detector
        if embedder is not None:
            self.__dict__["embedder"] = embedder
        self.dir = settings.index_path
        self.lock = lock_mod.WriterLock(self.dir, command).acquire() if mode is OpenMode.WRITE else None
        try:
            if mode is OpenMode.EDIT and not store_exists(self.dir):
                raise NotFoundError(f"no index at {self.dir}; run `faceindex ingest PATH --index {self.dir}`")
            self.store = FaceStore(self.dir, readonly=mode is OpenMode.READ)
            if mode is OpenMode.WRITE:
                # A writer killed while saving a snapshot leaves its temp file; only a writer saves, and we hold
                # the lock, so any temp file here is such a leftover.
                for leftover in leftover_temp_files(self.dir / SNAPSHOT_FILE):
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
        from indexer.models.embedder import FaceEmbedder

        stored = self.store.get_meta("model")
        return FaceEmbedder(self.settings.embedder, prefer=stored.split(":")[0] if stored else None,
                            workers=self.settings.ingest.model_workers)

    @cached_property
    def detector(self) -> FaceDetector:
        from indexer.models.detector import FaceDetector

        return FaceDetector(self.settings.detector, device=self.embedder.device,
                            workers=self.settings.ingest.model_workers)

    @cached_property
    def vectors(self) -> SyncedIndex:
        from indexer.store.sync import SyncedIndex  # here: FAISS loads only for commands that search

        return SyncedIndex(self.store, self.settings.index)

    def _fingerprint(self) -> str:
        """What the loaded models make: weights and preprocessing (indexer/fingerprint.py); loads them."""
        prep = fp.preprocessing(self.detector.settings.margin, self.embedder.settings.flip)
        return fp.full(self.embedder.fingerprint, prep)

    def _check_model(self) -> None:
        """Refuse to embed for an index whose vectors were made otherwise (where vectors are made or compared)."""
        self._refuse_other_model(self._fingerprint())

    def _refuse_other_model(self, fingerprint: str) -> None:
        pending = self.store.get_meta(fp.REBUILD_KEY)
        if pending is not None:
            raise fp.interrupted(self.dir, pending)
        stored = fp.normalised(self.store.get_meta("model"))
        if stored and fingerprint != stored:
            raise fp.mismatch(self.dir, stored, fingerprint)

    def _check_configuration(self) -> None:
        """Weights named explicitly (--weights, embedder.weights) and preprocessing (detector.margin, embedder.flip)
        that are not the index's are refused at once, even when nothing needs embedding; resolving the weights reads
        the weights file, not torch."""
        if "embedder" in self.__dict__:
            return self._check_model()  # the loaded models say what they make
        stored = fp.normalised(self.store.get_meta("model"))
        if stored or self.store.get_meta(fp.REBUILD_KEY) is not None:
            weights = fp.weights_of(stored) if stored else ""
            if self.settings.embedder.weights != "auto" and stored:
                from indexer.models.weights import resolve

                weights = resolve(self.settings.embedder.weights, prefer=stored.split(":")[0]).fingerprint
            self._refuse_other_model(fp.full(weights, fp.configured(self.settings)))

    def models(self) -> tuple[FaceDetector, FaceEmbedder]:
        """The detector and embedder, loaded now if they were not, checked against the index's model."""
        self._check_model()
        return self.detector, self.embedder

    def pipeline(self) -> Pipeline:
        """The ingest pipeline (SIGINT/SIGTERM set its stop event); the models load when a file first needs them."""
        from indexer.persons.assign import knn_assigner
        from indexer.pipeline.faces import FaceStage
        from indexer.pipeline.runner import Pipeline

        self._check_configuration()
        assigner = knn_assigner(self.store, self.settings.cluster, lambda: self.vectors.index.search)
        return Pipeline(self.settings, self.store, self.vectors, FaceStage(self.settings, self.models),
                        self._fingerprint, assigner=assigner)

    # ------------------------------------------------------------------ indexing
    def ingest(self, paths: list[str | Path], progress: bool = True) -> IngestSummary:
        from indexer.pipeline.runner import trap_stop_signals
        from indexer.pipeline.scan import scan

        candidates = list(scan(paths, self.settings.ingest.extensions, self.settings.watch.ignore))
        pipeline = self.pipeline()
        restore = trap_stop_signals(pipeline.stop, self.settings.ingest.stop_grace_s)
        try:
            with pipeline:  # closing (the final snapshot) is inside the signals' deadline too
                return pipeline.ingest(candidates, progress=progress)
        finally:
            restore()

    def ingest_ray(self, paths: list[str | Path], address: str | None = None, staging: str | Path | None = None,
                   shard_size: int = 0, progress: bool = True) -> RayRun:
        """``ingest --engine ray``: Ray Data workers (a local Ray, or the cluster at ``address``) write shards into
        ``staging`` (default ``<index>/staging``), this process merges them (indexer/pipeline/ray_engine.py)."""
        from indexer.pipeline.ray_engine import RayIngest
        from indexer.pipeline.runner import trap_stop_signals
        from indexer.pipeline.scan import scan

        candidates = list(scan(paths, self.settings.ingest.extensions, self.settings.watch.ignore))
        pipeline = self.pipeline()
        stored = self.store.get_meta("model")
        engine = RayIngest(pipeline, prefer=stored.split(":")[0] if stored else None, address=address,
                           staging=Path(staging).expanduser().absolute() if staging else self.dir / "staging",
                           shard_size=shard_size,
                           fingerprint=lambda weights: fp.full(weights, fp.configured(self.settings)))
        restore = trap_stop_signals(pipeline.stop, self.settings.ingest.stop_grace_s)
        try:
            with pipeline:
                return engine.run(candidates, progress=progress)
        finally:
            restore()

    def watch(self, root: str | Path, once: bool = False) -> IngestSummary:
        """The daemon over ``root`` until SIGINT/SIGTERM (or, ``once``, until caught up), reclustering when due."""
        from indexer.persons.schedule import BackgroundRecluster
        from indexer.pipeline.runner import trap_stop_signals
        from indexer.pipeline.watch import Watcher

        pipeline = self.pipeline()
        recluster = BackgroundRecluster(self.store, self.settings.cluster, lambda: pipeline.index.index.search,
                                        pipeline.index.catch_up)
        watcher = Watcher(pipeline, root, once=once, on_idle=lambda wait: recluster.poll(wait))
        restore = trap_stop_signals(pipeline.stop, self.settings.ingest.stop_grace_s)
        try:
            return watcher.run()
        finally:
            restore()

    def rebuild(self, progress: bool = True) -> dict[str, Any]:
        """``ingest --rebuild``: embed every stored file again with the configured models and preprocessing,
        keeping the ids (and so the user's word) of faces found again (indexer/rebuild.py)."""
        from indexer.pipeline.faces import FaceStage
        from indexer.pipeline.runner import trap_stop_signals
        from indexer.rebuild import Rebuild, finish

        job = Rebuild(self.settings, self.store, FaceStage(self.settings, lambda: (self.detector, self.embedder)),
                      self._fingerprint)
        vectors = self.vectors  # the snapshot of the old vectors, kept in step with their replacement below
        restore = trap_stop_signals(job.stop, self.settings.ingest.stop_grace_s)
        try:
            summary = job.run(progress)
        finally:
            restore()
        vectors.catch_up()
        vectors.save(force=True)
        return finish(self.store, self.settings, summary).to_dict()

    # ------------------------------------------------------------------ searching
    def embed_image(self, path: str | Path) -> list[tuple[dict[str, Any], np.ndarray]]:
        """Faces of a photo that is not (necessarily) indexed: (record, vector) for each."""
        from indexer.images import decode

        if not Path(path).is_file():
            raise NotFoundError(f"{path} does not exist")
        self._check_model()
        image = decode(str(path), self.settings.ingest.max_pixels, self.settings.detector.max_side)
        faces = self.detector.detect([image])[0]
        source = self.detector.crop_source(image, faces)
        vectors = self.embedder.embed([self.detector.crop(source, f) for f in faces])
        return [(f.to_record(), v) for f, v in zip(faces, vectors, strict=True)]

    def _stored_query(self, face_id: int) -> list[tuple[dict[str, Any], np.ndarray]]:
        with self.store.read() as txn:
            face = self.store.get_face(face_id, txn)
            if face is None:
                raise NotFoundError(f"no face with id {face_id} in {self.dir}")
            vector = self.store.get_vector(face_id, txn)
            if vector is None:
                raise NotFoundError(f"face {face_id} has no usable vector (a damaged record: see `faceindex status`)")
            vector = vector.copy()
        return [({"face_id": face_id, "path": face.path, "box": face.box, "prob": face.prob}, vector)]

    def query(self, image: str | Path | None = None, face_id: int | None = None, k: int = 10,
              min_similarity: float | None = None) -> list[dict[str, Any]]:
        """For each face in ``image`` (or the stored face ``face_id``), the ``k`` nearest indexed faces."""
        queries = self._stored_query(face_id) if face_id is not None else self.embed_image(image)
        if not queries:
            return []
        index = self.vectors
        index.catch_up()
        # Ask for one more when querying a stored face: it finds itself first and is left out.
        extra = 1 if face_id is not None else 0
        sims, ids = index.index.search(np.stack([v for _, v in queries]), k + extra)
        results = []
        with self.store.read() as txn:
            for (rec, _), row_s, row_i in zip(queries, sims, ids, strict=True):
                matches = []
                for s, i in zip(row_s, row_i, strict=True):
                    if i < 0 or i == face_id or (min_similarity is not None and s < min_similarity):
                        continue
                    face = self.store.get_face(int(i), txn)
                    if face is not None:
                        matches.append({"face_id": int(i), "path": face.path, "box": face.box,
                                        "similarity": round(float(s), 4), "cluster": face.cluster})
                results.append({**{k_: rec[k_] for k_ in ("box", "prob") if k_ in rec}, "matches": matches[:k]})
        return results

    def status(self) -> dict[str, Any]:
        """Counts kept by the store, the clustering's summary, the last integrity check: no scan of the records."""
        from indexer.persons.state import clustering_summary
        from indexer.store.check import last

        counts = self.store.counts()
        return {"index_dir": str(self.dir), "files": counts["files"], "faces": counts["faces"],
                "model": counts["model"], "index": self._index_info(counts["seq"], counts["model"]),
                "clusters": clustering_summary(self.store), "daemon": daemon_status(self.dir),
                "store_bytes": self.store.disk_bytes(), "failures": counts["failures"], "damaged": last(self.store)}

    def _index_info(self, seq: int, model: str | None) -> dict[str, Any]:
        """The vector index for ``status``: from a current snapshot's header, else the index loaded and caught up."""
        from indexer.store.lmdb_store import SNAPSHOT_FILE
        from indexer.store.snapshot_info import status_info

        if "vectors" not in self.__dict__ and (  # not loaded yet (a cached_property)
                info := status_info(self.dir / SNAPSHOT_FILE, seq, model, self.settings.index)) is not None:
            return info
        index = self.vectors
        return {**index.info(), "snapshot_seq": index.saved_seq, "store_seq": seq}

    def check(self, progress: bool = False) -> dict[str, Any]:
        """``faceindex check``: read and check every record; the findings are kept for ``status``."""
        from indexer.store.check import record, scan

        result = scan(self.store, progress)
        record(self.store, result)
        return result

    def export(self, out: str | Path) -> dict[str, Any]:
        from indexer.persons.artefacts import export

        return export(self.store, out)

    def assign(self, paths: list[str | Path], out: str | Path, progress: bool = False) -> dict[str, Any]:
        from tqdm import tqdm

        from indexer.errors import ImageError
        from indexer.persons.artefacts import assign
        from indexer.pipeline.scan import scan

        files = list(scan(paths, self.settings.ingest.extensions, self.settings.watch.ignore))
        faces, failures = [], []
        for path in tqdm(files, unit="img", disable=not progress, desc="assign"):
            try:
                faces += [(path, rec, vec) for rec, vec in self.embed_image(path)]
            except ImageError as exc:
                failures.append({"path": path, "reason": str(exc)})
        return {**assign(self.store, faces, out), "files": len(files), "failures": failures}

    def report(self, out: str | Path, open_browser: bool = False) -> dict[str, Any]:
        from indexer.persons.artefacts import report_faces
        from indexer.report import build_report

        clustering, faces, vectors = report_faces(self.store)
        return build_report(Path(out), faces, vectors, names=clustering.names, metrics=dict(clustering.metrics),
                            title=f"faceindex: {self.dir}", seed=self.settings.cluster.seed,
                            open_browser=open_browser)

