"""Daemon benchmark: trickle latency, burst throughput relative to ``faceindex ingest``, daemon memory.

Run: ``python -m benchmarks.bench_watch [--burst 1000] [--trickle 20] [--json] [--smoke]`` (LFW from
$FACEINDEX_DATA or ../shared/data). ``--smoke``: a burst of ``SMOKE_BURST`` and a trickle of ``SMOKE_TRICKLE``,
the daemon and the ingest on one thread, to check that the script works (most of its time is the two model loads).

- Trickle: with the daemon running, single photos are copied in one at a time; latency is from the end of a file's
  last write to its faces being committed (a query from another process sees them then). Target p50: settle_s + 1 s.
- Burst: ``--burst`` LFW photos are copied in at once; the daemon's throughput (from the first copy to the last
  file committed) is compared with ``faceindex ingest`` of the same photos in this run (its own pipeline time).
  Target ratio >= 0.9.
- Peak RSS of the daemon process (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # `python benchmarks/bench_x.py` from any folder: put the repo root first, so `benchmarks` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lfw_data import SMOKE_NOTE, SMOKE_THREADS, Recorder, lfw_images, require_data

REPO = Path(__file__).resolve().parent.parent
FULL_BURST, FULL_TRICKLE = 1000, 20   # the recorded figures
SMOKE_BURST, SMOKE_TRICKLE = 6, 2     # two single files still give a p50 and a p95


def committed(index: Path, paths: set[str] | None = None) -> int:
    """How many files (of ``paths``, or all) the store holds, read as another process would."""
    from indexer.store.lmdb_store import FaceStore

    if not (index / "store.lmdb" / "data.mdb").exists():
        return 0
    try:
        store = FaceStore(index, readonly=True)
    except Exception:  # not initialised yet
        return 0
    try:
        with store.read() as txn:
            if paths is None:
                return txn.stat(store.db["files"])["entries"]
            return sum(store.get_file(p, txn) is not None for p in paths)
    finally:
        store.close()


def wait_until(predicate, timeout: float = 1800.0, poll: float = 0.02) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.perf_counter()
        time.sleep(poll)
    raise TimeoutError("the daemon did not catch up in time")


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=None,
                        help=f"photos copied in at once (default {FULL_BURST}; --smoke: {SMOKE_BURST})")
    parser.add_argument("--trickle", type=int, default=None,
                        help=f"photos copied in one at a time (default {FULL_TRICKLE}; --smoke: {SMOKE_TRICKLE})")
    parser.add_argument("--settle", type=float, default=1.0, help="watch.settle_s for this run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default=None, help="also write <name>.json and <name>.txt into this folder")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds): checks the script runs")
    args = parser.parse_args()
    if args.burst is None:
        args.burst = SMOKE_BURST if args.smoke else FULL_BURST
    if args.trickle is None:
        args.trickle = SMOKE_TRICKLE if args.smoke else FULL_TRICKLE
    root = require_data()
    paths, _ = lfw_images(root)
    step = max(1, len(paths) // (args.burst + args.trickle))
    chosen = paths[::step][: args.burst + args.trickle]
    burst, trickle = chosen[: args.burst], chosen[args.burst:]
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        for p in burst:
            shutil.copy(p, src / Path(p).name)
        config = tmp / "config.toml"
        config.write_text(f"[watch]\nsettle_s = {args.settle}\n")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.smoke:  # torch reads it at start-up: the ingest and the daemon compute on one thread
            env["OMP_NUM_THREADS"] = str(SMOKE_THREADS)

        # (a) faceindex ingest of the burst photos
        out = subprocess.run([sys.executable, "-m", "indexer", "ingest", "--index", str(tmp / "ingest"),
                              "--config", str(config), "--json", str(src)], capture_output=True, text=True,
                             check=True, cwd=REPO, env=env)
        ingest_s = json.loads(out.stdout)["seconds"]

        # (b) the daemon
        folder = tmp / "watched"
        folder.mkdir()
        index = tmp / "watch"
        daemon = subprocess.Popen([sys.executable, "-m", "indexer", "watch", str(folder), "--index", str(index),
                                   "--config", str(config)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            from indexer.store.daemon import daemon_status

            wait_until(lambda: daemon_status(index)["running"], timeout=300, poll=0.1)
            latencies = []
            for p in trickle:
                dest = folder / f"trickle_{Path(p).name}"
                shutil.copy(p, dest)
                written = time.perf_counter()
                latencies.append(wait_until(lambda d=str(dest): committed(index, {d}) == 1) - written)
            started = time.perf_counter()
            shutil.copytree(src, folder / "burst")
            done = wait_until(lambda: committed(index) >= len(trickle) + len(burst), poll=0.2)
            watch_s = done - started
            rss = peak_rss_mb(daemon.pid)
        finally:
            daemon.terminate()
            daemon.wait(timeout=300)
    latencies.sort()
    result = {
        "settle_s": args.settle, "trickle_files": len(trickle), "burst_files": len(burst),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
        "ingest_ips": round(len(burst) / ingest_s, 2), "watch_burst_ips": round(len(burst) / watch_s, 2),
        "burst_ratio": round(ingest_s / watch_s, 3), "peak_rss_mb": round(rss, 1),
        **({"smoke": True} if args.smoke else {}),
    }
    rec = Recorder(args.out, "bench_watch")
    if rec.json(result, args.json):
        return
    if args.smoke:
        rec.print(SMOKE_NOTE)
    rec.print(f"trickle of {len(trickle)} single files (settle_s {args.settle}): latency p50 "
          f"{result['latency_p50_s']:.2f} s, p95 {result['latency_p95_s']:.2f} s "
          f"(target p50 <= settle + 1 s = {args.settle + 1:.1f} s)")
    rec.print(f"burst of {len(burst)} files: daemon {result['watch_burst_ips']:.2f} images/s vs faceindex ingest "
          f"{result['ingest_ips']:.2f} images/s: ratio {result['burst_ratio']:.2f} (target >= 0.9)")
    rec.print(f"daemon peak RSS {result['peak_rss_mb']:.0f} MiB")

    rec.close()


if __name__ == "__main__":
    main()
