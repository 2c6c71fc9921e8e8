"""``faceindex models verify``: the converted weights are the pinned tensors, and they embed as the original graph.

Two checks, neither needing OpenCV or TensorFlow at run time:
- the converted tensors' sha256 equals the one pinned in ``weights.SOURCES`` (the digest of every existing index);
- torch (float32, one plain forward pass, no flip) embeds the bundled face crops like the recorded golden
  embeddings, ``indexer/data/verify_golden.npy``: OpenCV 5.0's DNN forward pass of Sandberg's original graph on the
  same crops, recorded once (see indexer/data/README.md). The minimum cosine must be >= 0.9999: a wrong mapping of
  one layer lowers it (one 3x3 kernel transposed: 0.997), while float32 kernels of different CPUs move it by about
  1e-7 (measured here: within 1e-7 of 1, largest element difference 2.6e-7).
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from PIL import Image

from indexer.config import EmbedderSettings
from indexer.errors import WeightsError
from indexer.models import weights as weights_mod
from indexer.models.embedder import FaceEmbedder

THRESHOLD = 0.9999
GOLDEN_FILE = "verify_golden.npy"


def bundled_crops() -> np.ndarray:
    """float32 [N, 3, 160, 160] standardised crops shipped with the package."""
    files = sorted(p for p in resources.files("indexer.data").iterdir() if p.name.startswith("verify_")
                   and p.name.endswith(".png"))
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in files]
    return ((np.stack(arrays) - 127.5) / 128.0).transpose(0, 3, 1, 2).copy()


def golden_embeddings() -> np.ndarray:
    """float32 [N, 512]: the original graph's embeddings of ``bundled_crops()``, in the same (sorted) order."""
    source = resources.files("indexer.data") / GOLDEN_FILE
    try:
        with source.open("rb") as fh:
            golden = np.load(fh, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"the golden embeddings {GOLDEN_FILE} are missing or damaged ({exc}); "
                           "reinstall faceindex") from None
    return np.asarray(golden, dtype=np.float32)


def verify_conversion() -> dict:
    crops, golden = bundled_crops(), golden_embeddings()
    resolved = weights_mod.import_casia()
    pinned = weights_mod.SOURCES["casia-webface"]["tensors_sha256"]
    # float32 and no flip-averaging: this checks the weights themselves (one plain forward pass), not the
    # precision or the preprocessing ingest runs with.
    settings = EmbedderSettings(weights="casia-webface", device="cpu", precision="float32", flip=False)
    ours = FaceEmbedder(settings, resolved=resolved).embed(torch.from_numpy(crops))
    if golden.shape != ours.shape:
        raise WeightsError(f"the golden embeddings have shape {golden.shape}, the bundled crops give {ours.shape}; "
                           "reinstall faceindex")
    cosines = (ours * golden).sum(axis=1)
    digest_ok = resolved.sha256 == pinned
    return {"faces": len(crops), "min_cosine": float(cosines.min()), "threshold": THRESHOLD,
            "sha256": resolved.sha256, "pinned_sha256": pinned, "digest_ok": digest_ok,
            "ok": bool(digest_ok and cosines.min() >= THRESHOLD), "fingerprint": resolved.fingerprint}
