"""``faceindex models verify``: the converted torch weights against OpenCV DNN running the original graph.

Both run on the same bundled face crops (fixed standardisation); the minimum cosine must be >= 0.9999.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from PIL import Image

from indexer.config import EmbedderSettings
from indexer.models import weights as weights_mod
from indexer.models.embedder import FaceEmbedder

THRESHOLD = 0.9999


def bundled_crops() -> np.ndarray:
    """float32 [N, 3, 160, 160] standardised crops shipped with the package."""
    files = sorted(p for p in resources.files("indexer.data").iterdir() if p.name.startswith("verify_"))
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in files]
    return ((np.stack(arrays) - 127.5) / 128.0).transpose(0, 3, 1, 2).copy()


def opencv_embeddings(crops: np.ndarray) -> np.ndarray:
    import cv2

    net = cv2.dnn.readNetFromTensorflow(str(weights_mod.find_graph()))
    out = []
    for crop in crops:  # OpenCV's import of this graph runs one image at a time
        net.setInput(crop[None])
        out.append(net.forward().reshape(-1))
    vectors = np.stack(out).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def verify_conversion() -> dict:
    crops = bundled_crops()
    resolved = weights_mod.import_casia()
    # float32 and no flip-averaging: this compares the conversion itself with OpenCV (one plain forward pass),
    # not the precision or the preprocessing ingest runs with.
    settings = EmbedderSettings(weights="casia-webface", device="cpu", precision="float32", flip=False)
    embedder = FaceEmbedder(settings, resolved=resolved)
    ours = embedder.embed(torch.from_numpy(crops))
    theirs = opencv_embeddings(crops)
    cosines = (ours * theirs).sum(axis=1)
    return {"faces": len(crops), "min_cosine": float(cosines.min()), "threshold": THRESHOLD,
            "ok": bool(cosines.min() >= THRESHOLD), "fingerprint": resolved.fingerprint}
