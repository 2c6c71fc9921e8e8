"""The real CLI on the bundled photos: every kind of edit, then every clustering method, then new photos through the
daemon and its own recluster; every edit holds. Undo restores what was there before the edit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from indexer.config import CLUSTER_METHODS
from indexer.store.lmdb_store import FaceStore
from tests.conftest import SAMPLES, cli, cli_json


def faces(index: Path) -> dict[str, list[tuple[int, int]]]:
    """{"folder/file name": [(face id, person), ...]} read straight from the store."""
    store = FaceStore(index, readonly=True)
    try:
        with store.read() as txn:
            out: dict[str, list[tuple[int, int]]] = {}
            for f in store.iter_faces(txn):
                out.setdefault(f"{Path(f.path).parent.name}/{Path(f.path).name}", []).append((f.face_id, f.cluster))
            return out
    finally:
        store.close()


def person_of(index: Path, name: str) -> int:
    (person,) = {p for _, p in faces(index)[name]}
    return person


def edited(index: Path) -> dict:
    """One edit of each kind through the CLI; returns what must hold afterwards."""
    cli("cluster", "--index", str(index))
    kit, rose = person_of(index, "kit_harington/john1.jpeg"), person_of(index, "rose_leslie/img2.jpg")
    obama, biden = person_of(index, "obama/obama1.jpg"), person_of(index, "biden/biden.jpg")
    assert len({kit, rose, obama, biden}) == 4, "the samples' four people start apart"
    merged = cli_json("people", "merge", str(kit), str(rose), "--index", str(index))
    assert merged["id"] == kit and merged["merged"] == rose
    cli("people", "name", str(kit), "Kit+Rose", "--index", str(index))
    (small_face, _), = faces(index)["obama/obama_small.jpg"]
    cli("people", "remove", str(obama), str(small_face), "--index", str(index))
    (alex_face, _), = faces(index)["alex_lacamoire/alex-lacamoire.png"]
    cli("people", "move", str(alex_face), "--to", str(biden), "--index", str(index))
    group = faces(index)["group/obama_and_biden.jpg"]
    poster = next(face for face, person in group if person == obama)
    cli("people", "ignore", str(poster), "--index", str(index))
    return {"kit": kit, "obama": obama, "biden": biden, "small": small_face, "alex": alex_face, "poster": poster}


def check(index: Path, e: dict) -> None:
    by_name = faces(index)
    kit_rose = {p for n in ("kit_harington/john1.jpeg", "kit_harington/john2.jpeg", "rose_leslie/img1.jpg",
                            "rose_leslie/img2.jpg") for _, p in by_name[n]}
    assert kit_rose == {e["kit"]}, "merged persons stay one person under the kept id"
    names = {r["id"]: r["name"] for r in cli_json("people", "list", "--index", str(index))}
    assert names[e["kit"]] == "Kit+Rose"
    face_person = {face: person for found in by_name.values() for face, person in found}
    assert face_person[e["small"]] != e["obama"], "a removed face never rejoins its person"
    assert face_person[e["alex"]] == e["biden"], "a moved face stays where the user put it"
    assert face_person[e["poster"]] == -1, "an ignored face belongs to nobody"
    assert e["poster"] not in {f["face_id"] for r in names for f in
                               cli_json("people", "show", str(r), "--index", str(index))["faces"]}


@pytest.mark.slow
def test_edits_hold_through_every_method_and_the_daemon(copy_index, tmp_path):
    e = edited(copy_index)
    check(copy_index, e)
    for method in CLUSTER_METHODS:
        cli("cluster", "--index", str(copy_index), "--method", method, *(["--k", "5"] if method == "kmeans" else []))
        check(copy_index, e)
    cli("cluster", "--index", str(copy_index))
    # New photos (same pixels, new bytes) through the daemon, which reclusters on its own once the index grew.
    folder = tmp_path / "new"
    folder.mkdir()
    for photo in sorted((SAMPLES / "photos").rglob("*.jp*g")):
        (folder / f"new_{photo.name}").write_bytes(photo.read_bytes() + b"\0")
    config = tmp_path / "config.toml"
    config.write_text("[cluster]\nrecluster_growth = 0.1\n")
    before = cli_json("status", "--index", str(copy_index))["clusters"]["last_recluster"]
    cli("watch", "--once", str(folder), "--index", str(copy_index), "--config", str(config))
    after = cli_json("status", "--index", str(copy_index))["clusters"]
    assert after["n_faces"] > 16 and after["last_recluster"] >= before
    check(copy_index, e)
    new_kit = person_of(copy_index, "new/new_john1.jpeg")
    assert new_kit == e["kit"], "new faces still join persons by themselves"


def test_undo_restores_the_state_before_the_edit(copy_index):
    cli("cluster", "--index", str(copy_index))
    obama = person_of(copy_index, "obama/obama1.jpg")
    before = faces(copy_index), cli_json("people", "list", "--index", str(copy_index))
    (face, _), = faces(copy_index)["obama/obama2.jpg"]
    removed = cli_json("people", "remove", str(obama), str(face), "--index", str(copy_index))
    assert removed["edit"]["op"] == "remove"
    assert faces(copy_index) != before[0]
    undone = cli_json("people", "undo", "--index", str(copy_index))
    assert undone["undone"]["seq"] == removed["edit"]["seq"]
    assert (faces(copy_index), cli_json("people", "list", "--index", str(copy_index))) == before
    assert cli_json("people", "history", "--index", str(copy_index)) == []
    refused = cli("people", "undo", "--index", str(copy_index), check=False)
    assert refused.returncode == 1 and "nothing to undo" in refused.stderr


COMMANDS_WITHOUT_MODELS = [["status"], ["people", "list"], ["people", "show", "{person}"], ["people", "history"],
                           ["query", "--face-id", "1"], ["export", "--out", "{tmp}/export"], ["cluster"],
                           ["eval", "{samples}"], ["ingest", "{samples}"]]


@pytest.mark.parametrize("args", COMMANDS_WITHOUT_MODELS, ids=lambda a: " ".join(a[:2]))
def test_commands_that_run_no_model_never_import_torch(copy_index, tmp_path, args):
    """Run in a subprocess that reports, at exit, whether torch was imported; `query IMAGE` is the control."""
    cli("cluster", "--index", str(copy_index))
    person = person_of(copy_index, "obama/obama1.jpg")
    values = {"person": str(person), "tmp": str(tmp_path), "samples": str(SAMPLES)}
    argv = [a.format(**values) for a in args] + ["--index", str(copy_index)]
    probe = ("import atexit, sys; atexit.register(lambda: print('TORCH' if 'torch' in sys.modules else 'NO-TORCH',"
             " file=sys.stderr)); from indexer.cli import main; sys.argv = ['faceindex', *sys.argv[1:]]; main()")
    import subprocess

    proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("NO-TORCH"), proc.stderr[-500:]
    if args[0] == "status":  # the control: a photo query embeds, so it must load torch (the probe can tell)
        control = subprocess.run([sys.executable, "-c", probe, "query", str(SAMPLES / "photos/obama/obama2.jpg"),
                                  "--index", str(copy_index)], capture_output=True, text=True, timeout=600)
        assert control.returncode == 0 and control.stderr.strip().endswith("TORCH") and "NO-TORCH" not in \
            control.stderr.strip().splitlines()[-1]
