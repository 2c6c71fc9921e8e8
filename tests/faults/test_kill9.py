"""kill -9 at random points of ingest, the daemon and reclustering; after each, a restart and the oracle.

Each trial starts from the same baseline (photos ingested, clustered, the largest person named "Ada"), changes the
folder (new photos, overwrites, renames, and for the daemon deletes and a renamed folder), runs one process and
kills it: at the N-th visit of a named point (``FACEINDEX_FAULT=kill@POINT:N``: just before an LMDB commit, with
the FAISS snapshot written but not renamed, inside the recluster's transaction) or from outside after a random
delay. Then the restart a user would run (``ingest`` again, or ``watch --once``) and tests/faults/oracle.py.
Seeded: trial i draws its changes and its N or delay from random.Random(SEED + i), so a failure reruns the same.

LFW (../shared/data or $FACEINDEX_DATA) gives 30 small photos of 10 people; without it the bundled samples do.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.lfw_data import data_root
from indexer.config import load_settings
from indexer.library import FaceIndex, OpenMode
from indexer.store.daemon import daemon_status
from indexer.store.lmdb_store import FaceStore
from tests.conftest import SAMPLES, cli, cli_json
from tests.faults import oracle
from tests.faults.helpers import Child

SEED = 20261129
CONFIG = """
[detector]
batch_size = 4          # more batches: more commits to die in
[watch]
settle_s = 0.3
batch_size = 4
[index]
snapshot_every = 1      # a snapshot after every batch: more snapshots to die in
[cluster]
recluster_growth = 0.1  # the daemon reclusters once the index grew by a tenth
"""


@dataclass(frozen=True)
class Trial:
    process: str   # ingest | watch | cluster | edit | local (`cluster --local` after an ingest of new photos)
    fault: str     # commit | snapshot | recluster | local-recluster | outside


# 35 trials: where a process can die, each several times with different changes and moments.
TRIALS = ([Trial("ingest", "commit")] * 6 + [Trial("ingest", "snapshot")] * 4 + [Trial("ingest", "outside")] * 4
          + [Trial("watch", "commit")] * 5 + [Trial("watch", "snapshot")] * 3 + [Trial("watch", "outside")] * 4
          + [Trial("watch", "recluster")] * 2
          + [Trial("cluster", "recluster")] * 2 + [Trial("cluster", "commit")] * 1 + [Trial("cluster", "outside")] * 1
          + [Trial("edit", "commit")] * 1 + [Trial("local", "local-recluster")] * 1 + [Trial("local", "outside")] * 1)
FAST = {0}  # `make test` runs this one (ingest dying just before a commit); `make test-faults` all 35


class Lab:
    """The pool of photos, the clean reference, and the baseline every trial starts from. The clean runs and the
    restarts go through the library in this process (the session's models: no model load per run); only the
    process that is killed is a real CLI process."""

    def __init__(self, root: Path, detector, embedder) -> None:
        self.root, self.models = root, {"detector": detector, "embedder": embedder}
        self.pool = root / "pool"
        self.work = root / "work"
        self.photos, self.index = self.work / "photos", self.work / "index"
        self.config = root / "config.toml"
        self.config.write_text(CONFIG)
        self._fill_pool()
        reference = root / "reference"
        self.run("ingest", reference, self.pool)
        self.truth = oracle.reference(reference)
        self.sources = sorted(p for p in self.pool.rglob("*.jpg"))
        self._baseline()

    def _fill_pool(self) -> None:
        lfw = data_root()
        if lfw is not None:
            people = [p for p in sorted(os.listdir(lfw / "lfw-devtrain"))
                      if len(os.listdir(lfw / "lfw-devtrain" / p)) >= 3][:10]
            for person in people:
                (self.pool / person).mkdir(parents=True)
                for name in sorted(os.listdir(lfw / "lfw-devtrain" / person))[:3]:
                    shutil.copy(lfw / "lfw-devtrain" / person / name, self.pool / person / name)
        else:
            shutil.copytree(SAMPLES, self.pool)

    def _baseline(self) -> None:
        """Half the pool ingested, clustered, and its largest person named: restored before every trial."""
        half = self.sources[: len(self.sources) // 2]
        for src in half:
            dest = self.photos / src.relative_to(self.pool)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
        self.run("ingest", self.index, self.photos)
        cli("cluster", "--index", str(self.index), "--config", str(self.config))
        largest = max(cli_json("people", "list", "--index", str(self.index)), key=lambda r: (r["size"], -r["id"]))
        cli("people", "name", str(largest["id"]), "Ada", "--index", str(self.index))
        self.names = {largest["id"]: "Ada"}
        self._more_edits(largest["id"])
        self.word = oracle.users_word(self.index)
        said = self.word.values()
        assert any(w.person is not None for w in said) and any(w.ignored for w in said) \
            and any(w.not_persons for w in said), "the baseline lacks a kind of edit the trials should check"
        shutil.copytree(self.work, self.root / "baseline", symlinks=True)

    def _more_edits(self, ada: int) -> None:
        """Every other kind of edit, so the trials check them all: a merge, a move, a remove and an ignore."""
        index = ["--index", str(self.index)]
        others = [r["id"] for r in sorted(cli_json("people", "list", *index), key=lambda r: (-r["size"], r["id"]))
                  if r["id"] != ada]
        assert len(others) >= 4, f"the baseline needs 5 persons for every kind of edit, it has {len(others) + 1}"
        cli("people", "merge", str(others[0]), str(others[1]), *index)
        self.edit = ["people", "merge", str(ada), str(others[2])]  # the edit trial's: Ada takes a whole person

        def faces(person: int) -> list[int]:
            return [f["face_id"] for f in cli_json("people", "show", str(person), *index)["faces"]]

        cli("people", "move", str(faces(others[2])[0]), "--to", str(ada), *index)
        cli("people", "remove", str(ada), str(faces(ada)[-1]), *index)
        cli("people", "ignore", str(faces(others[3])[0]), *index)

    def run(self, command: str, index: Path, folder: Path) -> None:
        """``faceindex ingest`` or ``watch --once`` as a fresh open of the index, in this process."""
        settings = load_settings(self.config, index)
        with FaceIndex(settings, OpenMode.WRITE, command=command, **self.models) as fi:
            fi.ingest([folder], progress=False) if command == "ingest" else fi.watch(folder, once=True)

    def restore(self) -> None:
        shutil.rmtree(self.work)
        shutil.copytree(self.root / "baseline", self.work, symlinks=True)

    def change(self, rng: random.Random, deletes: bool) -> None:
        """New photos, overwrites with other photos, renames; with ``deletes`` also deletions and a renamed
        folder (the one-shot ingest never removes a record, by design: only the daemon and --once do)."""
        present = sorted(self.photos.rglob("*.jpg"))
        new = [s for s in self.sources if not (self.photos / s.relative_to(self.pool)).exists()]
        for src in rng.sample(new, min(len(new), rng.randint(4, 10))):
            dest = self.photos / "new" / f"{rng.randrange(10**6)}_{src.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest)
        overwritten = rng.sample(present, 2)
        for victim in overwritten:
            shutil.copy(rng.choice(self.sources), victim)  # overwritten with another photo (or the same bytes)
        # Renamed: files not overwritten (one overwritten and then renamed is a new file and a deleted one, and the
        # one-shot ingest keeps records of deleted files by design).
        for victim in rng.sample([p for p in present if p not in overwritten], 2):
            victim.rename(victim.with_name("renamed_" + victim.name))
        if deletes:
            for victim in rng.sample(sorted(self.photos.rglob("*.jpg")), 2):
                victim.unlink()
            folders = sorted(p for p in self.photos.iterdir() if p.is_dir() and p.name != "new")
            if folders:
                folder = rng.choice(folders)
                folder.rename(folder.with_name(folder.name + "_moved"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory, detector, embedder) -> Lab:
    return Lab(tmp_path_factory.mktemp("kill9"), detector, embedder)


def _run_and_kill(lab: Lab, trial: Trial, rng: random.Random) -> str:
    """Restore the baseline, run the trial's process with its fault (changing the folder under a daemon) and see
    it killed; returns where. A kill from outside that comes after the process already finished is tried again,
    sooner (same seed, so the same changes)."""
    commits = 1 if trial.process in ("cluster", "edit", "local") else 3  # a cluster run or an edit commits once
    nth = {"commit": rng.randint(1, commits), "snapshot": rng.randint(1, 2), "recluster": 1,
           "local-recluster": 1}.get(trial.fault)
    # From outside: a random delay after the trial's marker (the daemon: the first change; ingest: its k-th
    # commit, k = 0 meaning its start; cluster: its start).
    after_commits = rng.randint(0, 2) if trial.process == "ingest" else 0
    delay = rng.uniform(0.0, 0.5) if after_commits else rng.uniform(0.0, 3.0)
    state = rng.getstate()
    for attempt in range(4):
        rng.setstate(state)
        code, child = _attempt(lab, trial, rng, nth, delay * 0.4 ** attempt, after_commits)
        if code == -signal.SIGKILL or nth:
            break
    assert code == -signal.SIGKILL, f"{trial} was not killed (exit {code}):\n{''.join(child.stderr)}"
    if nth:
        assert any(f"kill at {trial.fault} #{nth}" in line for line in child.stderr), "".join(child.stderr)
    return f"{trial.fault} #{nth}" if nth else f"outside after {delay:.2f} s"


def _attempt(lab: Lab, trial: Trial, rng: random.Random, nth: int | None, delay: float,
             after_commits: int) -> tuple[int, Child]:
    lab.restore()
    base = _last_commit(lab.index)
    args = {"ingest": ["ingest", str(lab.photos)], "watch": ["watch", str(lab.photos)], "cluster": ["cluster"],
            "edit": lab.edit, "local": ["cluster", "--local"]}
    args = [*args[trial.process], "--index", str(lab.index), "--config", str(lab.config)]
    if trial.process in ("ingest", "local"):
        lab.change(rng, deletes=False)
    if trial.process == "local":  # new faces, placed live, waiting for a local recluster
        lab.run("ingest", lab.index, lab.photos)
    child = Child(args, env={"FACEINDEX_FAULT": f"kill@{trial.fault}:{nth}"} if nth else {})
    try:
        if trial.process == "watch":
            _wait(lambda: daemon_status(lab.index)["running"] or child.proc.poll() is not None, "daemon start")
            lab.change(rng, deletes=True)
        elif trial.process == "ingest" and not nth:
            _wait(lambda: child.proc.poll() is not None or _last_commit(lab.index) >= base + after_commits,
                  f"commit {after_commits}")
        if not nth:
            time.sleep(delay)  # the randomised moment itself
            child.proc.send_signal(signal.SIGKILL)
        return child.wait(), child
    finally:
        child.kill()


def _last_commit(index: Path) -> int:
    """LMDB's last transaction id, read as another process would: it grows by one with every commit."""
    store = FaceStore(index, readonly=True)
    try:
        return store.env.info()["last_txnid"]
    finally:
        store.close()


def _wait(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("n", [pytest.param(i, marks=[] if i in FAST else [pytest.mark.exhaustive],
                                            id=f"{i}-{t.process}-{t.fault}") for i, t in enumerate(TRIALS)])
def test_kill_9_then_restart_matches_the_oracle(lab, n):
    trial, rng = TRIALS[n], random.Random(SEED + n)
    _run_and_kill(lab, trial, rng)
    lab.run("ingest" if trial.process == "ingest" else "watch", lab.index, lab.photos)  # the restart
    oracle.check(lab.index, lab.photos, lab.truth, lab.names, lab.word)
