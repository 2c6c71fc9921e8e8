"""Shared fixtures: real models (loaded once), the bundled sample photos, LFW when present, a CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from benchmarks.lfw_data import data_root

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
SKIP_LFW = "LFW not found: set FACEINDEX_DATA or put shared/data beside the checkout (CI has it)"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if root is None:
        pytest.skip(SKIP_LFW)
    return root


@pytest.fixture(scope="session")
def detector():
    from indexer.models.detector import FaceDetector

    return FaceDetector()


@pytest.fixture(scope="session")
def embedder():
    from indexer.models.embedder import FaceEmbedder

    return FaceEmbedder()


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Like watchdog's test suite: a test that leaves threads running fails."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    assert not leaked, f"test leaked threads: {leaked}"


def settings_for(index_dir: Path, **sections):
    """Built-in settings with an index folder and some section overrides: settings_for(d, ingest={...})."""
    from indexer.config import Settings, with_overrides

    s = Settings(index_dir=str(index_dir))
    for section, values in sections.items():
        s = with_overrides(s, section, **values)
    return s


def cli(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `faceindex` entry point in a subprocess (as a user would)."""
    cmd = [sys.executable, "-m", "indexer", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout,
                          cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(*args: str):
    return json.loads(cli(*args, "--json").stdout)


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory) -> Path:
    """The bundled samples ingested once; tests that change an index copy it first (see copy_index)."""
    index = tmp_path_factory.mktemp("sample-index") / "index"
    cli("ingest", "--index", str(index), str(SAMPLES))
    return index


@pytest.fixture
def copy_index(sample_index, tmp_path) -> Path:
    target = tmp_path / "index"
    shutil.copytree(sample_index, target)
    return target
