"""config.toml + flags -> one validated, immutable settings object.

The built-in defaults below are the source of truth; the repository's ``config.toml`` repeats them with comments
(a test checks the two agree). Unknown keys are errors, not warnings: a typo must not silently do nothing.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from indexer.errors import ConfigError

# The clustering methods (indexer.cluster implements them); config, CLI and library all use this list.
CLUSTER_METHODS = ("adaptive", "agglomerative", "hdbscan", "threshold", "kmeans")


@dataclass(frozen=True)
class DetectorSettings:
    min_face_size: int = 20          # pixels, in the image MTCNN sees (after downscaling to max_side)
    min_prob: float = 0.90           # faces below this MTCNN probability are dropped
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # P-, R-, O-net thresholds (facenet-pytorch's)
    max_side: int = 1280             # detect on a copy whose long side is at most this; crop from the original
    margin: int = 32                 # pixels of the 160 px crop (measured best on LFW dev-train: bench_models)
    image_size: int = 160
    batch_size: int = 16             # images per MTCNN batch; 0: chosen from the device (models/device.py)


@dataclass(frozen=True)
class EmbedderSettings:
    weights: str = "auto"            # auto | vggface2 | casia-webface | /path/to/weights(.pt|.npz)
    batch_size: int = 32             # faces per forward pass; 0: chosen from the device (models/device.py)
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    precision: str = "auto"          # auto | float32 | bfloat16 | float16 (see embedder.choose_precision)
    flip: bool = True                # embed each face and its mirror image, keep their normalised mean


@dataclass(frozen=True)
class IngestSettings:
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
    decode_workers: int = 2
    model_workers: int = 0           # photos the models work on at once; 0: one per core on CPU, 1 on a GPU
    max_pixels: int = 120_000_000    # decompression-bomb cap: larger images are recorded as failed
    max_file_mb: int = 200           # files larger than this are recorded as failed without being read
    queue_size: int = 64             # bounded queues between stages (items)
    thumbnail_size: int = 96         # px, JPEG thumbnail of each face kept in the store for galleries
    read_timeout_s: float = 120.0    # a file whose read + decode takes longer is failed (a stalled disk or mount)
    stop_grace_s: float = 60.0       # after SIGINT/SIGTERM the process exits within this, whatever it is doing


@dataclass(frozen=True)
class IndexSettings:
    exact_max_vectors: int = 50_000  # Flat (exact) up to here, IVF above: see indexer/store/choose.py
    target_recall: float = 0.95      # IVF nprobe is chosen for this recall@10
    snapshot_every: int = 2000       # save the FAISS file after this many changes or 10% growth (and at exit)
    # RAM for the vector index, in MiB; 0: a quarter of physical memory (see store/choose.py). Past it the float32
    # vectors stay in LMDB and the index keeps compressed codes, re-ranked with vectors read from the store.
    memory_budget_mb: float = 0.0


@dataclass(frozen=True)
class ClusterSettings:
    method: str = "adaptive"         # adaptive | agglomerative | hdbscan | threshold | kmeans
    k: int = 0                       # kmeans only; 0 means auto (silhouette over a range)
    threshold: float = 0.55          # cosine similarity for the linkage / graph methods (cross-validated: README)
    pair_margin: float = 0.06        # adaptive: a merge of a- and b-face clusters needs threshold + margin/sqrt(ab)
    center_merge: float = 0.65       # adaptive: then a cluster joins its nearest center at this cosine (0 = off)...
    center_lead: float = 0.15        # ...when it leads the nearest rival person's by this (and for attach_similarity)
    attach_similarity: float = 0.50  # adaptive: last, an unassigned face joins its nearest center likewise (0 = off)
    min_cluster_size: int = 2        # hdbscan
    assign_min_similarity: float = 0.45  # live assignment: a face joins a person only this close to its center
    assign_neighbours: int = 10      # live assignment: indexed faces searched per new face (persons/assign.py)
    assign_link: float = 0.65        # live assignment: a neighbour counts at this cosine (bench_assign's sweep)
    assign_min_faces: int = 2        # live assignment: faces (the new one + free neighbours) to start a new person
    recluster_growth: float = 0.25   # the daemon reclusters all when the index grew by this fraction
    local_recluster_faces: int = 10_000  # ...and locally when this many faces arrived since a recluster saw them...
    recluster_interval_s: float = 3600.0  # ...or this much time passed with such faces (persons/schedule.py)
    seed: int = 1234


@dataclass(frozen=True)
class WatchSettings:
    settle_s: float = 1.0            # a file is read once size+mtime are unchanged for this long
    max_wait_ms: int = 200           # a batch closes after this wait even when not full
    batch_size: int = 32             # images per batch while streaming
    ignore: tuple[str, ...] = (".*", "*~", "*.part", "*.tmp", "*.crdownload", "*.partial", "*.download", "*.swp")


@dataclass(frozen=True)
class Settings:
    index_dir: str = "~/.local/share/faceindex"
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    embedder: EmbedderSettings = field(default_factory=EmbedderSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)

    @property
    def index_path(self) -> Path:
        return Path(os.path.expanduser(self.index_dir)).resolve()


_SECTIONS = {f.name: f.type for f in fields(Settings) if f.name != "index_dir"}


def _coerce(section: str, cls: type, raw: dict[str, Any]) -> Any:
    default = cls()
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown setting [{section}] {key}; known: {', '.join(sorted(known))}")
        want = getattr(default, key)
        if isinstance(want, tuple):
            if not isinstance(value, list | tuple):
                raise ConfigError(f"[{section}] {key} must be a list, got {value!r}")
            value = tuple(value)
        elif isinstance(want, float) and type(value) is int:
            value = float(value)
        elif type(value) is not type(want):
            raise ConfigError(f"[{section}] {key} must be {type(want).__name__}, got {value!r}")
        values[key] = value
    return replace(default, **values)


def validate(s: Settings) -> Settings:
    checks = [
        (s.detector.min_face_size >= 8, "detector.min_face_size must be >= 8"),
        (0.0 <= s.detector.min_prob <= 1.0, "detector.min_prob must be in [0, 1]"),
        (s.detector.max_side >= 64, "detector.max_side must be >= 64"),
        (s.detector.batch_size >= 0 and s.embedder.batch_size >= 0,
         "detector.batch_size and embedder.batch_size must be >= 0 (0: chosen from the device)"),
        (s.embedder.precision in ("auto", "float32", "bfloat16", "float16"),
         "embedder.precision must be auto, float32, bfloat16 or float16"),
        (s.ingest.decode_workers >= 1, "ingest.decode_workers must be >= 1"),
        (s.ingest.model_workers >= 0, "ingest.model_workers must be >= 0 (0: one per CPU core)"),
        (s.ingest.max_pixels > 0, "ingest.max_pixels must be > 0"),
        (s.ingest.read_timeout_s > 0 and s.ingest.stop_grace_s > 0,
         "ingest.read_timeout_s and ingest.stop_grace_s must be > 0"),
        (s.cluster.method in CLUSTER_METHODS, f"cluster.method must be one of {', '.join(CLUSTER_METHODS)}"),
        (-1.0 <= s.cluster.threshold <= 1.0, "cluster.threshold must be a cosine in [-1, 1]"),
        (s.cluster.k >= 0, "cluster.k must be >= 0 (0 = auto)"),
        (s.cluster.assign_neighbours >= 1 and s.cluster.assign_min_faces >= 2,
         "cluster.assign_neighbours must be >= 1 and cluster.assign_min_faces >= 2"),
        (-1.0 <= s.cluster.assign_link <= 1.0, "cluster.assign_link must be a cosine in [-1, 1]"),
        (s.cluster.local_recluster_faces >= 1, "cluster.local_recluster_faces must be >= 1"),
        (s.cluster.pair_margin >= 0, "cluster.pair_margin must be >= 0"),
        (0 <= s.cluster.center_merge <= 1, "cluster.center_merge must be a cosine in [0, 1] (0 = off)"),
        (s.cluster.center_lead >= 0, "cluster.center_lead must be >= 0"),
        (0 <= s.cluster.attach_similarity <= 1, "cluster.attach_similarity must be a cosine in [0, 1] (0 = off)"),
        (s.watch.settle_s >= 0, "watch.settle_s must be >= 0"),
        (0 < s.index.target_recall <= 1, "index.target_recall must be in (0, 1]"),
        (s.index.memory_budget_mb >= 0, "index.memory_budget_mb must be >= 0 (0 = a quarter of RAM)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return s


def default_config_file() -> Path | None:
    """$FACEINDEX_CONFIG, else ./config.toml, else ~/.config/faceindex/config.toml, else none (built-ins)."""
    env = os.environ.get("FACEINDEX_CONFIG")
    if env:
        return Path(env)
    for candidate in (Path("config.toml"), Path.home() / ".config" / "faceindex" / "config.toml"):
        if candidate.is_file():
            return candidate
    return None


def load_settings(config_file: str | Path | None = None, index_dir: str | Path | None = None) -> Settings:
    """Read ``config_file`` (or the default one) over the built-ins; ``index_dir`` overrides the file."""
    path = Path(config_file) if config_file else default_config_file()
    raw: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    settings = Settings()
    top: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS and isinstance(value, dict):
            top[key] = _coerce(key, type(getattr(settings, key)), value)
        elif key == "index_dir":
            top[key] = str(value)
        else:
            raise ConfigError(f"unknown setting {key} in {path}")
    settings = replace(settings, **top)
    if index_dir is not None:
        settings = replace(settings, index_dir=str(index_dir))
    return validate(settings)


def with_overrides(settings: Settings, section: str, **values: Any) -> Settings:
    """A copy of ``settings`` with some keys of one section replaced (flags use this)."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return settings
    sub = replace(getattr(settings, section), **values)
    return validate(replace(settings, **{section: sub}))
