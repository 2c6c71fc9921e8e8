"""Damaged records: skipped with a warning where they are read, counted by ``faceindex status``.

LMDB keeps its own structure consistent (copy-on-write pages, atomic commits), but a value can still be wrong: a bug
in some version, a tool that wrote into the store, a bad sector under an old record. One such value must cost its own
face, not every command that walks the faces (a msgpack error in ``iter_faces`` would stop people, report and
recluster alike). So face records that do not decode, vectors of the wrong length and thumbnails that are not whole
JPEGs are left out where they are read, each reported once per process, and ``check.scan`` counts them for
``status``. The checks here are pure (bytes in, verdict out), so the store's own module can use them.
"""

from __future__ import annotations

import logging

from indexer.embedding import EMBEDDING_DIM
from indexer.store.records import FaceRecord, from_u64, unpack

log = logging.getLogger("faceindex.store")
VECTOR_BYTES = EMBEDDING_DIM * 4
_reported: set[tuple[str, bytes]] = set()


def _report(table: str, key: bytes, why: str) -> None:
    if (table, key) not in _reported:
        _reported.add((table, key))
        log.warning("damaged %s record of face %d (%s): skipped; `faceindex status` counts them", table,
                    from_u64(key) if len(key) == 8 else -1, why)


def face_or_why(raw: bytes) -> FaceRecord | str:
    """The face record in ``raw``, or why it does not decode (the exception's name); reports nothing."""
    try:
        return FaceRecord(**unpack(raw))
    except Exception as exc:  # msgpack raises several types; a wrong shape is a TypeError
        return type(exc).__name__


def decode_face(key: bytes, raw: bytes) -> FaceRecord | None:
    """The face record stored under ``key``, or None (with a warning) when it does not decode."""
    face = face_or_why(raw)
    if isinstance(face, str):
        _report("face", key, face)
        return None
    return face


def vector_ok(key: bytes, raw: bytes) -> bool:
    if len(raw) == VECTOR_BYTES:
        return True
    _report("vector", key, f"{len(raw)} bytes, not {VECTOR_BYTES}")
    return False


def thumbnail_ok(raw: bytes | memoryview) -> bool:
    """A whole JPEG: start-of-image and end-of-image markers (the cheap check; decoding them all would not be)."""
    return len(raw) > 4 and bytes(raw[:2]) == b"\xff\xd8" and bytes(raw[-2:]) == b"\xff\xd9"
