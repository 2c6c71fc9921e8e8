"""What made an index's vectors: the embedder's weights and the preprocessing of its input (issue 11).

Two vectors can be compared only when the same weights embedded the same kind of crop: a face cropped with another
margin, or flip-averaged, lands elsewhere in the embedding space. So an index records both, as one string
``<weights fingerprint>/<preprocessing>``, e.g. ``casia-webface:7cb52a24/m32+flip`` (margin 32 px of the 160 px
crop, each face averaged with its mirror image), in the store's ``model`` meta key, and refuses vectors made
differently. ``faceindex ingest --rebuild`` re-embeds an index's photos from their files with the configured
preprocessing (indexer/pipeline/rebuild.py).

An index built before preprocessing was recorded holds only the weights (``casia-webface:7cb52a24``): its vectors
were made with the defaults of that time, margin 14 and no flip (``LEGACY_PREPROCESSING``).
"""

from __future__ import annotations

from pathlib import Path

from indexer.config import Settings
from indexer.errors import IndexMismatchError

LEGACY_PREPROCESSING = "m14"   # facenet-pytorch's margin, no flip: what every index made before issue 11 holds
REBUILD_KEY = "rebuild_to"     # store meta: set while a rebuild runs (what it makes); gone once it completes


def preprocessing(margin: int, flip: bool) -> str:
    """The preprocessing part of a fingerprint: ``m<margin>`` and ``+flip`` when flip-averaged."""
    return f"m{margin}" + ("+flip" if flip else "")


def configured(settings: Settings) -> str:
    """The preprocessing the settings ask for."""
    return preprocessing(settings.detector.margin, settings.embedder.flip)


def full(weights: str, prep: str) -> str:
    return f"{weights}/{prep}"


def normalised(stored: str | None) -> str | None:
    """A stored ``model`` value as a full fingerprint: one without preprocessing is a pre-issue-11 index."""
    if not stored:
        return None
    return stored if "/" in stored.rpartition(":")[2] else full(stored, LEGACY_PREPROCESSING)


def weights_of(fingerprint: str) -> str:
    """The weights part (``casia-webface:7cb52a24``) of a full or a legacy fingerprint."""
    name, _, rest = fingerprint.rpartition(":")
    return f"{name}:{rest.split('/')[0]}"


def mismatch(index_dir: str | Path, stored: str, wanted: str) -> IndexMismatchError:
    """The one-line refusal: names what the index holds and what this configuration makes, and the way out."""
    way = f"`faceindex ingest --rebuild --index {index_dir}` re-embeds its photos from the stored files"
    if weights_of(stored) != weights_of(wanted):
        way += f" (or use --weights {stored.split(':')[0]})"
    else:
        way += " (or set detector.margin / embedder.flip back to the index's)"
    return IndexMismatchError(f"index {index_dir} holds vectors made by {stored}, but this configuration makes "
                              f"{wanted}; {way}, or use a new --index")


def interrupted(index_dir: str | Path, target: str) -> IndexMismatchError:
    return IndexMismatchError(f"index {index_dir} was being rebuilt to {target} when that stopped; run "
                              f"`faceindex ingest --rebuild --index {index_dir}` again to finish it")
