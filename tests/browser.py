"""Headless Chromium for tests: a screenshot and the rendered DOM of a local page, each in one bounded run.

CI installs the browser with ``apt-get install -y chromium`` (Debian's package, /usr/bin/chromium). Each call runs
Chromium in its own process group with a throwaway profile, and kills the whole group on timeout so no renderer or
zygote child outlives the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# No sandbox: CI runs as root, where Chromium refuses to start sandboxed. The rest keeps it off the network and
# quiet: no updates, no sync, no QUIC probes, no first-run pages.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--disable-dev-shm-usage")
# Virtual time lets the page finish loading its images before the screenshot or dump without a wall-clock wait.
VIRTUAL_TIME_MS = 5000


def chromium_path() -> str | None:
    """The browser's path, or None when it is not installed (tests skip with the install command)."""
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError(f"{CHROMIUM} not found; install it with: apt-get install -y chromium")
    profile = tempfile.mkdtemp(prefix="faceindex-chromium-")
    cmd = [exe, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={VIRTUAL_TIME_MS}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        # Helpers can linger after the browser process exits; the group is ours alone (start_new_session).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(profile, ignore_errors=True)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def screenshot(page: Path, out_png: Path, width: int = 1200, height: int = 2000, timeout: float = 90) -> Path:
    """Render ``page`` (a local file) and write a PNG of the first ``width`` x ``height`` pixels."""
    result = _run([f"--screenshot={out_png}", f"--window-size={width},{height}", Path(page).resolve().as_uri()],
                  timeout)
    if not out_png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (rc={result.returncode}): {result.stderr[-2000:]}")
    return out_png


def dump_dom(page: Path, timeout: float = 90) -> str:
    """The DOM of ``page`` after loading, serialised as HTML."""
    result = _run(["--dump-dom", Path(page).resolve().as_uri()], timeout)
    if result.returncode != 0 or "<html" not in result.stdout:
        raise RuntimeError(f"chromium --dump-dom failed (rc={result.returncode}): {result.stderr[-2000:]}")
    return result.stdout
