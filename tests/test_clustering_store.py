"""Clustering wired to the store and CLI: stable ids, names, merges, live assignment, artefacts, eval."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from indexer.errors import ClusteringError
from tests.conftest import SAMPLES, cli, cli_json
from tests.test_ingest import lfw_folder


def person_of(path: str) -> str:
    return Path(path).parent.name


def majority(faces: list[dict]) -> dict[str, int]:
    """person -> the cluster id most of that person's faces carry."""
    by_person: dict[str, Counter] = {}
    for f in faces:
        if f["cluster_id"] >= 0:
            by_person.setdefault(person_of(f["path"]), Counter())[f["cluster_id"]] += 1
    return {p: c.most_common(1)[0][0] for p, c in by_person.items()}


@pytest.fixture(scope="module")
def lfw_index(shared_data, tmp_path_factory):
    """8 LFW people x 4 photos ingested, with one more photo per person kept aside."""
    tmp = tmp_path_factory.mktemp("lfw-cluster")
    folder, _ = lfw_folder(shared_data, tmp, people=8, per_person=5)
    later = tmp / "later"
    for person in sorted(p.name for p in folder.iterdir()):
        (later / person).mkdir(parents=True)
        last = sorted((folder / person).iterdir())[-1]
        shutil.move(last, later / person / last.name)
    index = tmp / "index"
    cli("ingest", "--index", str(index), str(folder))
    return index, folder, later


@pytest.mark.lfw
def test_kmeans_with_k_people_gives_pure_clusters(lfw_index, tmp_path):
    index, _, _ = lfw_index
    work = tmp_path / "ix"
    shutil.copytree(index, work)
    result = cli_json("cluster", "--index", str(work), "--method", "kmeans", "--k", "8")
    assert result["k"] == 8
    cli("export", "--index", str(work), "--out", str(tmp_path / "out"))
    faces = json.loads((tmp_path / "out" / "train_assignments.json").read_text())["faces"]
    clusters: dict[int, Counter] = {}
    for f in faces:
        clusters.setdefault(f["cluster"], Counter())[person_of(f["path"])] += 1
    purity = sum(c.most_common(1)[0][1] for c in clusters.values()) / len(faces)
    assert purity >= 0.9


@pytest.mark.lfw
def test_ids_and_names_survive_reclustering_and_merge_works(lfw_index, tmp_path):
    index, _, later = lfw_index
    work = tmp_path / "ix"
    shutil.copytree(index, work)
    cli("cluster", "--index", str(work))
    cli("export", "--index", str(work), "--out", str(tmp_path / "a"))
    before = majority(json.loads((tmp_path / "a" / "train_assignments.json").read_text())["faces"])
    assert len(set(before.values())) == len(before) == 8, "one cluster per person"
    named_person = sorted(before)[0]
    cli("people", "name", "--index", str(work), str(before[named_person]), "Person <A>")

    # Live assignment: new photos of known people join their clusters as they are ingested.
    cli("ingest", "--index", str(work), str(later))
    joined = cli_json("status", "--index", str(work))
    assert joined["faces"] >= 40
    cli("export", "--index", str(work), "--out", str(tmp_path / "b"))
    faces = json.loads((tmp_path / "b" / "train_assignments.json").read_text())["faces"]
    new_faces = [f for f in faces if str(later) in f["path"]]
    assert sum(f["cluster_id"] == before[person_of(f["path"])] for f in new_faces) >= 7

    cli("cluster", "--index", str(work))  # recluster with the added photos
    cli("export", "--index", str(work), "--out", str(tmp_path / "c"))
    after_doc = json.loads((tmp_path / "c" / "train_assignments.json").read_text())
    assert majority(after_doc["faces"]) == before, "cluster ids moved to other people"
    people = {p["id"]: p for p in cli_json("people", "list", "--index", str(work))}
    assert people[before[named_person]]["name"] == "Person <A>"

    a, b = before[sorted(before)[1]], before[sorted(before)[2]]
    size = people[a]["size"] + people[b]["size"]
    merged = cli_json("people", "merge", "--index", str(work), str(a), str(b))
    assert merged["size"] == size
    people = {p["id"]: p for p in cli_json("people", "list", "--index", str(work))}
    assert b not in people and people[a]["size"] == size
    shown = cli_json("people", "show", "--index", str(work), str(a))
    assert len(shown["faces"]) == size


def test_seed_artefacts_have_the_documented_shapes(copy_index, tmp_path):
    cli("cluster", "--index", str(copy_index))
    out = tmp_path / "out"
    cli("export", "--index", str(copy_index), "--out", str(out))
    centers = np.load(out / "cluster_centers.npy")
    train = json.loads((out / "train_assignments.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert centers.dtype == np.float32 and centers.shape == (train["k"], 512)
    assert np.allclose(np.linalg.norm(centers, axis=1), 1.0, atol=1e-5)
    assert train["model"].startswith("casia-webface:") and train["method"] == "adaptive"
    assert len(train["faces"]) == 16
    for f in train["faces"]:
        assert set(f) >= {"face_id", "path", "box", "prob", "cluster", "similarity"}
        assert Path(f["path"]).is_absolute() and len(f["box"]) == 4
        if f["cluster"] >= 0:  # similarity is the cosine to row `cluster` of cluster_centers.npy
            vec_sim = f["similarity"]
            assert -1 <= vec_sim <= 1 and f["cluster"] < train["k"]
    assert {"silhouette", "davies_bouldin", "calinski_harabasz", "n_faces", "k"} <= set(metrics)
    assert metrics["n_faces"] == 16 and metrics["k"] == train["k"]

    digest_before = _tree_digest(copy_index)
    test_out = tmp_path / "test_assignments.json"
    cli("assign", "--index", str(copy_index), "--out", str(test_out), str(SAMPLES / "group"))
    assert _tree_digest(copy_index) == digest_before, "assign changed the index"
    test = json.loads(test_out.read_text())
    assert test["k"] == train["k"] and len(test["faces"]) == 5
    for f in test["faces"]:
        assert f["face_id"] is None and Path(f["path"]).is_absolute() and 0 <= f["cluster"] < test["k"]
    # The same faces are indexed: each is assigned to the cluster its stored twin has, with the same similarity.
    stored = {(Path(f["path"]).name, round(f["box"][0])): f for f in train["faces"]}
    for f in test["faces"]:
        twin = min((v for (n, _), v in stored.items() if n == Path(f["path"]).name),
                   key=lambda v: abs(v["box"][0] - f["box"][0]))
        if twin["cluster"] >= 0:
            assert twin["cluster"] == f["cluster"] and abs(twin["similarity"] - f["similarity"]) < 1e-3


def _tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every index file but LMDB's lock.mdb: that is its reader table, which every reader writes to."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "lock.mdb"}


def test_report_from_the_index_keeps_hostile_names_inert(copy_index, tmp_path):
    # A folder "<script>alert(1)<" holding "script>.jpg": the photo's path reads <script>alert(1)</script>.jpg.
    (tmp_path / "<script>alert(1)<").mkdir()
    hostile = tmp_path / "<script>alert(1)<" / "script>.jpg"
    shutil.copy(SAMPLES / "photos" / "obama" / "obama_small.jpg", hostile)
    cli("ingest", "--index", str(copy_index), str(hostile))
    cli("cluster", "--index", str(copy_index))
    cli("people", "name", "--index", str(copy_index), "0", "<b>x</b>")
    result = cli_json("report", "--index", str(copy_index), "--out", str(tmp_path / "report"))
    assert result["faces"] == 17 and result["thumbnails"] == 17
    html = (tmp_path / "report" / "index.html").read_text()
    assert html.count('class="face"') == 17
    assert "<script>alert" not in html and "<b>x</b>" not in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html


def test_empty_and_tiny_indexes_give_clear_messages(tmp_path, copy_index):
    empty = tmp_path / "empty"
    cli("ingest", "--index", str(empty), str(SAMPLES / "LICENSE.md"))  # recorded as failed: an index without faces
    for args in (["cluster", "--index", str(empty)], ["export", "--index", str(empty), "--out", str(tmp_path / "o")],
                 ["people", "list", "--index", str(empty)], ["cluster", "--index", str(tmp_path / "missing")]):
        proc = cli(*args, check=False)
        assert proc.returncode == 1, args
        assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = cli("cluster", "--index", str(copy_index), "--method", "kmeans", "--k", "40", check=False)
    assert proc.returncode == 1 and "16 faces cannot make 40 clusters" in proc.stderr
    proc = cli("cluster", "--index", str(copy_index), "--k", "3", check=False)
    assert proc.returncode == 2 and "--method kmeans" in proc.stderr
    proc = cli("cluster", "--index", str(copy_index), "--method", "kmeans", "--k", "zero", check=False)
    assert proc.returncode == 2


def test_daemon_reclusters_when_the_index_grew(copy_index, tmp_path, detector, embedder):
    from indexer.library import FaceIndex, OpenMode
    from indexer.persons.schedule import due
    from indexer.persons.state import load_clustering
    from tests.conftest import settings_for

    settings = settings_for(copy_index, cluster={"recluster_growth": 0.1})
    with FaceIndex(settings, OpenMode.EDIT) as fi:
        fi.cluster()
        first = load_clustering(fi.store)
    folder = tmp_path / "more"
    folder.mkdir()
    for p in (SAMPLES / "photos").rglob("*.jp*g"):
        shutil.copy(p, folder / f"copy_{p.parent.name}_{p.name}")
        (folder / f"copy_{p.parent.name}_{p.name}").write_bytes(p.read_bytes() + b"\0")  # new bytes, same pixels
    with FaceIndex(settings, OpenMode.WRITE, command="watch", detector=detector, embedder=embedder) as fi:
        fi.watch(folder, once=True)
        second = load_clustering(fi.store)
        assert second.n_faces > first.n_faces and second.created > first.created
        assert set(first.ids.tolist()) <= set(second.ids.tolist()), "existing clusters kept their ids"
        assert due(fi.store, settings.cluster, second.n_faces) is False


def test_compute_refuses_an_empty_snapshot():
    from indexer.config import ClusterSettings
    from indexer.persons.recluster import compute

    with pytest.raises(ClusteringError, match="no faces"):
        compute(np.zeros(0, np.int64), np.zeros((0, 512), np.float32), ClusterSettings())


@pytest.mark.lfw
def test_report_of_an_lfw_index(lfw_index, tmp_path):
    from PIL import Image

    index, _, _ = lfw_index
    work = tmp_path / "ix"
    shutil.copytree(index, work)
    cli("cluster", "--index", str(work))
    out = tmp_path / "report"
    result = cli_json("report", "--index", str(work), "--out", str(out))
    faces = cli_json("status", "--index", str(work))["faces"]
    assert result["faces"] == faces == result["thumbnails"]
    for name in ("cluster_sizes.png", "tsne.png", "pca.png"):
        with Image.open(out / name) as img:
            img.load()
            assert img.size[0] > 300 and img.size[1] > 200
    html = (out / "index.html").read_text()
    import re

    thumbs = re.findall(r'<img[^>]*class="face"[^>]*src="([^"]+)"|<img[^>]*src="([^"]+)"[^>]*class="face"', html)
    srcs = [a or b for a, b in thumbs]
    assert len(srcs) == faces and all((out / s).is_file() for s in srcs)


@pytest.mark.lfw
def test_eval_scores_a_folder_per_person_tree(lfw_index):
    _, folder, _ = lfw_index
    result = cli_json("eval", str(folder))
    assert result["n_people"] == 8 and result["n_faces"] == 32 and result["files_without_face"] == 0
    assert result["pairwise_f1"] >= 0.9 and result["bcubed_f1"] >= 0.9
    assert set(result) >= {"pairwise_precision", "pairwise_recall", "nmi", "ari", "n_clusters"}


@pytest.mark.lfw
def test_photos_of_a_new_person_start_a_person_as_they_arrive(lfw_index, shared_data, tmp_path):
    """The real pipeline (MTCNN, the embedder, FAISS, LMDB) and the live rule: a person the index has never seen
    gets a person of their own from their second photo on, with no recluster, and no known person takes them."""
    index, _, _ = lfw_index
    work = tmp_path / "ix"
    shutil.copytree(index, work)
    cli("cluster", "--index", str(work))
    known = {p["id"] for p in cli_json("people", "list", "--index", str(work))}
    root = shared_data / "lfw-devtrain"
    newcomer = [p for p in sorted(root.iterdir()) if len(list(p.iterdir())) >= 5][8]  # lfw_index took the first 8
    photos = sorted(newcomer.iterdir())[:4]
    first, rest = tmp_path / "first", tmp_path / "rest"
    first.mkdir()
    rest.mkdir()
    shutil.copy(photos[0], first)
    for p in photos[1:]:
        shutil.copy(p, rest)
    cli("ingest", "--index", str(work), str(first))   # alone: nobody like it yet, it waits unassigned
    cli("ingest", "--index", str(work), str(rest))    # three more: with the first, a new person
    cli("export", "--index", str(work), "--out", str(tmp_path / "out"))
    doc = json.loads((tmp_path / "out" / "train_assignments.json").read_text())["faces"]
    ids = Counter(f["cluster_id"] for f in doc if newcomer.name in f["path"])
    person, count = ids.most_common(1)[0]
    assert person >= 0 and person not in known and count >= 3, ids
