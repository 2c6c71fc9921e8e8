"""What an embedding is, in one place: float32, L2-normalised, 512 values (InceptionResnetV1's output)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EMBEDDING_DIM = 512


def stack_vectors(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """float32 [n, EMBEDDING_DIM] from a list of vectors; an empty list gives the empty [0, EMBEDDING_DIM] matrix."""
    if len(vectors) == 0:
        return np.zeros((0, EMBEDDING_DIM), np.float32)
    return np.ascontiguousarray(np.stack(vectors), dtype=np.float32)
