"""The store's records and their encoding: msgpack (no pickle), big-endian u64 ids, file paths as raw bytes."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

_U64 = struct.Struct(">Q")  # big-endian so LMDB's byte order is numeric order


def u64(n: int) -> bytes:
    return _U64.pack(n)


def from_u64(b: bytes) -> int:
    return _U64.unpack(b)[0]


def pack(obj: Any) -> bytes:
    # surrogateescape: a file name that is not valid UTF-8 (Latin-1 bytes from an old archive) reaches Python as a
    # str with surrogates (os.fsdecode); it is stored as its original bytes and read back as the same str.
    return msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogateescape")


def unpack(b: bytes) -> Any:
    return msgpack.unpackb(b, raw=False, unicode_errors="surrogateescape")


def path_key(path: str) -> bytes:
    """A file's key: its path as the bytes the filesystem holds (any name, UTF-8 or not)."""
    return os.fsencode(path)


@dataclass
class FileRecord:
    path: str
    size: int
    mtime_ns: int
    sha256: str
    status: str                 # indexed | no_face | failed
    reason: str = ""
    face_ids: list[int] = field(default_factory=list)
    indexed_at: float = 0.0
    width: int = 0              # pixels of the oriented image (0 when it could not be decoded)
    height: int = 0

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class FaceRecord:
    face_id: int
    path: str
    box: list[float]
    prob: float
    landmarks: list[list[float]]
    cluster: int = -1
    similarity: float = float("nan")
    suggested: int | None = None  # the clusterer's person for it; None: as ``cluster`` (schema 1 records)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class NewFace:
    """A face to commit: its record fields (without id), its vector and its thumbnail."""

    box: list[float]
    prob: float
    landmarks: list[list[float]]
    vector: np.ndarray
    thumbnail: bytes
    cluster: int = -1
    similarity: float = float("nan")
