"""Model benchmark: LFW verification accuracy, embedder faces/s by batch size and variant, MTCNN images/s.

Run: ``python -m benchmarks.bench_models [--json] [--smoke]`` (LFW from $FACEINDEX_DATA or ../shared/data).

``--smoke`` runs every part on tiny sizes (see ``SMOKE``) to check that the script works; its figures mean nothing.

- Verification: 10-fold accuracy with the best threshold of the 9 other folds, on LFW View 1's
  ``pairsDevTrain.txt`` (1100 same + 1100 different pairs), each photo embedded by the face nearest its centre.
- Rank-1 identification: leave-one-out nearest neighbour among the photos of people with >= 2 photos.
- Preprocessing (issue 11): crop margin x flip-averaged embeddings, each scored by verification, rank-1 and the
  default clustering method (benchmarks/preprocess_grid.py; per-setting embeddings cached outside the repository).
  ``margin`` / ``flip`` in the JSON are the defaults, the figures above them are for the defaults.
- Embedder: faces/s at batch 1, 16, 64 for plain eager (NCHW), channels_last, and channels_last with bfloat16
  autocast, side by side in this run; ``embed_fps`` reports the fastest for each batch size. Verification uses the
  embedder's chosen precision (printed).
- MTCNN: images/s on LFW photos one by one vs. in batches of 16 (same-shape batching), and facenet-pytorch's own
  ``MTCNN.detect`` on the same batches (what faceindex's CPU detector replaces).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if not __package__:  # `python benchmarks/bench_x.py` from any folder: put the repo root first, so `benchmarks` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.lfw_data import (
    SMOKE_NOTE,
    SMOKE_THREADS,
    Recorder,
    default_preprocessing,
    lfw_embeddings,
    lfw_images,
    lfw_sample,
    read_pairs,
    require_data,
    ten_fold_accuracy,
)
from benchmarks.preprocess_grid import SMOKE_MARGINS, grid, rank1, table

# The recorded figures: all 2,200 pairs, batch 1/16/64 on 128 faces, MTCNN on 96 photos. --smoke: 10 same + 10
# different pairs (one of each per fold), batch 1 and 16 on 16 faces (64 alone would cost ~10 s), MTCNN on 8 photos.
FULL = {"pairs_each": None, "batch_sizes": (1, 16, 64), "faces": 128, "mtcnn_images": 96}
SMOKE = {"pairs_each": 10, "batch_sizes": (1, 16), "faces": 16, "mtcnn_images": 8}


def verification(root, pairs_each: int | None = None) -> dict:
    """10-fold accuracy on all of pairsDevTrain, or on its first ``pairs_each`` same and different pairs."""
    pairs = read_pairs(str(root / "meta" / "lfw" / "pairsDevTrain.txt"))
    if pairs_each is None:
        data = lfw_embeddings(root)
    else:
        pairs = [p for p in pairs if p[2]][:pairs_each] + [p for p in pairs if not p[2]][:pairs_each]
        # Only the photos of these pairs: a smoke run must not embed all of LFW when the cache is absent.
        data = lfw_sample(root, sorted({f"lfw-devtrain/{photo}" for p in pairs for photo in p[:2]}))
    where = {p.split("lfw-devtrain/")[-1]: i for i, p in enumerate(data["paths"].tolist())}
    a = np.array([where[p[0]] for p in pairs])
    b = np.array([where[p[1]] for p in pairs])
    same = np.array([p[2] for p in pairs])
    sims = (data["vectors"][a] * data["vectors"][b]).sum(axis=1)
    acc, std, threshold = ten_fold_accuracy(sims, same)
    return {"lfw_verification_acc": round(acc, 4), "lfw_verification_std": round(std, 4),
            "threshold_cosine": round(threshold, 3), "pairs": len(pairs),
            "rank1": round(rank1(data["vectors"], data["people"]), 4), "rank1_photos": int(len(data["people"])),
            "photos_without_detected_face": int((~data["found"]).sum())}


def preprocessing(root, embedder, pairs_each: int | None = None) -> dict:
    """The margin x flip grid (benchmarks/preprocess_grid.py) on all of dev-train, or, for --smoke, on the photos
    of the first ``pairs_each`` same and different pairs (two margins, nothing cached)."""
    margin, flip = default_preprocessing(embedder)
    pairs = read_pairs(str(root / "meta" / "lfw" / "pairsDevTrain.txt"))
    if pairs_each is None:
        paths, people = lfw_images(root)
        rel = [os.path.relpath(p, root) for p in paths]
        rows = grid(root, rel, np.array(people), pairs, embedder)
    else:
        pairs = [p for p in pairs if p[2]][:pairs_each] + [p for p in pairs if not p[2]][:pairs_each]
        rel = sorted({f"lfw-devtrain/{photo}" for p in pairs for photo in p[:2]})
        people = np.array([Path(p).parent.name for p in rel])
        rows = grid(root, rel, people, pairs, embedder, tuple(sorted({*SMOKE_MARGINS, margin})), cache=False)
    return {"margin": margin, "flip": flip, "preprocessing_grid": rows}


def embed_speed(embedder, batch_sizes=(1, 16, 64), faces: int = 128) -> dict:
    """faces/s of the embedder per batch size: eager NCHW vs channels_last (float32 and bfloat16 autocast),
    measured alternately in this run."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (faces, 3, 160, 160)).astype(np.float32))
    model = embedder.model
    out = {}
    with torch.inference_mode():
        for bs in batch_sizes:
            n = min(faces, max(bs * 2, 16))
            rates = {}
            for variant in ("eager", "channels_last", "channels_last_bf16"):
                layout = torch.contiguous_format if variant == "eager" else torch.channels_last
                m = model.to(memory_format=layout)
                batch = x[:bs].contiguous(memory_format=layout)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.endswith("bf16")):
                    m(batch)  # warm-up
                    started = time.perf_counter()
                    done = 0
                    while done < n:
                        m(batch)
                        done += bs
                rates[variant] = done / (time.perf_counter() - started)
            out[bs] = {k: round(v, 1) for k, v in rates.items()}
    model.to(memory_format=torch.channels_last if embedder.channels_last else torch.contiguous_format)
    return out


def mtcnn_speed(detector, root, n: int = 96) -> dict:
    from indexer.images import decode

    paths, _ = lfw_images(root)
    images = [decode(p, 10**9) for p in paths[:: max(1, len(paths) // n)][:n]]
    detector.detect(images[:2])
    started = time.perf_counter()
    single = [detector.detect([im])[0] for im in images]
    t_single = time.perf_counter() - started
    started = time.perf_counter()
    batched = [f for i in range(0, len(images), 16) for f in detector.detect(images[i:i + 16])]
    t_batched = time.perf_counter() - started
    same = sum(len(a) == len(b) for a, b in zip(single, batched, strict=True))
    from facenet_pytorch import MTCNN

    reference = MTCNN(keep_all=True, select_largest=False).eval()
    arrays = [np.asarray(im.image) for im in images]
    started = time.perf_counter()
    for i in range(0, len(arrays), 16):
        reference.detect(np.stack(arrays[i:i + 16]))
    t_reference = time.perf_counter() - started
    return {"mtcnn_ips_single": round(len(images) / t_single, 2),
            "mtcnn_ips_batched": round(len(images) / t_batched, 2),
            "facenet_mtcnn_ips_batched": round(len(images) / t_reference, 2), "mtcnn_images": len(images),
            "same_face_counts": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default=None, help="also write <name>.json and <name>.txt into this folder")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds): checks the script runs")
    args = parser.parse_args()
    root = require_data()
    torch.set_num_threads(SMOKE_THREADS if args.smoke else os.cpu_count() or 1)
    from indexer.models.detector import FaceDetector
    from indexer.models.embedder import FaceEmbedder

    embedder = FaceEmbedder()
    detector = FaceDetector()
    size = SMOKE if args.smoke else FULL
    result = {"model": embedder.fingerprint, "precision": embedder.precision, "threads": torch.get_num_threads(),
              **({"smoke": True} if args.smoke else {}), **verification(root, size["pairs_each"])}
    result.update(preprocessing(root, embedder, size["pairs_each"]))
    speeds = embed_speed(embedder, size["batch_sizes"], size["faces"])
    result["embed_fps_by_variant"] = speeds
    result["embed_fps"] = {str(bs): max(v.values()) for bs, v in speeds.items()}
    result.update(mtcnn_speed(detector, root, size["mtcnn_images"]))
    rec = Recorder(args.out, "bench_models")
    if rec.json(result, args.json):
        return
    if args.smoke:
        rec.print(SMOKE_NOTE)
    rec.print(f"model {result['model']} ({result['precision']}) on {result['threads']} CPU threads")
    rec.print(f"LFW verification (View 1 pairsDevTrain, {result['pairs']} pairs, 10-fold, best threshold): "
          f"{result['lfw_verification_acc']:.4f} +- {result['lfw_verification_std']:.4f} "
          f"(threshold cosine {result['threshold_cosine']}; target >= 0.98; "
          f"{result['photos_without_detected_face']} photos without a detected face used a central box)")
    rec.print(f"rank-1 identification (leave-one-out nearest neighbour, people with >= 2 of "
              f"{result['rank1_photos']} photos): {result['rank1']:.4f}; default preprocessing: margin "
              f"{result['margin']} px, flip {'on' if result['flip'] else 'off'}")
    rec.print("crop margin x flip-averaged embeddings (verification 10-fold; rank-1; default clustering method at its "
              "parameters, and at the best threshold of a sweep):")
    for line in table(result["preprocessing_grid"]):
        rec.print(line)
    rec.print("embedder faces/s    eager   channels_last   channels_last + bfloat16")
    for bs, v in speeds.items():
        rec.print(f"  batch {bs:<3}        {v['eager']:>6.1f}   {v['channels_last']:>13.1f}   "
                  f"{v['channels_last_bf16']:>24.1f}")
    rec.print(f"MTCNN on {result['mtcnn_images']} LFW images: {result['mtcnn_ips_single']:.2f} images/s one by one, "
          f"{result['mtcnn_ips_batched']:.2f} batched by 16 "
          f"(ratio {result['mtcnn_ips_batched'] / result['mtcnn_ips_single']:.2f}; "
          f"same face count for {result['same_face_counts']}/{result['mtcnn_images']}); "
          f"facenet-pytorch's MTCNN.detect batched by 16: {result['facenet_mtcnn_ips_batched']:.2f}")

    rec.close()


if __name__ == "__main__":
    main()
