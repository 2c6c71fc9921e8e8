"""Downloaded checkpoint files checked against the sha256 of the file: a pinned value where one is known, else the
value recorded the first time the file was seen (trust on first use).

The hash here is over the file's bytes as published (what ``sha256sum`` prints), because that is what a pin of a
download means. It is not the weights' fingerprint (weights.tensors_sha256, over the tensors), which names weights
however they were serialised and so cannot tell a swapped file from a re-saved one.

Trust-on-first-use records live in ``<faceindex cache>/checkpoints.json`` (file name -> sha256), not in the torch
cache, which belongs to torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from indexer.errors import WeightsError
from indexer.fsutil import atomic_write, atomic_writer

RECORD_FILE = "checkpoints.json"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _records(store: Path) -> dict[str, str]:
    try:
        data = json.loads(store.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        raise WeightsError(f"{store} is unreadable; delete it (the checkpoint hashes are recorded again)") from None
    return data if isinstance(data, dict) else {}


def recorded_sha256(store: Path, filename: str) -> str | None:
    return _records(store).get(filename)


def record_sha256(store: Path, filename: str, digest: str) -> None:
    records = _records(store)
    records[filename] = digest
    store.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(store, json.dumps(records, indent=2, sort_keys=True))


def _mismatch(what: str, digest: str, want: str, *, pinned: bool, store: Path, filename: str,
              downloaded: bool = False) -> WeightsError:
    got = f"({digest[:12]}… instead of {want[:12]}…)"
    retry = "it was not saved; try again later" if downloaded else "delete it and run again to download it afresh"
    if pinned:
        return WeightsError(f"{what} does not match its pinned sha256 {got}; {retry}, or choose other --weights")
    return WeightsError(
        f"{what} does not match the sha256 recorded when {filename} was first used {got}; {retry}, "
        f"or if the new file is the one you want, remove its entry from {store}"
    )


def expected_sha256(pinned: str | None, store: Path, filename: str) -> str | None:
    """The pin when there is one, else what was recorded at first use, else None (nothing to check against yet)."""
    return pinned or recorded_sha256(store, filename)


def verify_file(path: Path, pinned: str | None, store: Path) -> str:
    """The file's sha256, checked against the pin or the first-use record in ``store`` (made if missing)."""
    digest = file_sha256(path)
    want = expected_sha256(pinned, store, path.name)
    if want is None:
        record_sha256(store, path.name, digest)
    elif digest != want:
        raise _mismatch(str(path), digest, want, pinned=pinned is not None, store=store, filename=path.name)
    return digest


def download(url: str, dest: Path, pinned: str | None, store: Path, timeout: float) -> str:
    """Fetch ``url`` to ``dest`` atomically and checked; a download that does not match never lands."""
    import requests

    dest.parent.mkdir(parents=True, exist_ok=True)
    want = expected_sha256(pinned, store, dest.name)
    h = hashlib.sha256()
    with requests.get(url, stream=True, timeout=timeout) as resp:
        resp.raise_for_status()
        with atomic_writer(dest) as fh:
            for chunk in resp.iter_content(_CHUNK):
                h.update(chunk)
                fh.write(chunk)
            digest = h.hexdigest()
            if want is not None and digest != want:
                # Raised inside the writer, so the bytes are deleted instead of renamed into the torch cache.
                raise _mismatch(f"the download of {url}", digest, want, pinned=pinned is not None, store=store,
                                filename=dest.name, downloaded=True)
    if want is None:
        record_sha256(store, dest.name, digest)
    return digest
