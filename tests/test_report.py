"""The report (plots, metrics.json, HTML gallery) built from real photos through the real detector and embedder.

Clusters are the photo's person (folder), with one face deliberately unassigned, so the tests do not depend on the
clustering code. Photos: the repository's samples/ (always there) and LFW dev-train (skipped when absent).
"""

from __future__ import annotations

import io
import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from indexer.report import ReportFace, build_report
from indexer.report.plots import stratified_sample

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "photos"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
HOSTILE_NAME = "<script>alert(1)</script>.jpg"  # the "/" makes "<script>alert(1)<" a folder: still hostile
QUOTE_NAME = 'a" onerror="alert(1).jpg'
HOSTILE_PERSON = "<b>x</b>"


# ---------------------------------------------------------------- real faces


@pytest.fixture(scope="module")
def models():
    import torch

    from indexer.models.detector import FaceDetector
    from indexer.models.embedder import FaceEmbedder

    # One torch thread: on the shared CI cores MTCNN ran 3-4x slower with two threads than with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield FaceDetector(), FaceEmbedder()
    torch.set_num_threads(threads)


def embed_photos(models, paths: list[Path]) -> tuple[list[tuple[str, tuple, bytes]], np.ndarray]:
    """(path, box, JPEG thumbnail) and the vector of the face nearest each photo's centre (LFW's labelled face)."""
    from benchmarks.lfw_data import FALLBACK_BOX, centre_face
    from indexer.images import decode
    from indexer.models.detector import DetectedFace

    det, emb = models
    rows, crops = [], []
    images = [decode(path, max_pixels=10**9) for path in paths]
    for path, img, found in zip(paths, images, det.detect(images), strict=True):
        face = centre_face(found, *img.orig_size) or DetectedFace(FALLBACK_BOX, 0.0, ())
        crops.append(det.crop(img, face))
        buf = io.BytesIO()
        det.thumbnail(img, face, 96).save(buf, format="JPEG", quality=85)
        rows.append((str(Path(path).resolve()), face.box, buf.getvalue()))
    return rows, emb.embed(crops)


def make_faces(rows, vectors: np.ndarray, clusters: list[int]) -> list[ReportFace]:
    """Records with similarity to the (normalised) mean of each cluster, as the clustering code would give."""
    clusters_arr = np.array(clusters)
    sims = np.full(len(rows), math.nan)
    for c in set(clusters) - {-1}:
        members = clusters_arr == c
        center = vectors[members].mean(axis=0)
        sims[members] = vectors[members] @ (center / np.linalg.norm(center))
    return [ReportFace(face_id=i, path=p, box=tuple(float(v) for v in box), cluster=c, similarity=float(s),
                       thumbnail=thumb)
            for i, ((p, box, thumb), c, s) in enumerate(zip(rows, clusters, sims, strict=True))]


def person_clusters(people: list[str], unassigned: int = 0) -> list[int]:
    index = {p: i for i, p in enumerate(sorted(set(people)))}
    clusters = [index[p] for p in people]
    clusters[unassigned] = -1  # one face deliberately left out of every cluster
    return clusters


def scores(vectors: np.ndarray, clusters: list[int]) -> dict:
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

    labels = np.array(clusters)
    x, y = vectors[labels >= 0], labels[labels >= 0]
    return {"silhouette": float(silhouette_score(x, y, metric="cosine")),
            "davies_bouldin": float(davies_bouldin_score(x, y)),
            "calinski_harabasz": float(calinski_harabasz_score(x, y)),
            "n_faces": len(clusters), "k": len(set(y.tolist())), "sampled": "all"}


@pytest.fixture(scope="module")
def sample_set(models):
    """The 11 sample photos of 5 people: faces, vectors, person names by cluster."""
    paths = sorted(SAMPLES.glob("*/*"))
    people = [p.parent.name for p in paths]
    rows, vectors = embed_photos(models, paths)
    clusters = person_clusters(people)
    names = {c: p for p, c in zip(people, clusters, strict=True) if c >= 0}
    return make_faces(rows, vectors, clusters), vectors, names


@pytest.fixture(scope="module")
def lfw_set(models):
    """40 LFW photos: the first 8 people (sorted) with at least 5 photos, 5 photos each."""
    from benchmarks.lfw_data import data_root

    root = data_root()
    if root is None:
        pytest.skip("LFW not found: set FACEINDEX_DATA or place shared/data/lfw-devtrain beside the checkout")
    paths, people = [], []
    for person_dir in sorted((root / "lfw-devtrain").iterdir()):
        photos = sorted(person_dir.glob("*.jpg"))
        if len(photos) >= 5:
            paths += photos[:5]
            people += [person_dir.name] * 5
        if len(paths) == 40:
            break
    rows, vectors = embed_photos(models, paths)
    clusters = person_clusters(people, unassigned=7)
    # Named persons for half of the clusters: the others must show as "Cluster #id".
    names = {c: p.replace("_", " ") for p, c in zip(people, clusters, strict=True) if c >= 0 and c % 2 == 0}
    return make_faces(rows, vectors, clusters), vectors, names, scores(vectors, clusters)


# ---------------------------------------------------------------- HTML checking


class PageChecker(HTMLParser):
    """Well-formedness (every non-void tag closed in order) and every reference the page makes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.refs: list[tuple[str, str]] = []  # (tag, url)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        attr = dict(attrs)
        self.tags.append((tag, attr))
        if tag == "img":
            self.refs.append((tag, attr.get("src") or ""))
        if tag == "a":
            self.refs.append((tag, attr.get("href") or ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def check_page(out_dir: Path, photos: set[str]) -> PageChecker:
    page = (out_dir / "index.html").read_text(encoding="utf-8")
    checker = PageChecker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert not checker.stack, f"unclosed tags: {checker.stack}"
    assert not [t for t, _ in checker.tags if t in ("script", "link", "iframe", "object")]
    for tag, url in checker.refs:
        parsed = urlparse(url)
        if url.startswith("#"):
            continue
        if parsed.scheme == "file":
            # Links to the original photos only, and they exist.
            assert unquote(parsed.path) in photos, url
            continue
        assert not parsed.scheme and not parsed.netloc, f"{tag} refers outside the report: {url}"
        target = (out_dir / unquote(parsed.path)).resolve()
        assert target.is_relative_to(out_dir.resolve()) and target.is_file(), f"{tag} -> missing {url}"
    return checker


def face_imgs(checker: PageChecker) -> list[dict]:
    return [a for t, a in checker.tags if t == "img" and "face" in (a.get("class") or "").split()]


# ---------------------------------------------------------------- tests


def test_stratified_sample_is_proportional_and_keeps_small_clusters():
    clusters = np.array([0] * 900 + [1] * 90 + [2] * 9 + [3])
    idx = stratified_sample(clusters, cap=100, seed=1)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100 and (np.diff(idx) > 0).all()
    counts = np.bincount(clusters[idx], minlength=4)
    assert counts[3] == 1 and counts[2] >= 1 and 85 <= counts[0] <= 90
    assert np.array_equal(idx, stratified_sample(clusters, cap=100, seed=1))
    # More clusters than the cap: the largest clusters get one point each.
    many = np.repeat(np.arange(10), np.arange(10, 0, -1))
    assert sorted(set(many[stratified_sample(many, cap=3, seed=0)].tolist())) == [0, 1, 2]
    assert len(stratified_sample(clusters[:5], cap=100, seed=0)) == 5


@pytest.mark.lfw
def test_lfw_report_plots_metrics_and_gallery(lfw_set, tmp_path):
    faces, vectors, names, metrics = lfw_set
    result = build_report(tmp_path, faces, vectors, names=names, metrics=metrics, seed=7)

    for name in ("cluster_sizes.png", "tsne.png", "pca.png"):
        with Image.open(tmp_path / name) as im:
            im.load()
            assert im.width > 200 and im.height > 200, (name, im.size)
            colours = np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)
            assert len(colours) > 20, f"{name} looks blank"
    assert result["projection"] == {"sample": 40, "of": 40, "perplexity": pytest.approx(13.0)}
    assert result["skipped"] == {} and result["thumbnails"] == len(faces) == 40
    assert result["clusters"] == 8 and result["unassigned"] == 1

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["silhouette"] == pytest.approx(metrics["silhouette"]) and written["sampled"] == "all"
    assert written["report_samples"]["projection"] == 40 and written["report_samples"]["gallery_thumbnails"] == 40

    checker = check_page(tmp_path, {f.path for f in faces})
    imgs = face_imgs(checker)
    assert len(imgs) == len(faces)
    assert {a["src"] for a in imgs} == {f"thumbs/{f.face_id}.jpg" for f in faces}
    assert sorted(p.name for p in (tmp_path / "thumbs").iterdir()) == sorted(f"{f.face_id}.jpg" for f in faces)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    for cluster, name in names.items():
        assert f"{name} (cluster #{cluster})" in page
    assert "Cluster #1<" in page and page.rindex("Unassigned faces") > page.rindex("Cluster #")
    # Thumbnails within a cluster are sorted by similarity, most central first.
    first = min(c for c in {f.cluster for f in faces} if c >= 0)
    members = sorted((f for f in faces if f.cluster == first), key=lambda f: -f.similarity)
    positions = [page.index(f'src="thumbs/{f.face_id}.jpg"') for f in members]
    assert positions == sorted(positions)


def test_hostile_file_and_person_names_are_inert(models, tmp_path):
    source = sorted((SAMPLES / "obama").glob("*.jpg"))[0]
    hostile = tmp_path / "photos" / HOSTILE_NAME
    quoted = tmp_path / "photos" / QUOTE_NAME
    for dest in (hostile, quoted):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    rows, vectors = embed_photos(models, [hostile, quoted])
    faces = make_faces(rows, vectors, [0, 0])
    out = tmp_path / "report"
    build_report(out, faces, vectors, names={0: HOSTILE_PERSON}, metrics={"silhouette": None}, title="<i>t</i>")

    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page and "<b>x</b>" not in page and "<i>t</i>" not in page
    assert 'onerror="alert' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "&lt;i&gt;t&lt;/i&gt;" in page
    assert "a&quot; onerror=&quot;alert(1).jpg" in page
    checker = check_page(out, {f.path for f in faces})
    assert len(face_imgs(checker)) == 2
    # The links decode back to the hostile paths themselves.
    links = {unquote(urlparse(u).path) for t, u in checker.refs if t == "a" and u.startswith("file:")}
    assert links == {str(hostile.resolve()), str(quoted.resolve())}


def test_large_cluster_is_capped_with_a_note(sample_set, tmp_path):
    faces, vectors, _ = sample_set
    # Every sample face in one cluster (11 faces), shown 4 at most.
    center = vectors.mean(axis=0)
    sims = vectors @ (center / np.linalg.norm(center))
    merged = [ReportFace(f.face_id, f.path, f.box, 0, float(s), f.thumbnail) for f, s in zip(faces, sims, strict=True)]
    result = build_report(tmp_path, merged, vectors, names={}, metrics={}, max_per_cluster=4, seed=3)

    assert result["thumbnails"] == 4 and result["capped_clusters"] == 1
    checker = check_page(tmp_path, {f.path for f in faces})
    assert len(face_imgs(checker)) == 4 and len(list((tmp_path / "thumbs").iterdir())) == 4
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert f"showing 4 of {len(merged)}" in page
    # The spread keeps the most central and the least central face.
    by_sim = sorted(merged, key=lambda f: -f.similarity)
    assert f'thumbs/{by_sim[0].face_id}.jpg"' in page and f'thumbs/{by_sim[-1].face_id}.jpg"' in page


@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_tiny_inputs_do_not_crash(sample_set, tmp_path, n):
    faces, vectors, names = sample_set
    faces, vectors = faces[1:1 + n], vectors[1:1 + n]  # face 0 is the unassigned one
    result = build_report(tmp_path, faces, vectors, names=names, metrics={"silhouette": float("nan")})

    assert result["thumbnails"] == n
    assert ("tsne" in result["skipped"]) == (n < 4) and ("pca" in result["skipped"]) == (n < 2)
    for name in ["cluster_sizes.png"] + [f"{k}.png" for k in ("tsne", "pca") if k not in result["skipped"]]:
        with Image.open(tmp_path / name) as im:
            assert im.width > 200 and im.height > 200
    assert json.loads((tmp_path / "metrics.json").read_text())["silhouette"] is None  # NaN is not JSON
    checker = check_page(tmp_path, {f.path for f in faces})
    assert len(face_imgs(checker)) == n


def test_gallery_renders_in_headless_chromium(sample_set, tmp_path):
    from tests.browser import chromium_path, dump_dom, screenshot

    if chromium_path() is None:
        pytest.skip("/usr/bin/chromium absent; install it with: apt-get install -y chromium")
    faces, vectors, names = sample_set
    build_report(tmp_path / "report", faces, vectors, names=names, metrics={"silhouette": 0.5, "k": 5})
    page = tmp_path / "report" / "index.html"

    shot = screenshot(page, tmp_path / "shot.png")
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1200, 2000)
        pixels = np.asarray(rgb)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    not_white = float((pixels.min(axis=2) < 240).mean())
    # Text and flat CSS alone give a few hundred colours; rendered photos and plots give thousands.
    assert colours > 1000 and not_white > 0.05, (colours, not_white)

    dom = dump_dom(page)
    assert dom.count('class="face"') == len(faces)
    assert "Unassigned faces" in dom


def test_gallery_template_ships_and_escapes_every_value():
    """Without models: the Jinja2 template is package data and every kind of value in it is escaped."""
    from importlib.resources import files

    from indexer.report.gallery import ClusterSection, render_html

    assert files("indexer.report").joinpath("templates/gallery.html").is_file()
    face = ReportFace(7, f"/photos/{QUOTE_NAME}", (0, 0, 1, 1), 0, 0.5, b"")
    page = render_html(title=HOSTILE_PERSON, sections=[ClusterSection(0, HOSTILE_PERSON, 1, 0.5, [face])],
                       thumbs={7: 'thumbs/"><script>.jpg'}, metrics={"silhouette": "<script>"},
                       plots={"<script>": '"><script>.png'}, skipped={"<x>": "<script>"}, n_faces=1, projection={})
    assert "<script" not in page and "<b>x</b>" not in page and 'onerror="alert' not in page
    assert page.count("&lt;b&gt;x&lt;/b&gt;") == 4  # <title>, <h1>, the nav chip, the section <h2>
    assert "&quot;&gt;&lt;script&gt;.png" in page and "a&quot; onerror=&quot;alert(1).jpg" in page
    assert page.startswith("<!DOCTYPE html>\n") and page.endswith("</body>\n</html>\n")
