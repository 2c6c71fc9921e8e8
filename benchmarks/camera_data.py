"""The camera workload: 12-megapixel JPEGs made from the repository's own licensed photos, and their reference faces.

A real photo library is camera-size JPEGs, not LFW's 250x250 crops. No camera photos with a licence we may use are
at hand, so the set is **made**, and it says so:

- every photo of ``face_recognition/`` and ``multi_face/`` (../shared/data; the repo's ``samples/`` when those are
  absent), **upscaled** (bicubic) to 4000 px on the long side and saved as JPEG quality 90: 26 photos, the set the
  issue measured (3.5 images/s). Upscaled photos are smoother than camera photos; JPEG decode cost depends on the
  pixel count and quality, which match a 12 MP camera JPEG;
- ``GROUPS`` group photos, 4000x3000, each a seeded collage of ``PER_GROUP`` head-and-shoulders tiles cut from those
  photos around their faces and scaled so each face is 40-120 px wide at full resolution (what a group photo on a
  12 MP camera holds), on a blurred, upscaled photo as background.

The **reference faces** of each file are what facenet-pytorch's own ``MTCNN.detect`` finds on the full-resolution
image (min_face_size 20, its default thresholds, probability >= 0.9 as faceindex keeps), limited to faces whose box
side is at least 1% of the photo's long side (40 px here): the faces a user expects to be found. Recall is the
share of reference faces that faceindex finds (a box with IoU >= 0.5). Files and references are cached under
``$FACEINDEX_BENCH_CACHE/camera-<VERSION>``, by default the faceindex cache's ``bench/camera-<VERSION>``
(``~/.cache/faceindex``, see weights.cache_dir; seconds to make, a minute or two to detect, once).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parent.parent
VERSION = "v1"            # bump when the recipe changes: the cache is keyed by it
LONG_SIDE = 4000
QUALITY = 90
GROUPS = 4
PER_GROUP = 16
FACE_PX = (40, 120)       # face width range in group photos, full-resolution pixels
MIN_FACE_FRACTION = 0.01  # reference faces: box side >= 1% of the long side
MIN_PROB = 0.9
MATCH_IOU = 0.5


def cache_dir() -> Path:
    from indexer.models.weights import cache_dir as faceindex_cache

    base = Path(os.environ.get("FACEINDEX_BENCH_CACHE") or faceindex_cache() / "bench")
    return base / f"camera-{VERSION}"


def sources(data_root: Path | None) -> list[Path]:
    """The licensed photos the set is made from (attribution: ../shared/data/meta/PROVENANCE.md, samples/LICENSE.md)."""
    if data_root is not None and (data_root / "face_recognition").is_dir():
        found = sorted((data_root / "face_recognition").rglob("*")) + sorted((data_root / "multi_face").rglob("*"))
    else:
        found = sorted((REPO / "samples").rglob("*"))
    return [p for p in found if p.suffix.lower() in (".jpg", ".jpeg", ".png")]


def _rgb(path: Path) -> Image.Image:
    from indexer.images import to_rgb

    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def upscale(img: Image.Image, long_side: int = LONG_SIDE) -> Image.Image:
    w, h = img.size
    f = long_side / max(w, h)
    return img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BICUBIC)


def _faces_at_native_size(photos: list[Image.Image]) -> list[np.ndarray]:
    """Boxes [n, 4] of the faces of each source photo (for cutting group tiles around them)."""
    from facenet_pytorch import MTCNN

    mtcnn = MTCNN(keep_all=True, device="cpu")
    out = []
    for img in photos:
        boxes, probs = mtcnn.detect(img)
        keep = [] if boxes is None else [b for b, p in zip(boxes, probs, strict=True) if p >= MIN_PROB]
        out.append(np.asarray(keep, np.float64).reshape(-1, 4))
    return out


def group_photo(photos: list[Image.Image], boxes: list[np.ndarray], rng: random.Random,
                size: tuple[int, int] = (4000, 3000)) -> Image.Image:
    """A collage: a grid of tiles, each cut around one face and scaled so that face is FACE_PX wide."""
    background = photos[rng.randrange(len(photos))]
    canvas = background.resize((size[0] // 8, size[1] // 8), Image.BILINEAR).filter(ImageFilter.GaussianBlur(4))
    canvas = canvas.resize(size, Image.BICUBIC)
    faces = [(i, b) for i, bs in enumerate(boxes) for b in bs]
    cols, rows = 5, 4
    cell_w, cell_h = size[0] // cols, size[1] // rows
    for slot in rng.sample(range(cols * rows), PER_GROUP):
        i, (x1, y1, x2, y2) = faces[rng.randrange(len(faces))]
        target = rng.uniform(*FACE_PX)
        scale = target / max(x2 - x1, 1.0)
        cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * 1.6  # head and shoulders around the face
        tile = photos[i].crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half * 1.6)))
        tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))), Image.LANCZOS)
        r, c = divmod(slot, cols)
        x = c * cell_w + rng.randrange(max(1, cell_w - tile.width))
        y = r * cell_h + rng.randrange(max(1, cell_h - tile.height))
        canvas.paste(tile, (x, y))
    return canvas


def make(data_root: Path | None, out: Path | None = None, groups: int = GROUPS, limit: int | None = None,
         long_side: int = LONG_SIDE) -> list[Path]:
    """The camera set's files (made once, then reused from the cache). ``limit`` / ``long_side``: a smaller set
    (for --smoke)."""
    out = out or cache_dir()
    srcs = sources(data_root)[:limit]
    names = [f"{i:02d}_{p.stem}.jpg" for i, p in enumerate(srcs)] + [f"group_{g}.jpg" for g in range(groups)]
    files = [out / n for n in names]
    if all(f.exists() for f in files):
        return files
    out.mkdir(parents=True, exist_ok=True)
    photos = [_rgb(p) for p in srcs]
    for img, f in zip(photos, files, strict=False):
        _save(upscale(img, long_side), f)
    boxes = _faces_at_native_size(photos) if groups else []
    rng = random.Random(1234)
    for g in range(groups):
        size = (long_side, long_side * 3 // 4)
        _save(group_photo(photos, boxes, rng, size), files[len(srcs) + g])
    return files


def _save(img: Image.Image, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    img.save(tmp, "JPEG", quality=QUALITY)
    os.replace(tmp, path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_faces(files: list[Path]) -> dict[str, list[list[float]]]:
    """path -> boxes of the reference faces (full-resolution MTCNN, side >= 1% of the long side); cached by sha256."""
    from facenet_pytorch import MTCNN

    cache = cache_dir() / "reference.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    mtcnn = None
    out = {}
    for f in files:
        key = _sha(f)
        if key not in known:
            mtcnn = mtcnn or MTCNN(keep_all=True, min_face_size=20, device="cpu")
            img = _rgb(f)
            boxes, probs = mtcnn.detect(img)
            long_side = max(img.size)
            keep = [] if boxes is None else [
                [float(v) for v in b] for b, p in zip(boxes, probs, strict=True)
                if p >= MIN_PROB and min(b[2] - b[0], b[3] - b[1]) >= MIN_FACE_FRACTION * long_side]
            known[key] = keep
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known))
        out[str(f)] = known[key]
    return out


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def recall(reference: dict[str, list[list[float]]], found: dict[str, list[list[float]]]) -> tuple[float, int, int]:
    """(recall, reference faces found, reference faces): a reference face is found by a box with IoU >= 0.5."""
    total = hit = 0
    for path, ref in reference.items():
        boxes = found.get(path, [])
        for r in ref:
            total += 1
            hit += any(iou(r, b) >= MATCH_IOU for b in boxes)
    return (hit / total if total else 1.0), hit, total
