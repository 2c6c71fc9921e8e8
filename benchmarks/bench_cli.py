"""CLI start-up benchmark: whole-process wall time of commands that run no model, beside importing torch.

Run: ``python benchmarks/bench_cli.py [--json] [--repeats 5] [--smoke]`` (LFW from $FACEINDEX_DATA or ../shared/data).

An index of the LFW dev-train photos (one face per photo, vectors from the cached LFW embeddings, so building it
runs no model) answers `status`, `people list` and `query --face-id`, each run as a fresh process (median of
``--repeats``); `python -c "import torch"` on the same machine, in the same run, is the reference: a command that
imported torch could not be faster than it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # `python benchmarks/bench_x.py` from any folder: put the repo root first, so `benchmarks` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.lfw_data import (
    SMOKE_NOTE,
    Recorder,
    index_of_vectors,
    lfw_embeddings,
    lfw_images,
    lfw_sample,
    require_data,
)

REPO = Path(__file__).resolve().parents[1]


def build_index(index: Path, vectors: np.ndarray, people: np.ndarray) -> None:
    from indexer.config import Settings
    from indexer.library import FaceIndex, OpenMode

    index_of_vectors(index, vectors, people)
    with FaceIndex(Settings(index_dir=str(index)), OpenMode.EDIT) as fi:
        fi.cluster()
        fi.vectors.save(force=True)


def wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command; the median is reported")
    parser.add_argument("--smoke", action="store_true", help="200 faces and 1 repeat: checks the script runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", help="also write <name>.json and <name>.txt into this folder")
    args = parser.parse_args()
    rec = Recorder(args.out, "bench_cli")
    root = require_data()
    repeats = 1 if args.smoke else args.repeats
    if args.smoke:
        # The first 200 photos: from the embedding cache when it exists, else embedded now (not all of LFW).
        data = lfw_sample(root, [os.path.relpath(p, root) for p in lfw_images(root)[0][:200]])
    else:
        data = lfw_embeddings(root)
    vectors, people = data["vectors"], data["people"]
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        build_index(index, vectors, people)
        faceindex = [sys.executable, "-m", "indexer"]
        result = {
            "faces": len(vectors),
            "repeats": repeats,
            **({"smoke": True} if args.smoke else {}),
            "status_s": wall([*faceindex, "status", "--index", str(index)], repeats),
            "people_list_s": wall([*faceindex, "people", "list", "--index", str(index)], repeats),
            "query_face_id_s": wall([*faceindex, "query", "--face-id", "1", "--index", str(index)], repeats),
            "torch_import_s": wall([sys.executable, "-c", "import torch"], repeats),
        }
    result = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    if rec.json(result, to_stdout=args.json):
        return
    if args.smoke:
        rec.print(SMOKE_NOTE)
    rec.print(f"faceindex CLI start-up: whole-process wall time, median of {repeats}, index of {result['faces']} "
              "LFW faces (no model runs)")
    for key, label in (("status_s", "faceindex status"), ("people_list_s", "faceindex people list"),
                       ("query_face_id_s", "faceindex query --face-id 1"),
                       ("torch_import_s", "python -c 'import torch' (reference)")):
        rec.print(f"  {label:<40} {result[key]:6.3f} s" + ("" if key == "torch_import_s" else "   target <= 0.5 s"))
    rec.close()


if __name__ == "__main__":
    main()
