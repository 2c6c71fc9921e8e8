"""The FAISS vector index: L2-normalised float32 face vectors searched by inner product (cosine), keyed by face id.

The index is derived data: LMDB holds every vector, and the owner rebuilds from it whenever the index file is
missing or damaged (``load`` raises ``IndexFileError``) or the index outgrew its kind (``should_rebuild``).

Two parts, chosen by ``choose_index`` (see indexer/store/choose.py for why):
- the exact store ``IndexIDMap2(IndexFlatIP)``: every vector in float32 by id. Alone it is the ``Flat`` index;
- for large n a coarse index (``PCA128,IVF4096,SQ8``: projected, 8-bit codes in inverted lists, its own ids) that
  proposes ``k * refine`` candidates which the exact store re-scores (key suffix ``,RFlat``). faiss's own
  ``IndexRefine`` supports neither ``add_with_ids`` nor ``remove_ids``, hence this pairing.
- past the memory budget the coarse index stands alone in RAM (``SQ8`` or ``PCAR128,IVF<n>,PQ64x4fs``) and its
  candidates are re-scored with vectors read from disk (key suffix ``,RLMDB``): float32 from the store
  (indexer/store/compressed.py) or, for the inverted-list kind, float16 copies from the packed file beside the
  index (indexer/store/packed.py, attached by sync.py): the index needs its ``source`` (``attach``) to search. A
  coarse index without either suffix (an older snapshot) answers with its approximate scores.
Both parts remove by id, so ``remove`` works for every kind. Builds read their vectors from a source in chunks
(``build_from``): from the store, a build never holds all float32 vectors at once unless the kind keeps them.

File format (one file, written atomically: temp file in the same folder, fsync, ``os.replace``, fsync the folder):
``b"FIDXV1\\n"`` + 8-byte little-endian header length + UTF-8 JSON header + payload, the payload being
``faiss.serialize_index`` of the exact store then of the coarse index (byte lengths in the header's ``parts``).
The header also holds the caller's ``meta``, the ``choice``, ``n``, ``dim`` and a sha256 over the other header
fields (canonical JSON) and the payload, so damage anywhere past the magic is caught. No pickle.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer import faults
from indexer.errors import IndexFileError
from indexer.fsutil import atomic_writer, header_digest
from indexer.store.choose import (
    EXACT_MAX_VECTORS,
    STORE_RERANK,
    TARGET_RECALL,
    IndexChoice,
    choose_index,
    index_kind,
)
from indexer.store.compressed import ArrayVectors, VectorSource, rerank, train_coarse
from indexer.store.snapshot_info import LENGTH, MAGIC, MAX_HEADER_BYTES

FORMAT_VERSION = 1
_LEN = LENGTH
REFINE_SUFFIX = ",RFlat"
# Unit rows drift by float32 rounding only; a norm off by more means unnormalised input, for which inner products
# are not cosines.
NORM_TOLERANCE = 1e-3
# 10 k-means iterations is faiss's IVF default (training points per list: choose.TRAIN_POINTS_PER_LIST).
TRAIN_ITERATIONS = 10
# Below faiss's BLAS threshold (20 queries) a search is a loop over queries; one thread does it best: a parallel
# region for one query gains nothing and, on a loaded machine, waits a scheduler tick for its second thread
# (measured: 8 ms instead of 0.01 ms for the PCA step of one query on 2 busy cores).
SINGLE_THREAD_MAX_QUERIES = 19


class VectorIndex:
    """A thread-safe FAISS index over unit vectors with int64 ids, add/remove/search and atomic persistence."""

    def __init__(self, choice: IndexChoice, dim: int, exact: faiss.Index | None, coarse: faiss.Index | None, *,
                 exact_max_vectors: int = EXACT_MAX_VECTORS, target_recall: float = TARGET_RECALL,
                 memory_budget_bytes: int | None = None, source: VectorSource | None = None) -> None:
        if exact is None and coarse is None:
            raise ValueError("a VectorIndex needs an exact store, a coarse index or both")
        self.choice = choice
        self.dim = dim
        self._exact = exact      # IndexIDMap2(IndexFlatIP), or None for codes only
        self._coarse = coarse    # trained coarse index with its own ids, or None for Flat
        self._source = source    # where ,RLMDB kinds read their candidates' float32 vectors
        # Kept so should_rebuild asks choose_index the same question the index was built with.
        self.exact_max_vectors = exact_max_vectors
        self.target_recall = target_recall
        self.memory_budget_bytes = memory_budget_bytes
        # One lock for mutations and searches: the daemon searches while the pipeline adds, and a faiss index is
        # not safe for a concurrent add and search (and both parts must change together).
        self._lock = threading.Lock()

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, dim: int = 512, choice: IndexChoice | None = None, *,
              exact_max_vectors: int = EXACT_MAX_VECTORS, target_recall: float = TARGET_RECALL) -> VectorIndex:
        """An empty index; only an untrained kind (Flat) can start empty, an IVF needs ``build``."""
        choice = choice or choose_index(0, dim, exact_max_vectors=exact_max_vectors, target_recall=target_recall)
        if choice.key != "Flat":
            raise ValueError(f"{choice.key} must be trained on vectors: use VectorIndex.build")
        return cls(choice, dim, _new_exact(dim), None, exact_max_vectors=exact_max_vectors,
                   target_recall=target_recall)

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, *, exact_max_vectors: int = EXACT_MAX_VECTORS,
              target_recall: float = TARGET_RECALL, seed: int = 1234,
              memory_budget_bytes: int | None = None) -> VectorIndex:
        """Choose the kind for ``len(vectors)`` with ``choose_index``, train it when needed, and add everything.

        The vectors stay the source of an ``,RLMDB`` kind's re-ranking (tests and benchmarks; the running index
        builds from the store with ``build_from``)."""
        vectors = _as_vectors(vectors)
        source = ArrayVectors(_as_ids(ids, len(vectors)), vectors)
        return cls.build_from(source, vectors.shape[1], exact_max_vectors=exact_max_vectors,
                              target_recall=target_recall, seed=seed, memory_budget_bytes=memory_budget_bytes)

    @classmethod
    def build_from(cls, source: VectorSource, dim: int = 512, *, exact_max_vectors: int = EXACT_MAX_VECTORS,
                   target_recall: float = TARGET_RECALL, seed: int = 1234,
                   memory_budget_bytes: int | None = None, choice: IndexChoice | None = None) -> VectorIndex:
        """Build the index ``choose_index`` picks for ``len(source)`` vectors (``choice``: that answer, when the
        caller already asked): train the coarse part on seeded samples, then add the vectors chunk by chunk. The
        source stays attached for re-ranking."""
        if choice is None:
            choice = choose_index(len(source), dim, exact_max_vectors=exact_max_vectors,
                                  target_recall=target_recall, memory_budget_bytes=memory_budget_bytes)
        coarse = train_coarse(choice, dim, source, seed, TRAIN_ITERATIONS) if choice.key != "Flat" else None
        exact = _new_exact(dim) if choice.key == "Flat" or choice.key.endswith(REFINE_SUFFIX) else None
        out = cls(choice, dim, exact, coarse, exact_max_vectors=exact_max_vectors, target_recall=target_recall,
                  memory_budget_bytes=memory_budget_bytes, source=source)
        for ids, vectors in source.chunks():
            out.add(ids, vectors)
        return out

    def attach(self, source: VectorSource) -> None:
        """Where an ``,RLMDB`` kind reads its candidates' vectors (a loaded snapshot has none until then)."""
        self._source = source

    # -- mutation and search -------------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add unit ``vectors`` [n, dim] under new face ``ids`` [n] (ids already held are the caller's bug)."""
        vectors = _as_vectors(vectors, self.dim)
        ids = _as_ids(ids, len(vectors))
        if len(ids) == 0:
            return
        with self._lock:
            for part in self._parts():
                part.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove these face ids; returns how many were held (unknown ids are ignored)."""
        ids = np.unique(_as_ids(ids))
        if len(ids) == 0:
            return 0
        selector = faiss.IDSelectorBatch(ids)
        with self._lock:
            # Every part holds the same ids, so they all report the same count.
            return [int(part.remove_ids(selector)) for part in self._parts()][0]

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None,
               refine: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by cosine: (sims float32 [m, k], ids int64 [m, k]); padded with -inf / -1 past the held ones.

        ``nprobe`` and ``refine`` override the chosen ones for this call (IVF and re-ranked kinds only; the
        benchmark sweeps them).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = _as_vectors(queries, self.dim)
        if len(queries) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        few = len(queries) <= SINGLE_THREAD_MAX_QUERIES
        with self._lock, (_omp_threads(1) if few else nullcontext()):
            if self._coarse is None:
                sims, ids = self._exact.search(queries, k)
            else:
                # Per-call parameters rather than index.nprobe: nothing shared changes, and nprobe (which faiss does
                # not serialise) always comes from the choice.
                params = _ivf_params(self._coarse, nprobe or self.choice.nprobe) if self.choice.nlist else None
                sims, ids = self._coarse.search(queries, k * max(refine or self.choice.refine, 1), params=params)
                if self._exact is not None:
                    sims, ids = _rerank(self._exact, queries, ids, k)
                elif self.choice.key.endswith(STORE_RERANK):
                    if self._source is None:
                        raise RuntimeError(f"{self.choice.key} re-ranks from the store: attach() it first")
                    sims, ids = rerank(self._source.fetch(ids[ids >= 0]), queries, ids, k)
        # faiss pads inner-product results with -FLT_MAX; -inf says "no result" without looking like a similarity.
        sims[ids < 0] = -np.inf
        return sims.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return int(self._parts()[0].ntotal)

    def ids(self) -> np.ndarray:
        """All ids held, int64, in no particular order."""
        with self._lock:
            id_map = self._exact if self._exact is not None else None if self.choice.nlist else self._coarse
            if id_map is not None:   # the exact store, or an SQ8 whole-scan under an IDMap2
                return faiss.vector_to_array(id_map.id_map).astype(np.int64, copy=False)
            invlists = faiss.extract_index_ivf(self._coarse).invlists
            parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                     for i in range(invlists.nlist) if invlists.list_size(i)]
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)

    @property
    def info(self) -> dict[str, Any]:
        """For ``status --json``: ``type`` (the key), ``vectors``, ``reason``; nlist/nprobe/refine are 0 if exact."""
        c = self.choice
        return {"type": c.key, "vectors": len(self), "reason": c.reason, "nlist": c.nlist, "nprobe": c.nprobe,
                "refine": c.refine}

    def should_rebuild(self, n: int) -> bool:
        """Whether an index holding ``n`` vectors should be rebuilt from the store as another kind.

        True when ``choose_index(n)`` picks another family (e.g. grown past the exact threshold, or shrunk below
        it) or an IVF whose list count differs by 4x or more (lists 16x longer than intended slow every query).
        """
        wanted = choose_index(n, self.dim, exact_max_vectors=self.exact_max_vectors, target_recall=self.target_recall,
                              memory_budget_bytes=self.memory_budget_bytes)
        if index_kind(wanted.key) != index_kind(self.choice.key):
            return True
        if wanted.nlist and self.choice.nlist:
            return max(wanted.nlist, self.choice.nlist) >= 4 * min(wanted.nlist, self.choice.nlist)
        return False

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write the index and ``meta`` (JSON-serialisable) to ``path`` atomically."""
        path = Path(path)
        with self._lock:
            exact = faiss.serialize_index(self._exact) if self._exact is not None else _NO_BYTES
            coarse = faiss.serialize_index(self._coarse) if self._coarse is not None else _NO_BYTES
            n = len(self)
        fields = {
            "format": FORMAT_VERSION, "meta": meta or {}, "choice": asdict(self.choice), "n": n, "dim": self.dim,
            "exact_max_vectors": self.exact_max_vectors, "target_recall": self.target_recall,
            "memory_budget_bytes": self.memory_budget_bytes,
            "parts": {"exact": len(exact), "coarse": len(coarse)},
        }
        header = json.dumps({**fields, "sha256": header_digest(fields, exact, coarse)}, sort_keys=True).encode()
        # The temp file is ``.<name>.*.tmp`` beside ``path``: the library deletes such leftovers of a crash on open.
        with atomic_writer(path) as f:
            f.write(MAGIC)
            f.write(_LEN.pack(len(header)))
            f.write(header)
            f.write(memoryview(exact))
            f.write(memoryview(coarse))
            faults.reached("snapshot")  # tests/faults: a crash with the new snapshot written but not in place

    @classmethod
    def load(cls, path: str | Path, source: VectorSource | None = None) -> tuple[VectorIndex, dict[str, Any]]:
        """Read a file written by ``save`` (``source``: see ``attach``); raises ``IndexFileError`` when it is missing
        or damaged in any way."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise IndexFileError(f"cannot read vector index {path}: {err.strerror or err}") from err
        if data[:len(MAGIC)] != MAGIC:
            raise IndexFileError(f"{path} is not a faceindex vector index (bad magic)")
        start = len(MAGIC) + _LEN.size
        if len(data) < start:
            raise IndexFileError(f"{path} is truncated (no header length)")
        (header_len,) = _LEN.unpack_from(data, len(MAGIC))
        if header_len > MAX_HEADER_BYTES or start + header_len > len(data):
            raise IndexFileError(f"{path} is truncated or damaged (header length {header_len})")
        try:
            header = json.loads(data[start:start + header_len])
            digest = header.pop("sha256")
            choice = IndexChoice(**header["choice"])
            n, dim = int(header["n"]), int(header["dim"])
            sizes = [int(header["parts"]["exact"]), int(header["parts"]["coarse"])]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise IndexFileError(f"{path} has a damaged header: {err}") from err
        payload = np.frombuffer(data, np.uint8, offset=start + header_len)
        if len(payload) != sum(sizes) or min(sizes) < 0:
            raise IndexFileError(f"{path} is truncated or damaged: payload {len(payload)} bytes, expected {sum(sizes)}")
        exact_bytes, coarse_bytes = payload[:sizes[0]], payload[sizes[0]:]
        if header_digest(header, exact_bytes, coarse_bytes) != digest:
            raise IndexFileError(f"{path} is damaged: sha256 does not match")
        try:
            exact = faiss.deserialize_index(exact_bytes) if sizes[0] else None
            coarse = faiss.deserialize_index(coarse_bytes) if sizes[1] else None
        except RuntimeError as err:
            raise IndexFileError(f"{path}: faiss cannot read the payload: {err}") from err
        parts = [p for p in (exact, coarse) if p is not None]
        if not parts or any(p.ntotal != n or p.d != dim for p in parts):
            raise IndexFileError(f"{path}: payload does not hold the {n}x{dim} vectors its header says")
        index = cls(choice, dim, exact, coarse, exact_max_vectors=header.get("exact_max_vectors", EXACT_MAX_VECTORS),
                    target_recall=header.get("target_recall", TARGET_RECALL),
                    memory_budget_bytes=header.get("memory_budget_bytes"), source=source)
        return index, header["meta"]

    # -- internals -----------------------------------------------------------------------------------------------
    def _parts(self) -> list[faiss.Index]:
        return [p for p in (self._exact, self._coarse) if p is not None]


_NO_BYTES = np.zeros(0, np.uint8)


def _new_exact(dim: int) -> faiss.Index:
    # IDMap2 (not IDMap) keeps an id -> row map: remove_ids stays consistent and reconstruct works by id (re-ranking).
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _ivf_params(coarse: faiss.Index, nprobe: int) -> faiss.SearchParameters:
    ivf_params = faiss.SearchParametersIVF(nprobe=nprobe)
    if isinstance(coarse, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=ivf_params)
    return ivf_params


def _rerank(exact: faiss.Index, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine of each query with its candidates (-1 = none), best ``k`` first."""
    valid = candidates >= 0
    sims = np.full(candidates.shape, -np.inf, np.float32)
    if valid.any():
        rows = np.nonzero(valid)[0]
        vectors = exact.reconstruct_batch(candidates[valid])
        sims[valid] = np.einsum("ij,ij->i", vectors, queries[rows])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(candidates, order, axis=1)
    return np.take_along_axis(sims, order, axis=1), np.where(ids >= 0, ids, -1)


@contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    # The OpenMP thread count is per calling thread (libgomp): a build on another thread keeps its own.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _as_vectors(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim == 1 and dim is not None and vectors.shape[0] == dim:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or (dim is not None and vectors.shape[1] != dim):
        raise ValueError(f"vectors must be [n, {dim or 'd'}], got shape {vectors.shape}")
    if len(vectors):
        norms = np.linalg.norm(vectors, axis=1)
        if not np.all(np.abs(norms - 1) <= NORM_TOLERANCE):
            raise ValueError("vectors must be L2-normalised rows (inner product is the cosine only for unit rows)")
    return vectors


def _as_ids(ids: np.ndarray, n: int | None = None) -> np.ndarray:
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if n is not None and len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} vectors")
    return ids
