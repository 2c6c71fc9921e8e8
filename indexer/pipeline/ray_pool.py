"""How many Ray actors run the model stage, with what resources, and how many files go into one shard.

Pure functions of the cluster's resources (``ray.cluster_resources()`` read once by the engine, described here as
``ClusterResources``), each returning its answer with a one-line reason that the engine logs and prints, like
``store/choose.py`` and ``models/device.py``. Table-tested in tests/test_ray_engine.py.

An actor holds the detector and the embedder (loaded inside it) and reads, decodes, detects and embeds whole
shards. GPUs, when the cluster has any, get one actor each; on CPUs an actor gets ``CPU_THREADS_PER_ACTOR`` cores
for torch's threads. Memory caps the count either way: each actor reserves ``ACTOR_MEMORY`` of Ray's ``memory``
resource, so Ray never packs more onto a node than fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30

# Resident memory of one actor with both models loaded and a shard of decoded photos in flight. Measured once on
# the 2-core development machine (CPU, 298 LFW photos in shards of 80, the actor's RSS sampled every 0.5 s): peak
# 1.45 GiB. Reserved with a margin for larger photos: a 24-megapixel JPEG decodes to 72 MB, and a detector batch
# holds 16 of them plus the next batch read ahead.
ACTOR_MEMORY = 3 * GIB
# torch's intra-op threads per CPU actor. On the 2-core development machine one 2-core actor is the single-process
# pipeline (MTCNN and the embedder batches use both cores; bench_models). Larger CPUs were not measured: several
# 2-core actors with independent batches are expected to scale better than one actor with many threads.
CPU_THREADS_PER_ACTOR = 2
# On a GPU the models run on the device; the actor's cores read and decode photos ahead of it (ReadAhead threads)
# and cut crops and thumbnails. An estimate, not measured (no GPU was lent while this was written): decoding is the
# CPU work that grows with the GPU's speed, and 4 reader threads (the actor reads with as many threads as it has
# cores) at a few tens of ms per photo keep ~100 photos/s decoded. More cores per GPU are left to the driver and to Ray.
CPUS_PER_GPU_ACTOR = 4
# A node with more cores than this keeps one core for the driver (the single writer merging shards) and Ray's own
# processes; on a small machine (this 2-core one) every core goes to the actors and the driver shares them.
RESERVE_DRIVER_ABOVE = 2
# Shards: several per actor so the work spreads evenly and progress is seen; at most this many files each, so a
# crash or a retry redoes little, and a shard (a few kB a face: a 2 kB vector, a small JPEG thumbnail, a record)
# stays a few MB.
SHARDS_PER_ACTOR = 4
MAX_SHARD_FILES = 256


@dataclass(frozen=True)
class ClusterResources:
    """What the engine reads from Ray: total CPUs, GPUs and ``memory`` (bytes) over all nodes."""

    cpus: float
    gpus: float = 0.0
    memory: int = 0

    def describe(self) -> str:
        gpus = f", {self.gpus:g} GPU{'' if self.gpus == 1 else 's'}" if self.gpus else ""
        return f"{self.cpus:g} CPUs{gpus}, {self.memory / GIB:.1f} GiB"


@dataclass(frozen=True)
class PoolPlan:
    """The actor pool: ``actors`` workers each reserving ``cpus``, ``gpus`` and ``memory`` (bytes)."""

    actors: int
    cpus: float
    gpus: float
    memory: int
    reason: str

    def to_dict(self) -> dict[str, float | int | str]:
        return {"actors": self.actors, "cpus_per_actor": self.cpus, "gpus_per_actor": self.gpus,
                "memory_per_actor_mb": self.memory // 2**20, "reason": self.reason}


def choose_pool(res: ClusterResources) -> PoolPlan:
    """The actor pool for a cluster, and why."""
    spare = res.cpus - 1 if res.cpus > RESERVE_DRIVER_ABOVE else res.cpus
    spare_note = "one core kept for the driver" if spare < res.cpus else "the driver shares the cores"
    by_memory = int(res.memory // ACTOR_MEMORY) if res.memory else None  # 0: not reported, no cap
    if res.gpus >= 1:
        # One actor per whole GPU (both models fit one device many times over), each with at least a core.
        actors = min(int(res.gpus), max(1, math.floor(spare)))
        cpus = float(max(1, min(CPUS_PER_GPU_ACTOR, math.floor(spare / actors))))
        why = f"one actor per GPU, {_cores(cpus)} each to read and decode ahead ({spare_note})"
        gpus = 1.0
    else:
        cpus = float(min(CPU_THREADS_PER_ACTOR, max(1, math.floor(spare))))
        actors = max(1, math.floor(spare / cpus))
        why = f"{_cores(cpus)} per actor for torch's threads ({spare_note})"
        gpus = 0.0
    if by_memory is not None and by_memory < actors:
        if by_memory < 1:
            why += f"; memory holds less than one actor's {ACTOR_MEMORY / GIB:g} GiB, one runs anyway"
            actors = 1
        else:
            why += f"; capped by memory at {ACTOR_MEMORY / GIB:g} GiB an actor"
            actors = by_memory
    memory = min(ACTOR_MEMORY, res.memory) if res.memory else ACTOR_MEMORY
    return PoolPlan(actors, cpus, gpus, memory, f"{res.describe()}: {actors} actor{'' if actors == 1 else 's'}, {why}")


def _cores(n: float) -> str:
    return f"{n:g} core{'' if n == 1 else 's'}"


def choose_shard_size(files: int, actors: int, batch: int, requested: int = 0) -> tuple[int, str]:
    """Files per shard, and why: a multiple of the detector's batch (so the model stage sees the same batches as
    a single-machine ingest), about ``SHARDS_PER_ACTOR`` shards per actor, at most ``MAX_SHARD_FILES``."""
    if requested > 0:
        return requested, "set by --shard-size"
    batch = max(1, batch)
    per_shard = math.ceil(files / max(1, actors * SHARDS_PER_ACTOR))
    size = max(1, math.ceil(per_shard / batch)) * batch
    cap = max(batch, MAX_SHARD_FILES // batch * batch)
    if size > cap:
        return cap, f"{cap} (the cap: a multiple of the batch of {batch} up to {MAX_SHARD_FILES} files)"
    return size, (f"{size}: {SHARDS_PER_ACTOR} shards per actor over {files} files, rounded up to a multiple of "
                  f"the batch of {batch}")
