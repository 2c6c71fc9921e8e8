"""What the models run on, and the batch sizes chosen from it; whether FAISS can use a GPU.

``describe_device`` reads the hardware once (the only impure part); ``choose_detector_batch`` and
``choose_embedder_batch`` are pure functions of that description and the settings, each returning its size and
the reason, which the models log at load (like ``embedder.choose_precision``). A batch size set in the config
(> 0) is always obeyed; 0 means "choose".

On CPU the answer is what was measured best on the development machine (2 cores, AVX512-BF16; bench_models):
MTCNN 8-16 images a batch (72 images/s at 16 against 35 one by one), the bfloat16 embedder 16-64 faces a batch
within noise (111.1 faces/s at 16, 111.0 at 64). Other core counts were not measured, so they get the same
sizes: torch spreads one batch over its threads, and these batches already keep 2 cores busy.

On CUDA the sizes come from memory: each model may use ``CUDA_MEMORY_SHARE`` of the device's total memory for its
activations, at an estimated cost per face or per image times ``CUDA_SAFETY``. The costs are ESTIMATES, measured
on CPU (peak resident memory per extra item, batch 33/65 against 1) and by counting tensors; no GPU was lent to
this project when they were set. ``python -m indexer.models.measure`` (run by benchmarks/gpu.sh) measures them on
a GPU; replace the constants with its figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple

MIB = 2**20
GIB = 2**30

# Measured on the 2-core development CPU (bench_models; benchmarks/results/bench_models.txt): see the docstring.
CPU_DETECTOR_BATCH = 16
CPU_EMBEDDER_BATCH = 32

# Embedder activation memory per face (InceptionResnetV1, 3x160x160), the input included. Measured on CPU as peak
# resident memory growth per extra face: bfloat16 autocast 2.6-2.8 MiB, float32 3.9-6.3 MiB (batch 65 and 33
# against batch 1, channels_last); rounded up. Half precision (bf16 or fp16) halves activations.
EMBED_BYTES_PER_FACE = {"half": 3 * MIB, "float32": 6 * MIB}

# MTCNN on CUDA (facenet-pytorch's detect_face) holds the whole batch as float32 (12 bytes a pixel of the
# detection copy) while it runs P-Net over the scale pyramid; the first, largest level (scale 12 / min_face_size,
# 0.6 at the default 20) peaks at its resampled input, the normalised copy (12 + 12 bytes a pixel) and conv1 with
# its PReLU output (10 channels each, 40 + 40), i.e. 104 bytes a pixel of that level. Total at the defaults:
# 12 + 104 * 0.36 = 49 bytes a pixel. Measured on CPU with MTCNN.detect on a 1280x914 photo: 42-47 bytes a pixel
# per extra image (batches 1, 2, 5). R-Net and O-Net crops (24x24, 48x48 per candidate box) are small next to it.
DETECT_FULL_BYTES_PER_PIXEL = 12
DETECT_LEVEL_BYTES_PER_PIXEL = 104
PNET_CELL = 12   # P-Net's input window: the pyramid starts at scale 12 / min_face_size

# Each model may take this share of the device's total memory for activations: detection and embedding run one
# after the other, but PyTorch's caching allocator keeps both peaks reserved, and the rest is for weights, the
# CUDA context, cuDNN workspaces and whatever else uses the GPU (a desktop, another job).
CUDA_MEMORY_SHARE = 0.25
# Over the CPU-measured costs: the CUDA allocator rounds blocks up and cuDNN may pick workspaces that grow with the
# batch. A guess until measure.py has run on a GPU.
CUDA_SAFETY = 2.0
# Caps (not measured: measure.py times every power of two up to them). Embedder: a pipeline batch seldom holds
# more faces than this, and ``embed`` splits evenly anyway. Detector: the ingest holds a batch of decoded photos
# plus the next one read ahead in host memory, and only same-shape photos share an MTCNN batch.
CUDA_EMBEDDER_MAX = 256
CUDA_DETECTOR_MAX = 64


@dataclass(frozen=True)
class DeviceInfo:
    """The facts the batch sizes depend on."""

    kind: str                          # "cpu" | "cuda"
    name: str = ""                     # e.g. "NVIDIA H200"
    total_memory: int = 0              # bytes of device memory (CUDA); 0 on CPU
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability (9, 0) for Hopper; (0, 0) on CPU
    cpu_cores: int = 1                 # cores this process may run on

    def describe(self) -> str:
        if self.kind == "cuda":
            major, minor = self.capability
            return f"{self.name or 'CUDA'} (sm_{major}{minor}, {self.total_memory / GIB:.1f} GiB)"
        if self.kind == "cpu":
            return f"CPU ({self.cpu_cores} core{'' if self.cpu_cores == 1 else 's'})"
        return self.kind


class BatchChoice(NamedTuple):
    size: int
    reason: str


def describe_device(device: Any) -> DeviceInfo:
    """Read what ``choose_*_batch`` need from a ``torch.device`` (or a string such as "cuda:0")."""
    import torch

    device = torch.device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type != "cuda":
        return DeviceInfo(kind=device.type, cpu_cores=cores)
    props = torch.cuda.get_device_properties(device.index if device.index is not None else torch.cuda.current_device())
    return DeviceInfo(kind="cuda", name=props.name, total_memory=int(props.total_memory),
                      capability=(props.major, props.minor), cpu_cores=cores)


def _power_of_two_at_most(n: float) -> int:
    """The largest power of two <= n, at least 1 (powers of two are multiples of 8 from 8 on, which suits
    tensor-core tiles, and keep the choice readable)."""
    return 1 << max(int(n), 1).bit_length() - 1


def _fit(per_item: float, device: DeviceInfo, cap: int) -> tuple[int, str]:
    """The largest power of two of items within the memory share, at most ``cap``; and how that came out."""
    budget = device.total_memory * CUDA_MEMORY_SHARE
    if budget < per_item:
        return 1, f"1 (by the estimate not even one fits {CUDA_MEMORY_SHARE:.0%} of memory)"
    size = min(_power_of_two_at_most(budget / per_item), cap)
    return size, f"{size} (the cap)" if size == cap else f"{size} (what fits {CUDA_MEMORY_SHARE:.0%} of memory)"


def embed_bytes_per_face(precision: str) -> int:
    """Estimated activation bytes per face for the embedder at ``precision`` (float32 | bfloat16 | float16)."""
    return EMBED_BYTES_PER_FACE["float32" if precision == "float32" else "half"]


def detect_bytes_per_image(max_side: int, min_face_size: int) -> int:
    """Estimated bytes per image for MTCNN on CUDA, for a square detection copy of ``max_side`` (the worst case)."""
    level = min(PNET_CELL / min_face_size, 1.0) ** 2   # area of the pyramid's first level, relative
    return int(max_side * max_side * (DETECT_FULL_BYTES_PER_PIXEL + DETECT_LEVEL_BYTES_PER_PIXEL * level))


def choose_embedder_batch(requested: int, device: DeviceInfo, precision: str) -> BatchChoice:
    """Faces per embedder forward pass, and why."""
    if requested > 0:
        return BatchChoice(requested, "set by embedder.batch_size")
    if device.kind != "cuda":
        # Not CUDA (CPU, or a device this project never ran on): the size measured on CPU.
        return BatchChoice(CPU_EMBEDDER_BATCH, f"{device.describe()}: {CPU_EMBEDDER_BATCH}, measured best on a "
                                               "2-core CPU (bfloat16: 16-64 within noise; other CPUs not measured)")
    per_face = embed_bytes_per_face(precision) * CUDA_SAFETY
    size, how = _fit(per_face, device, CUDA_EMBEDDER_MAX)
    return BatchChoice(size, f"{device.describe()}, {precision}: {how}; estimated {per_face / MIB:.0f} MiB a face "
                             f"({CUDA_SAFETY:g}x the activations measured on CPU; not yet measured on a GPU)")


def choose_detector_batch(requested: int, device: DeviceInfo, max_side: int, min_face_size: int) -> BatchChoice:
    """Images per MTCNN batch, and why."""
    if requested > 0:
        return BatchChoice(requested, "set by detector.batch_size")
    if device.kind != "cuda":
        return BatchChoice(CPU_DETECTOR_BATCH, f"{device.describe()}: {CPU_DETECTOR_BATCH}, measured best on a "
                                               "2-core CPU (8-16 images; other CPUs not measured)")
    per_image = detect_bytes_per_image(max_side, min_face_size) * CUDA_SAFETY
    size, how = _fit(per_image, device, CUDA_DETECTOR_MAX)
    return BatchChoice(size, f"{device.describe()}, detection copies up to {max_side}x{max_side}, min face "
                             f"{min_face_size}: {how}; estimated {per_image / MIB:.0f} MiB an image "
                             f"({CUDA_SAFETY:g}x MTCNN's peak as measured on CPU; not yet measured on a GPU)")


def faiss_gpu_support(has_gpu_api: bool, num_gpus: int) -> tuple[bool, str]:
    """Whether FAISS can put an index or K-Means on a GPU, and why: a pure function of what faiss reports."""
    if not has_gpu_api:
        return False, "not available: faiss-cpu (this faiss build has no GPU classes)"
    if num_gpus < 1:
        return False, "not available: faiss has GPU support but sees no GPU"
    return True, f"available: faiss sees {num_gpus} GPU{'' if num_gpus == 1 else 's'}"


def faiss_gpu(faiss_module: Any = None) -> tuple[bool, str]:
    """``faiss_gpu_support`` for the installed faiss (or ``faiss_module``)."""
    if faiss_module is None:
        import faiss as faiss_module
    has_api = hasattr(faiss_module, "StandardGpuResources")
    count = int(faiss_module.get_num_gpus()) if has_api and hasattr(faiss_module, "get_num_gpus") else 0
    return faiss_gpu_support(has_api, count)
