"""Camera-size photos: draft-mode decoding for detection, and crops from the full decode when a face needs it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from indexer.images import decode
from indexer.models.detector import needs_full_resolution
from indexer.store.lmdb_store import FaceStore
from tests.conftest import SAMPLES, cli

GROUP = SAMPLES / "group" / "obama_and_biden.jpg"     # 2000 x 1428, three faces
PORTRAIT = SAMPLES / "photos" / "obama" / "obama1.jpg"  # 1480 x 832, one large face


@pytest.mark.parametrize("scale,sides,want", [
    (1.0, [20.0], False),          # not reduced: nothing more to decode
    (2.0, [400.0], False),         # 200 px in the reduced image: the 128 px box of a 160 px crop is downsampled
    (2.0, [256.0], False),         # exactly 128 px: not upsampled
    (2.0, [255.0], True),          # just under: the full decode has more pixels to give
    (4.0, [600.0, 300.0], True),   # one small face is enough
    (2.0, [], False),              # no face, no second decode
])
def test_needs_full_resolution_table(scale, sides, want):
    assert needs_full_resolution(scale, sides, image_size=160, margin=32) is want


def test_a_draft_decode_keeps_its_bytes_and_decodes_them_in_full():
    full = decode(GROUP, 10**9)
    assert full.scale == 1.0 and full.encoded is None  # nothing held for an image decoded in full
    draft = decode(GROUP.read_bytes(), 10**9, min_side_needed=500)
    assert draft.image.size == (500, 357) and draft.scale == 4.0 and draft.orig_size == (2000, 1428)
    again = draft.full_resolution()
    assert again.scale == 1.0 and again.image.size == (2000, 1428)
    assert np.array_equal(np.asarray(again.image), np.asarray(full.image))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_small_faces_are_cropped_from_the_full_decode(detector, embedder):
    draft = decode(GROUP, 10**9, min_side_needed=500)  # faces of ~150-250 px become ~40-60 px
    faces = detector.detect([draft])[0]
    assert len(faces) >= 2
    source = detector.crop_source(draft, faces)
    assert source.scale == 1.0
    full = decode(GROUP, 10**9)
    ours = embedder.embed([detector.crop(source, f) for f in faces])
    want = embedder.embed([detector.crop(full, f) for f in faces])
    reduced = embedder.embed([detector.crop(draft, f) for f in faces])
    assert all(_cos(a, b) > 0.9999 for a, b in zip(ours, want, strict=True))
    # What the second decode is for: crops upsampled from the reduced image embed measurably elsewhere.
    assert min(_cos(a, b) for a, b in zip(reduced, want, strict=True)) < 0.99


def test_large_faces_are_cropped_from_the_draft_decode(detector):
    draft = decode(PORTRAIT, 10**9, min_side_needed=740)
    assert draft.scale == 2.0
    faces = detector.detect([draft])[0]
    assert len(faces) == 1 and faces[0].box[2] - faces[0].box[0] > 2 * 128
    assert detector.crop_source(draft, faces) is draft  # no second decode


def test_ingest_of_a_camera_size_jpeg_gives_the_full_resolution_vectors(tmp_path, detector, embedder):
    """End to end: a 4000 px JPEG is draft-decoded for detection, and its faces' vectors are the ones a full decode
    gives (boxes from the reduced copy, crops from whichever decode the face needs)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    img = Image.open(GROUP).convert("RGB")
    big = img.resize((4000, round(4000 * img.size[1] / img.size[0])), Image.BICUBIC)
    big.save(photos / "camera.jpg", quality=90)
    index = tmp_path / "index"
    cli("ingest", "--index", str(index), str(photos))
    store = FaceStore(index, readonly=True)
    try:
        with store.read() as txn:
            got = store.all_vectors(txn)[1]
    finally:
        store.close()
    full = decode(photos / "camera.jpg", 10**9)
    faces = detector.detect([full])[0]
    want = embedder.embed([detector.crop(full, f) for f in faces])
    assert len(got) == len(want) >= 2
    # Same faces; boxes found on a reduced copy differ by a pixel or so at 4000 px, hence not 0.9999.
    assert all(max(_cos(g, w) for w in want) > 0.99 for g in got)
