"""`faceindex serve` for tests: the real command in a subprocess on 127.0.0.1 and a free port, found through the
serve.json it writes; stopped with SIGTERM, after which it must exit 0 and withdraw serve.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120  # the server binds before it loads models, but its imports share a busy machine


@contextmanager
def running_server(index: Path, *args: str, log_dir: Path) -> Iterator[dict]:
    """Yields serve.json's content (pid, host, port, url) once the server listens."""
    serve_file = index / "serve.json"
    serve_file.unlink(missing_ok=True)
    log = open(log_dir / "serve.log", "w+b")  # a file, not a pipe: a chatty server never blocks on it
    proc = subprocess.Popen([sys.executable, "-m", "indexer", "serve", "--index", str(index), "--port", "0", *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        info = _wait_for_announcement(proc, serve_file, log)
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("faceindex serve did not stop within 60 s of SIGTERM") from None
        finally:
            log.close()
    assert rc == 0, f"faceindex serve exited {rc}:\n{(log_dir / 'serve.log').read_text(errors='replace')}"
    assert not serve_file.exists(), "serve.json outlived the server"


def _wait_for_announcement(proc: subprocess.Popen, serve_file: Path, log) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"faceindex serve exited {proc.returncode}:\n{log.read().decode(errors='replace')}")
        try:
            info = json.loads(serve_file.read_text())
            if info["pid"] == proc.pid:
                return info
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)  # polling a file the server writes once; no event to wait on across processes
    raise AssertionError(f"faceindex serve wrote no serve.json within {START_TIMEOUT_S} s")
