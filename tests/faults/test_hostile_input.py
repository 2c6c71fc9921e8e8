"""Hostile input end to end: every kind in tests/corpus gets its documented outcome from the real CLI (as an
unprivileged user where the machine allows), names are kept as raw bytes and shown safely, and random damage to a
real JPEG never raises past the file it is in."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer.library import FaceIndex, OpenMode
from indexer.store.lmdb_store import FaceStore
from tests.conftest import SAMPLES, settings_for
from tests.corpus.make_corpus import FACE, Corpus, build
from tests.faults.helpers import Runner, public_tmp
from tests.test_ingest import consistency

LATIN1 = b"latin1-\xe9t\xe9.jpg"
BROKEN_NAME = b"broken-caf\xe9\n<i>.jpg"


def records(index: Path) -> dict[str, tuple[str, int, str]]:
    store = FaceStore(index, readonly=True)
    try:
        with store.read() as txn:
            return {r.path: (r.status, len(r.face_ids), r.reason) for r in store.iter_files(txn)}
    finally:
        store.close()


def check_outcomes(index: Path, corpus: Corpus, as_root: bool) -> None:
    got = records(index)
    expected = corpus.expectations(as_root)
    wrong = []
    for path, want in sorted(expected.items()):
        status, faces, reason = got.get(path, ("skipped", 0, ""))
        ok = status == want.status and (status != "indexed" or faces == want.faces) and \
            (status != "failed" or reason.startswith(want.reasons))
        if not ok:
            wrong.append(f"{ascii(path)} ({want.kind}): got {status} {faces} {reason!r}, want {want}")
    assert not wrong, "\n".join(wrong)
    assert set(got) <= set(expected), f"records of files the corpus does not name: {set(got) - set(expected)}"


@pytest.fixture(scope="module")
def scratch():
    with public_tmp() as path:
        yield path


@pytest.fixture(scope="module")
def hostile(scratch) -> tuple[Runner, Corpus, Path]:
    """The corpus, ingested once by the real CLI (as nobody when we are root)."""
    runner = Runner(scratch)
    corpus = build(scratch / "photos")
    index = runner.own(scratch / "indexes") / "ix"
    proc = runner.run("ingest", "--index", str(index), "--json", str(corpus.root))
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads(proc.stdout)
    expected = corpus.expectations(runner.is_root)
    assert summary["failed"] == sum(e.status == "failed" for e in expected.values())
    return runner, corpus, index


def test_every_hostile_file_gets_its_documented_outcome(hostile):
    """As root (no setpriv) mode-000 files are simply read: ``runner.why_root`` says why the check is weaker."""
    runner, corpus, index = hostile
    check_outcomes(index, corpus, as_root=runner.is_root)
    expected = corpus.expectations(runner.is_root)
    assert consistency(index)["_faces"] == sum(e.faces for e in expected.values())


def test_watch_once_treats_them_the_same(hostile, scratch):
    runner, corpus, _ = hostile
    index = runner.own(scratch / "indexes-watch") / "ix"
    proc = runner.run("watch", "--once", "--index", str(index), str(corpus.root))
    assert proc.returncode == 0, proc.stderr.decode()
    check_outcomes(index, corpus, as_root=runner.is_root)
    consistency(index)


def test_exif_orientations_are_applied_before_detection(hostile):
    _, corpus, index = hostile
    store = FaceStore(index, readonly=True)
    try:
        boxes = {}
        for o in range(1, 9):
            rec = store.get_file(str(corpus.root / "exif" / f"orientation{o}.jpg"))
            assert (rec.width, rec.height) == (320, 240), f"orientation {o}: stored upright size"
            boxes[o] = store.get_face(rec.face_ids[0]).box
    finally:
        store.close()
    for o, box in boxes.items():  # the same face at the same place once turned upright
        assert max(abs(a - b) for a, b in zip(box, boxes[1], strict=True)) < 8, f"orientation {o}: {box}"


def test_names_are_stored_as_bytes_and_shown_safely(hostile, scratch):
    runner, corpus, index = hostile
    status = json.loads(runner.run("status", "--index", str(index), "--json").stdout)
    raw = {os.fsencode(f["path"]) for f in status["failures"]}
    assert os.fsencode(corpus.root) + b"/" + BROKEN_NAME in raw  # --json is lossless (\udcXX escapes)
    text = runner.run("status", "--index", str(index))
    assert text.returncode == 0, text.stderr.decode()
    shown = text.stdout.decode()
    assert "broken-caf\ufffd\\n<i>.jpg: not an image" in shown  # one line, undecodable byte replaced
    # query prints every matching path, the Latin-1 and newline names among them
    query = runner.run("query", "--index", str(index), "-k", "40", str(FACE))
    assert query.returncode == 0, query.stderr.decode()
    out = query.stdout.decode()
    assert "latin1-\ufffdt\ufffd.jpg" in out and "new\\nline.jpg" in out
    # the HTML gallery: escaped, replacement characters, and links that keep the raw bytes
    assert runner.run("cluster", "--index", str(index)).returncode == 0
    report = runner.own(scratch / "report")
    proc = runner.run("report", "--index", str(index), "--out", str(report))
    assert proc.returncode == 0, proc.stderr.decode()
    page = (report / "index.html").read_text()
    assert "<b onmouseover" not in page and "&lt;b onmouseover=alert(1)&gt;x&lt;b&gt; &amp;amp;.jpg" in page
    assert "latin1-\ufffdt\ufffd.jpg" in page and "latin1-%E9t%E9.jpg" in page


# ------------------------------------------------------------------------------------ in-process, session models
@pytest.fixture
def index(tmp_path, detector, embedder):
    fi = FaceIndex(settings_for(tmp_path / "ix"), OpenMode.WRITE, detector=detector, embedder=embedder)
    yield fi
    fi.close()


def _mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, where, value in edits:
        if not out and op != "insert":
            continue
        at = where % max(len(out), 1)
        if op == "flip":
            out[at] ^= 1 << (value % 8)
        elif op == "set":
            out[at] = value
        elif op == "insert":
            out[at:at] = bytes([value]) * (1 + value % 16)
        elif op == "delete":
            del out[at:at + 1 + value % 64]
        elif op == "truncate":
            del out[at:]
        elif op == "repeat":  # a copy of a chunk somewhere else: markers and segment lengths in odd places
            chunk = out[at:at + 1 + value]
            out[(at * 7) % max(len(out), 1):(at * 7) % max(len(out), 1)] = chunk
    return bytes(out)


EDIT = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat"]), st.integers(0, 1 << 20),
                 st.integers(0, 255))
EDITS = st.lists(EDIT, min_size=1, max_size=6)


def _never_raises(fi: FaceIndex, folder: Path, edits) -> None:
    base = FACE.read_bytes()
    data = _mutate(base, edits)
    path = folder / "mutant.jpg"
    path.write_bytes(data)
    with fi.pipeline() as pipeline:
        summary = pipeline.process([str(path)])  # must not raise, whatever the bytes
    rec = fi.store.get_file(str(path))
    assert rec is not None and rec.status in ("indexed", "no_face", "failed")
    assert summary.indexed + summary.no_face + summary.failed + summary.unchanged == 1
    if rec.status != "failed" or rec.size:
        assert rec.sha256 == hashlib.sha256(data).hexdigest()


@settings(max_examples=40, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=EDITS)
def test_random_damage_to_a_jpeg_never_escapes_the_file(index, tmp_path, edits):
    _never_raises(index, tmp_path, edits)


@pytest.mark.exhaustive
@settings(max_examples=500, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(EDIT, min_size=1, max_size=30))
def test_random_damage_many_examples(index, tmp_path, edits):
    _never_raises(index, tmp_path, edits)


@pytest.mark.parametrize("when", ["mid-read", "at-eof"])
def test_a_file_that_grows_while_read(index, tmp_path, monkeypatch, when):
    """Half a photo is being read while the rest is written: the record is true to the bytes read (the whole
    photo when the rest came in time, a truncated one when it came after the end was seen), and the next run
    reads the file again whenever the record is not its final content."""
    import indexer.pipeline.read as read_mod

    data = FACE.read_bytes()
    folder = tmp_path / "photos"
    folder.mkdir()
    path = folder / "growing.jpg"
    path.write_bytes(data[: len(data) // 2])
    real_read = os.read

    class GrowingOs:  # the module's ``os``, except that its reads let the writer finish the file
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def read(fd, n):
            chunk = real_read(fd, n)
            if (chunk if when == "mid-read" else not chunk) and path.stat().st_size < len(data):
                with open(path, "ab") as fh:
                    fh.write(data[len(data) // 2:])
            return chunk

    monkeypatch.setattr(read_mod, "READ_CHUNK", 1024)
    monkeypatch.setattr(read_mod, "os", GrowingOs())
    first = index.ingest([folder], progress=False)
    monkeypatch.undo()
    rec = index.store.get_file(str(path))
    assert first.files == 1
    if when == "mid-read":
        assert (rec.status, rec.size, rec.sha256) == ("indexed", len(data), hashlib.sha256(data).hexdigest())
    else:
        assert rec.status == "failed" and rec.reason.startswith("corrupt") and rec.size == len(data) // 2
    index.ingest([folder], progress=False)
    rec = index.store.get_file(str(path))
    st = path.stat()
    assert (rec.status, len(rec.face_ids), rec.sha256) == ("indexed", 1, hashlib.sha256(data).hexdigest())
    assert (rec.size, rec.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_a_file_replaced_between_hashing_and_decoding(index, tmp_path, monkeypatch):
    """The bytes hashed are the bytes decoded (one read), so a record is always true to one content; the reader
    sees that the file changed after its read and reads it again."""
    import indexer.pipeline.read as read_mod

    folder = tmp_path / "photos"
    folder.mkdir()
    path = folder / "photo.jpg"
    shutil.copy(FACE, path)
    other = SAMPLES / "group" / "kit_with_rose.jpg"  # two faces
    real_sha = read_mod.file_sha256
    swaps = []

    def sha_then_replace(data: bytes) -> str:
        digest = real_sha(data)
        if not swaps:
            swaps.append(digest)
            tmp = folder / ".swap.tmp"
            shutil.copy(other, tmp)
            os.replace(tmp, path)
        return digest

    monkeypatch.setattr(read_mod, "file_sha256", sha_then_replace)
    index.ingest([folder], progress=False)
    monkeypatch.undo()
    assert swaps == [hashlib.sha256(FACE.read_bytes()).hexdigest()]  # the swap happened after hashing the old
    new = hashlib.sha256(other.read_bytes()).hexdigest()
    rec = index.store.get_file(str(path))
    assert (rec.sha256, len(rec.face_ids)) == (new, 2)  # noticed and read again: not old bytes under a new stat
    assert index.ingest([folder], progress=False).unchanged == 1
