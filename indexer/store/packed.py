"""The packed re-rank file: float16 copies of the store's vectors, in id order, beside the index (``vectors.f16``).

Why: past the memory budget the codes in RAM only propose candidates; each query re-scores 20 x k of them with
full vectors. Read from LMDB, each 2 KiB vector sits in its own 4 KiB overflow page (5M faces: a 19 GiB store) that
does not stay in the page cache on a busy machine, so re-ranking went to disk (bench_scale: 5M p50 14.1 ms). Here a
vector takes 1 KiB, back to back (5M: 5 GiB), found by position: a binary search of the sorted ids in RAM (8 bytes
a face), then one ``pread`` per candidate. ``pread`` rather than a memory map: the pages read stay in the page cache
and never count in this process's RSS (a map's fault-around would make every candidate map up to 64 KiB, as the
store's map does; see compressed.py's ``MapTrimmer``), at ~1 us a candidate.

Derived data: LMDB stays the source of truth. The file records the store's change sequence (``seq``) it reflects;
the owner (sync.py) uses it only when ``seq`` is at or past the index snapshot's and not past the store's, and marks
every face changed since (``mark_changed``: the change log replayed at open, then each catch-up); those, and any id
the file lacks or holds damaged (a norm far from 1), are read from the store instead. So a stale, foreign or
damaged file costs speed, never a wrong result.

Format (written with ``atomic_writer``: temp file, fsync, rename; a killed write leaves no file under the name):
a 4096-byte header block (``b"FIDXPK1\\n"``, 8-byte little-endian JSON length, UTF-8 JSON, zero padding), the
vectors (float16 [n, dim], little-endian, row i = i-th smallest id), then the ids (int64 little-endian [n], strictly
increasing). The JSON holds ``format``, ``dim``, ``n``, ``seq``, ``model``, the offsets, the sha256 of the ids and a
sha256 over all of that; the file size must match. No pickle. The vector bytes are not hashed (5 GiB at 5M would
take seconds to check at every open): each row read is checked by its norm instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from indexer.errors import IndexFileError
from indexer.fsutil import atomic_writer, header_digest
from indexer.store.compressed import CHUNK_VECTORS, VectorSource, sample_positions

# Not on every platform (macOS has no posix_fadvise): there the reads just go one after another.
_FADVISE = getattr(os, "posix_fadvise", None)
log = logging.getLogger(__name__)

PACKED_FILE = "vectors.f16"   # beside the FAISS snapshot (lmdb_store.SNAPSHOT_FILE)
MAGIC = b"FIDXPK1\n"
FORMAT_VERSION = 1
HEADER_BYTES = 4096           # one page: the vectors start page-aligned
_LEN = struct.Struct("<Q")
_F16, _I64 = np.dtype("<f2"), np.dtype("<i8")
# A stored row is a unit vector rounded to float16 (relative error 2^-11 a component, so |norm^2 - 1| < 2e-3);
# further off means the bytes are not what was written: the store answers for that face instead.
NORM2_TOLERANCE = 1e-2


class _Abandoned(Exception):
    """Raised inside the atomic writer so that it deletes the temp file of a write given up (disk full)."""


class PackedWriter:
    """Writes a packed file: ``add`` chunks in increasing id order, then leave the ``with`` block. A write that
    failed (``abandon``, or an exception in the block) leaves nothing under ``path``."""

    def __init__(self, path: str | Path, dim: int, seq: int, model: str | None) -> None:
        self.path, self.dim, self.seq, self.model = Path(path), dim, int(seq), model
        self._ids: list[np.ndarray] = []
        self._last = -1
        self._failed: BaseException | None = None
        self._stack = ExitStack()

    def __enter__(self) -> PackedWriter:
        self._fh = self._stack.enter_context(atomic_writer(self.path))
        self._fh.write(bytes(HEADER_BYTES))   # the header goes in last, when n and the ids' digest are known
        return self

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self._failed is not None or not len(ids):
            return
        ids = np.asarray(ids, _I64)
        if ids[0] <= self._last or np.any(np.diff(ids) <= 0):
            raise ValueError("a packed file takes ids in strictly increasing order")
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"vectors must be [{len(ids)}, {self.dim}], got {vectors.shape}")
        try:
            self._fh.write(np.ascontiguousarray(vectors, _F16).tobytes())
        except OSError as exc:
            self.abandon(exc)
            return
        self._ids.append(ids.copy())
        self._last = int(ids[-1])

    def abandon(self, exc: BaseException) -> None:
        """Give the write up (the index works without the file, re-ranking from the store)."""
        if self._failed is None:
            log.warning("could not write %s (%s); re-ranking reads the store instead", self.path,
                        getattr(exc, "strerror", None) or exc)
            self._failed = exc

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:             # the caller's error: the temp file goes, the error goes on
            return bool(self._stack.__exit__(exc_type, exc, tb))
        try:
            if self._failed is None:
                self._finish()
                self._stack.__exit__(None, None, None)   # fsync, rename, fsync the folder
                return False
        except OSError as err:               # disk full at the end: as a failed add
            self.abandon(err)
        try:                                 # a no-op when the rename step itself failed (its temp file is gone)
            self._stack.__exit__(_Abandoned, _Abandoned(), None)
        except _Abandoned:
            pass
        return False

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def _finish(self) -> None:
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, _I64)
        self._fh.write(ids.tobytes())
        n = len(ids)
        fields = {"format": FORMAT_VERSION, "dtype": "float16", "dim": self.dim, "n": n, "seq": self.seq,
                  "model": self.model, "vectors_offset": HEADER_BYTES, "ids_offset": HEADER_BYTES + 2 * n * self.dim,
                  "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()}
        header = json.dumps({**fields, "sha256": header_digest(fields)}, sort_keys=True).encode()
        if len(MAGIC) + _LEN.size + len(header) > HEADER_BYTES:
            raise ValueError("packed header too long")   # a model name of kilobytes: a bug
        self._fh.seek(0)
        self._fh.write(MAGIC + _LEN.pack(len(header)) + header)


class PackedVectors:
    """A packed file open for reading: ``fetch`` as a ``VectorSource`` does, from the file where it can, else from
    ``fallback`` (the store). Thread-safe for fetches (``pread`` has no file position); ``mark_changed`` may run
    beside them (a set's membership test and add are atomic under the GIL)."""

    def __init__(self, path: Path, header: dict, ids: np.ndarray, fallback: VectorSource | None) -> None:
        self.path, self.header, self.ids, self.fallback = path, header, ids, fallback
        self.dim, self.seq, self.model = int(header["dim"]), int(header["seq"]), header["model"]
        self.changed: set[int] = set()   # faces changed since ``seq``: read from the fallback
        self._row_bytes = 2 * self.dim
        self._offset = int(header["vectors_offset"])
        # Closed when the last reference goes (a search in flight keeps it open across a swap to a newer file).
        self._file = open(path, "rb", buffering=0)   # noqa: SIM115
        self.prefetch = _FADVISE is not None   # announce a query's rows before reading them (see read_rows)
        if _FADVISE is not None:   # candidates are scattered: read-ahead would read neighbours for nothing
            _FADVISE(self._file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)

    @classmethod
    def open(cls, path: str | Path, dim: int, fallback: VectorSource | None = None) -> PackedVectors | None:
        """The packed file at ``path``; None when there is none; ``IndexFileError`` when it is damaged."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
                size = os.fstat(f.fileno()).st_size
                header = _parse_header(path, head, size, dim)
                f.seek(header["ids_offset"])
                raw = f.read(8 * header["n"])
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise IndexFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if hashlib.sha256(raw).hexdigest() != header["ids_sha256"]:
            raise IndexFileError(f"{path} is damaged: the ids' sha256 does not match")
        ids = np.frombuffer(raw, _I64).astype(np.int64)
        if np.any(np.diff(ids) <= 0):
            raise IndexFileError(f"{path} is damaged: ids not strictly increasing")
        return cls(path, header, ids, fallback)

    def __len__(self) -> int:
        return len(self.ids)

    def mark_changed(self, ids: Iterable[int]) -> None:
        """These faces changed after ``seq``: their rows here are stale (or absent), the fallback answers."""
        self.changed.update(int(i) for i in ids)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in this file, -1 where it has none or the face changed since."""
        ids = np.asarray(ids, np.int64)
        if not len(self.ids) or not len(ids):
            return np.full(len(ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        hit = self.ids[pos] == ids
        if self.changed:
            changed = self.changed
            hit &= np.fromiter((i not in changed for i in ids.tolist()), bool, len(ids))
        return np.where(hit, pos, -1)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """float16 [len(rows), dim] of these rows, one ``pread`` each.

        Past RAM most rows are not in the page cache, and one ``pread`` after another waits for the disk once per
        row. So every row is first announced with ``posix_fadvise(WILLNEED)``, which queues its read and returns at
        once: the disk serves them side by side and each ``pread`` then waits only for its own page. Measured on
        this machine's disk, 200 random 1 KiB rows of a 4 GiB file out of the page cache: 9-12 ms one after
        another, 1.3-1.4 ms announced first (bench_scale re-measures it in the query latency)."""
        fd, size, base = self._file.fileno(), self._row_bytes, self._offset
        offsets = [base + r * size for r in rows.tolist()]
        if len(offsets) > 1 and self.prefetch and _FADVISE is not None:
            for offset in offsets:
                _FADVISE(fd, offset, size, os.POSIX_FADV_WILLNEED)
        raw = b"".join([os.pread(fd, size, offset) for offset in offsets])
        if len(raw) != len(rows) * size:
            raise IndexFileError(f"{self.path} is truncated")
        return np.frombuffer(raw, _F16).reshape(len(rows), self.dim)

    def fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, np.int64)
        rows = self.rows(ids)
        out = np.zeros((len(ids), self.dim), np.float32)
        found = rows >= 0
        if found.any():
            where = np.nonzero(found)[0]
            try:
                vectors = self.read_rows(rows[found]).astype(np.float32)
            except (OSError, IndexFileError) as exc:  # the file went bad under us: the store still answers
                log.warning("re-rank file %s unreadable (%s); reading the store", self.path, exc)
                vectors, where = np.zeros((0, self.dim), np.float32), where[:0]
            ok = np.abs(np.einsum("ij,ij->i", vectors, vectors) - 1) <= NORM2_TOLERANCE
            found[:] = False
            found[where[ok]] = True
            out[where[ok]] = vectors[ok]
        missing = np.nonzero(~found)[0]
        if len(missing) and self.fallback is not None:
            vectors, got = self.fallback.fetch(ids[missing])
            out[missing[got]] = vectors
            found[missing[got]] = True
        return out[found], found

    def chunks(self, size: int = CHUNK_VECTORS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float16 vectors) of the whole file in id order, ``size`` rows a read (stale rows included)."""
        for start in range(0, len(self.ids), size):
            stop = min(start + size, len(self.ids))
            yield self.ids[start:stop], self.read_rows(np.arange(start, stop))

    def sample_chunks(self, n: int, seed: int, size: int = CHUNK_VECTORS) -> Iterator[np.ndarray]:
        positions = sample_positions(len(self.ids), n, seed)
        for start in range(0, len(positions), size):
            yield self.read_rows(positions[start:start + size]).astype(np.float32)


class TeeSource:
    """A source whose ``chunks`` also go into a ``PackedWriter``: a rebuild writes the packed file in the same
    pass over the store as the index's adds (one read of the store, not two)."""

    def __init__(self, source: VectorSource, writer: PackedWriter) -> None:
        self.source, self.writer = source, writer

    def __len__(self) -> int:
        return len(self.source)

    def chunks(self, size: int = CHUNK_VECTORS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, vectors in self.source.chunks(size):
            self.writer.add(ids, vectors)
            yield ids, vectors

    def sample_chunks(self, n: int, seed: int, size: int = CHUNK_VECTORS) -> Iterator[np.ndarray]:
        return self.source.sample_chunks(n, seed, size)

    def fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.source.fetch(ids)


def write_merged(path: str | Path, old: PackedVectors, store_source: VectorSource, seq: int,
                 model: str | None) -> bool:
    """A new packed file at ``seq``: ``old``'s rows of unchanged faces, the changed ones read from ``store_source``
    (gone from it: left out). Streams both, a chunk at a time. ``seq`` must be one at which every face outside
    ``old.changed`` still had ``old``'s vector (the index's own sequence number, changes marked up to it).
    Whether the file was written (False: a warning was logged, the old file is still in place)."""
    changed = np.array(sorted(old.changed), np.int64)
    old_pos = ch_pos = 0
    with PackedWriter(path, old.dim, seq, model) as writer:
        while old_pos < len(old.ids) or ch_pos < len(changed):
            # Up to one chunk of each: the old rows and the changed ids up to the smaller of their chunks' last ids.
            bounds = [old.ids[min(old_pos + CHUNK_VECTORS, len(old.ids)) - 1]] if old_pos < len(old.ids) else []
            bounds += [changed[min(ch_pos + CHUNK_VECTORS, len(changed)) - 1]] if ch_pos < len(changed) else []
            bound = min(bounds)
            old_stop = int(np.searchsorted(old.ids, bound, side="right"))
            ch_stop = int(np.searchsorted(changed, bound, side="right"))
            ids = old.ids[old_pos:old_stop]
            kept = ~np.isin(ids, changed)
            all_ids, all_vectors = ids[kept], old.read_rows(np.arange(old_pos, old_stop)[kept])
            fresh = changed[ch_pos:ch_stop]
            if len(fresh):
                vectors, got = store_source.fetch(fresh)
                all_ids = np.concatenate([all_ids, fresh[got]])
                all_vectors = np.concatenate([all_vectors, vectors.astype(_F16)])
                order = np.argsort(all_ids, kind="stable")
                all_ids, all_vectors = all_ids[order], all_vectors[order]
            writer.add(all_ids, all_vectors)
            old_pos, ch_pos = old_stop, ch_stop
    return not writer.failed


def write_all(path: str | Path, source: VectorSource, dim: int, seq: int, model: str | None) -> bool:
    """A packed file of every vector of ``source`` (the store, read in one transaction at ``seq``); see
    ``write_merged`` for the answer."""
    with PackedWriter(path, dim, seq, model) as writer:
        for ids, vectors in source.chunks():
            writer.add(ids, vectors)
    return not writer.failed


def _parse_header(path: Path, head: bytes, size: int, dim: int) -> dict:
    if head[:len(MAGIC)] != MAGIC:
        raise IndexFileError(f"{path} is not a faceindex packed vector file (bad magic)")
    try:
        (length,) = _LEN.unpack_from(head, len(MAGIC))
        start = len(MAGIC) + _LEN.size
        if start + length > HEADER_BYTES:
            raise ValueError(f"header length {length}")
        header = json.loads(head[start:start + length])
        digest = header.pop("sha256")
        if digest != header_digest(header):
            raise ValueError("header sha256 does not match")
        n, ids_offset = int(header["n"]), int(header["ids_offset"])
        int(header["seq"])
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise IndexFileError(f"{path} has a damaged header: {exc}") from exc
    if header.get("format") != FORMAT_VERSION or header.get("dtype") != "float16" or header.get("dim") != dim:
        raise IndexFileError(f"{path}: format {header.get('format')}, {header.get('dtype')}, dim {header.get('dim')}; "
                             f"this faceindex reads format {FORMAT_VERSION}, float16, dim {dim}")
    if header.get("vectors_offset") != HEADER_BYTES or ids_offset != HEADER_BYTES + 2 * n * dim \
            or size != ids_offset + 8 * n:
        raise IndexFileError(f"{path} is truncated or damaged: {size} bytes for {n} vectors of {dim}")
    return header
