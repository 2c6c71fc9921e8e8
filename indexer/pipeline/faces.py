"""The model stage: detect, crop, embed and thumbnail the faces of a batch of decoded images."""

from __future__ import annotations

import io
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from indexer.config import Settings
from indexer.embedding import stack_vectors
from indexer.images import DecodedImage
from indexer.models.detector import DetectedFace, FaceDetector
from indexer.models.embedder import FaceEmbedder
from indexer.pipeline.records import FaceItem, ReadItem
from indexer.store.lmdb_store import NewFace


class StageTimer:
    """Seconds spent per stage, for the per-batch log line and the benchmark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] += time.perf_counter() - started

    def summary(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


class FaceStage:
    """Detect, crop, embed and thumbnail the faces of the items that need them; the others pass through."""

    def __init__(self, settings: Settings, detector: FaceDetector, embedder: FaceEmbedder) -> None:
        self.thumbnail_size = settings.ingest.thumbnail_size
        self.detector = detector
        self.embedder = embedder

    def warm_up(self) -> None:
        """One tiny forward pass through both models, so the first photo of a trickle is not also paying for
        torch's lazy initialisation (measured: several seconds of extra latency on the first file)."""
        self.detector.detect([Image.new("RGB", (64, 64))])
        self.embedder.embed(torch.zeros(1, 3, 160, 160))

    def __call__(self, items: list[ReadItem], timer: StageTimer | None = None) -> list[FaceItem]:
        timer = timer or StageTimer()
        todo = [i for i, it in enumerate(items) if it.needs_faces]
        started = time.perf_counter()
        detections = self.detector.detect([items[i].image for i in todo]) if todo else []
        timer.add("detect", started)
        started = time.perf_counter()
        crops, owners = [], []
        for i, faces in zip(todo, detections, strict=True):
            for face in faces:
                crops.append(self.detector.crop(items[i].image, face))
                owners.append((i, face))
        timer.add("crop", started)
        started = time.perf_counter()
        vectors = self.embedder.embed(crops) if crops else stack_vectors([])
        timer.add("embed", started)
        started = time.perf_counter()
        out = [FaceItem(it) for it in items]
        for (i, face), vector in zip(owners, vectors, strict=True):
            out[i].faces.append(self._new_face(items[i].image, face, vector))
        for fi in out:  # free the pixels as soon as the faces are out
            if fi.read.image is not None:
                fi.read = replace(fi.read, image=None)
        timer.add("thumbnail", started)
        return out

    def _new_face(self, image: DecodedImage, face: DetectedFace, vector: np.ndarray) -> NewFace:
        buf = io.BytesIO()
        self.detector.thumbnail(image, face, self.thumbnail_size).save(buf, "JPEG", quality=85)
        rec = face.to_record()
        return NewFace(box=rec["box"], prob=rec["prob"], landmarks=rec["landmarks"], vector=vector,
                       thumbnail=buf.getvalue())

