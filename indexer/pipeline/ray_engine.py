"""``faceindex ingest PATH --engine ray``: the backfill on Ray Data, with the single writer merging shards.

The driver (this process, which holds the index's writer lock) scans the paths and asks the store which files
changed (``Pipeline.needs_reading``: unchanged files are never sent), cuts the rest into shards of consecutive
files, and hands them to Ray Data: ``map_batches`` over an actor pool of ``ShardWorker``s, sized by
``ray_pool.choose_pool`` from the cluster's resources. Each actor runs the local path's own stages on a shard
(the reader, with the read-ahead and its timeouts; ``dedupe_batch``; the ``FaceStage`` built from
``ModelsFromSettings`` inside the actor: arguments are shipped, models are not) in the same batches a
single-machine ingest makes, and writes the shard as a Parquet file into the run's staging folder. The driver
merges each shard as Ray reports it (``merge.ShardMerger``: one transaction per shard, exactly once), so merging
overlaps the workers' compute. Shards left by a run that died are merged first by the next one.

Ray is imported only here, and this module only by ``--engine ray``: a plain ``faceindex ingest`` never loads it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from indexer.config import Settings, with_overrides
from indexer.errors import EngineError
from indexer.models.device import CPU_DETECTOR_BATCH
from indexer.pipeline import shards
from indexer.pipeline.faces import FaceStage, ModelsFromSettings, StageTimer
from indexer.pipeline.merge import ShardMerger
from indexer.pipeline.ray_pool import ClusterResources, PoolPlan, choose_pool, choose_shard_size
from indexer.pipeline.read import ReadAhead, Reader
from indexer.pipeline.records import FaceItem, ReadItem, Verdict
from indexer.pipeline.runner import IngestSummary, Pipeline, dedupe_batch, faces_or_failures

log = logging.getLogger("faceindex.ray")

# Local mode only (a cluster started by `ray start` sizes its own): shards travel through the staging folder, not
# the object store, which carries only the shards' path lists and names; Ray's minimum is 75 MB.
LOCAL_OBJECT_STORE = 256 * 2**20
CONNECT_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------------------------------- the workers
class ShardReader(Reader):
    """The local reader without a store (a worker has none): every file sent is new to it. Only changed files
    are sent, and the writer decides what each is to the store when it merges (copy, move, unchanged)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, store=None)  # type: ignore[arg-type]  # classify, the store's one user, is ours

    def classify(self, item: ReadItem) -> tuple[Verdict, str | None]:
        return Verdict.NEW, None


class ShardWorker:
    """A Ray actor: the files of one shard at a time through read -> faces, written as a shard file. Built from
    plain arguments (settings, the index's weights, the run folder); its models load inside it on first use."""

    def __init__(self, settings: Settings, prefer: str | None, folder: str, readers: int) -> None:
        self.settings = settings
        self.folder = Path(folder)
        self.faces = FaceStage(settings, ModelsFromSettings(settings, prefer))
        self.read_ahead = ReadAhead(ShardReader(settings), readers, timeout_s=settings.ingest.read_timeout_s)

    def __call__(self, batch: Any) -> Any:
        """A pyarrow table of shards (name, paths as bytes) -> one row per shard written: its name, files, faces
        and the seconds of each stage (JSON), which the driver adds to the run's."""
        import pyarrow as pa

        out: dict[str, list] = {"shard": [], "files": [], "faces": [], "stages": []}
        for name, raw in zip(batch.column("shard").to_pylist(), batch.column("paths").to_pylist(), strict=True):
            timer = StageTimer()
            items = self.process([os.fsdecode(p) for p in raw], timer)
            started = time.perf_counter()
            shards.write_shard(self.folder / name, items, self.faces.embedder.fingerprint)
            timer.add("write_shard", started)
            out["shard"].append(name)
            out["files"].append(len(items))
            out["faces"].append(sum(len(fi.faces) for fi in items))
            out["stages"].append(json.dumps(timer.summary()))
        return pa.table(out)

    def process(self, paths: list[str], timer: StageTimer) -> list[FaceItem]:
        """The batches a local ingest would make of these paths, each read ahead while the previous one is in the
        models; a file the read-ahead gave up on is recorded as failed, as locally."""
        size = self.settings.detector.batch_size or self.faces.detector.batch_size
        batches = [paths[i:i + size] for i in range(0, len(paths), size)]
        out: list[FaceItem] = []
        for n, batch in enumerate(batches):
            started = time.perf_counter()
            items = self.read_ahead.take(batch)
            timer.add("read_wait", started)
            for item in items:  # the reader threads' own time (read + hash, decode, resize), as a local ingest adds
                for stage, seconds in item.seconds:
                    timer.add_seconds(stage, seconds)
            self.read_ahead.ahead(batches[n + 1] if n + 1 < len(batches) else [])
            out += faces_or_failures(self.faces, dedupe_batch(items), timer)
        return out


# ---------------------------------------------------------------------------------------------- the driver
@dataclass
class RayRun:
    """What ``ingest --engine ray`` did: the ingest summary plus the pool, the shards and the staging folder."""

    summary: IngestSummary
    staging: str
    run_id: str = ""
    pool: PoolPlan | None = None
    shard_size: int = 0
    shard_reason: str = ""
    shards: int = 0            # shards of this run
    resumed_shards: int = 0    # shards an earlier, interrupted run left, merged first ...
    resumed: IngestSummary = field(default_factory=IngestSummary)  # ... and what they held (the scan that follows
    # finds their files unchanged: ``summary`` counts the files of this run's scan only)

    def to_dict(self) -> dict[str, Any]:
        resumed = {k: getattr(self.resumed, k) for k in ("files", "indexed", "no_face", "failed", "faces", "failures")}
        return {**self.summary.to_dict(), "engine": "ray", "run_id": self.run_id, "staging": self.staging,
                "pool": self.pool.to_dict() if self.pool else None, "shard_size": self.shard_size,
                "shard_reason": self.shard_reason, "shards": self.shards, "resumed_shards": self.resumed_shards,
                "resumed": resumed}


class RayIngest:
    """The driver: resume, scan, send changed files to the workers, merge their shards (the single writer)."""

    def __init__(self, pipeline: Pipeline, prefer: str | None, staging: Path, address: str | None = None,
                 shard_size: int = 0, fingerprint: Callable[[str], str] = lambda weights: weights) -> None:
        self.pipeline = pipeline
        self.fingerprint = fingerprint  # the workers' weights fingerprint -> what the index records (merge.py)
        self.settings = pipeline.settings
        self.prefer = prefer
        self.staging = staging
        self.address = address
        self.requested_shard_size = shard_size

    def run(self, candidates: list[str], progress: bool = False) -> RayRun:
        started = time.perf_counter()
        run = RayRun(IngestSummary(), str(self.staging))
        run.resumed_shards = ShardMerger(self.pipeline, run.resumed, self.fingerprint).resume(self.staging)
        merger = ShardMerger(self.pipeline, run.summary, self.fingerprint)
        todo, unchanged = self.pipeline.needs_reading(candidates)
        run.summary.files += unchanged
        run.summary.unchanged += unchanged
        if todo and not self.pipeline.stop.is_set():
            timer, connecting = StageTimer(), time.perf_counter()
            with ray_session(self.address) as ray:
                timer.add("ray_start", connecting)
                self._backfill(ray, todo, merger, run, timer, progress)
            run.summary.stages = timer.summary()
        run.summary.interrupted = self.pipeline.stop.is_set()
        run.summary.seconds = time.perf_counter() - started
        return run

    def _backfill(self, ray: Any, todo: list[str], merger: ShardMerger, run: RayRun, timer: StageTimer,
                  progress: bool) -> None:
        """Send ``todo`` to the workers and merge their shards as they come; ``timer``: the workers' stages (their
        seconds added up over all actors), the driver's wait for them and its merges."""
        run.pool = choose_pool(cluster_resources(ray))
        batch = self.settings.detector.batch_size or CPU_DETECTOR_BATCH  # 0: each worker's detector chooses
        run.shard_size, run.shard_reason = choose_shard_size(len(todo), run.pool.actors, batch,
                                                             self.requested_shard_size)
        log.info("ray pool: %s; shards of %s", run.pool.reason, run.shard_reason)
        chunks = [todo[i:i + run.shard_size] for i in range(0, len(todo), run.shard_size)]
        run.shards = len(chunks)
        run.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        folder = shards.start_run(self.staging, run.run_id, self.pipeline.store.index_dir)
        rows = [{"shard": shards.shard_name(n, chunk), "paths": [os.fsencode(p) for p in chunk]}
                for n, chunk in enumerate(chunks)]
        # Each actor's models get the actor's CPUs (model_workers 0 would count the whole node's cores per actor).
        settings = self.settings if self.settings.ingest.model_workers else with_overrides(
            self.settings, "ingest", model_workers=max(1, int(run.pool.cpus)))
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            ShardWorker, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=run.pool.actors),
            num_cpus=run.pool.cpus, num_gpus=run.pool.gpus or None, memory=run.pool.memory,
            fn_constructor_kwargs={"settings": settings, "prefer": self.prefer, "folder": str(folder),
                                   "readers": max(self.settings.ingest.decode_workers, int(run.pool.cpus))})
        with tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True, desc="ingest (ray)") as bar:
            try:
                waited = time.perf_counter()
                for row in ds.iter_rows():
                    timer.add("wait_for_workers", waited)
                    for stage, seconds in json.loads(row["stages"]).items():
                        timer.seconds[stage] += seconds
                    if not (folder / row["shard"]).is_file():
                        raise EngineError(f"a worker wrote {row['shard']}, but it is not in {folder}: on a cluster, "
                                          "--staging must be a folder every node sees (shared storage)")
                    started = time.perf_counter()
                    merger.merge(folder / row["shard"], bar.update)
                    timer.add("merge", started)
                    waited = time.perf_counter()
                    bar.set_postfix(faces=run.summary.faces, failed=run.summary.failed, refresh=False)
                    if self.pipeline.stop.is_set():
                        break  # shards written meanwhile stay in the staging folder: the next run merges them
            except ray.exceptions.RayError as exc:
                raise EngineError(f"a Ray worker failed ({_first_line(exc)}); merged shards are kept, run the same "
                                  "command again to finish") from None
        merger.finish(folder)


def cluster_resources(ray: Any) -> ClusterResources:
    res = ray.cluster_resources()
    return ClusterResources(cpus=float(res.get("CPU", 0)), gpus=float(res.get("GPU", 0)),
                            memory=int(res.get("memory", 0)))


# ---------------------------------------------------------------------------------------------- Ray itself
@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, connected: to ``address`` (a running cluster), else a local one started here (and stopped after).
    A session already open in this process (tests) is used as it is and left open."""
    ray = _import_ray()
    if address and address != "auto" and not address.startswith("ray://"):
        _probe(address)
    if ray.is_initialized():
        yield ray
        return
    local = address is None
    try:
        with _quiet_ray_core(), _keep_sigterm_handler():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                     object_store_memory=LOCAL_OBJECT_STORE if local else None)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise EngineError(f"cannot start or reach {where}: {_first_line(exc)}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False      # faceindex draws its own
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """``ray.init`` makes SIGTERM exit at once (``sys.exit``); the ingest's own handler (finish the shard being
    merged, save, exit 130) is put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _quiet_ray_core() -> Iterator[None]:
    """Ray's C++ core writes log lines to the driver's stderr (an advisory about actor restarts on every run, the
    log level it read at start-up) that would break faceindex's one-line output; errors that matter raise Python
    exceptions. So its level is set to fatal (a RAY_BACKEND_LOG_LEVEL the user set wins: set it to debug Ray) and
    stderr goes to /dev/null while Ray starts, when it announces that level."""
    if "RAY_BACKEND_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (Ray without its Data library cannot run the engine)
    except ImportError:
        raise EngineError("--engine ray needs Ray Data: `pip install 'ray[data]'` (make install does)") from None
    return ray


def _probe(address: str) -> None:
    """Fail at once, in one line, when nothing answers at ``host:port`` (Ray itself retries for a minute)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EngineError(f"--address {address!r}: expected HOST:PORT (the head's GCS address), 'auto' or "
                          "ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise EngineError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                          "`ray start --head` and pass the address it prints") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
