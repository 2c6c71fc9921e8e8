"""Downloaded checkpoints are checked by the sha256 of their file: pinned, or recorded at first use."""

from __future__ import annotations

import hashlib

import pytest

from indexer.errors import WeightsError
from indexer.fsutil import leftover_temp_files
from indexer.models import checkpoints
from indexer.models import weights as weights_mod

GOOD, BAD = b"the published checkpoint", b"a checkpoint someone swapped in"
GOOD_SHA, BAD_SHA = hashlib.sha256(GOOD).hexdigest(), hashlib.sha256(BAD).hexdigest()


# (case, file bytes, pinned, recorded before, refusal message or None, recorded after)
VERIFY_TABLE = [
    ("pinned, matching file", GOOD, GOOD_SHA, None, None, None),
    ("pinned, wrong file", BAD, GOOD_SHA, None, "does not match its pinned sha256", None),
    ("pin wins over a record", BAD, GOOD_SHA, BAD_SHA, "does not match its pinned sha256", BAD_SHA),
    ("unpinned, first use records", BAD, None, None, None, BAD_SHA),
    ("unpinned, matches its record", GOOD, None, GOOD_SHA, None, GOOD_SHA),
    ("unpinned, differs from its record", BAD, None, GOOD_SHA, "recorded when model.pt was first used", GOOD_SHA),
]


@pytest.mark.parametrize("data, pinned, before, refusal, after",
                         [row[1:] for row in VERIFY_TABLE], ids=[row[0] for row in VERIFY_TABLE])
def test_verify_file(tmp_path, data, pinned, before, refusal, after):
    path, store = tmp_path / "model.pt", tmp_path / "cache" / checkpoints.RECORD_FILE
    path.write_bytes(data)
    if before is not None:
        checkpoints.record_sha256(store, path.name, before)
    if refusal is None:
        assert checkpoints.verify_file(path, pinned, store) == hashlib.sha256(data).hexdigest()
    else:
        with pytest.raises(WeightsError, match=refusal) as err:
            checkpoints.verify_file(path, pinned, store)
        assert "\n" not in str(err.value) and "delete it" in str(err.value)
    assert checkpoints.recorded_sha256(store, path.name) == after


class _FakeResponse:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def __enter__(self) -> _FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def raise_for_status(self) -> None:
        return None

    def iter_content(self, size: int):
        for i in range(0, len(self.body), 7):  # several chunks, so the hash is built incrementally
            yield self.body[i:i + 7]


# (case, served bytes, pinned, recorded before, refused, recorded after)
DOWNLOAD_TABLE = [
    ("pinned, matching download", GOOD, GOOD_SHA, None, False, None),
    ("pinned, wrong download", BAD, GOOD_SHA, None, True, None),
    ("unpinned, first download records", BAD, None, None, False, BAD_SHA),
    ("unpinned, matches its record", GOOD, None, GOOD_SHA, False, GOOD_SHA),
    ("unpinned, differs from its record", BAD, None, GOOD_SHA, True, GOOD_SHA),
]


@pytest.mark.parametrize("served, pinned, before, refused, after",
                         [row[1:] for row in DOWNLOAD_TABLE], ids=[row[0] for row in DOWNLOAD_TABLE])
def test_download_is_checked_before_it_lands(tmp_path, monkeypatch, served, pinned, before, refused, after):
    import requests

    monkeypatch.setattr(requests, "get", lambda url, **kw: _FakeResponse(served))
    dest, store = tmp_path / "torch" / "model.pt", tmp_path / "cache" / checkpoints.RECORD_FILE
    if before is not None:
        checkpoints.record_sha256(store, dest.name, before)
    if refused:
        with pytest.raises(WeightsError, match="it was not saved"):
            checkpoints.download("https://example.invalid/model.pt", dest, pinned, store, timeout=1)
        assert not dest.exists()
    else:
        checkpoints.download("https://example.invalid/model.pt", dest, pinned, store, timeout=1)
        assert dest.read_bytes() == served
    assert checkpoints.recorded_sha256(store, dest.name) == after
    assert leftover_temp_files(dest) == []


def test_wrong_vggface2_in_the_torch_cache_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("FACEINDEX_CACHE", str(tmp_path / "cache"))
    fake = weights_mod.torch_checkpoint_dir() / "20180402-114759-vggface2.pt"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(BAD)
    with pytest.raises(WeightsError, match="does not match its pinned sha256") as err:
        weights_mod.resolve("vggface2")
    assert "\n" not in str(err.value)
    # A pinned source is never recorded: the pin alone decides.
    assert not (tmp_path / "cache" / checkpoints.RECORD_FILE).exists()


def test_every_pin_is_a_sha256():
    for name, source in weights_mod.SOURCES.items():
        if "sha256" in source:
            assert len(source["sha256"]) == 64 and int(source["sha256"], 16) >= 0, name


def test_unreadable_record_file_is_one_clear_error(tmp_path):
    store = tmp_path / checkpoints.RECORD_FILE
    store.write_text("{not json")
    (tmp_path / "model.pt").write_bytes(GOOD)
    with pytest.raises(WeightsError, match="unreadable; delete it"):
        checkpoints.verify_file(tmp_path / "model.pt", None, store)
