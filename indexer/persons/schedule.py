"""When the daemon reclusters, and which kind: a local recluster for what changed, a full one when the index grew.

- **local** (persons/local.py) when ``cluster.local_recluster_faces`` faces arrived since a recluster last saw them,
  or ``cluster.recluster_interval_s`` passed since the last recluster of either kind with any such face;
- **full** (persons/recluster.py) when the index grew by ``cluster.recluster_growth`` since the last full one (the
  global structure a local recluster cannot see: its cost is amortised over that growth), and for K-Means, which
  has no local form, when the interval passed.

The first clustering is the user's call (``faceindex cluster``: method and k are theirs); before it, nothing runs.
Both kinds compute off the main loop, in a thread, on a snapshot read between two batches, and are applied between
two later batches; faces committed meanwhile are handled by the apply step (full) or stay fresh (local).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from indexer.config import ClusterSettings
from indexer.persons.assign import Search
from indexer.persons.local import Scope, apply_local, compute_local, scope
from indexer.persons.recluster import Computed, apply, compute, snapshot
from indexer.persons.state import LOCAL_KEY, load_clustering
from indexer.store.lmdb_store import FaceStore

log = logging.getLogger("faceindex.cluster")


def due(store: FaceStore, settings: ClusterSettings, n_faces: int) -> bool:
    """A full recluster is due: the index grew by ``recluster_growth`` since the last one (or, for K-Means, the
    interval passed with new faces). Reads two meta records, no center."""
    meta = store.get_meta("clustering", None)
    if meta is None:
        return False
    grown = n_faces - meta.get("n_faces", 0)
    if grown <= 0:
        return False
    if grown >= settings.recluster_growth * max(meta.get("n_faces", 0), 1):
        return True
    return meta["method"] == "kmeans" and time.time() - meta.get("created", 0.0) >= settings.recluster_interval_s


def local_due(store: FaceStore, settings: ClusterSettings) -> bool:
    """A local recluster is due: enough fresh faces, or the interval passed with some."""
    with store.read() as txn:
        meta = store.get_meta("clustering", None, txn)
        if meta is None or meta["method"] == "kmeans":
            return False
        fresh = store.fresh_count(txn)
        last = max(meta.get("created", 0.0), (store.get_meta(LOCAL_KEY, None, txn) or {}).get("time", 0.0))
    return fresh >= settings.local_recluster_faces or (fresh > 0 and
                                                        time.time() - last >= settings.recluster_interval_s)


class BackgroundRecluster:
    """The daemon's reclustering: when due, computes in a thread; applies it between two batches.

    ``poll()`` is called by the daemon's loop between batches (cheap: one check per 2 s); ``poll(wait=True)``
    starts a due recluster and waits for it (``watch --once``). ``on_applied`` runs after a result is written
    (the daemon catches its vector index up). ``search``: the daemon's FAISS index (for the local scope).
    """

    CHECK_EVERY_S = 2.0

    def __init__(self, store: FaceStore, settings: ClusterSettings, search: Callable[[], Search | None] = lambda: None,
                 on_applied: Callable[[], None] = lambda: None) -> None:
        self.store, self.settings, self.search, self.on_applied = store, settings, search, on_applied
        self.job: ReclusterJob | None = None
        self.checked = 0.0

    def poll(self, wait: bool = False) -> None:
        if self.job is None and not self._start_if_due(wait):
            return
        if wait:
            self.job.join()
        if self.job.is_alive():
            return
        job, self.job = self.job, None
        if job.error is not None:
            log.warning("recluster failed: %s", job.error)
            return
        if job.computed is None:
            return
        if job.scope is not None:
            done = apply_local(self.store, job.scope, job.computed, self.settings)
            log.info("local recluster: %d fresh faces, %d in scope, %d clusters, %d faces re-derived in %.1f s",
                     done["fresh"], done["faces"], done["clusters"], done["rederived"], job.computed.seconds)
        else:
            result = apply(self.store, job.computed, self.settings)
            log.info("reclustered %s: k=%d over %d faces in %.1f s", result.method, len(result.ids), result.n_faces,
                     job.computed.seconds)
        self.on_applied()

    def _start_if_due(self, wait: bool) -> bool:
        now = time.monotonic()
        if not wait and now - self.checked < self.CHECK_EVERY_S:
            return False
        self.checked = now
        if due(self.store, self.settings, self.store.face_count()):
            self.job = ReclusterJob(self.store, self.settings)
        elif local_due(self.store, self.settings):
            found = scope(self.store, self.settings, self.search())
            if found is None:
                return False
            self.job = ReclusterJob(self.store, self.settings, found)
        else:
            return False
        self.job.start()
        return True


class ReclusterJob(threading.Thread):
    """Computes a recluster off the main loop (daemon thread: never delays shutdown): a full one over a snapshot
    of the store, or a local one over ``found``."""

    def __init__(self, store: FaceStore, settings: ClusterSettings, found: Scope | None = None) -> None:
        super().__init__(name="recluster", daemon=True)
        self.settings, self.scope = settings, found
        self.previous = load_clustering(store) if found is None else None
        self.ids, self.x = snapshot(store) if found is None else (found.face_ids, found.x)
        self.computed: Computed | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            if self.scope is not None:
                self.computed = compute_local(self.scope, self.settings)
                return
            prev = self.previous
            k = len(prev.ids) if prev.method == "kmeans" else None
            self.computed = compute(self.ids, self.x, self.settings, method=prev.method, k=k,
                                    threshold=prev.params.get("threshold"), previous=prev)
        except Exception as exc:  # reported by the main loop; the daemon keeps indexing
            self.error = exc

