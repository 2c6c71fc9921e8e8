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


def embedding_cache(embedder) -> Path:
    """Where ``lfw_embeddings`` keeps the embeddings of all of lfw-devtrain for this model and precision."""
    from indexer.models.weights import cache_dir

    name = f"lfw-devtrain-{embedder.fingerprint.replace(':', '-')}-{embedder.precision}.npz"
    return cache_dir() / "bench" / name


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
    from indexer.models.embedder import FaceEmbedder

    torch.set_num_threads(SMOKE_THREADS)
    embedder = FaceEmbedder()
    people = np.array([Path(p).parent.name for p in rel_paths])
    target = embedding_cache(embedder)
    if target.is_file():
        with np.load(target, allow_pickle=False) as data:
            row = {p: i for i, p in enumerate(data["paths"].tolist())}
            rows = np.array([row[p] for p in rel_paths], np.int64)
            return {"paths": np.array(rel_paths), "people": people, "vectors": data["vectors"][rows],
                    "found": data["found"][rows]}
    print(f"  smoke: no LFW embedding cache at {target}; embedding {len(rel_paths)} photos now", file=sys.stderr)
    detector = FaceDetector(DetectorSettings(min_prob=0.5))
    vectors, found = embed_centre_faces([str(root / p) for p in rel_paths], detector, embedder, progress=False)
    return {"paths": np.array(rel_paths), "people": people, "vectors": vectors, "found": found}


def lfw_embeddings(root: Path | None = None) -> dict[str, np.ndarray]:
    """Embeddings of all of lfw-devtrain with the default models, computed once and cached by model fingerprint
    and embedder precision.

    Keys: ``paths``, ``people``, ``vectors`` [N, 512] float32 unit rows, ``found`` (MTCNN found a face).
    """
    import torch

    from indexer.config import DetectorSettings
    from indexer.models.detector import FaceDetector
    from indexer.models.embedder import FaceEmbedder

    root = root or require_data()
    torch.set_num_threads(os.cpu_count() or 1)
    embedder = FaceEmbedder()
    target = embedding_cache(embedder)
    if target.is_file():
        with np.load(target, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    paths, people = lfw_images(root)
    detector = FaceDetector(DetectorSettings(min_prob=0.5))
    vectors, found = embed_centre_faces(paths, detector, embedder)
    rel = [os.path.relpath(p, root) for p in paths]
    out = {"paths": np.array(rel), "people": np.array(people), "vectors": vectors, "found": found}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, target)
    return out



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
    """``--out DIR``: the benchmark's JSON goes to DIR/<name>.json and its printed table to DIR/<name>.txt."""

    def __init__(self, out: str | None, name: str) -> None:
        self.dir = Path(out) if out else None
        self.name = name
        self.lines: list[str] = []

    def json(self, result: dict, to_stdout: bool = False) -> bool:
        """Record ``result``; with ``to_stdout`` (``--json``) also print it and return True: the run ends there."""
        import json

        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / f"{self.name}.json").write_text(json.dumps(result, indent=1) + "\n")
        if to_stdout:
            print(json.dumps(result))
        return to_stdout

    def print(self, line: str = "") -> None:
        print(line)
        self.lines.append(line)

    def close(self) -> None:
        if self.dir is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            load = os.getloadavg()[0]
            (self.dir / f"{self.name}.txt").write_text(
                f"# {self.name}, {stamp}, {os.cpu_count()} CPUs, 1-minute load average {load:.1f} at the end\n"
                + "\n".join(self.lines) + "\n")
