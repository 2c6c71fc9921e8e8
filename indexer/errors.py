"""Typed errors of the faceindex library. The CLI alone turns them into one-line messages."""

from __future__ import annotations


class FaceIndexError(Exception):
    """Base class: a failure the user can act on; ``str(err)`` is one sentence saying what to do."""


class DependencyError(FaceIndexError):
    """A package faceindex needs is missing, or lacks a function faceindex calls: reinstall (``make install``)."""


class ConfigError(FaceIndexError):
    """config.toml or a flag holds a value that cannot work."""


class WeightsError(FaceIndexError):
    """Model weights are missing, corrupt or cannot be obtained."""


class ImageError(FaceIndexError):
    """An input file cannot be decoded as an image (the message is the recorded reason)."""


class IndexMismatchError(FaceIndexError):
    """The index was built with another model or schema than the one asked for."""


class IndexLockedError(FaceIndexError):
    """Another writer (ingest or watch) holds the index."""


class NotFoundError(FaceIndexError):
    """A file, face, cluster or index the user named does not exist."""


class ClusteringError(FaceIndexError):
    """Clustering cannot run on this index as asked (too few faces, bad k, ...)."""


class IndexFileError(FaceIndexError):
    """The saved vector index file is missing, truncated or damaged: rebuild it from the store."""


class ReadStalledError(FaceIndexError):
    """Reads of photos keep hanging: the disk or network mount holding them is not answering."""


class StorageError(FaceIndexError):
    """The index folder cannot be written (disk full, read-only, no permission): nothing half-written is kept."""


class EngineError(FaceIndexError):
    """The distributed engine cannot run: Ray is not installed, its cluster cannot be reached, or a worker failed."""
