"""What ``status`` says of the FAISS snapshot, from its header alone: no FAISS import, no index read.

The snapshot (``vectors.faiss``, written by store/vectors.py) starts with its magic, the header's length and a JSON
header: the index kind chosen and why, how many vectors, and the store sequence number it reflects. When that
number is the store's and the model is the store's, the snapshot is the index a search would load, and its header
is what ``status`` needs (0.01 s, where loading the index took seconds at 100,000 faces). Otherwise (no snapshot,
a stale or damaged one, a kind re-ranked from the packed file, whose state status also reports) the caller loads
the index as a search would.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from indexer import fingerprint as fp
from indexer.store.choose import STORE_RERANK, IndexChoice, choose_index

MAGIC = b"FIDXV1\n"
LENGTH = struct.Struct("<Q")
# A header is a few hundred bytes of JSON; anything far larger means the length field itself is garbage.
MAX_HEADER_BYTES = 16 * 1024 * 1024


def read_header(path: Path) -> dict[str, Any] | None:
    """The snapshot's JSON header, or None when there is no readable one."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + LENGTH.size)
            if len(head) < len(MAGIC) + LENGTH.size or head[:len(MAGIC)] != MAGIC:
                return None
            (size,) = LENGTH.unpack_from(head, len(MAGIC))
            if size > MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def current_info(path: Path, store_seq: int, model: str | None, settings: Any,
                 budget: tuple[int | None, str]) -> dict[str, Any] | None:
    """``SyncedIndex.info()`` plus the sequence numbers, from the header of a snapshot that is current; else None.
    ``settings``: the index settings; ``budget``: (memory budget bytes, its reason)."""
    header = read_header(path)
    try:
        meta, choice, n, dim = header["meta"], IndexChoice(**header["choice"]), int(header["n"]), int(header["dim"])
    except (TypeError, KeyError, ValueError):
        return None
    if meta.get("seq") != store_seq or fp.normalised(meta.get("model")) != fp.normalised(model):
        return None
    if choice.key.endswith(STORE_RERANK) and choice.nlist > 0:
        return None  # re-ranked from the packed file: its state comes with the loaded index
    info = {"type": choice.key, "vectors": n, "reason": choice.reason, "nlist": choice.nlist,
            "nprobe": choice.nprobe, "refine": choice.refine}
    now = choose_index(n, dim, exact_max_vectors=settings.exact_max_vectors, target_recall=settings.target_recall,
                       memory_budget_bytes=budget[0])
    if now.key == choice.key:
        info["reason"] = now.reason
    return {**info, "memory_budget_mb": None if budget[0] is None else round(budget[0] / 2**20, 3),
            "memory_budget_reason": budget[1], "snapshot_seq": store_seq, "store_seq": store_seq}


def physical_memory() -> int | None:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit when lower (containers)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def status_info(path: Path, store_seq: int, model: str | None, settings: Any) -> dict[str, Any] | None:
    """``current_info`` with the memory budget of ``settings`` (the index settings) on this machine."""
    from indexer.store.choose import memory_budget

    budget = memory_budget(settings.memory_budget_mb, physical_memory())
    return current_info(path, store_seq, model, settings, budget)
