"""Named fault points for the fault-injection tests (tests/faults/); inert unless ``$FACEINDEX_FAULT`` is set.

``FACEINDEX_FAULT="ACTION@POINT:N[,...]"`` makes the process do ACTION the N-th time (1-based) any thread reaches
POINT. Actions: ``kill`` (SIGKILL itself: a crash at exactly that moment) and ``stall`` (block that thread forever:
a read from a dead network mount, a hung disk). Points:

- ``commit``   every LMDB write transaction, after its writes, just before ``txn.commit()`` (FaceStore.write)
- ``snapshot`` the FAISS snapshot, written to its temp file but not yet renamed over the old one (VectorIndex.save)
- ``recluster`` a recluster's result, inside its transaction, before it commits (persons/recluster.apply)
- ``local-recluster`` a local recluster's new suggestions, inside its transaction, before the word is applied
  (persons/local.apply_local)
- ``read``     a reader thread, with the file open, before its first ``read()`` (pipeline/read.py)

The variable is read once, at import. Unset (every real run) ``reached`` is one falsy check. A process that stalls
or is about to kill itself says so on stderr first, so a test knows the fault was hit.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "FACEINDEX_FAULT"
ACTIONS = ("kill", "stall")
POINTS = ("commit", "snapshot", "recluster", "local-recluster", "read")


def parse(spec: str) -> dict[str, tuple[str, int]]:
    """``"kill@commit:3,stall@read:1"`` -> {"commit": ("kill", 3), "read": ("stall", 1)}; bad entries are errors."""
    plan: dict[str, tuple[str, int]] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        action, _, rest = entry.partition("@")
        point, _, nth = rest.partition(":")
        if action not in ACTIONS or point not in POINTS or not nth.isdigit() or int(nth) < 1:
            raise ValueError(f"{ENV}: cannot parse {entry!r}; expected ACTION@POINT:N with ACTION in {ACTIONS}, "
                             f"POINT in {POINTS}, N >= 1")
        plan[point] = (action, int(nth))
    return plan


_plan = parse(os.environ.get(ENV, ""))
_counts: dict[str, int] = {}
_lock = threading.Lock()


def reached(point: str) -> None:
    """A fault point: does nothing unless ``$FACEINDEX_FAULT`` names ``point`` and this is its N-th visit."""
    if not _plan or point not in _plan:
        return
    action, nth = _plan[point]
    with _lock:
        _counts[point] = _counts.get(point, 0) + 1
        hit = _counts[point] == nth
    if not hit:
        return
    os.write(2, f"faceindex: fault injected: {action} at {point} #{nth} (pid {os.getpid()})\n".encode())
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Event().wait()  # stall: this thread never comes back
