"""The foundation: real MTCNN, real converted weights, real photos."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.config import EmbedderSettings
from indexer.errors import ImageError, WeightsError
from indexer.images import decode
from indexer.models import weights as weights_mod
from indexer.models.embedder import FaceEmbedder
from tests.conftest import SAMPLES, cli

# Faces a person counts in ../shared/data/multi_face/face_recognition (checked by eye on each photo).
MULTI_FACE_COUNTS = {
    "32bit.png": 1, "kit_with_rose.jpg": 2, "obama-1080p.jpg": 1, "obama-240p.jpg": 1, "obama-480p.jpg": 1,
    "obama-720p.jpg": 1, "obama_and_biden.jpg": 3, "obama_partial_face.jpg": 1, "obama_partial_face2.jpg": 1,
    "two_people.jpg": 2,
}
GOLDEN = Path(__file__).parent / "data" / "golden_kit.npy"


def test_bundled_group_photos_give_the_right_face_count(detector):
    names = ("kit_with_rose.jpg", "obama_and_biden.jpg")
    found = detector.detect([decode(SAMPLES / "group" / n, 10**9) for n in names])
    assert [len(f) for f in found] == [2, 3]


@pytest.mark.lfw
def test_multi_face_counts_batched_and_single(shared_data, detector):
    folder = shared_data / "multi_face" / "face_recognition"
    images = [decode(folder / name, 10**9) for name in MULTI_FACE_COUNTS]
    batched = detector.detect(images)
    assert {n: len(f) for n, f in zip(MULTI_FACE_COUNTS, batched, strict=True)} == MULTI_FACE_COUNTS
    # Same-shape grouping must not change what is found: one by one gives the same boxes.
    for image, faces in zip(images, batched, strict=True):
        alone = detector.detect([image])[0]
        assert len(alone) == len(faces)
        for a, b in zip(alone, faces, strict=True):
            assert np.allclose(a.box, b.box, atol=1e-3)


def test_boxes_are_in_original_coordinates_when_detection_is_downscaled(detector):
    from indexer.config import DetectorSettings
    from indexer.models.detector import FaceDetector

    image = decode(SAMPLES / "group" / "obama_and_biden.jpg", 10**9)  # 2000 px wide
    small = FaceDetector(DetectorSettings(max_side=640)).detect([image])[0]
    big = detector.detect([image])[0]
    assert len(small) >= 2
    for face in small[:2]:
        best = max(big, key=lambda f: _iou(f.box, face.box))
        assert _iou(best.box, face.box) > 0.6


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _one_face_photo() -> Image.Image:
    return Image.open(SAMPLES / "photos" / "obama" / "obama1.jpg").convert("RGB")


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16", "CMYK"])
def test_modes_are_converted_and_faces_still_found(detector, tmp_path, mode):
    img = _one_face_photo()
    if mode == "I;16":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr)
        assert img.mode.startswith("I;16")
    else:
        img = img.convert(mode)
    path = tmp_path / ("face.tif" if mode in ("I;16", "CMYK") else "face.png")
    img.save(path)
    decoded = decode(path, 10**9)
    assert decoded.image.mode == "RGB"
    assert len(detector.detect([decoded])[0]) == 1


def test_exif_orientation_is_honoured(detector, tmp_path):
    img = _one_face_photo()
    upright = detector.detect([img])[0][0]
    # Store the pixels rotated 90 degrees with EXIF orientation 8 ("rotate 90 CW to view"): viewers show it upright.
    stored = img.transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    decoded = decode(path, 10**9)
    assert decoded.orig_size == img.size
    faces = detector.detect([decoded])[0]
    assert len(faces) == 1
    assert _iou(faces[0].box, upright.box) > 0.7


def test_draft_mode_keeps_boxes_in_full_resolution(detector, tmp_path):
    img = Image.open(SAMPLES / "group" / "obama_and_biden.jpg").convert("RGB")
    full = detector.detect([decode(SAMPLES / "group" / "obama_and_biden.jpg", 10**9)])[0]
    drafted = decode(SAMPLES / "group" / "obama_and_biden.jpg", 10**9, min_side_needed=900)
    assert drafted.image.size[0] < img.size[0] and drafted.orig_size == img.size
    faces = detector.detect([drafted])[0]
    for face in faces[:2]:
        assert max(_iou(face.box, f.box) for f in full) > 0.7


@pytest.mark.parametrize("payload,reason", [
    (b"", "not an image"), (b"this is not a jpeg at all" * 10, "not an image"),
])
def test_non_images_raise_image_error(tmp_path, payload, reason):
    path = tmp_path / "x.jpg"
    path.write_bytes(payload)
    with pytest.raises(ImageError, match=reason):
        decode(path, 10**9)


def test_truncated_and_oversized_images_raise_image_error(tmp_path):
    data = (SAMPLES / "photos" / "obama" / "obama1.jpg").read_bytes()
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode(io.BytesIO(data[: len(data) // 3]), 10**9)
    with pytest.raises(ImageError, match="too large"):
        decode(io.BytesIO(data), max_pixels=1000)


def test_embeddings_are_unit_float32_and_batch_invariant(detector, embedder):
    image = decode(SAMPLES / "group" / "obama_and_biden.jpg", 10**9)
    crops = [detector.crop(image, f) for f in detector.detect([image])[0]]
    together = embedder.embed(crops)
    alone = np.concatenate([embedder.embed([c]) for c in crops])
    assert together.dtype == np.float32 and together.shape == (len(crops), 512)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert np.allclose(together, alone, atol=1e-4)


def test_golden_embedding(detector, embedder):
    """The converted casia-webface model embeds a bundled crop as it did when this golden vector was saved."""
    from indexer.models.verify import bundled_crops

    crop = torch.from_numpy(bundled_crops()[1:2])  # verify_kit.png ... sorted: biden, kit, obama, rose
    vector = embedder.embed_views(crop)[0][0]  # the face itself, whatever embedder.flip says
    if embedder.weights.name != "casia-webface":
        pytest.skip("golden vector is for the converted casia-webface weights")
    golden = np.load(GOLDEN)
    assert float(vector @ golden) > 0.9999


def test_flip_averaging_is_the_mean_of_a_face_and_its_mirror(embedder):
    """embedder.flip: the vector of a face is the normalised mean of its and its mirror image's, so a face and its
    mirror get the same vector; without flip they differ."""
    from dataclasses import replace

    from indexer.models.embedder import FaceEmbedder
    from indexer.models.verify import bundled_crops

    crops = torch.from_numpy(bundled_crops())
    mirrored = torch.flip(crops, dims=[3])
    flip = FaceEmbedder(replace(embedder.settings, flip=True), resolved=embedder.weights)
    plain = FaceEmbedder(replace(embedder.settings, flip=False), resolved=embedder.weights)
    assert np.allclose(flip.embed(crops), flip.embed(mirrored), atol=2e-3)
    assert float(np.min(np.sum(plain.embed(crops) * plain.embed(mirrored), axis=1))) < 0.995
    views = plain.embed_views(crops)
    expected = views[0] + views[1]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(flip.embed(crops), expected, atol=1e-5)


def test_cli_models_verify_and_list():
    out = cli("models", "verify")
    assert out.stdout.splitlines()[-1] == "OK" and weights_mod.SOURCES["casia-webface"]["tensors_sha256"] in out.stdout
    rows = {r["name"]: r for r in __import__("json").loads(cli("models", "list", "--json").stdout)}
    assert rows["casia-webface"]["available"] and rows["casia-webface"]["fingerprint"].startswith("casia-webface:")


@pytest.mark.lfw
def test_same_person_is_closer_than_different_people(shared_data, detector, embedder):
    from benchmarks.lfw_data import embed_centre_faces

    people = ["Colin_Powell", "Serena_Williams", "George_W_Bush", "Hugo_Chavez", "Tony_Blair"]
    paths, labels = [], []
    for person in people:
        files = sorted((shared_data / "lfw-devtrain" / person).glob("*.jpg"))[:4]
        if len(files) < 2:
            pytest.skip(f"{person} has fewer than 2 photos in this LFW copy")
        paths += [str(f) for f in files]
        labels += [person] * len(files)
    vectors, _ = embed_centre_faces(paths, detector, embedder, progress=False)
    sims = vectors @ vectors.T
    same = [sims[i, j] for i, j in itertools.combinations(range(len(paths)), 2) if labels[i] == labels[j]]
    diff = [sims[i, j] for i, j in itertools.combinations(range(len(paths)), 2) if labels[i] != labels[j]]
    assert min(same) > np.percentile(diff, 95)
    assert np.mean(same) - np.mean(diff) > 0.4
    # Each photo's nearest other photo is of the same person.
    np.fill_diagonal(sims, -2)
    assert all(labels[int(np.argmax(sims[i]))] == labels[i] for i in range(len(paths)))


def test_wrong_weights_path_is_one_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        weights_mod.resolve(str(tmp_path / "missing.pt"))
    proc = cli("query", "--index", str(tmp_path / "ix"), "--weights", str(tmp_path / "missing.pt"),
               str(SAMPLES / "photos" / "obama" / "obama1.jpg"), check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_corrupt_weights_file_is_one_clear_error(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(WeightsError, match="corrupt"):
        FaceEmbedder(EmbedderSettings(weights=str(path)))


@pytest.mark.parametrize("flags,native", [
    ({"fpu", "avx2", "avx512f", "avx512bw", "avx512vl"}, False),   # AVX512 without BF16: oneDNN would emulate it
    ({"avx2"}, False),
    ({"avx512f", "avx512_bf16"}, True),                             # Cooper Lake, Zen 4
    ({"avx512f", "amx_tile", "amx_bf16"}, True),                    # Sapphire Rapids
])
def test_native_bf16_means_the_instructions_not_onednns_emulation(flags, native):
    from indexer.models.embedder import cpu_flags, native_bf16

    assert native_bf16(torch.device("cpu"), frozenset(flags)) is native
    cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: " + " ".join(sorted(flags)) + "\n"
    assert cpu_flags(cpuinfo) == frozenset(flags)
    assert cpu_flags("processor : 0\nFeatures : fp asimd bf16\n") is None   # ARM: oneDNN answers instead


@pytest.mark.parametrize("requested,device,native,want", [
    ("auto", "cpu", True, "bfloat16"),
    ("auto", "cpu", False, "float32"),
    ("auto", "cuda", True, "bfloat16"),
    ("auto", "cuda", False, "float16"),
    ("float32", "cpu", True, "float32"),
    ("bfloat16", "cpu", False, "bfloat16"),
])
def test_choose_precision_table(requested, device, native, want):
    from indexer.models.embedder import choose_precision

    precision, reason = choose_precision(requested, device, native)
    assert precision == want
    assert reason


@pytest.mark.parametrize("precision", ["bfloat16"])
def test_reduced_precision_embeds_like_float32(precision):
    """Reduced precision must not move a face: cosine to float32 >= 0.9995 on the bundled real face crops."""
    from indexer.models.verify import bundled_crops

    crops = torch.from_numpy(bundled_crops())
    reference = FaceEmbedder(EmbedderSettings(precision="float32", device="cpu")).embed(crops)
    got = FaceEmbedder(EmbedderSettings(precision=precision, device="cpu")).embed(crops)
    assert got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert float((got * reference).sum(1).min()) >= 0.9995
