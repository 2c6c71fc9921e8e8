"""Ingest benchmark: the seed's one-image-at-a-time loop vs ``faceindex ingest``, side by side in one process.

Run: ``python -m benchmarks.bench_ingest [--n 500] [--json] [--smoke]`` (LFW from $FACEINDEX_DATA or
../shared/data). ``--smoke``: both ways on ``SMOKE_N`` photos, one thread, to check that the script works.

(a) seed loop: for each photo, facenet-pytorch ``MTCNN(keep_all=True)`` crops every face, then
    ``InceptionResnetV1`` embeds each face with batch 1 (same weights as faceindex);
(b) ``faceindex ingest`` of the same photos into a fresh index (decode thread pool, batched MTCNN with batched
    crops and fast pooling, batched channels_last embedding in the chosen precision (bfloat16 on CPUs that compute
    it natively), LMDB commit per batch, FAISS add).
Prints both images/s and the ratio b/a (target >= 2.5 on a 2-core CPU), and the resident memory at each quarter of
the ingest: it must stay flat as the number of images grows (the pipeline streams; nothing is held per image).

Then the **camera workload** (``benchmarks/camera_data.py``: 12-megapixel JPEGs made from the repo's licensed photos,
upscaled, plus group photos with 40-120 px faces): the same two ways side by side, faceindex's stage breakdown
(read + hash, decode and resize to the detector's copy are the reader threads' seconds, spent beside the models;
detect, decode_full (a second, full decode for faces too small for the draft-reduced image), crop, embed,
thumbnail, commit, index the main thread's), and face recall against full-resolution MTCNN (faces >= 1% of the long
side). ``--json`` keys ``camera_faceindex_ips``, ``camera_seed_ips``, ``camera_face_recall``,
``camera_stage_seconds``. ``--no-camera`` skips it.

``--camera-sweep 20,18,16`` adds the trade-off behind the camera targets: faceindex on the camera set with each
``detector.min_face_size`` (px of the 1280 copy), in interleaved rounds, each size's median images/s and its recall
(``camera_min_face_sweep``). Recall at 1 % of the long side asks for faces of 40 px at 4000 px, 13 px in the copy;
the default 20 px looks for faces from 62 px.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # `python benchmarks/bench_x.py` from any folder: put the repo root first, so `benchmarks` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psutil
import torch

from benchmarks.lfw_data import SMOKE_NOTE, SMOKE_THREADS, Recorder, lfw_images, require_data

FULL_N = 500   # the recorded figure
SMOKE_N = 8    # a few photos: one pipeline batch, still several quarters of progress to sample memory at


def pick_images(root, n: int) -> list[str]:
    paths, _ = lfw_images(root)
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def seed_loop(paths: list[str], embedder) -> tuple[float, int]:
    """The seed's way. Returns (images/s, faces)."""
    from facenet_pytorch import MTCNN, InceptionResnetV1
    from PIL import Image

    mtcnn = MTCNN(image_size=160, margin=14, keep_all=True, device="cpu").eval()
    resnet = InceptionResnetV1(pretrained=None).eval()
    resnet.load_state_dict({k: v.contiguous() for k, v in embedder.model.state_dict().items()})
    faces = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            img = Image.open(path).convert("RGB")
            crops = mtcnn(img)
            if crops is None:
                continue
            for crop in crops:
                resnet(crop.unsqueeze(0))
                faces += 1
    return len(paths) / (time.perf_counter() - started), faces


def faceindex_ingest(paths: list[str], detector, embedder, boxes: dict | None = None) -> dict:
    from indexer.config import Settings
    from indexer.library import FaceIndex, OpenMode
    from indexer.pipeline.runner import Pipeline

    rss: list[tuple[int, float]] = []
    process = psutil.Process()
    real = Pipeline.process

    def measured(self, paths, summary=None, **kwargs):
        summary = real(self, paths, summary, **kwargs)
        rss.append((summary.indexed + summary.no_face + summary.failed, process.memory_info().rss / 2**20))
        return summary

    Pipeline.process = measured
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # The readers decode for the detector they feed (its max_side), not for the default settings.
            settings = Settings(index_dir=tmp, detector=detector.settings)
            with FaceIndex(settings, OpenMode.WRITE, detector=detector, embedder=embedder) as fi:
                summary = fi.ingest(paths, progress=False)
                if boxes is not None:  # path -> face boxes, for the camera workload's recall
                    with fi.store.read() as txn:
                        for rec in fi.store.iter_files(txn):
                            boxes[rec.path] = [fi.store.get_face(f, txn).box for f in rec.face_ids]
    finally:
        Pipeline.process = real
    done = np.array([r[0] for r in rss])
    quarters = {}
    for q in (0.25, 0.5, 0.75, 1.0):
        i = int(np.searchsorted(done, q * len(paths)))
        quarters[f"{int(q * 100)}%"] = round(rss[min(i, len(rss) - 1)][1], 1)
    return {"ips": len(paths) / summary.seconds, "faces": summary.faces, "stages": summary.stages,
            "rss_mb_by_progress": quarters, "peak_rss_mb": round(max(r[1] for r in rss), 1)}


def camera(data_root, detector, embedder, smoke: bool, sweep: list[int] | None = None) -> dict:
    """The camera workload: seed loop vs faceindex on 12 MP JPEGs, stage seconds, face recall; with ``sweep``,
    also faceindex at each of those minimum face sizes (``min_face_sweep``)."""
    from benchmarks import camera_data

    with tempfile.TemporaryDirectory() as tmp:
        files = (camera_data.make(data_root, Path(tmp), groups=1, limit=2, long_side=800) if smoke
                 else camera_data.make(data_root))
        result = _camera_run(files, camera_data, detector, embedder)
        if sweep:
            result["camera_min_face_sweep"] = min_face_sweep(files, camera_data, detector, embedder, sweep,
                                                             rounds=1 if smoke else 2)
    return result


def min_face_sweep(files: list[Path], camera_data, detector, embedder, sizes: list[int], rounds: int) -> list[dict]:
    """faceindex on ``files`` with each minimum face size, the sizes interleaved in ``rounds`` rounds (the machine's
    drift falls on all of them alike): per size, the median images/s, the recall and the faces found."""
    from dataclasses import replace

    from indexer.models.detector import FaceDetector

    paths = [str(f) for f in files]
    reference = camera_data.reference_faces(files)
    detectors = {m: FaceDetector(replace(detector.settings, min_face_size=m), device=detector.device)
                 for m in sizes}
    runs: dict[int, list[dict]] = {m: [] for m in sizes}
    for _ in range(rounds):
        for m in sizes:
            found: dict = {}
            run = faceindex_ingest(paths, detectors[m], embedder, boxes=found)
            run["recall"] = camera_data.recall(reference, found)
            runs[m].append(run)
    return [{"min_face_size": m, "ips": round(float(np.median([r["ips"] for r in runs[m]])), 3),
             "ips_runs": [round(r["ips"], 3) for r in runs[m]], "recall": round(runs[m][0]["recall"][0], 4),
             "found": runs[m][0]["recall"][1], "reference": runs[m][0]["recall"][2],
             "faces": runs[m][0]["faces"]} for m in sizes]


def _camera_run(files: list[Path], camera_data, detector, embedder) -> dict:
    paths = [str(f) for f in files]
    reference = camera_data.reference_faces(files)
    seed_ips, seed_faces = seed_loop(paths, embedder)
    found: dict = {}
    ours = faceindex_ingest(paths, detector, embedder, boxes=found)
    recall, hit, total = camera_data.recall(reference, found)
    return {"camera_n_images": len(paths), "camera_seed_ips": round(seed_ips, 3),
            "camera_faceindex_ips": round(ours["ips"], 3), "camera_ratio": round(ours["ips"] / seed_ips, 2),
            "camera_face_recall": round(recall, 4), "camera_reference_faces": total, "camera_found_faces": hit,
            "camera_faceindex_faces": ours["faces"], "camera_seed_faces": seed_faces,
            "camera_stage_seconds": ours["stages"], "camera_peak_rss_mb": ours["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None,
                        help=f"LFW photos (default {FULL_N}, >= {FULL_N} for the recorded figure; --smoke: {SMOKE_N})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default=None, help="also write <name>.json and <name>.txt into this folder")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_N} photos on one thread: checks the script runs")
    parser.add_argument("--no-camera", action="store_true", help="skip the camera workload (12 MP JPEGs)")
    parser.add_argument("--camera-sweep", default="", metavar="SIZES",
                        help="also run the camera set with each of these detector.min_face_size values, e.g. 20,18,16 "
                             "(images/s and recall per size, interleaved rounds)")
    args = parser.parse_args()
    n = args.n if args.n is not None else SMOKE_N if args.smoke else FULL_N
    try:
        sweep = [int(v) for v in args.camera_sweep.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--camera-sweep wants sizes like 20,18,16, not {args.camera_sweep!r}")
    if any(v < 12 for v in sweep):
        parser.error("--camera-sweep: MTCNN looks for faces of 12 px and more")
    root = require_data()
    torch.set_num_threads(SMOKE_THREADS if args.smoke else os.cpu_count() or 1)
    from indexer.models.detector import FaceDetector
    from indexer.models.embedder import FaceEmbedder

    embedder, detector = FaceEmbedder(), FaceDetector()
    paths = pick_images(root, n)
    seed_ips, seed_faces = seed_loop(paths, embedder)
    ours = faceindex_ingest(paths, detector, embedder)
    result = {"n_images": len(paths), "threads": torch.get_num_threads(), "seed_loop_ips": round(seed_ips, 2),
              "faceindex_ips": round(ours["ips"], 2), "ratio": round(ours["ips"] / seed_ips, 2),
              "seed_faces": seed_faces, "faceindex_faces": ours["faces"], "peak_rss_mb": ours["peak_rss_mb"],
              "rss_mb_by_progress": ours["rss_mb_by_progress"], "stage_seconds": ours["stages"],
              **({"smoke": True} if args.smoke else {})}
    if not args.no_camera:
        result.update(camera(root, detector, embedder, args.smoke, sweep))
    rec = Recorder(args.out, "bench_ingest")
    if rec.json(result, args.json):
        return
    if args.smoke:
        rec.print(SMOKE_NOTE)
    rec.print(f"{len(paths)} LFW photos, {result['threads']} CPU threads")
    rec.print(f"  (a) seed loop (MTCNN per image, embed batch 1): {seed_ips:7.2f} images/s  ({seed_faces} faces)")
    rec.print(f"  (b) faceindex ingest:                          {ours['ips']:7.2f} images/s  ({ours['faces']} faces)")
    rec.print(f"  ratio b/a: {result['ratio']:.2f} (target >= 2.5)")
    rec.print(f"  resident memory during ingest by progress (MiB): {ours['rss_mb_by_progress']}; "
          f"peak {ours['peak_rss_mb']} MiB")
    rec.print(f"  stage seconds (read, decode, resize: summed over the reader threads; detect, crop, embed, "
              f"thumbnail: summed over the model workers): {ours['stages']}")
    if not args.no_camera:
        rec.print(f"camera workload: {result['camera_n_images']} JPEGs (12 MP, made from the repo's licensed photos: "
                  "upscaled, and group photos with 40-120 px faces; benchmarks/camera_data.py)")
        rec.print(f"  (a) seed loop: {result['camera_seed_ips']:7.3f} images/s  ({result['camera_seed_faces']} faces)")
        rec.print(f"  (b) faceindex: {result['camera_faceindex_ips']:7.3f} images/s  "
                  f"({result['camera_faceindex_faces']} faces)   ratio b/a {result['camera_ratio']:.2f}")
        rec.print(f"  face recall vs full-resolution MTCNN (faces >= 1% of the long side): "
                  f"{result['camera_face_recall']:.4f} ({result['camera_found_faces']} of "
                  f"{result['camera_reference_faces']})")
        rec.print(f"  stage seconds (summed over reader threads and model workers, as above): "
                  f"{result['camera_stage_seconds']}")
        for row in result.get("camera_min_face_sweep", []):
            rec.print(f"  min_face_size {row['min_face_size']:3d} px: {row['ips']:6.3f} images/s "
                      f"(runs {row['ips_runs']}), recall {row['recall']:.4f} ({row['found']} of {row['reference']}), "
                      f"{row['faces']} faces")

    rec.close()


if __name__ == "__main__":
    main()
