"""Preprocessing is part of the model fingerprint, and `faceindex ingest --rebuild` re-embeds an index (issue 11)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer import fingerprint as fp
from indexer.config import IndexSettings, Settings
from indexer.errors import IndexMismatchError
from indexer.library import FaceIndex, OpenMode
from indexer.rebuild import Rebuild, box_iou, match_faces
from indexer.store.lmdb_store import FaceStore
from indexer.store.records import FileRecord, NewFace
from indexer.store.sync import SyncedIndex
from tests.conftest import SAMPLES, cli, settings_for

PHOTOS = ["obama/obama1.jpg", "obama/obama2.jpg", "biden/biden.jpg", "biden/biden2.jpg"]
OLD = {"detector": {"margin": 14}, "embedder": {"flip": False}}   # the defaults before issue 11
NEW = {"detector": {"margin": 32}, "embedder": {"flip": True}}


# ------------------------------------------------------------------------------------------ pure parts
def test_a_fingerprint_without_preprocessing_is_read_as_the_old_defaults():
    assert fp.normalised("casia-webface:7cb52a24") == "casia-webface:7cb52a24/m14"
    assert fp.normalised("casia-webface:7cb52a24/m32+flip") == "casia-webface:7cb52a24/m32+flip"
    assert fp.normalised(None) is None
    assert fp.weights_of("casia-webface:7cb52a24/m32+flip") == "casia-webface:7cb52a24"
    assert fp.configured(settings_for(Path("/x"), **NEW)) == "m32+flip"
    assert fp.configured(settings_for(Path("/x"), **OLD)) == fp.LEGACY_PREPROCESSING


def test_the_mismatch_message_is_one_line_naming_both_and_the_rebuild():
    msg = str(fp.mismatch("/ix", "casia-webface:7cb52a24/m14", "casia-webface:7cb52a24/m32+flip"))
    assert "\n" not in msg
    assert "casia-webface:7cb52a24/m14" in msg and "casia-webface:7cb52a24/m32+flip" in msg
    assert "faceindex ingest --rebuild" in msg
    other = str(fp.mismatch("/ix", "casia-webface:7cb52a24/m14", "tuned:0123abcd/m14"))
    assert "--weights casia-webface" in other and "faceindex ingest --rebuild" in other


def test_faces_are_matched_one_to_one_by_box_overlap():
    old = [[0, 0, 10, 10], [100, 100, 120, 120], [50, 50, 60, 60]]
    new = [[101, 101, 121, 121], [1, 0, 11, 10], [0, 0, 10, 10], [300, 300, 310, 310]]
    assert np.isclose(box_iou(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10]]))[0, 0], 50 / 150)
    # Old face 0 takes the identical box (IoU 1), not the shifted one; old face 2 matches nothing.
    assert sorted(match_faces(old, new)) == [(0, 2), (1, 0)]
    assert match_faces(old, []) == [] and match_faces([], new) == []
    assert match_faces([[0, 0, 10, 10]], [[6, 0, 16, 10]]) == []  # IoU 0.25 < 0.5


def test_a_replaced_vector_reaches_faiss_by_replay_and_by_reload(tmp_path):
    rng = np.random.default_rng(3)
    unit = lambda v: (v / np.linalg.norm(v)).astype(np.float32)  # noqa: E731
    store = FaceStore(tmp_path / "ix")
    face = NewFace([0, 0, 1, 1], 1.0, [[0, 0]] * 5, unit(rng.normal(size=512)), b"")
    ids = store.transact(lambda txn: store.put_file(txn, FileRecord("/a.jpg", 1, 1, "a" * 64, "indexed"), [face]))
    synced = SyncedIndex(store, IndexSettings())
    synced.save(force=True)
    moved = unit(rng.normal(size=512))
    store.transact(lambda txn: store.replace_face(txn, ids[0], NewFace([0, 0, 2, 2], 0.9, [[0, 0]] * 5, moved, b"")))
    synced.catch_up()  # replay of the 'u' change
    fresh = SyncedIndex(store, IndexSettings())  # the saved snapshot plus the log
    for index in (synced, fresh):
        sims, found = index.index.search(moved[None], 1)
        assert found[0, 0] == ids[0] and sims[0, 0] > 0.999 and len(index.index) == 1
    with store.read() as txn:
        assert store.get_face(ids[0], txn).box == [0, 0, 2, 2]
    store.close()


# ------------------------------------------------------------------------------------------ real models
def _models(settings: Settings):
    from indexer.models.detector import FaceDetector
    from indexer.models.embedder import FaceEmbedder

    embedder = FaceEmbedder(settings.embedder)
    return {"detector": FaceDetector(settings.detector, device=embedder.device), "embedder": embedder}


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> tuple[Path, Path]:
    """An index of four sample photos made as before issue 11: margin 14, no flip, and a model record without
    preprocessing (what such an index holds)."""
    root = tmp_path_factory.mktemp("legacy")
    for rel in PHOTOS:
        (root / "photos" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLES / "photos" / rel, root / "photos" / rel)
    settings = settings_for(root / "ix", **OLD)
    with FaceIndex(settings, OpenMode.WRITE, **_models(settings)) as fi:
        fi.ingest([root / "photos"], progress=False)
        fi.cluster()
        fi.store.transact(lambda txn: fi.store.put_meta(txn, "model", fp.weights_of(fi.store.get_meta("model"))))
    return root / "ix", root / "photos"


def _copy(legacy: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    ix, photos = tmp_path / "ix", tmp_path / "photos"
    shutil.copytree(legacy[0], ix)
    shutil.copytree(legacy[1], photos)
    # The store records absolute paths: point them at this copy's photos.
    store = FaceStore(ix)
    with store.read() as txn:
        paths = [r.path for r in store.iter_files(txn)]
    store.transact(lambda txn: [store.move_file(txn, p, str(photos / Path(p).relative_to(legacy[1])))
                                for p in paths])
    store.close()
    return ix, photos


def test_an_old_index_is_refused_by_ingest_naming_both_and_the_rebuild(legacy, tmp_path):
    ix, photos = _copy(legacy, tmp_path)
    config = tmp_path / "new.toml"
    config.write_text("[detector]\nmargin = 32\n[embedder]\nflip = true\n")
    proc = cli("ingest", "--index", str(ix), "--config", str(config), str(photos), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
    assert len(line) == 1
    assert "/m14" in line[0] and "/m32+flip" in line[0] and "faceindex ingest --rebuild" in line[0]
    # With the repository's defaults: refused exactly when they differ from the old ones.
    proc = cli("ingest", "--index", str(ix), str(photos), check=False)
    differ = fp.configured(Settings()) != fp.LEGACY_PREPROCESSING
    assert proc.returncode == (1 if differ else 0)
    assert ("faceindex ingest --rebuild" in proc.stderr) == differ


def test_rebuild_re_embeds_keeps_face_ids_and_names_and_reports_what_it_could_not_match(legacy, tmp_path):
    ix, photos = _copy(legacy, tmp_path)
    new = settings_for(ix, **NEW)
    models = _models(new)
    with FaceIndex(new, OpenMode.WRITE, **models) as fi:
        store = fi.store
        with store.read() as txn:
            faces = {Path(f.path).name: f for f in store.iter_faces(txn)}
            before = {f.face_id: store.get_vector(f.face_id, txn).copy() for f in faces.values()}
        obama1, obama2, biden = faces["obama1.jpg"], faces["obama2.jpg"], faces["biden.jpg"]
        person = fi.name(obama1.cluster, "Obama")["id"] if obama1.cluster >= 0 else None
        if person is None:  # not clustered with its twin: tie it to a person by a move
            person = fi.move_faces([obama1.face_id], fi.people()[0]["id"])["id"]
            fi.name(person, "Obama")
        fi.ignore_faces([biden.face_id])
        # obama2's stored box is moved off its face: the face found again cannot be matched to it.
        obama2.box = [0.0, 0.0, 5.0, 5.0]
        store.transact(lambda txn: store.put_face(txn, obama2))
        fi.move_faces([obama2.face_id], person)
        (photos / "biden" / "biden.jpg").unlink()
        with pytest.raises(IndexMismatchError, match="--rebuild"):
            fi.pipeline()
        # A rebuild stopped before its end leaves the index refused until one completes.
        stopped = Rebuild(new, store, _stage(new, models), fi._fingerprint)
        stopped.stop.set()
        assert stopped.run().interrupted
        with pytest.raises(IndexMismatchError, match="being rebuilt to .*/m32\\+flip"):
            fi.pipeline()
        history = fi.history()
        result = fi.rebuild(progress=False)
        assert fi.history() == history  # the user's word and its history are untouched
        people = {p["id"]: p for p in fi.people()}
    assert result["previous"].endswith("/m14") and result["model"].endswith("/m32+flip")
    assert result["gone"] == [str(photos / "biden" / "biden.jpg")]
    unmatched = {w["face_id"] for w in result["unmatched_word"]}
    assert unmatched == {obama2.face_id, biden.face_id}
    assert result["faces_kept"] == len(before) - 2 and result["faces_added"] == 1  # obama2's face, new id
    store = FaceStore(ix, readonly=True)
    with store.read() as txn:
        after = {f.face_id: f for f in store.iter_faces(txn)}
        assert store.get_meta("model", txn=txn) == result["model"] and store.get_meta(fp.REBUILD_KEY, txn=txn) is None
        vector = store.get_vector(obama1.face_id, txn)
        synced = SyncedIndex(store, IndexSettings())
        assert set(synced.index.ids().tolist()) == set(after)
    store.close()
    assert obama1.face_id in after and obama2.face_id not in after and biden.face_id not in after
    cos = float(vector @ before[obama1.face_id])
    assert 0.5 < cos < 0.9999  # the same face, embedded another way
    assert after[obama1.face_id].cluster == person and people[person]["name"] == "Obama"
    assert {"name", "ignore", "move"} <= {h["op"] for h in history}
    # The rebuilt index takes new photos made the same way.
    with FaceIndex(new, OpenMode.WRITE, **models) as fi:
        fi.pipeline().close()


def _stage(settings: Settings, models: dict):
    from indexer.pipeline.faces import FaceStage

    return FaceStage(settings, lambda: (models["detector"], models["embedder"]))
