"""Soak: the daemon under a long stream of file events, hostile files mixed in; memory over time and the oracle.

Run: ``python benchmarks/bench_soak.py [--events 5000] [--json] [--out benchmarks/results] [--smoke]`` (LFW from
$FACEINDEX_DATA or ../shared/data). A real ``faceindex watch`` subprocess follows a folder while this script
applies ``--events`` seeded random operations to it, in bursts, at the pace the daemon keeps up with: copies of LFW
photos (new files to embed), overwrites, renames, moves into other folders, deletes, renamed and deleted folders,
and hostile files (truncated and fake images, empty files, FIFOs, symlink loops, names that are not UTF-8 or hold a
newline). Measured: files processed, faces, failures, the daemon's resident memory at start / middle / end (and its
peak), the time SIGTERM takes to stop it, and the oracle of tests/faults/oracle.py over the final folder (every
file once with the faces a clean ingest finds, no record of anything gone, store and FAISS in agreement).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

if not __package__:  # `python benchmarks/bench_x.py` from any folder: put the repo root first, so `benchmarks` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lfw_data import SMOKE_NOTE, SMOKE_THREADS, Recorder, lfw_images, require_data

REPO = Path(__file__).resolve().parent.parent
FULL_EVENTS, SMOKE_EVENTS = 5000, 60
POOL = 400            # distinct LFW photos the copies are drawn from (a clean ingest of them is the reference)
BURST = 25            # events applied at once; then the script waits until the daemon's backlog is small
# Operation -> weight. Copies dominate so the folder grows (about 1,900 files at the end of a full run).
OPS = {"copy": 40, "overwrite": 8, "rename": 12, "move": 6, "delete": 14, "hostile": 12, "folder_rename": 2,
       "folder_delete": 1, "fifo": 2, "loop": 1, "odd_name": 2}


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def hostile_bytes(rng: random.Random, photo: bytes) -> bytes:
    kind = rng.choice(["truncated", "text", "empty", "random", "html"])
    return {"truncated": photo[: len(photo) // 3], "text": b"not a photo\n" * 50, "empty": b"",
            "random": rng.randbytes(4096), "html": b"<html><script>alert(1)</script></html>"}[kind]


class Folder:
    """The watched folder and the seeded operations on it."""

    def __init__(self, root: Path, pool: list[Path], hostile: list[Path], rng: random.Random) -> None:
        self.root, self.pool, self.hostile, self.rng = root, pool, hostile, rng
        self.n = 0
        self.counts: Counter[str] = Counter()

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file() and not p.is_symlink())

    def folders(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_dir() and not p.is_symlink())

    def fresh(self, suffix: str = ".jpg") -> Path:
        self.n += 1
        folder = self.root / f"d{self.rng.randrange(12)}" / f"e{self.rng.randrange(3)}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"f{self.n}{suffix}"

    def apply(self) -> None:
        op = self.rng.choices(list(OPS), weights=list(OPS.values()))[0]
        files = self.files()
        if op in ("overwrite", "rename", "move", "delete") and not files:
            op = "copy"
        folders = [f for f in self.folders() if f != self.root]
        if op.startswith("folder") and not folders:
            op = "copy"
        rng = self.rng
        if op == "copy":
            shutil.copy(rng.choice(self.pool), self.fresh())
        elif op == "overwrite":
            shutil.copy(rng.choice(self.pool), rng.choice(files))
        elif op == "rename":
            src = rng.choice(files)
            src.rename(src.with_name(f"r{self.n}_{src.name}"))
            self.n += 1
        elif op == "move":
            rng.choice(files).rename(self.fresh())
        elif op == "delete":
            rng.choice(files).unlink()
        elif op == "hostile":
            shutil.copy(rng.choice(self.hostile), self.fresh())
        elif op == "folder_rename":
            folder = rng.choice(folders)
            folder.rename(folder.with_name(f"{folder.name}_{self.n}"))
            self.n += 1
        elif op == "folder_delete":
            shutil.rmtree(rng.choice(folders))
        elif op == "fifo":
            os.mkfifo(self.fresh())
        elif op == "loop":
            path = self.fresh()
            os.symlink(path.name, path)  # a symlink to itself
        elif op == "odd_name":
            name = rng.choice([b"caf\xe9-%d.jpg", b"new\nline-%d.jpg", b"<b>%d<i>.jpg"]) % self.n
            shutil.copy(rng.choice(self.pool), os.path.join(os.fsencode(self.fresh().parent), name))
        self.counts[op] += 1


def wait(predicate, timeout: float, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the daemon did not catch up in time")
        time.sleep(poll)


def daemon_file(index: Path) -> dict:
    try:
        return json.loads((index / "daemon.json").read_text())
    except (OSError, ValueError):
        return {}


def idle(index: Path) -> bool:
    """Caught up: the daemon's loop reported an empty backlog after a two-second window in which nothing was
    committed (its status is written between batches only, so a report from after the window start means no batch
    was running through it unseen)."""
    from indexer.store.lmdb_store import FaceStore

    def txnid() -> int:  # LMDB's last transaction id: every commit (a move, a failed file too) changes it
        store = FaceStore(index, readonly=True)
        try:
            return store.env.info()["last_txnid"]
        finally:
            store.close()

    started, before = time.time(), txnid()
    time.sleep(2.0)
    status = daemon_file(index)
    return status.get("updated", 0) > started + 1.0 and status.get("backlog") == 0 and txnid() == before


def soak(args: argparse.Namespace, tmp: Path) -> dict:
    from indexer.store.daemon import daemon_status
    from tests.faults import oracle

    rng = random.Random(args.seed)
    paths, _ = lfw_images(require_data())
    pool_dir = tmp / "pool"
    pool_dir.mkdir()
    size = 40 if args.smoke else POOL
    pool = [Path(shutil.copy(p, pool_dir / f"{i}_{Path(p).name}"))
            for i, p in enumerate(paths[:: max(1, len(paths) // size)][:size])]
    hostile = tmp / "hostile"  # every hostile content the folder can get, so the reference knows their outcome
    hostile.mkdir()
    for kind in range(40):
        (hostile / f"h{kind}.jpg").write_bytes(hostile_bytes(random.Random(kind), pool[kind % len(pool)].read_bytes()))
    hostile_files = sorted(hostile.iterdir())
    config = tmp / "config.toml"
    config.write_text("[watch]\nsettle_s = 0.3\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(SMOKE_THREADS)} if args.smoke else {})}
    cli = [sys.executable, "-m", "indexer"]
    subprocess.run([*cli, "ingest", "--index", str(tmp / "reference"), "--config", str(config), str(pool_dir),
                    str(hostile)], check=True, cwd=REPO, env=env, capture_output=True)
    truth = oracle.reference(tmp / "reference")
    folder, index = tmp / "watched", tmp / "index"
    folder.mkdir()
    log_file = open(tmp / "daemon.log", "wb")  # noqa: SIM115 - a pipe nobody drains would block the daemon's logging
    daemon = subprocess.Popen([*cli, "watch", str(folder), "--index", str(index), "--config", str(config)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        wait(lambda: daemon_status(index)["running"] and "backlog" in daemon_file(index), timeout=600)  # looping
        ops = Folder(folder, pool, hostile_files, rng)
        rss_start = rss_mb(daemon.pid)
        rss_middle = None
        started = time.perf_counter()
        for n in range(args.events):
            ops.apply()
            if n % BURST == BURST - 1:  # let the daemon keep pace: it is a soak, not a flood
                wait(lambda: daemon_status(index)["backlog"] < 4 * BURST, timeout=1800, poll=0.05)
            if n == args.events // 2:
                rss_middle = rss_mb(daemon.pid)
        wait(lambda: idle(index), timeout=1800, poll=0)
        seconds = time.perf_counter() - started
        rss_end, rss_peak = rss_mb(daemon.pid), rss_mb(daemon.pid, "VmHWM")
        stop_started = time.perf_counter()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=600)
        stop_s = time.perf_counter() - stop_started
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log_file.close()
    try:
        view = oracle.check(index, folder, truth, names={})
        oracle_ok, oracle_error = code == 0, ""
    except AssertionError as exc:
        view, oracle_ok, oracle_error = {"_faces": -1}, False, str(exc)[:2000]
    from indexer.store.lmdb_store import FaceStore

    store = FaceStore(index, readonly=True)
    counts = store.counts()
    store.close()
    return {
        "events": args.events, "operations": dict(sorted(ops.counts.items())), "seconds": round(seconds, 1),
        "files": sum(counts["files"].values()), "files_by_status": counts["files"], "faces": view["_faces"],
        "failures": counts["files"]["failed"], "rss_start_mb": round(rss_start, 1),
        "rss_middle_mb": round(rss_middle or float("nan"), 1), "rss_end_mb": round(rss_end, 1),
        "rss_peak_mb": round(rss_peak, 1), "stop_after_sigterm_s": round(stop_s, 2), "exit_code": code,
        "oracle_ok": oracle_ok, **({"oracle_error": oracle_error} if oracle_error else {}),
        **({"smoke": True} if args.smoke else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=None,
                        help=f"file operations (default {FULL_EVENTS}; --smoke: {SMOKE_EVENTS})")
    parser.add_argument("--seed", type=int, default=1313)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default=None, help="also write bench_soak.json and .txt into this folder")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a minute or two): checks the script runs")
    args = parser.parse_args()
    if args.events is None:
        args.events = SMOKE_EVENTS if args.smoke else FULL_EVENTS
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        result = soak(args, Path(tmp))
    rec = Recorder(None if args.smoke else args.out, "bench_soak")
    if rec.json(result, args.json):
        return
    if args.smoke:
        rec.print(SMOKE_NOTE)
    rec.print(f"{result['events']} file events in {result['seconds']:.0f} s: {json.dumps(result['operations'])}")
    rec.print(f"store: {result['files']} files {json.dumps(result['files_by_status'])}, {result['faces']} faces, "
              f"{result['failures']} failed (the hostile files)")
    rec.print(f"daemon RSS start / middle / end / peak: {result['rss_start_mb']:.0f} / {result['rss_middle_mb']:.0f}"
              f" / {result['rss_end_mb']:.0f} / {result['rss_peak_mb']:.0f} MiB")
    rec.print(f"SIGTERM -> exit {result['exit_code']} in {result['stop_after_sigterm_s']:.2f} s; oracle "
              f"{'OK' if result['oracle_ok'] else 'FAILED: ' + result.get('oracle_error', '')}")
    rec.close()


if __name__ == "__main__":
    main()
