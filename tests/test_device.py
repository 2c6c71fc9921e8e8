"""Batch sizes chosen from the device (tables, like choose_index / choose_precision), FAISS's GPU support, and
benchmarks/gpu.sh's dry run. No GPU is needed: CUDA devices are described, not opened."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from indexer.models.device import (
    GIB,
    DeviceInfo,
    choose_detector_batch,
    choose_embedder_batch,
    describe_device,
    faiss_gpu,
    faiss_gpu_support,
)
from tests.conftest import REPO

CPU1, CPU2, CPU64 = (DeviceInfo("cpu", cpu_cores=n) for n in (1, 2, 64))
H200 = DeviceInfo("cuda", "NVIDIA H200", 150_119_153_664, (9, 0), 16)
RTX_24G = DeviceInfo("cuda", "RTX 4090", 24 * GIB, (8, 9))
RTX_8G = DeviceInfo("cuda", "RTX 3070", 8 * GIB, (8, 6))
T4_16G = DeviceInfo("cuda", "Tesla T4", 15 * GIB, (7, 5))
GTX_4G = DeviceInfo("cuda", "GTX 1650", 4 * GIB, (7, 5))
GTX_2G = DeviceInfo("cuda", "GTX 1050", 2 * GIB, (6, 1))
TINY = DeviceInfo("cuda", "tiny", GIB // 2, (6, 1))


@pytest.mark.parametrize("requested,device,precision,want", [
    # CPU: what was measured best on the 2-core development machine, whatever the core count (others unmeasured).
    (0, CPU1, "float32", 32),
    (0, CPU2, "bfloat16", 32),
    (0, CPU64, "bfloat16", 32),
    # CUDA: a quarter of memory at 2 x 3 MiB a face in half precision (2 x 6 MiB in float32), a power of two <= 256.
    (0, H200, "bfloat16", 256),
    (0, RTX_24G, "bfloat16", 256),
    (0, RTX_8G, "bfloat16", 256),
    (0, GTX_4G, "float16", 128),
    (0, GTX_2G, "float16", 64),
    (0, GTX_2G, "float32", 32),
    (0, TINY, "float32", 8),
    # A number in the config is obeyed.
    (64, CPU2, "bfloat16", 64),
    (8, H200, "bfloat16", 8),
])
def test_choose_embedder_batch_table(requested, device, precision, want):
    size, reason = choose_embedder_batch(requested, device, precision)
    assert size == want
    assert reason
    if requested:
        assert reason == "set by embedder.batch_size"
    elif device.kind == "cuda":
        assert "estimate" in reason and "not yet measured on a GPU" in reason and device.name in reason


@pytest.mark.parametrize("requested,device,max_side,min_face,want", [
    (0, CPU1, 1280, 20, 16),
    (0, CPU2, 1280, 20, 16),
    (0, CPU64, 640, 20, 16),
    # CUDA: a quarter of memory at 2 x ~77 MiB an image (1280x1280 copies, min face 20), a power of two <= 64.
    (0, H200, 1280, 20, 64),
    (0, RTX_24G, 1280, 20, 32),
    (0, T4_16G, 1280, 20, 16),
    (0, RTX_8G, 1280, 20, 8),
    (0, RTX_8G, 640, 20, 32),      # a quarter of the pixels: four times the images
    (0, RTX_8G, 1280, 12, 4),      # smaller faces: P-Net's first level is the whole copy
    (0, GTX_4G, 1280, 20, 4),
    (0, GTX_2G, 1280, 20, 2),
    (0, TINY, 1280, 20, 1),        # not even one fits the estimate: still 1
    (16, H200, 1280, 20, 16),
])
def test_choose_detector_batch_table(requested, device, max_side, min_face, want):
    size, reason = choose_detector_batch(requested, device, max_side, min_face)
    assert size == want
    assert reason
    if device is TINY:
        assert "not even one fits" in reason


def test_the_cpu_choice_is_the_configured_default():
    """0 ("choose") on CPU gives exactly today's defaults, so choosing changes nothing there."""
    from indexer.config import DetectorSettings, EmbedderSettings

    assert choose_detector_batch(0, CPU2, 1280, 20).size == DetectorSettings().batch_size
    assert choose_embedder_batch(0, CPU2, "bfloat16").size == EmbedderSettings().batch_size


def test_cuda_choices_grow_with_memory_and_shrink_with_the_image():
    sizes = [choose_detector_batch(0, DeviceInfo("cuda", "x", gib * GIB, (8, 0)), 1280, 20).size
             for gib in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert sizes == sorted(sizes) and sizes[0] >= 1 and sizes[-1] == 64
    by_side = [choose_detector_batch(0, RTX_8G, side, 20).size for side in (320, 640, 1280, 2560)]
    assert by_side == sorted(by_side, reverse=True)


def test_describe_this_cpu():
    info = describe_device("cpu")
    assert info.kind == "cpu" and info.cpu_cores >= 1 and info.total_memory == 0
    assert info.describe().startswith("CPU (")


def test_models_log_and_keep_their_choice(detector, caplog):
    from indexer.config import DetectorSettings
    from indexer.models.detector import FaceDetector

    assert (detector.batch_size, detector.batch_reason) == (16, "set by detector.batch_size")
    with caplog.at_level("INFO", logger="faceindex.detector"):
        chosen = FaceDetector(DetectorSettings(batch_size=0), device="cpu")
    assert chosen.batch_size == 16 and "measured best" in chosen.batch_reason
    assert "batch 16" in caplog.text and chosen.batch_reason in caplog.text


def test_config_accepts_zero_and_refuses_negative(tmp_path):
    from indexer.config import load_settings
    from indexer.errors import ConfigError

    path = tmp_path / "config.toml"
    path.write_text("[detector]\nbatch_size = 0\n[embedder]\nbatch_size = 0\n")
    settings = load_settings(path)
    assert settings.detector.batch_size == 0 and settings.embedder.batch_size == 0
    path.write_text("[embedder]\nbatch_size = -1\n")
    with pytest.raises(ConfigError, match="batch_size must be >= 0"):
        load_settings(path)


@pytest.mark.parametrize("has_api,gpus,want,words", [
    (False, 0, False, "not available: faiss-cpu"),
    (True, 0, False, "sees no GPU"),
    (True, 1, True, "1 GPU"),
    (True, 4, True, "4 GPUs"),
])
def test_faiss_gpu_support_table(has_api, gpus, want, words):
    ok, reason = faiss_gpu_support(has_api, gpus)
    assert ok is want and words in reason


def test_installed_faiss_is_cpu_only_here():
    # The project installs faiss-cpu; a GPU build would say "available".
    assert faiss_gpu() == (False, "not available: faiss-cpu (this faiss build has no GPU classes)")
    fake = types.SimpleNamespace(StandardGpuResources=object, get_num_gpus=lambda: 2)
    assert faiss_gpu(fake) == (True, "available: faiss sees 2 GPUs")


def test_gpu_sh_dry_run_plans_every_step_and_checks_the_scripts():
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--device", "cpu", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    planned = [line for line in out.splitlines() if line.startswith("would run")]
    wanted = ["-m indexer.models.measure --device cpu --out benchmarks/results/gpu",
              "benchmarks/bench_models.py --out benchmarks/results/gpu", "bench_models import verification",
              "benchmarks/bench_ingest.py --n 500 --out benchmarks/results/gpu",
              "benchmarks/bench_cluster.py --threads"]
    assert len(planned) == len(wanted)
    for line, want in zip(planned, wanted, strict=True):
        assert want in line and sys.executable in line
    for check in ("ok: benchmarks/bench_models.py --help", "ok: benchmarks/bench_ingest.py --help",
                  "ok: benchmarks/bench_cluster.py --help", "ok: measure --smoke on CPU"):
        assert check in out
    assert "missing python packages: none" in out
