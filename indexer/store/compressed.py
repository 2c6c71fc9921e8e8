"""Indexes past RAM: where the vectors of a build come from, how compressed kinds are trained, and re-ranking with
float32 vectors read from the store.

A build reads its vectors from a *source*: ``ArrayVectors`` (an array already in RAM: tests, benchmarks) or
``StoreVectors`` (the LMDB store, streamed in chunks, so a build never holds every float32 vector at once). The
same source answers ``fetch`` for the kinds re-ranked from the store (key suffix ``,RLMDB``, see choose.py): only
the candidates' vectors are read, from LMDB's memory map.

LMDB stores each 2,048-byte vector in its own 4 KiB overflow page, and every page of the map that this process
touched counts in its resident memory (RSS) until the kernel needs it back: a build streaming 5M vectors would show
20 GB resident, all of it reclaimable page cache but indistinguishable from a leak to whoever watches RSS. Random
reads map more than they read: the kernel's fault-around maps up to 16 cached neighbours of each page touched
(measured: 300 re-ranked queries, 400 candidates each, left 205 MiB of the map resident, not the 470 KiB read). So
the file-backed part of RSS is checked as reads go (/proc/self/statm), and past ``TRIM_EVERY_BYTES`` the map's
pages are dropped from this process (``madvise(MADV_DONTNEED)`` on the read-only shared mapping: the data stays in
the page cache and comes back on the next touch, nothing is lost).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Iterator
from typing import Protocol

import faiss
import lmdb
import numpy as np

from indexer.store.choose import PCA_TRAIN_POINTS, STORE_RERANK, TRAIN_POINTS_PER_LIST, IndexChoice
from indexer.store.integrity import vector_ok
from indexer.store.lmdb_store import STORE_DIR, FaceStore
from indexer.store.records import from_u64, u64

log = logging.getLogger(__name__)

# Vectors a build reads and adds at a time: 16,384 x 2 KiB = 32 MiB of float32 (64 MiB of LMDB pages).
CHUNK_VECTORS = 16_384
# Drop the store's mapped pages from this process once file-backed RSS grew this much (see the docstring). Each
# trim costs its next reads their page faults again (a query re-ranking 400 candidates right after a trim took
# 21.7 ms instead of 5.8 ms on this loaded 2-core machine) and ~2 ms itself: 128 MiB trims every ~10 queries.
TRIM_EVERY_BYTES = 128 * 2**20
# Look at /proc/self/statm (~10 us) after this many vectors read: each maps up to 64 KiB with fault-around, so
# 256 reads map at most 16 MiB between looks (a build's random sample would otherwise map the whole store).
CHECK_EVERY_VECTORS = 256
MADV_DONTNEED = 4           # Linux
# SQ8 learns each dimension's range: tens of thousands of vectors pin it down (outliers are clamped, then re-ranked).
SQ8_TRAIN_POINTS = 40_960


class VectorSource(Protocol):
    """Where a build reads its vectors, and where ``,RLMDB`` kinds read their candidates'."""

    def __len__(self) -> int: ...

    def chunks(self, size: int = CHUNK_VECTORS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64 [m], vectors float32 [m, d]) in id order, ``size`` at a time."""
        ...

    def sample_chunks(self, n: int, seed: int, size: int = CHUNK_VECTORS) -> Iterator[np.ndarray]:
        """``n`` vectors drawn without replacement by a seeded generator (in id order), ``size`` at a time."""
        ...

    def fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float32 [found.sum(), d] of the ids held, in order; found bool [m]) for these ids."""
        ...


def sample(source: VectorSource, n: int, seed: int, transform=None) -> np.ndarray:
    """A seeded sample of ``n`` vectors of ``source`` (all of them when it holds fewer), float32 [m, d], each chunk
    passed through ``transform`` first when given; filled in place (no second copy of a sample of 100s of MiB)."""
    out, m = None, 0
    for chunk in source.sample_chunks(n, seed):
        chunk = transform(chunk) if transform is not None else chunk
        if out is None:
            out = np.empty((min(n, len(source)), chunk.shape[1]), np.float32)
        out[m:m + len(chunk)] = chunk
        m += len(chunk)
    return out[:m] if out is not None else np.zeros((0, 0), np.float32)


def sample_positions(total: int, n: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded sample (the same draw ``VectorIndex.build`` always made)."""
    return np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))


class ArrayVectors:
    """A source over arrays already in RAM."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.ids, self.vectors = ids, vectors
        self._row = None

    def __len__(self) -> int:
        return len(self.ids)

    def chunks(self, size: int = CHUNK_VECTORS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self.ids), size):
            yield self.ids[start:start + size], self.vectors[start:start + size]

    def sample_chunks(self, n: int, seed: int, size: int = CHUNK_VECTORS) -> Iterator[np.ndarray]:
        positions = sample_positions(len(self.ids), n, seed)
        for start in range(0, len(positions), size):
            yield self.vectors[positions[start:start + size]]

    def fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._row is None:
            self._row = {int(i): r for r, i in enumerate(self.ids.tolist())}
        rows = np.array([self._row.get(int(i), -1) for i in ids], np.int64)
        return self.vectors[rows[rows >= 0]], rows >= 0


class StoreVectors:
    """A source over the store's ``vectors`` table. With ``txn``, ``len``/``chunks``/``sample`` read in that
    transaction (a rebuild reads one consistent snapshot, with its change sequence); ``fetch`` always opens a
    short transaction of its own, since searches come later and from any thread."""

    def __init__(self, store: FaceStore, txn: lmdb.Transaction | None = None, dim: int = 512) -> None:
        self.store, self.txn, self.dim = store, txn, dim
        self._trim = MapTrimmer(store)

    def __len__(self) -> int:
        return self._read(lambda txn: txn.stat(self.store.db["vectors"])["entries"])

    def _read(self, fn):
        if self.txn is not None:
            return fn(self.txn)
        with self.store.read() as txn:
            return fn(txn)

    def chunks(self, size: int = CHUNK_VECTORS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        txn = self._build_txn()
        ids, out, m = np.zeros(size, np.int64), np.zeros((size, self.dim), np.float32), 0
        for key, raw in txn.cursor(db=self.store.db["vectors"]):
            if vector_ok(key, raw):   # a damaged vector is left out (integrity.py counts it)
                ids[m], out[m] = from_u64(key), np.frombuffer(raw, np.float32)
                m += 1
            self._trim.read(1)
            if m == size:
                yield ids.copy(), out.copy()
                m = 0
        if m:
            yield ids[:m].copy(), out[:m].copy()

    def _build_txn(self) -> lmdb.Transaction:
        if self.txn is None:
            raise ValueError("StoreVectors reads a build's vectors in the build's transaction: give it one")
        return self.txn

    def sample_chunks(self, n: int, seed: int, size: int = CHUNK_VECTORS) -> Iterator[np.ndarray]:
        txn = self._build_txn()
        db = self.store.db["vectors"]
        # Keys only; LMDB still faults each value's overflow page in as its cursor steps (measured: listing the keys
        # of 1M vectors mapped the whole 4 GiB store), so the trimmer counts them too.
        keys = []
        for key in txn.cursor(db=db).iternext(keys=True, values=False):
            keys.append(key)
            self._trim.read(1)
        positions = sample_positions(len(keys), n, seed)
        for start in range(0, len(positions), size):
            out, m = np.zeros((min(size, len(positions) - start), self.dim), np.float32), 0
            for i in positions[start:start + size]:
                raw = txn.get(keys[i], db=db)
                if vector_ok(keys[i], raw):
                    out[m] = np.frombuffer(raw, np.float32)
                    m += 1
                self._trim.read(1)
            yield out[:m]

    def fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = np.zeros(len(ids), bool)
        out = np.zeros((len(ids), self.dim), np.float32)
        with self.store.read(buffers=True) as txn:   # views into the map: one copy, into ``out``
            db = self.store.db["vectors"]
            for j, i in enumerate(ids.tolist()):
                view = txn.get(u64(i), db=db)
                if view is not None and len(view) == 4 * self.dim:  # else gone since (removed) or damaged
                    found[j] = True
                    out[j] = np.frombuffer(view, np.float32)
                self._trim.read(1)
        return out[found], found


class MapTrimmer:
    """Drops the store's memory-mapped pages from this process's RSS when its file-backed part grew by
    ``TRIM_EVERY_BYTES`` (looked at every ``CHECK_EVERY_VECTORS`` vectors read).

    Called only inside a read transaction of the store (``FaceStore.read`` holds off a remap of the map while it
    runs), so the mapping found in /proc/self/maps is still the store's when ``madvise`` runs. Linux only; elsewhere
    nothing is done.
    """

    def __init__(self, store: FaceStore) -> None:
        self.path = os.path.realpath(os.path.join(store.index_dir, STORE_DIR, "data.mdb"))
        self.pending = 0
        self._madvise = _libc_madvise()
        # File-backed RSS right after a trim: libraries' pages and the like, not ours to drop. Unknown until the
        # first read (in a transaction) trims once: pages another reader left mapped must not raise it.
        self.floor: int | None = None

    def read(self, vectors: int) -> None:
        self.pending += vectors
        if self.pending >= CHECK_EVERY_VECTORS and self._madvise is not None:
            self.pending = 0
            if self.floor is None or file_resident_bytes() - self.floor >= TRIM_EVERY_BYTES:
                self.trim()

    def trim(self) -> int:
        """Drop the mapped pages now; returns how many bytes of mapping were advised."""
        if self._madvise is None:
            return 0
        advised = 0
        for start, stop in _mappings_of(self.path):
            if self._madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), MADV_DONTNEED) == 0:
                advised += stop - start
        self.floor = file_resident_bytes()
        return advised


def file_resident_bytes() -> int:
    """File-backed (and shared) resident bytes of this process: /proc/self/statm's third field; 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[2]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _libc_madvise():
    if not os.path.exists("/proc/self/maps"):
        return None
    try:
        madvise = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


def _mappings_of(path: str) -> list[tuple[int, int]]:
    """(start, stop) of this process's read-only shared mappings of ``path``."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == path and fields[1].startswith("r-") \
                        and int(fields[2], 16) == 0:
                    start, stop = (int(v, 16) for v in fields[0].split("-"))
                    out.append((start, stop))
    except OSError:
        return []
    return out


# -- training ----------------------------------------------------------------------------------------------------
def train_coarse(choice: IndexChoice, dim: int, source: VectorSource, seed: int, niter: int) -> faiss.Index:
    """The trained coarse index of ``choice`` (everything but ``Flat``), from seeded samples of ``source``."""
    key = choice.key.removesuffix(STORE_RERANK).removesuffix(",RFlat")
    coarse = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    if not choice.nlist:                    # SQ8: per-dimension ranges, from the sample
        coarse.train(sample(source, SQ8_TRAIN_POINTS, seed))
        return faiss.IndexIDMap2(coarse)
    ivf = faiss.extract_index_ivf(coarse)
    ivf.cp.seed, ivf.cp.niter = seed, niter
    n_train = TRAIN_POINTS_PER_LIST * choice.nlist
    if not choice.key.endswith(STORE_RERANK):
        coarse.train(sample(source, n_train, seed))   # in-RAM kinds: one float32 sample (as always)
        return coarse
    # Past RAM: the PCA on a float32 sample of its own, then lists and sub-quantizers on projected vectors, drawn in
    # chunks so the float32 sample never needs to be whole (at 5M: 327,680 x 2 KiB would be 640 MiB).
    # "PCAR128" is one PCAMatrix (its random rotation included): the chain's only transform.
    faiss.downcast_VectorTransform(coarse.chain.at(0)).train(sample(source, PCA_TRAIN_POINTS, seed))
    coarse.index.train(sample(source, n_train, seed + 1, transform=lambda x: _apply(coarse, x)))
    coarse.is_trained = True
    return coarse


def _apply(pretransform: faiss.IndexPreTransform, x: np.ndarray) -> np.ndarray:
    for i in range(pretransform.chain.size()):
        x = faiss.downcast_VectorTransform(pretransform.chain.at(i)).apply(x)
    return x


# -- re-ranking --------------------------------------------------------------------------------------------------
def rerank(fetched: tuple[np.ndarray, np.ndarray], queries: np.ndarray, candidates: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine of each query with its candidates (-1, or not found in the source: none), best ``k`` first.

    ``fetched`` is ``source.fetch`` of ``candidates[candidates >= 0]`` (row order)."""
    vectors, found = fetched
    valid = candidates >= 0
    ok = valid.copy()
    ok[valid] = found
    sims = np.full(candidates.shape, -np.inf, np.float32)
    if ok.any():
        rows = np.nonzero(ok)[0]
        sims[ok] = np.einsum("ij,ij->i", vectors, queries[rows])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(np.where(ok, candidates, -1), order, axis=1)
    return np.take_along_axis(sims, order, axis=1), ids
