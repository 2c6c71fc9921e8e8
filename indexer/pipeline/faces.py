"""The model stage: detect, crop, embed and thumbnail the faces of a batch of decoded images."""

from __future__ import annotations

import io
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from indexer.config import Settings
from indexer.embedding import stack_vectors
from indexer.pipeline.records import FaceItem, ReadItem
from indexer.store.records import NewFace

if TYPE_CHECKING:
    from indexer.images import DecodedImage
    from indexer.models.detector import DetectedFace, FaceDetector
    from indexer.models.embedder import FaceEmbedder

# Builds (detector, embedder) on first use: a run with nothing new to embed never loads torch.
ModelLoader = Callable[[], "tuple[FaceDetector, FaceEmbedder]"]


@dataclass(frozen=True)
class ModelsFromSettings:
    """A model loader that is plain data: a stage built with it can be shipped to another process (a Ray actor)
    and builds its models there, on first use. ``prefer``: the weights the index was built with."""

    settings: Settings
    prefer: str | None = None

    def __call__(self) -> tuple[FaceDetector, FaceEmbedder]:
        from indexer.models.detector import FaceDetector
        from indexer.models.embedder import FaceEmbedder

        workers = self.settings.ingest.model_workers
        embedder = FaceEmbedder(self.settings.embedder, prefer=self.prefer, workers=workers)
        return FaceDetector(self.settings.detector, device=embedder.device, workers=workers), embedder


class StageTimer:
    """Seconds spent per stage, for the per-batch log line and the benchmark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] += time.perf_counter() - started

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def summary(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


class FaceStage:
    """Detect, crop, embed and thumbnail the faces of the items that need them; the others pass through.

    The models come from ``models`` on first use (in the process that runs the stage), so the stage itself holds
    only settings and a loader until then.
    """

    def __init__(self, settings: Settings, models: ModelLoader) -> None:
        self.thumbnail_size = settings.ingest.thumbnail_size
        self._load = models
        self._models: tuple[FaceDetector, FaceEmbedder] | None = None

    @property
    def detector(self) -> FaceDetector:
        return self.models()[0]

    @property
    def embedder(self) -> FaceEmbedder:
        return self.models()[1]

    def models(self) -> tuple[FaceDetector, FaceEmbedder]:
        if self._models is None:
            self._models = self._load()
        return self._models

    def warm_up(self) -> None:
        """One tiny forward pass through both models, so the first photo of a trickle is not also paying for
        torch's lazy initialisation (measured: several seconds of extra latency on the first file)."""
        import torch
        from PIL import Image

        self.detector.detect([Image.new("RGB", (64, 64))])
        self.embedder.embed(torch.zeros(1, 3, 160, 160))

    def __call__(self, items: list[ReadItem], timer: StageTimer | None = None) -> list[FaceItem]:
        """The faces of ``items``. On several model workers (CPU) each worker takes a chunk of photos
        (``FaceDetector.plan``) and detects, crops, embeds and thumbnails them by itself: no worker waits for
        the others between detection and embedding, and the crops (with any full-resolution decode) run in
        parallel too. The stage seconds are then summed over the workers. One worker (GPU): one chunk of all."""
        from indexer.models.parallel import map_workers

        timer = timer or StageTimer()
        todo = [i for i, it in enumerate(items) if it.needs_faces]
        out = [FaceItem(it) for it in items]
        if todo:
            detector = self.detector
            chunks = [[todo[j] for j in chunk] for chunk in detector.plan([items[i].image for i in todo])]
            done = map_workers(lambda chunk: self._chunk([items[i] for i in chunk]), chunks, detector.workers)
            for chunk, (faces, seconds) in zip(chunks, done, strict=True):
                for i, new_faces in zip(chunk, faces, strict=True):
                    out[i].faces = new_faces
                for stage, spent in seconds.items():
                    timer.add_seconds(stage, spent)
        for fi in out:  # free the pixels as soon as the faces are out
            if fi.read.image is not None:
                fi.read = replace(fi.read, image=None)
        return out

    def _chunk(self, items: list[ReadItem]) -> tuple[list[list[NewFace]], dict[str, float]]:
        """Detect, crop, embed and thumbnail the faces of ``items`` (on the calling thread when it is a model
        worker): the new faces of each item, and the seconds spent per stage."""
        timer = StageTimer()
        started = time.perf_counter()
        spent: dict[str, float] = {}
        detections = self.detector.detect([it.image for it in items], spent)
        for stage, seconds in spent.items():  # the detection copies' resize, apart from detection itself
            timer.add_seconds(stage, seconds)
        timer.add("detect", started + sum(spent.values()))
        crops, owners = [], []
        for i, faces in enumerate(detections):
            if not faces:
                continue
            started = time.perf_counter()
            source = self.detector.crop_source(items[i].image, faces)  # a full decode when faces are small
            if source is not items[i].image:
                timer.add("decode_full", started)
            started = time.perf_counter()
            for face in faces:
                crops.append(self.detector.crop(source, face))
                owners.append((i, face))
            timer.add("crop", started)
        started = time.perf_counter()
        vectors = self.embedder.embed(crops) if crops else stack_vectors([])
        timer.add("embed", started)
        started = time.perf_counter()
        new_faces: list[list[NewFace]] = [[] for _ in items]
        for (i, face), vector in zip(owners, vectors, strict=True):
            new_faces[i].append(self._new_face(items[i].image, face, vector))
        timer.add("thumbnail", started)
        return new_faces, dict(timer.seconds)

    def _new_face(self, image: DecodedImage, face: DetectedFace, vector: np.ndarray) -> NewFace:
        buf = io.BytesIO()
        self.detector.thumbnail(image, face, self.thumbnail_size).save(buf, "JPEG", quality=85)
        rec = face.to_record()
        return NewFace(box=rec["box"], prob=rec["prob"], landmarks=rec["landmarks"], vector=vector,
                       thumbnail=buf.getvalue())

