"""Face detection with facenet-pytorch's MTCNN (wrapped, not forked).

``FaceDetector.detect`` finds every face of a list of images of any sizes in batches: each image is downscaled so its
long side is at most ``max_side``, and copies of the same shape are stacked into one tensor (photos from one camera
share a shape after downscaling; LFW is all 250x250). Letterboxing mixed shapes into one batch was tried and
rejected: MTCNN's scale pyramid follows the padded size, so a padded image got other boxes (and a false face) than
the same image alone. Grouping keeps batched results identical to one-by-one detection. Boxes and landmarks are
mapped back to the original image's pixels.

On CPU, detection runs ``mtcnn_fast.detect_faces``: facenet-pytorch's networks and three-stage algorithm with its
CPU hot spots (max pooling, the per-box crop loop, the pyramid's resizes) replaced by bit-identical equivalents and
the networks channels-last; it finds the same faces as ``MTCNN.detect`` (see that module), its batches spread over
``workers`` threads (``parallel.choose_workers``). On CUDA it runs ``MTCNN.detect`` unchanged.

``crop`` cuts a face from the decoded image, with facenet-pytorch's margin, and applies the fixed standardisation
(x - 127.5) / 128 that both embedders were trained with; ``crop_source`` says which decode to cut from (a face
too small for the draft-reduced image is cut from the full-resolution one).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from facenet_pytorch import MTCNN
from PIL import Image

from indexer.config import DetectorSettings
from indexer.images import DecodedImage, detection_copy
from indexer.models.device import choose_detector_batch, describe_device
from indexer.models.embedder import pick_device
from indexer.models.facenet_api import helper
from indexer.models.mtcnn_fast import detect_faces, prepare_nets
from indexer.models.parallel import available_workers, choose_workers, map_workers, plan_chunks

log = logging.getLogger("faceindex.detector")
extract_face = helper("extract_face")


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels
    prob: float
    landmarks: tuple[tuple[float, float], ...]  # 5 points (eyes, nose, mouth corners), original pixels

    def to_record(self) -> dict:
        return {"box": [round(v, 2) for v in self.box], "prob": round(self.prob, 6),
                "landmarks": [[round(x, 2), round(y, 2)] for x, y in self.landmarks]}


def needs_full_resolution(scale: float, sides: list[float], image_size: int, margin: int) -> bool:
    """Whether faces found on an image that draft mode reduced ``scale`` times must be cropped from the full-
    resolution decode: when a face's crop (its box plus the margin, ``image_size`` pixels in the end) would be
    upsampled from the reduced image although the file holds more pixels. ``sides``: the faces' shorter box sides
    in original pixels. Measured on 12 MP photos: cropping faces under 80 px from a half-scale decode moved their
    embeddings to cosine 0.91 (0.76 at worst) of the full-resolution crop's; faces over 320 px, 0.9996."""
    if scale <= 1.0:
        return False
    return any(side / scale < image_size - margin for side in sides)


def plan_batches(shapes: list[tuple[int, ...]], batch_size: int) -> list[list[int]]:
    """Group image indices by identical shape into batches of at most ``batch_size``."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return [idx[i:i + batch_size] for idx in groups.values() for i in range(0, len(idx), batch_size)]


class FaceDetector:
    """MTCNN with batching over mixed image sizes; returns all faces above ``min_prob``."""

    def __init__(self, settings: DetectorSettings | None = None, device: str | torch.device = "auto",
                 workers: int = 0) -> None:
        self.settings = settings or DetectorSettings()
        # "auto" follows the embedder's rule (cuda when available), so a detector built alone runs where the
        # pipeline's would.
        self.device = pick_device(device) if isinstance(device, str) else device
        self.mtcnn = MTCNN(
            image_size=self.settings.image_size, margin=self.settings.margin,
            min_face_size=self.settings.min_face_size, thresholds=list(self.settings.thresholds),
            keep_all=True, select_largest=False, post_process=True, device=self.device,
        ).eval()
        self.nets = (self.mtcnn.pnet, self.mtcnn.rnet, self.mtcnn.onet)
        if self.device.type == "cpu":  # cuDNN pools fast; the CPU kernels are what mtcnn_fast replaces
            self.nets = prepare_nets(*self.nets)
        self.batch_size, self.batch_reason = choose_detector_batch(
            self.settings.batch_size, describe_device(self.device), self.settings.max_side, self.settings.min_face_size)
        self.workers, self.workers_reason = choose_workers(workers, describe_device(self.device))
        log.info("detector on %s, batch %d: %s; workers %d: %s", self.device, self.batch_size, self.batch_reason,
                 self.workers, self.workers_reason)

    def detect(self, images: list[DecodedImage] | list[Image.Image],
               seconds: dict[str, float] | None = None) -> list[list[DetectedFace]]:
        """All faces of each image, most probable first; boxes in original-image coordinates. ``seconds``, if
        given, receives the time spent making the detection copies ("resize")."""
        to_orig = [im.scale if isinstance(im, DecodedImage) else 1.0 for im in images]
        started = time.perf_counter()
        side = self.settings.max_side
        copies = [im.detection_copy(side) if isinstance(im, DecodedImage) else detection_copy(im, side)
                  for im in images]
        if seconds is not None:
            seconds["resize"] = seconds.get("resize", 0.0) + time.perf_counter() - started
        results: list[list[DetectedFace]] = [[] for _ in images]
        # MTCNN's pyramid starts at the minimum face size: a smaller image has no scale to look at (and facenet-pytorch
        # fails on it), so it has no face.
        big_enough = [i for i, c in enumerate(copies) if min(c[0].shape[:2]) >= self.settings.min_face_size]
        shapes = [copies[i][0].shape[:2] for i in big_enough]
        # Batches small enough that every worker gets one (16 same-shape LFW photos on 2 workers: 8 + 8); on a
        # thread that is itself a worker (FaceStage hands each worker its photos), all of them are its own.
        workers = available_workers(self.workers)
        per_batch = min(self.batch_size, max(1, -(-len(big_enough) // workers)))
        batches = [[big_enough[j] for j in group] for group in plan_batches(shapes, per_batch)]
        found = map_workers(lambda batch: self._detect(np.stack([copies[i][0] for i in batch])), batches, workers)
        for batch, faces in zip(batches, found, strict=True):
            for i, (boxes, probs, points) in zip(batch, faces, strict=True):
                results[i] = self._faces(boxes, probs, points, copies[i][1] * to_orig[i])
        return results

    def plan(self, images: list[DecodedImage] | list[Image.Image]) -> list[list[int]]:
        """``images`` (their indices) in chunks for the model workers, each of which detects, crops and embeds a
        chunk by itself (FaceStage): photos of one detection shape stay together (they batch), and the costliest
        chunks (pixels the detector sees) come first (``parallel.plan_chunks``). One chunk of all on one worker."""
        if self.workers <= 1 or len(images) <= 1:
            return [list(range(len(images)))]
        side = self.settings.max_side
        shapes, costs = [], []
        for im in images:
            if isinstance(im, DecodedImage):  # its copy was made ahead by the reader threads: no work here
                h, w = im.detection_copy(side)[0].shape[:2]
            else:  # a plain PIL image: its own size stands for its copy's (same size, same copy)
                w, h = im.size
            shapes.append((h, w))
            shrink = min(1.0, side / max(h, w, 1))
            costs.append(h * w * shrink * shrink)
        return plan_chunks(plan_batches(shapes, len(images)), costs, self.workers, self.batch_size)

    def _detect(self, stacked: np.ndarray) -> list[tuple]:
        """(boxes [n, 4], probs [n], landmarks [n, 5, 2]) per image of a same-shape uint8 batch [B, H, W, 3]."""
        m = self.mtcnn
        if self.device.type == "cpu":
            found = detect_faces(stacked, *self.nets, m.min_face_size, m.thresholds, m.factor)
            return [(boxes[:, :4], boxes[:, 4], points) for boxes, points in found]
        boxes, probs, points = m.detect(stacked, landmarks=True)
        return list(zip(boxes, probs, points, strict=True))

    def _faces(self, boxes, probs, points, factor: float) -> list[DetectedFace]:
        if boxes is None:
            return []
        # numpy 2 hands back object arrays from MTCNN.detect: cast before arithmetic.
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        points = np.asarray(points, dtype=np.float64).reshape(-1, 5, 2)
        faces = []
        for box, prob, pts in zip(boxes, probs, points, strict=True):
            if prob < self.settings.min_prob:
                continue
            x1, y1, x2, y2 = (float(v) * factor for v in box)
            faces.append(DetectedFace(
                box=(x1, y1, x2, y2), prob=float(prob),
                landmarks=tuple((float(x) * factor, float(y) * factor) for x, y in pts),
            ))
        faces.sort(key=lambda f: -f.prob)
        return faces

    def crop_source(self, image: DecodedImage, faces: list[DetectedFace]) -> DecodedImage:
        """The image to cut ``faces`` from: ``image``, or its full-resolution decode when a face needs it."""
        sides = [min(f.box[2] - f.box[0], f.box[3] - f.box[1]) for f in faces]
        if needs_full_resolution(image.scale, sides, self.settings.image_size, self.settings.margin):
            return image.full_resolution()
        return image

    def crop(self, image: DecodedImage | Image.Image, face: DetectedFace) -> torch.Tensor:
        """3x160x160 float tensor, fixed-standardised, cut from ``image`` (pass ``crop_source``'s choice)."""
        pil = image.image if isinstance(image, DecodedImage) else image
        scale = image.scale if isinstance(image, DecodedImage) else 1.0
        box = [v / scale for v in face.box]
        tensor = extract_face(pil, box, image_size=self.settings.image_size, margin=self.settings.margin)
        return (tensor - 127.5) / 128.0

    def thumbnail(self, image: DecodedImage | Image.Image, face: DetectedFace, size: int) -> Image.Image:
        """A small square RGB crop of the face (with some context) for galleries."""
        pil = image.image if isinstance(image, DecodedImage) else image
        scale = image.scale if isinstance(image, DecodedImage) else 1.0
        x1, y1, x2, y2 = (v / scale for v in face.box)
        side = max(x2 - x1, y2 - y1) * 1.3
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        square = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        return pil.crop(tuple(int(round(v)) for v in square)).resize((size, size), Image.BILINEAR)
