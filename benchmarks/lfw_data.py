"""LFW (View 1, dev-train people) for the benchmarks: where it is, and its embeddings, cached.

Data comes from ``$FACEINDEX_DATA`` or ``../shared/data`` beside the checkout; benchmarks and tests that need it skip
with a stated reason when it is absent. LFW is for benchmarking only: nothing here is copied into the repository.

The embedding of a photo is that of the detected face nearest the image centre (LFW's labelled face): taking the
most probable or the largest face picks a background face often enough to cost 2-3 points of verification accuracy.
Photos where MTCNN finds no face fall back to a fixed central box (counted and reported).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# The first line a --smoke run prints, so its table is never taken for a measurement.
SMOKE_NOTE = "--smoke run: tiny sizes; it checks that the benchmark runs, its figures measure nothing"
# --smoke runs compute on one thread (torch, FAISS, and OMP_NUM_THREADS for the processes they start): on a shared
# 2-core box where other work holds a core, two OpenMP threads wait on each other far more than they compute
# (measured: one face through the embedder in 44 ms on one thread, 2.7 s on two), and a smoke run has no figure
# worth the second thread.
SMOKE_THREADS = 1
# LFW deep-funneled images are 250x250 with the face centred; this box covers it when MTCNN finds nothing.
FALLBACK_BOX = (70.0, 58.0, 180.0, 192.0)


def data_root() -> Path | None:
    env = os.environ.get("FACEINDEX_DATA")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (candidate / "lfw-devtrain").is_dir():
            return candidate
    return None


def require_data() -> Path:
    root = data_root()
    if root is None:
        sys.exit("skipped: LFW not found; set FACEINDEX_DATA or place shared/data beside the checkout")
    return root


def lfw_images(root: Path) -> tuple[list[str], list[str]]:
    """All (path, person) of lfw-devtrain, sorted."""
    paths, people = [], []
    for person in sorted(os.listdir(root / "lfw-devtrain")):
        for name in sorted(os.listdir(root / "lfw-devtrain" / person)):
            paths.append(str(root / "lfw-devtrain" / person / name))
            people.append(person)
    return paths, people


def centre_face(faces, width: int, height: int):
    """The detected face whose box centre is nearest the image centre, or None."""
    if not faces:
        return None
    cx, cy = width / 2, height / 2
    return min(faces, key=lambda f: ((f.box[0] + f.box[2]) / 2 - cx) ** 2 + ((f.box[1] + f.box[3]) / 2 - cy) ** 2)


def embed_centre_faces(paths: list[str], detector, embedder, batch: int = 64, progress: bool = True):
    """Vectors [N, 512] of the centre face of each photo, and a mask of photos where MTCNN found a face."""
    from indexer.images import decode
    from indexer.models.detector import DetectedFace

    vectors = np.zeros((len(paths), 512), np.float32)
    found = np.zeros(len(paths), bool)
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        images = [decode(p, 10**9) for p in paths[i:i + batch]]
        crops = []
        for j, (img, faces) in enumerate(zip(images, detector.detect(images), strict=True)):
            face = centre_face(faces, *img.orig_size)
            found[i + j] = face is not None
            crops.append(detector.crop(img, face or DetectedFace(FALLBACK_BOX, 0.0, ())))
        vectors[i:i + len(images)] = embedder.embed(crops)
        if progress:
            done = i + len(images)
            rate = done / (time.perf_counter() - start)
            print(f"\r  embedded {done}/{len(paths)} LFW photos ({rate:.1f}/s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return vectors, found


def read_pairs(path: str) -> list[tuple[str, str, bool]]:
    pairs = []
    with open(path) as fh:
        next(fh)
        for line in fh:
            parts = line.split()
            if len(parts) == 3:
                name, a, b = parts
                pairs.append((f"{name}/{name}_{int(a):04d}.jpg", f"{name}/{name}_{int(b):04d}.jpg", True))
            elif len(parts) == 4:
                n1, a, n2, b = parts
                pairs.append((f"{n1}/{n1}_{int(a):04d}.jpg", f"{n2}/{n2}_{int(b):04d}.jpg", False))
    return pairs


def ten_fold_accuracy(sims: np.ndarray, same: np.ndarray) -> tuple[float, float, float]:
    """Mean and std of 10-fold accuracy (threshold picked on 9 folds), and the mean threshold."""
    # LFW's pairs file lists all same pairs, then all different pairs: interleave folds across both halves.
    idx = np.arange(len(sims))
    folds = [np.concatenate([idx[same][i::10], idx[~same][i::10]]) for i in range(10)]
    thresholds = np.unique(sims)
    accs, chosen = [], []
    for k in range(10):
        test = folds[k]
        train = np.concatenate([folds[j] for j in range(10) if j != k])
        train_acc = [((sims[train] >= t) == same[train]).mean() for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        chosen.append(best)
        accs.append(((sims[test] >= best) == same[test]).mean())
    return float(np.mean(accs)), float(np.std(accs)), float(np.mean(chosen))


def default_preprocessing(embedder) -> tuple[int, bool]:
    """(margin, flip) of the default configuration: what the embeddings of a full run are made with."""
    from indexer.config import DetectorSettings

    return DetectorSettings().margin, embedder.settings.flip


def views_cache(embedder, margin: int) -> Path:
    """Where ``margin_views`` keeps the plain and mirrored embeddings of lfw-devtrain cropped with ``margin``."""
    from indexer.models.weights import cache_dir

    name = f"lfw-devtrain-{embedder.fingerprint.replace(':', '-')}-{embedder.precision}-m{margin}-views.npz"
    return cache_dir() / "bench" / name


def _save(target: Path, **arrays: np.ndarray) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, target)


def _cached(target: Path, rel_paths: list[str] | None) -> dict[str, np.ndarray] | None:
    """The cached arrays when the file exists (and holds exactly ``rel_paths`` when given)."""
    if not target.is_file():
        return None
    with np.load(target, allow_pickle=False) as data:
        if rel_paths is not None and data["paths"].tolist() != rel_paths:
            return None
        return {k: data[k] for k in data.files}


def centre_boxes(root: Path, rel_paths: list[str], cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(boxes float64 [N, 4], found bool [N]): the centre face of each photo, detected once and cached (MTCNN at
    min_prob 0.5, the default detector otherwise), or ``FALLBACK_BOX`` where MTCNN finds none."""
    from indexer.config import DetectorSettings
    from indexer.images import decode
    from indexer.models.detector import FaceDetector
    from indexer.models.weights import cache_dir

    target = cache_dir() / "bench" / "lfw-devtrain-boxes.npz"
    hit = _cached(target, rel_paths) if cache else None
    if hit is not None:
        return hit["boxes"], hit["found"]
    detector = FaceDetector(DetectorSettings(min_prob=0.5))
    boxes, found = np.zeros((len(rel_paths), 4)), np.zeros(len(rel_paths), bool)
    for i in range(0, len(rel_paths), 64):
        images = [decode(str(root / p), 10**9) for p in rel_paths[i:i + 64]]
        for j, (img, faces) in enumerate(zip(images, detector.detect(images), strict=True)):
            face = centre_face(faces, *img.orig_size)
            found[i + j] = face is not None
            boxes[i + j] = face.box if face is not None else FALLBACK_BOX
        _progress("detected", i + len(images), len(rel_paths))
    if cache:
        _save(target, paths=np.array(rel_paths), boxes=boxes, found=found)
    return boxes, found


def margin_views(root: Path, rel_paths: list[str], boxes: np.ndarray, margin: int, embedder,
                 cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(plain, mirrored) unit embeddings [N, 512] of the faces cropped with ``margin`` as ingest crops them
    (``FaceDetector.crop``), each face and its mirror in the same forward passes (``FaceEmbedder.embed_views``, the
    code ``embedder.flip`` runs); cached per margin and model."""
    from dataclasses import replace

    from indexer.config import DetectorSettings
    from indexer.images import decode
    from indexer.models.detector import DetectedFace, FaceDetector

    target = views_cache(embedder, margin)
    hit = _cached(target, rel_paths) if cache else None
    if hit is not None:
        return hit["plain"], hit["mirrored"]
    cropper = FaceDetector(replace(DetectorSettings(), margin=margin), device="cpu")
    plain = np.zeros((len(rel_paths), 512), np.float32)
    mirrored = np.zeros_like(plain)
    for i in range(0, len(rel_paths), 64):
        crops = [cropper.crop(decode(str(root / p), 10**9), DetectedFace(tuple(boxes[i + j]), 1.0, ()))
                 for j, p in enumerate(rel_paths[i:i + 64])]
        plain[i:i + len(crops)], mirrored[i:i + len(crops)] = embedder.embed_views(crops)
        _progress(f"embedded with mirrors (margin {margin})", i + len(crops), len(rel_paths))
    if cache:
        _save(target, paths=np.array(rel_paths), plain=plain, mirrored=mirrored)
    return plain, mirrored


def _progress(what: str, done: int, total: int) -> None:
    if sys.stderr.isatty() or done == total or done % 1280 == 0:
        print(f"\r  {what} {done}/{total} LFW photos", end="\n" if done == total else "", file=sys.stderr, flush=True)


def smoke_photos(root: Path, people: int, per_person: int, others: int) -> list[str]:
    """A few lfw-devtrain photos (paths relative to ``root``) for a ``--smoke`` run: the first ``per_person``
    photos of the first ``people`` people with at least 4 photos (clustering and the face model need repeated
    identities), then the first photo of each of the next ``others`` people with fewer (strangers)."""
    many, rest = [], []
    for person in sorted(os.listdir(root / "lfw-devtrain")):
        names = sorted(os.listdir(root / "lfw-devtrain" / person))
        if len(names) >= 4 and len(many) < people * per_person:
            many += [f"lfw-devtrain/{person}/{n}" for n in names[:per_person]]
        elif len(names) < 4 and len(rest) < others:
            rest.append(f"lfw-devtrain/{person}/{names[0]}")
        if len(many) >= people * per_person and len(rest) >= others:
            break
    return many + rest


def lfw_sample(root: Path, rel_paths: list[str]) -> dict[str, np.ndarray]:
    """What ``lfw_embeddings`` returns, for these photos only (paths relative to ``root``, in this order).

    For ``--smoke`` runs: the rows come from the embedding cache when it exists (the same vectors a full run uses),
    else the photos are embedded now, the same way; a smoke run never waits for all 9,525 photos to be embedded.
    """
    import torch

    from indexer.config import DetectorSettings
    from indexer.models.detector import FaceDetector
    from indexer.models.embedder import FaceEmbedder, flip_average

    torch.set_num_threads(SMOKE_THREADS)
    embedder = FaceEmbedder()
    people = np.array([Path(p).parent.name for p in rel_paths])
    margin, flip = default_preprocessing(embedder)
    views = _cached(views_cache(embedder, margin), None)
    boxes = _cached(views_cache(embedder, margin).parent / "lfw-devtrain-boxes.npz", None)
    if views is not None and boxes is not None:
        row = {p: i for i, p in enumerate(views["paths"].tolist())}
        rows = np.array([row[p] for p in rel_paths], np.int64)
        vectors = flip_average(views["plain"][rows], views["mirrored"][rows]) if flip else views["plain"][rows]
        return {"paths": np.array(rel_paths), "people": people, "vectors": vectors, "found": boxes["found"][rows]}
    print(f"  smoke: no LFW embedding cache for margin {margin}; embedding {len(rel_paths)} photos now",
          file=sys.stderr)
    detector = FaceDetector(DetectorSettings(min_prob=0.5))
    vectors, found = embed_centre_faces([str(root / p) for p in rel_paths], detector, embedder, progress=False)
    return {"paths": np.array(rel_paths), "people": people, "vectors": vectors, "found": found}


def lfw_embeddings(root: Path | None = None) -> dict[str, np.ndarray]:
    """Embeddings of all of lfw-devtrain with the default models and preprocessing (margin, flip): the centre faces
    detected once (``centre_boxes``), cropped and embedded with their mirrors (``margin_views``), both cached.

    Keys: ``paths``, ``people``, ``vectors`` [N, 512] float32 unit rows, ``found`` (MTCNN found a face).
    """
    import torch

    from indexer.models.embedder import FaceEmbedder, flip_average

    root = root or require_data()
    root = root.parent if root.name == "lfw-devtrain" else root
    torch.set_num_threads(os.cpu_count() or 1)
    embedder = FaceEmbedder()
    paths, people = lfw_images(root)
    rel = [os.path.relpath(p, root) for p in paths]
    boxes, found = centre_boxes(root, rel)
    margin, flip = default_preprocessing(embedder)
    plain, mirrored = margin_views(root, rel, boxes, margin, embedder)
    vectors = flip_average(plain, mirrored) if flip else plain
    return {"paths": np.array(rel), "people": np.array(people), "vectors": vectors, "found": found}


def index_of_vectors(index: Path, vectors: np.ndarray, people: np.ndarray) -> None:
    """An index holding one face per row of ``vectors`` (face id i + 1, file /lfw/<person>/<i>.jpg), built without
    running the models: for benchmarks and tests of what happens after embedding."""
    from indexer.store.lmdb_store import FaceStore
    from indexer.store.records import FileRecord, NewFace

    store = FaceStore(index)

    def fill(txn) -> None:
        for i, (v, person) in enumerate(zip(vectors, people, strict=True)):
            face = NewFace(box=[0, 0, 1, 1], prob=1.0, landmarks=[[0, 0]] * 5, vector=v, thumbnail=b"")
            store.put_file(txn, FileRecord(f"/lfw/{person}/{i}.jpg", 1, 1, f"{i:064x}", "indexed"), [face])

    store.transact(fill)
    store.close()

if __name__ == "__main__":
    data = lfw_embeddings()
    print(f"{len(data['paths'])} photos, {int(data['found'].sum())} with a detected face, "
          f"{len(set(data['people'].tolist()))} people")


class Recorder:
    """``--out DIR``: the benchmark's JSON goes to DIR/<name>.json and its printed table to DIR/<name>.txt (both,
    with or without ``--json``)."""

    def __init__(self, out: str | None, name: str) -> None:
        self.dir = Path(out) if out else None
        self.name = name
        self.lines: list[str] = []
        self.table_to_stderr = False

    def json(self, result: dict, to_stdout: bool = False) -> bool:
        """Record ``result``; with ``to_stdout`` (``--json``) also print it. True when the run ends there: JSON on
        stdout and no folder to write the table to. With a folder the table is still rendered, to stderr (stdout
        stays one JSON object), so DIR/<name>.txt is written beside the JSON."""
        import json

        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / f"{self.name}.json").write_text(json.dumps(result, indent=1) + "\n")
        if to_stdout:
            print(json.dumps(result), flush=True)
            self.table_to_stderr = True
        return to_stdout and self.dir is None

    def print(self, line: str = "") -> None:
        print(line, file=sys.stderr if self.table_to_stderr else sys.stdout)
        self.lines.append(line)

    def close(self) -> None:
        if self.dir is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            load = os.getloadavg()[0]
            (self.dir / f"{self.name}.txt").write_text(
                f"# {self.name}, {stamp}, {os.cpu_count()} CPUs, 1-minute load average {load:.1f} at the end\n"
                + "\n".join(self.lines) + "\n")
