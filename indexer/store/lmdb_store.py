"""The LMDB store: the source of truth for files, faces, vectors, thumbnails, persons, the user's word and the log.

One environment (``<index>/store.lmdb``) with named databases; values are msgpack (records) or raw bytes
(float32 vectors, JPEG thumbnails) — no pickle. This module owns the environment, its transactions, the schema and
the meta table; each family of tables has its own module, a part of ``FaceStore``: faces.py (faces, vectors,
thumbnails, the change log), files.py, persons.py, word.py. Only indexer/store/ touches the tables.

Every batch is committed in ONE write transaction, so a crash
leaves either the whole batch or none of it. The map grows by itself when full.

The ``log`` database records, under a monotonically increasing sequence number, each face added to or removed from
the store. The FAISS index is derived data: its snapshot remembers the sequence number it reflects, and whoever opens
it replays the log from there (see indexer/store/sync.py), so a crash between "committed" and "indexed" loses
nothing and a reader never sees a stale answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from indexer import faults
from indexer import fingerprint as fp
from indexer.errors import IndexMismatchError, NotFoundError
from indexer.fsutil import private_dir
from indexer.store.faces import FaceTable
from indexer.store.files import COUNTS_KEY, FileTable, count_files
from indexer.store.mapguard import MapGuard, storage_error
from indexer.store.persons import BUILT_KEY, FRESH_TABLE, PERSON_TABLES, PersonTable
from indexer.store.records import pack, unpack
from indexer.store.word import WordTable

# 2: the user's word about persons (tables word, names, history) and each face's suggested person. A version 1
# index is read as it is and upgraded by the first writer (the new tables start empty).
# 3: files counted by status (meta file_counts) and the failed files in a table of their own (files.py), kept with
# every file record; the first writer of an older index counts it once. An older faceindex refuses a version 3
# index (it would not keep the counts).
# 4: the person tables (persons.py: members, vector sums, sizes, suggestions), kept with every face write; the first
# writer of an older index builds them once.
SCHEMA_VERSION = 4
READABLE_SCHEMAS = (1, 2, 3, 4)
STORE_DIR = "store.lmdb"
SNAPSHOT_FILE = "vectors.faiss"  # beside it: the FAISS snapshot (indexer/store/sync.py)
_DBS = ("meta", "files", "sha", "faces", "vectors", "thumbs", "log", "clusters", "word", "names", "history",
        "failed", *PERSON_TABLES, FRESH_TABLE)
# absent from an older index until a writer opens it
_OPTIONAL = ("word", "names", "history", "failed", *PERSON_TABLES, FRESH_TABLE)
_INITIAL_MAP = 1 << 30      # 1 GiB; sparse on Linux, doubled whenever a transaction fills it


def store_exists(index_dir: str | Path) -> bool:
    return (Path(index_dir) / STORE_DIR / "data.mdb").is_file()


class FaceStore(FaceTable, FileTable, PersonTable, WordTable):
    """LMDB environment of one index. ``readonly`` opens for queries from other processes."""

    def __init__(self, index_dir: str | Path, readonly: bool = False) -> None:
        self.index_dir = Path(index_dir)
        path = self.index_dir / STORE_DIR
        if readonly and not store_exists(self.index_dir):
            raise NotFoundError(f"no index at {self.index_dir}; run `faceindex ingest PATH --index {self.index_dir}`")
        self.readonly = readonly
        self._guard = MapGuard()
        try:  # mode 0o700: the folder owner-only, data.mdb and lock.mdb 0600 (SECURITY.md)
            private_dir(self.index_dir)
            self.env = lmdb.open(str(path), map_size=_INITIAL_MAP, max_dbs=len(_DBS), readonly=readonly, lock=True,
                                 readahead=False, meminit=False, mode=0o700)
        except (OSError, lmdb.Error) as exc:
            raise storage_error(self.index_dir, "open the index", exc) from None
        self.db = {name: self.env.open_db(name.encode(), create=True) for name in _DBS} if not readonly \
            else {name: db for name in _DBS if (db := self._open_existing(name)) is not None}
        self._check_schema()

    def _check_schema(self) -> None:
        """Refuse an index of a newer faceindex; upgrade a readable older one when opened for writing."""
        version = self.get_meta("schema")
        if version is not None and version not in READABLE_SCHEMAS:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise IndexMismatchError(
                f"index {self.index_dir} has schema version {version}, this faceindex reads up to "
                f"{SCHEMA_VERSION}; " + ("upgrade faceindex to open it" if newer else "re-ingest into a new --index"))
        if not self.readonly and version != SCHEMA_VERSION:
            def upgrade(txn: lmdb.Transaction) -> None:
                if version is None:
                    txn.put(b"created", pack(time.time()), db=self.db["meta"])
                if self.get_meta(COUNTS_KEY, None, txn) is None:
                    count_files(self, txn)  # once: every file record of an older index (seconds per 100k)
                if not self.get_meta(BUILT_KEY, False, txn):
                    self.build_person_tables(txn)  # once: every face of an older index
                txn.put(b"schema", pack(SCHEMA_VERSION), db=self.db["meta"])

            self.transact(upgrade)

    def _open_existing(self, name: str):
        try:
            return self.env.open_db(name.encode(), create=False)
        except lmdb.NotFoundError:
            if name in _OPTIONAL:
                return None
            raise NotFoundError(f"{self.index_dir} is not a faceindex index (no '{name}' table)") from None

    def has_table(self, name: str) -> bool:
        """False only for a table a version 1 index opened read-only does not have yet (read it as empty)."""
        return name in self.db

    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def read(self, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """A read transaction; ``buffers``: values are memoryviews into the map, valid inside it (no copy made)."""
        for retry in (False, True):
            with self._guard.reading():  # no remap of the map while this transaction reads it (mapguard.py)
                try:
                    txn = self.env.begin(write=False, buffers=buffers)
                except lmdb.MapResizedError:
                    if retry:
                        raise
                else:
                    try:
                        yield txn
                    finally:
                        txn.abort()
                    return
            self._guard.remap(lambda: self.env.set_mapsize(0))  # another process grew the map: adopt its size

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """One write transaction; commits on success, aborts on any exception. A failed commit (disk full, read-only)
        is a StorageError: LMDB keeps the last committed state, nothing of this transaction is half-written."""
        try:
            txn = self.env.begin(write=True)
        except lmdb.MapResizedError:
            self._guard.remap(lambda: self.env.set_mapsize(0))
            txn = self.env.begin(write=True)
        try:
            yield txn
        except BaseException:
            txn.abort()
            raise
        faults.reached("commit")  # tests/faults: a crash with the transaction written but not committed
        try:
            txn.commit()
        except lmdb.MapFullError:
            raise
        except lmdb.Error as exc:
            raise storage_error(self.index_dir, "commit to", exc) from None

    def _get(self, db: str, key: bytes, txn: lmdb.Transaction | None) -> bytes | None:
        """One value, in the caller's transaction or a short read transaction of its own (values are copies)."""
        if txn is not None:
            return txn.get(key, db=self.db[db])
        with self.read() as t:
            return t.get(key, db=self.db[db])

    def transact(self, fn, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(txn, ...)`` in one write transaction, growing the map and retrying when it is full."""
        while True:
            try:
                with self.write() as txn:
                    return fn(txn, *args, **kwargs)
            except lmdb.MapFullError:
                self._guard.remap(lambda: self.env.set_mapsize(self.env.info()["map_size"] * 2))

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str, default: Any = None, txn: lmdb.Transaction | None = None) -> Any:
        raw = self._get("meta", key.encode(), txn)
        return default if raw is None else unpack(raw)

    def put_meta(self, txn: lmdb.Transaction, key: str, value: Any) -> None:
        txn.put(key.encode(), pack(value), db=self.db["meta"])

    def delete_meta(self, txn: lmdb.Transaction, key: str) -> None:
        txn.delete(key.encode(), db=self.db["meta"])

    def delete_meta_prefix(self, txn: lmdb.Transaction, prefix: str) -> None:
        """Delete every meta key that starts with ``prefix``."""
        raw = prefix.encode()
        cursor = txn.cursor(db=self.db["meta"])
        if cursor.set_range(raw):
            while cursor.key().startswith(raw):
                if not cursor.delete():
                    break

    def check_model(self, fingerprint: str, txn: lmdb.Transaction) -> None:
        """Record the model (weights and preprocessing: indexer/fingerprint.py) on first use; refuse vectors made
        differently afterwards, and any while a rebuild is unfinished."""
        pending = self.get_meta(fp.REBUILD_KEY, txn=txn)
        if pending is not None:
            raise fp.interrupted(self.index_dir, pending)
        current = fp.normalised(self.get_meta("model", txn=txn))
        if current is not None and current != fingerprint:
            raise fp.mismatch(self.index_dir, current, fingerprint)
        if self.get_meta("model", txn=txn) != fingerprint:  # first use, or a pre-issue-11 record made explicit
            self.put_meta(txn, "model", fingerprint)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.index_dir.rglob("*") if p.is_file())
