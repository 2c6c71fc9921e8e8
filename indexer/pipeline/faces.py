"""The model stage: detect, crop, embed and thumbnail the faces of a batch of decoded images."""

from __future__ import annotations

import io
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from indexer.config import Settings
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
        """The faces of ``items``. The model workers (one per core on CPU, one on a GPU) take chunks of photos
        (``FaceDetector.plan``: one shape a chunk, costliest first) to detect and crop, and batches of the crops
        to embed and thumbnail, side by side with no barrier between the two (``schedule.run_two_stages``).
        Stage seconds are summed over the workers."""
        from indexer.pipeline.schedule import run_two_stages

        timer = timer or StageTimer()
        todo = [i for i, it in enumerate(items) if it.needs_faces]
        out = [FaceItem(it) for it in items]
        if todo:
            detector, embedder = self.models()
            chunks = [[todo[j] for j in chunk] for chunk in detector.plan([items[i].image for i in todo])]
            found: dict[int, list[tuple[int, NewFace]]] = {i: [] for i in todo}
            lock = threading.Lock()

            def cut(chunk: list[int]) -> list[tuple[int, int, DetectedFace, object]]:
                return self._detect_and_crop([items[i] for i in chunk], chunk, timer, lock)

            def embed(crops: list[tuple[int, int, DetectedFace, object]]) -> None:
                started = time.perf_counter()
                vectors = embedder.embed([crop for *_, crop in crops])
                embedded = time.perf_counter()
                new = [(i, rank, self._new_face(items[i].image, face, v))
                       for (i, rank, face, _), v in zip(crops, vectors, strict=True)]
                with lock:
                    timer.add_seconds("embed", embedded - started)
                    timer.add("thumbnail", embedded)
                    for i, rank, face in new:
                        found[i].append((rank, face))

            run_two_stages(chunks, cut, embed, embedder.faces_per_pass, detector.workers)
            for i, faces in found.items():  # most probable first, as the detector ranked them
                out[i].faces = [face for _, face in sorted(faces, key=lambda pair: pair[0])]
        for fi in out:  # free the pixels as soon as the faces are out
            if fi.read.image is not None:
                fi.read = replace(fi.read, image=None)
        return out

    def _detect_and_crop(self, items: list[ReadItem], where: list[int], timer: StageTimer,
                         lock: threading.Lock) -> list[tuple[int, int, DetectedFace, object]]:
        """(item index, rank, face, crop) of every face of ``items`` (``where``: their indices in the batch)."""
        seconds: dict[str, float] = defaultdict(float)
        started = time.perf_counter()
        spent: dict[str, float] = {}
        detections = self.detector.detect([it.image for it in items], spent)
        seconds["detect"] = time.perf_counter() - started - sum(spent.values())
        for stage, value in spent.items():  # the detection copies' resize, apart from detection itself
            seconds[stage] += value
        crops = []
        for item, i, faces in zip(items, where, detections, strict=True):
            if not faces:
                continue
            started = time.perf_counter()
            source = self.detector.crop_source(item.image, faces)  # a full decode when faces are small
            if source is not item.image:
                seconds["decode_full"] += time.perf_counter() - started
            started = time.perf_counter()
            crops += [(i, rank, face, self.detector.crop(source, face)) for rank, face in enumerate(faces)]
            seconds["crop"] += time.perf_counter() - started
        with lock:
            for stage, value in seconds.items():
                timer.add_seconds(stage, value)
        return crops

    def _new_face(self, image: DecodedImage, face: DetectedFace, vector: np.ndarray) -> NewFace:
        buf = io.BytesIO()
        self.detector.thumbnail(image, face, self.thumbnail_size).save(buf, "JPEG", quality=85)
        rec = face.to_record()
        return NewFace(box=rec["box"], prob=rec["prob"], landmarks=rec["landmarks"], vector=vector,
                       thumbnail=buf.getvalue())

