"""The pipeline's pure parts: what a file is to the store (classify), in-batch copies, and the reader's file checks."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from indexer.pipeline.read import FileReadError, read_regular_file
from indexer.pipeline.records import ReadItem, Twin, Verdict, classify
from indexer.pipeline.runner import dedupe_batch
from indexer.store.records import FileRecord

SHA, OTHER = "a" * 64, "b" * 64


def stored(path: str = "/p/a.jpg", sha: str = SHA, status: str = "indexed", size: int = 10,
           mtime_ns: int = 5) -> FileRecord:
    return FileRecord(path=path, size=size, mtime_ns=mtime_ns, sha256=sha, status=status)


@pytest.mark.parametrize("size, mtime, sha, record, twins, expected", [
    # Before reading (no sha256): only the stat decides whether the file must be read.
    (10, 5, None, None, [], (Verdict.NEW, None)),
    (10, 5, None, stored(), [], (Verdict.UNCHANGED, None)),
    (10, 6, None, stored(), [], (Verdict.CHANGED, None)),
    (11, 5, None, stored(), [], (Verdict.CHANGED, None)),
    (10, 5, None, stored(status="failed"), [], (Verdict.UNCHANGED, None)),  # the same bytes fail the same way
    # After reading: the content decides.
    (10, 6, SHA, stored(), [], (Verdict.UNCHANGED, None)),                   # touched: same bytes, new mtime
    (10, 6, OTHER, stored(), [], (Verdict.CHANGED, None)),
    (10, 6, SHA, stored(status="failed"), [], (Verdict.CHANGED, None)),      # failed before: try again
    (10, 5, SHA, None, [], (Verdict.NEW, None)),
    (10, 5, SHA, None, [Twin("/p/b.jpg", "indexed", True)], (Verdict.COPY, "/p/b.jpg")),
    (10, 5, SHA, None, [Twin("/p/b.jpg", "no_face", False)], (Verdict.MOVED, "/p/b.jpg")),
    (10, 5, SHA, None, [Twin("/p/b.jpg", "failed", True)], (Verdict.NEW, None)),   # nothing to reuse
    (10, 5, SHA, stored(sha=OTHER), [Twin("/p/b.jpg", "indexed", True)], (Verdict.COPY, "/p/b.jpg")),
    # A twin that is gone wins: the file moved here, and its faces keep their ids.
    (10, 5, SHA, None, [Twin("/p/b.jpg", "indexed", True), Twin("/p/c.jpg", "indexed", False)],
     (Verdict.MOVED, "/p/c.jpg")),
])
def test_classify(size, mtime, sha, record, twins, expected):
    assert classify(size, mtime, sha, record, twins) == expected


def test_only_new_and_changed_files_need_faces():
    assert {v for v in Verdict if v.needs_faces} == {Verdict.NEW, Verdict.CHANGED}


def test_byte_identical_files_in_one_batch_are_embedded_once():
    marker = object()
    items = [ReadItem("/a.jpg", sha256=SHA, image=marker), ReadItem("/b.jpg", sha256=OTHER, image=marker),
             ReadItem("/c.jpg", sha256=SHA, image=marker), ReadItem("/d.jpg", sha256=SHA, error="broken")]
    out = dedupe_batch(items)
    assert [it.needs_faces for it in out] == [True, True, False, False]
    assert (out[2].verdict, out[2].source, out[2].image) == (Verdict.COPY, "/a.jpg", None)
    assert out[3] is items[3]  # a failed read stays what it was
    assert items[2].verdict is Verdict.NEW  # items are replaced, not mutated


def test_reader_refuses_what_is_not_a_regular_file_without_blocking(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    folder = tmp_path / "dir.jpg"
    folder.mkdir()
    sock_path = tmp_path / "s.jpg"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    done = threading.Event()
    reasons = []

    def read_all() -> None:
        for path in (fifo, folder, sock_path, "/dev/zero"):
            with pytest.raises(FileReadError) as exc:
                read_regular_file(str(path), 1 << 20)
            reasons.append(str(exc.value))
        done.set()

    threading.Thread(target=read_all, daemon=True).start()
    try:
        assert done.wait(30), "a read blocked on a FIFO, a folder, a socket or a device"
    finally:
        sock.close()
    assert reasons == ["not a regular file"] * 4


def test_reader_reads_regular_files_and_caps_their_size(tmp_path):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"x" * 3000)
    st, data = read_regular_file(str(photo), 3000)
    assert data == b"x" * 3000 and st.st_size == 3000
    with pytest.raises(FileReadError, match="too large"):
        read_regular_file(str(photo), 2999)
    with pytest.raises(FileReadError, match="vanished"):
        read_regular_file(str(tmp_path / "gone.jpg"), 3000)


def test_the_model_stage_ships_to_another_process_as_plain_data():
    """What a Ray Data map_batches needs: the stage pickles without its models and builds them where it runs."""
    import pickle

    from indexer.config import Settings
    from indexer.pipeline.faces import FaceStage, ModelsFromSettings

    settings = Settings()
    stage = pickle.loads(pickle.dumps(FaceStage(settings, ModelsFromSettings(settings, prefer="casia-webface"))))
    assert stage._models is None and stage._load == ModelsFromSettings(settings, "casia-webface")
    assert stage([]) == []  # nothing to embed: no model is built
    assert stage._models is None


def test_detector_batch_size_0_lets_the_detector_choose_the_ingest_batches(tmp_path, monkeypatch):
    """At detector.batch_size 0 the ingest batches follow the size the detector chose for its device."""
    from types import SimpleNamespace

    from indexer.config import Settings, with_overrides
    from indexer.pipeline.runner import Pipeline
    from indexer.store.lmdb_store import FaceStore

    paths = []
    for i in range(7):
        (tmp_path / f"{i}.jpg").write_bytes(b"x")
        paths.append(str(tmp_path / f"{i}.jpg"))
    store = FaceStore(tmp_path / "index")
    settings = with_overrides(Settings(index_dir=str(tmp_path / "index")), "detector", batch_size=0)
    faces = SimpleNamespace(detector=SimpleNamespace(batch_size=3))
    pipeline = Pipeline(settings, store, index=None, faces=faces, fingerprint=lambda: "m")
    seen = []
    monkeypatch.setattr(Pipeline, "process", lambda self, batch, summary=None, ahead=None: seen.append(len(batch)))
    try:
        pipeline.ingest(paths)
    finally:
        pipeline.read_ahead.close()
        store.close()
    assert seen == [3, 3, 1]
