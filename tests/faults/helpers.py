"""What the fault tests share: running the real CLI (as an unprivileged user where the machine allows), watching a
child's stderr for a line, and public scratch folders another user can enter."""

from __future__ import annotations

import os
import pwd
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import REPO

HANG_S = 300  # a child that has not done its part by then is hung: fail instead of waiting forever


class Child:
    """A ``faceindex`` subprocess whose stderr is read line by line in a thread (so ``expect`` can wait for one)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "indexer", *args], cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.stderr.append(line)
            self.lines.put(line)

    def expect(self, text: str, timeout: float = HANG_S) -> str:
        """Wait for a stderr line containing ``text``; fail if the child exits or hangs first."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {text!r} on stderr within {timeout} s:\n{''.join(self.stderr)}") from None
            if text in line:
                return line

    def wait(self, timeout: float = HANG_S) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the process did not exit within {timeout} s:\n{''.join(self.stderr)}") from None
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def public_tmp() -> Iterator[Path]:
    """A scratch folder any user can enter (pytest's tmp_path is root-only when tests run as root)."""
    path = Path(tempfile.mkdtemp(prefix="faceindex-faults-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for folder, dirs, _ in os.walk(path):  # undo the corpus's mode-000 folders so they can be removed
            for d in dirs:
                p = os.path.join(folder, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o755)
        shutil.rmtree(path, ignore_errors=True)


class Runner:
    """Runs the CLI as an unprivileged user: ``nobody`` through setpriv when we are root, else as ourselves.

    ``is_root`` says whether the runs still have root's powers (permission bits then mean nothing)."""

    def __init__(self, scratch: Path) -> None:
        self.prefix: list[str] = []
        self.env: dict[str, str] = {}
        self.uid = os.geteuid()
        self.why_root = ""
        if self.uid == 0:
            self._drop_root(scratch)
        self.is_root = self.uid == 0

    def _drop_root(self, scratch: Path) -> None:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            self.why_root = "setpriv is not installed"
            return
        nobody = pwd.getpwnam("nobody")
        prefix = [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "--"]
        probe = subprocess.run([*prefix, sys.executable, "-c", "import indexer"], cwd=REPO, capture_output=True)
        if probe.returncode != 0:
            self.why_root = f"nobody cannot run this checkout's python: {probe.stderr.decode()[-200:]}"
            return
        from indexer.models.weights import cache_dir

        # nobody has no home and cannot read root's cache: give it a home and a copy of the converted weights.
        home = scratch / "home"
        cache = home / "faceindex-cache"
        cache.mkdir(parents=True)
        for f in cache_dir().glob("casia-webface.*"):
            shutil.copy(f, cache / f.name)
            (cache / f.name).chmod(0o644)
        for folder, _, _ in os.walk(home):
            os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        self.prefix, self.uid = prefix, nobody.pw_uid
        self.env = {"HOME": str(home), "FACEINDEX_CACHE": str(cache), "MPLCONFIGDIR": str(home / "mpl"),
                    "TORCH_HOME": str(home / "torch")}

    def own(self, path: Path) -> Path:
        """Create ``path`` (a folder) owned by the user the runs use."""
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, self.uid, -1)
        return path

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, sys.executable, "-m", "indexer", *args], cwd=REPO, capture_output=True,
                              env={**os.environ, **self.env, **(env or {})}, timeout=timeout)
