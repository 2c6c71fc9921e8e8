"""The single writer: merges shards into the store and the FAISS index, each exactly once.

One LMDB write transaction per shard commits its files and faces together with the shard's id (a ``meta`` key
``shard:<run>:<name>``); a shard whose id is there is skipped. So a writer killed anywhere (``kill -9`` mid-merge
included) leaves each shard wholly merged or not at all, and the next run merges what is left: nothing twice,
nothing lost. Shards are deleted once merged, run folders once empty, then their ids.

A shard says what a worker saw; what a file is to the store is decided here, again, in the merging transaction,
by the same ``classify_stored`` the local path uses (a worker has no store): a file whose bytes the store already
holds is unchanged (its stat is refreshed), a byte-identical copy of an indexed file reuses its faces, a file whose
twin has gone keeps the twin's face ids (a move); only new and changed files take the worker's faces. A file that
changed on disk since the worker read it is left out (this run's scan sends it again).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from indexer.persons.assign import Plan
from indexer.pipeline import shards
from indexer.pipeline.commit import Committer
from indexer.pipeline.records import FaceItem, classify_stored
from indexer.pipeline.runner import IngestSummary, Pipeline, plan_faces

log = logging.getLogger("faceindex.ray")

SHARD_PREFIX = "shard:"
SHARD_KEY = SHARD_PREFIX + "{run}:{name}"


class ShardMerger:
    """Merges shard files into the pipeline's store and index, counting into ``summary``."""

    def __init__(self, pipeline: Pipeline, summary: IngestSummary,
                 fingerprint: Callable[[str], str] = lambda weights: weights) -> None:
        self.pipeline = pipeline
        self.fingerprint = fingerprint  # a shard's weights fingerprint -> what the index records for its vectors
        self.store = pipeline.store
        self.summary = summary
        self.merged = 0    # shards merged by this writer
        self.skipped = 0   # shards found already merged (a run killed between commit and delete)

    def merge(self, path: Path, on_files: Callable[[int], None] | None = None) -> None:
        """Merge one shard file (unless its id is in the store) and delete it."""
        run = path.parent.name
        try:
            shard = shards.read_shard(path)
        except (OSError, ValueError, KeyError) as exc:  # pyarrow's errors derive from these
            log.warning("shard %s cannot be read (%s); deleted: its files are sent again by the next scan",
                        path, exc)
            path.unlink(missing_ok=True)
            return
        key = SHARD_KEY.format(run=run, name=shard.name)
        items = [fi for fi in shard.items if _still_as_read(fi)]
        dropped = len(shard.items) - len(items)
        if dropped:
            log.info("%s: %d files changed since they were read; left for the scan", shard.name, dropped)
        plan = plan_faces(self.pipeline.assigner, items)
        counts, failures = self.store.transact(self._merge, key, items, self.fingerprint(shard.model), plan)
        if counts is None:
            self.skipped += 1
        else:
            self.merged += 1
            self.summary.files += len(items)
            for name, value in counts.items():
                setattr(self.summary, name, getattr(self.summary, name) + value)
            self.summary.failures.extend(failures)
        self.pipeline.index.catch_up()
        self.pipeline.index.save()
        path.unlink(missing_ok=True)
        if on_files is not None:
            on_files(len(shard.items))

    def _merge(self, txn, key: str, items: list[FaceItem], model: str, plan: Plan | None = None
               ) -> tuple[Counter | None, list]:
        """In the shard's one transaction: its files, their faces and its id, or nothing if already merged."""
        if self.store.get_meta(key, txn=txn) is not None:
            return None, []
        if plan is not None:
            plan.settle(self.store, txn)
        committer = Committer(self.store, lambda: model)
        counts: Counter = Counter()
        failures: list[dict[str, str]] = []
        for fi in items:
            # One at a time: a file committed here is a twin the next one of this shard may copy.
            got, failed, _again = committer(txn, [_reclassified(self.store, txn, fi)])
            counts.update(got)
            failures += failed
        self.store.put_meta(txn, key, {"files": len(items), "faces": counts["faces"]})
        return counts, failures

    def resume(self, staging: Path, on_files: Callable[[int], None] | None = None) -> int:
        """Merge the shards earlier runs of this index left in ``staging``; returns how many were there."""
        found = 0
        for folder in shards.runs_for(staging, self.store.index_dir):
            pending = shards.shard_files(folder)
            found += len(pending)
            if pending:
                log.warning("resuming run %s: %d shards left unmerged", folder.name, len(pending))
            for path in pending:
                if self.pipeline.stop.is_set():
                    return found
                self.merge(path, on_files)
            self.finish(folder)
        return found

    def finish(self, folder: Path) -> None:
        """A run whose shards are all merged: delete its folder, then its shard ids (a crash between the two
        leaves a few ids no run will ask for again: run ids are never reused)."""
        if shards.shard_files(folder):
            return  # stopped before all were merged: the next run resumes them
        shards.remove_run(folder)
        self.store.transact(self.store.delete_meta_prefix, SHARD_KEY.format(run=folder.name, name=""))


def _reclassified(store, txn, fi: FaceItem) -> FaceItem:
    """The worker's item as the store sees it now (a worker reads without a store: it sends every file as new)."""
    item = fi.read
    if item.error is not None or not item.verdict.needs_faces:
        return fi  # failed: recorded as it is; a copy found inside the batch: the committer decides it
    verdict, source = classify_stored(store, txn, item)
    if verdict.needs_faces:
        return FaceItem(replace(item, verdict=verdict), fi.faces)
    return FaceItem(replace(item, verdict=verdict, source=source), [])


def _still_as_read(fi: FaceItem) -> bool:
    """A failed file is recorded as it was; a read one only while its stat is the one the worker read."""
    if fi.read.error is not None:
        return True
    try:
        st = os.stat(fi.read.path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (fi.read.size, fi.read.mtime_ns)

