"""The benchmark suite runs as documented (issue 15): every ``benchmarks/bench_*.py`` answers ``--help`` from any
folder (``make bench`` once broke on exactly that), and each one's ``--smoke --json`` run ends well and prints the
keys that the README's benchmark table and the issues quote. No timing is asserted: a smoke run's figures mean
nothing, and this machine is shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted((REPO / "benchmarks").glob("bench_*.py"))
RESULTS = REPO / "benchmarks" / "results"

# What each script's --json must hold: the figures the README's table (and the issues) quote.
KEYS: dict[str, set[str]] = {
    "bench_models": {"model", "precision", "lfw_verification_acc", "lfw_verification_std", "threshold_cosine",
                     "embed_fps", "embed_fps_by_variant", "mtcnn_ips_single", "mtcnn_ips_batched",
                     "facenet_mtcnn_ips_batched", "rank1", "flip", "margin", "preprocessing_grid"},
    "bench_ingest": {"n_images", "seed_loop_ips", "faceindex_ips", "ratio", "peak_rss_mb", "rss_mb_by_progress",
                     "stage_seconds"},
    "bench_query": {"n", "index", "nprobe", "build_s", "recall_at_10", "p50_ms", "p99_ms", "target_met",
                    "exact_latency", "nprobe_calibration", "figures"},
    "bench_cluster": {"kmeans_speedup_vs_sklearn", "kmeans_speedup_1_thread", "inertia_ratio", "kmeans_setup",
                      "default_method", "methods", "adaptive_choice", "cv_pairwise_f1_mean", "cv_pairwise_f1_min",
                      "cv_bcubed_f1_mean", "cv_bcubed_f1_min"},
    "bench_watch": {"latency_p50_s", "latency_p95_s", "ingest_ips", "watch_burst_ips", "burst_ratio",
                    "peak_rss_mb"},
    "bench_cli": {"status_s", "people_list_s", "query_face_id_s", "torch_import_s"},
    "bench_serve": {"people_page_p50_ms", "people_page_first_ms", "api_people_p50_ms", "person_page_p50_ms",
                    "edit_name_p50_ms", "search_p50_ms"},
    "bench_soak": {"events", "faces", "failures", "rss_start_mb", "rss_end_mb", "oracle_ok"},
    "bench_scale": {"ray_vs_single_ratio", "indexes", "memory_budget_mb", "targets_met"},
    "bench_persons_scale": {"sizes", "targets_met_1m"},
    "bench_assign": {"batch", "centers", "knn", "sweep", "real_live", "real_local"},
}
# The scripts that read LFW (all but bench_serve, whose index is synthetic and whose search photo is a sample).
NEEDS_LFW = {"bench_models", "bench_ingest", "bench_query", "bench_cluster", "bench_watch", "bench_cli", "bench_soak",
             "bench_scale", "bench_persons_scale", "bench_assign"}


def test_every_benchmark_has_a_smoke_test() -> None:
    """A new benchmarks/bench_*.py must come with its keys here, so that CI runs its --smoke size too."""
    assert {p.stem for p in BENCHMARKS} == set(KEYS)


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_help_from_another_folder(script: Path, tmp_path: Path) -> None:
    # Another working directory and no PYTHONPATH: the script must find the repository root on its own.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "--json" in proc.stdout and "--smoke" in proc.stdout


def smoke_run(name: str, env: dict[str, str] | None = None, labelled: bool = True, args: tuple[str, ...] = ()) -> dict:
    """``python benchmarks/<name>.py --smoke --json [args]`` from the repository root, as the README runs it; its
    JSON."""
    recorded = {p: p.stat().st_mtime_ns for p in RESULTS.glob(f"{name}.*")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--smoke", "--json", *args],
                          cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} --smoke exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    # A smoke run must never replace the recorded figures (bench_query writes there by default on full runs).
    assert {p: p.stat().st_mtime_ns for p in RESULTS.glob(f"{name}.*")} == recorded
    result = json.loads(proc.stdout)  # --json: stdout holds the one JSON object and nothing else
    missing = KEYS[name] - set(result)
    assert not missing, f"{name} --json lacks {sorted(missing)}"
    if labelled:
        assert result.get("smoke") is True, "a smoke run's JSON must say so, so it is never taken for a measurement"
    return result


@pytest.mark.lfw
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NEEDS_LFW - {"bench_models", "bench_cluster", "bench_scale",
                                                     "bench_persons_scale"}))
def test_smoke_run(name: str, shared_data: Path) -> None:
    smoke_run(name, {"FACEINDEX_DATA": str(shared_data)})


@pytest.mark.lfw
@pytest.mark.slow
def test_smoke_bench_ingest_min_face_sweep(shared_data: Path) -> None:
    result = smoke_run("bench_ingest", {"FACEINDEX_DATA": str(shared_data)}, args=("--camera-sweep", "20,16"))
    sweep = result["camera_min_face_sweep"]
    assert [row["min_face_size"] for row in sweep] == [20, 16]
    for row in sweep:  # the same reference faces for every size; a size finds at most all of them
        assert row["reference"] == result["camera_reference_faces"] and 0 <= row["found"] <= row["reference"]
        assert row["ips"] > 0 and len(row["ips_runs"]) == 1


@pytest.mark.lfw
@pytest.mark.slow
def test_smoke_bench_models(shared_data: Path) -> None:
    result = smoke_run("bench_models", {"FACEINDEX_DATA": str(shared_data)})
    assert {"1", "16"} <= set(result["embed_fps"])
    assert 0 < result["lfw_verification_acc"] <= 1
    # The default preprocessing is a row of its grid (issue 11), and it is the configured one.
    from indexer.config import Settings

    defaults = Settings()
    assert (result["margin"], result["flip"]) == (defaults.detector.margin, defaults.embedder.flip)
    assert (result["margin"], result["flip"]) in {(r["margin"], r["flip"]) for r in result["preprocessing_grid"]}


@pytest.mark.lfw
@pytest.mark.slow
def test_smoke_bench_cluster(shared_data: Path) -> None:
    result = smoke_run("bench_cluster", {"FACEINDEX_DATA": str(shared_data)})
    # The README quotes the default method's pairwise and BCubed F1.
    assert {"pairwise_f1", "bcubed_f1"} <= set(result["methods"][result["default_method"]])
    assert result["cv_pairwise_f1_min"] <= result["cv_pairwise_f1_mean"] <= 1
    assert result["cv_bcubed_f1_min"] <= result["cv_bcubed_f1_mean"] <= 1


@pytest.mark.lfw
@pytest.mark.slow
def test_smoke_bench_scale(shared_data: Path) -> None:
    result = smoke_run("bench_scale", {"FACEINDEX_DATA": str(shared_data)})
    # The README's "Indexes past RAM" table quotes these for each size; the smoke size takes the compressed path.
    (row,) = result["indexes"]
    assert {"n", "index", "bytes_per_vector", "build_s", "peak_rss_mb", "recall_at_10", "p50_ms"} <= set(row)
    assert row["index"].endswith(",RLMDB") and 0 <= row["recall_at_10"] <= 1
    # A figure or the reason it is missing, never neither.
    assert result["ray_vs_single_ratio"] is not None or result["ray_reason"]


@pytest.mark.slow
def test_smoke_bench_persons_scale(shared_data: Path) -> None:
    result = smoke_run("bench_persons_scale", {"FACEINDEX_DATA": str(shared_data)})
    # issue 24's keys, one row per spread.
    assert [(row["n"], row["spread"]) for row in result["sizes"]] == [(20_000, "geometric"), (20_000, "family")]
    for row in result["sizes"]:
        assert row["recluster_s"] > 0 and row["recluster_rss_mb"] > 0 and 0 < row["graph_recall"] <= 1
        assert row["largest_person"] >= 1 and 0 <= row["pairwise_f1"] <= 1
        # not built yet: null, never a made-up figure
        ops = ("edit_p50_ms", "edit_p95_ms", "people_page_ms", "person_page_ms", "status_s", "assign_ms_per_face",
               "local_recluster_s")
        if row["spread"] == "geometric":  # the smoke run times the real CLI and server on one spread
            assert all(row[key] > 0 for key in ops) and row["edit_p50_ms"] <= row["edit_p95_ms"]
            assert row["assign_faces"] >= 32 and 0 <= row["assign_same_person"] <= 1
            assert row["local_scope"] >= row["assign_faces"] and 0 < row["local_pairwise_f1"] <= 1
        else:
            assert all(row[key] is None for key in ops)
    assert result["targets_met_1m"] is None   # no 1M row in a smoke run


@pytest.mark.slow
def test_smoke_bench_serve() -> None:
    smoke_run("bench_serve", labelled=False)  # its JSON carries no "smoke" label (yet)


def test_persons_bench_edits_only_persons_no_other_listed_person_shares_an_identity_with() -> None:
    from benchmarks.persons_ops import distinct_people

    rows = [{"id": i} for i in range(8)]
    identity = {0: 0, 1: 1, 2: 2, 3: 3, 4: 0, 5: 5, 6: 6, 7: 6}   # 4 is a piece of 0's identity; 6 and 7 share one
    assert [r["id"] for r in distinct_people(rows, identity)] == [5]


def test_recorder_writes_the_table_beside_the_json_even_with_json_on_stdout(tmp_path: Path, capsys) -> None:
    from benchmarks.lfw_data import Recorder

    rec = Recorder(str(tmp_path), "bench_x")
    assert rec.json({"a": 1}, to_stdout=True) is False  # a folder to write to: the table is still rendered
    rec.print("the table")
    rec.close()
    out, err = capsys.readouterr()
    assert json.loads(out) == {"a": 1} and "the table" in err  # stdout stays one JSON object
    assert json.loads((tmp_path / "bench_x.json").read_text()) == {"a": 1}
    assert "the table" in (tmp_path / "bench_x.txt").read_text()
    assert Recorder(None, "bench_x").json({"a": 1}, to_stdout=True) is True  # nowhere to write: done
