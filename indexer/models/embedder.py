"""Face embedding with facenet-pytorch's InceptionResnetV1 (wrapped, not forked).

Eval mode, inference mode, batched, on ``cuda`` when available. Output: float32 [N, 512], rows L2-normalised, so
the inner product is the cosine similarity. On CPU the network runs in channels_last memory format, which
benchmarks/bench_models.py measured faster than the default layout (see benchmarks/results/).
"""

from __future__ import annotations

import numpy as np
import torch
from facenet_pytorch import InceptionResnetV1

from indexer.config import EmbedderSettings
from indexer.models import weights as weights_mod

EMBEDDING_DIM = 512


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


class FaceEmbedder:
    """InceptionResnetV1 with given weights. ``fingerprint`` names the weights for the index."""

    def __init__(self, settings: EmbedderSettings | None = None, prefer: str | None = None,
                 resolved: weights_mod.ResolvedWeights | None = None, channels_last: bool = True) -> None:
        self.settings = settings or EmbedderSettings()
        self.weights = resolved or weights_mod.resolve(self.settings.weights, prefer=prefer)
        self.device = pick_device(self.settings.device)
        state = weights_mod.load_state(self.weights.path)
        model = InceptionResnetV1(pretrained=None)
        tensors = {k: torch.from_numpy(v) for k, v in state.items() if not k.startswith("logits")}
        model.load_state_dict(tensors, strict=False)
        self.model = model.eval().to(self.device)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def fingerprint(self) -> str:
        return self.weights.fingerprint

    def embed(self, faces: torch.Tensor | list[torch.Tensor]) -> np.ndarray:
        """[N, 3, 160, 160] standardised crops -> float32 [N, 512] unit vectors."""
        if isinstance(faces, list):
            if not faces:
                return np.zeros((0, EMBEDDING_DIM), np.float32)
            faces = torch.stack(faces)
        out = []
        bs = self.settings.batch_size
        with torch.inference_mode():
            for i in range(0, len(faces), bs):
                x = faces[i:i + bs].to(self.device, non_blocking=True)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out.append(self.model(x).float().cpu())
        if not out:
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        vectors = torch.cat(out).numpy().astype(np.float32, copy=False)
        # The network already L2-normalises; renormalise in float32 so stored rows are unit to the last bit.
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
