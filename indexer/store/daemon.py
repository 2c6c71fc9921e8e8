"""The watch daemon's status file (``<index>/daemon.json``): pid, backlog, last event; read by ``status``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from indexer.fsutil import atomic_write
from indexer.store import lock as lock_mod

DAEMON_FILE = "daemon.json"


def daemon_status(index_dir: str | Path) -> dict[str, Any]:
    """Whether a watch daemon holds the index now, its pid, backlog and last event (from its status file)."""
    holder = lock_mod.is_held(index_dir)
    try:
        info = json.loads((Path(index_dir) / DAEMON_FILE).read_text())
    except (OSError, ValueError):
        info = {}
    running = holder is not None and holder.get("command") == "watch"
    out = {"running": running, "pid": holder.get("pid") if running else None,
           "backlog": info.get("backlog", 0) if running else 0, "last_event": info.get("last_event")}
    if holder is not None and not running:
        out["writer"] = holder
    return out


def write_daemon_status(index_dir: str | Path, **info: Any) -> None:
    atomic_write(Path(index_dir) / DAEMON_FILE, json.dumps({**info, "updated": time.time()}))
