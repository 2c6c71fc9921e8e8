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


def faceindex_ingest(paths: list[str], detector, embedder) -> dict:
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
            with FaceIndex(Settings(index_dir=tmp), OpenMode.WRITE, detector=detector, embedder=embedder) as fi:
                summary = fi.ingest(paths, progress=False)
    finally:
        Pipeline.process = real
    done = np.array([r[0] for r in rss])
    quarters = {}
    for q in (0.25, 0.5, 0.75, 1.0):
        i = int(np.searchsorted(done, q * len(paths)))
        quarters[f"{int(q * 100)}%"] = round(rss[min(i, len(rss) - 1)][1], 1)
    return {"ips": len(paths) / summary.seconds, "faces": summary.faces, "stages": summary.stages,
            "rss_mb_by_progress": quarters, "peak_rss_mb": round(max(r[1] for r in rss), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None,
                        help=f"LFW photos (default {FULL_N}, >= {FULL_N} for the recorded figure; --smoke: {SMOKE_N})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default=None, help="also write <name>.json and <name>.txt into this folder")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_N} photos on one thread: checks the script runs")
    args = parser.parse_args()
    n = args.n if args.n is not None else SMOKE_N if args.smoke else FULL_N
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
    rec.print(f"  stage seconds: {ours['stages']}")

    rec.close()


if __name__ == "__main__":
    main()
