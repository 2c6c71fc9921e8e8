"""Face embedding with facenet-pytorch's InceptionResnetV1 (wrapped, not forked).

Eval mode, inference mode, batched (faces per pass: ``embedder.batch_size``, or chosen from the device by
``device.choose_embedder_batch`` when 0), on ``cuda`` when available. Output: float32 [N, 512], rows L2-normalised, so
the inner product is the cosine similarity. On CPU the network runs in channels_last memory format, which
benchmarks/bench_models.py measured faster than the default layout (see benchmarks/results/).

Precision is chosen by ``choose_precision`` (a pure function with its reason): bfloat16 autocast where the hardware
computes it natively (AVX512-BF16/AMX CPUs by their flags, CUDA), float32 elsewhere (``native_bf16``: an AVX512 CPU
without those emulates bfloat16 3.5x slower than float32). On this repository's AVX512-BF16 CPU,
bfloat16 embeds about twice as many faces per second at cosine >= 0.9999 to float32, and LFW verification
accuracy is unchanged (benchmarks/results/bench_models.txt). Vectors are always stored as float32.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from facenet_pytorch import InceptionResnetV1

from indexer.config import EmbedderSettings
from indexer.models import weights as weights_mod
from indexer.models.device import choose_embedder_batch, describe_device
from indexer.models.parallel import available_workers, choose_workers, map_workers, split

EMBEDDING_DIM = 512
log = logging.getLogger("faceindex.embedder")


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


# x86 CPU flags (Linux /proc/cpuinfo) of instructions that compute bfloat16: AVX512-BF16 (Cooper Lake, Zen 4 on) and
# AMX (Sapphire Rapids on). oneDNN reports bfloat16 "supported" on any AVX512 CPU, emulated there: measured on an
# AVX512 Xeon without either, bfloat16 embedded 10 faces/s against 35 for float32 (3.5x slower).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 Linux); None where there is no such list."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return None


def native_bf16(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (not by emulation, which is slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpu_flags() if flags is None else flags
    if flags is not None:  # x86 Linux: the instructions themselves
        return bool(BF16_CPU_FLAGS & flags)
    try:  # elsewhere (another OS, ARM): oneDNN's own answer
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_precision(requested: str, device_type: str, has_native_bf16: bool) -> tuple[str, str]:
    """The embedder's compute precision and why: a pure function of the setting and the hardware."""
    if requested != "auto":
        return requested, "set by embedder.precision"
    if device_type == "cuda":
        # Tensor cores run half precision many times faster than float32; bfloat16 keeps float32's range.
        if has_native_bf16:
            return "bfloat16", "CUDA with bfloat16 support: autocast to bfloat16"
        return "float16", "CUDA without bfloat16: autocast to float16"
    if has_native_bf16:
        # Measured here (bench_models): ~2x faces/s, cosine to float32 >= 0.9999, LFW accuracy unchanged.
        return "bfloat16", "CPU computes bfloat16 natively (AVX512-BF16/AMX): autocast to bfloat16"
    return "float32", "CPU has no native bfloat16 (emulation would be slower): float32"


class FaceEmbedder:
    """InceptionResnetV1 with given weights. ``fingerprint`` names the weights for the index."""

    def __init__(self, settings: EmbedderSettings | None = None, prefer: str | None = None,
                 resolved: weights_mod.ResolvedWeights | None = None, channels_last: bool = True,
                 workers: int = 0) -> None:
        self.settings = settings or EmbedderSettings()
        self.weights = resolved or weights_mod.resolve(self.settings.weights, prefer=prefer)
        self.device = pick_device(self.settings.device)
        state = weights_mod.load_state(self.weights.path)
        model = InceptionResnetV1(pretrained=None)
        tensors = {k: torch.from_numpy(v) for k, v in state.items() if not k.startswith("logits")}
        model.load_state_dict(tensors, strict=False)
        self.model = model.eval().to(self.device)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.precision, self.precision_reason = choose_precision(
            self.settings.precision, self.device.type, native_bf16(self.device))
        self._autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.precision)
        info = describe_device(self.device)
        self.batch_size, self.batch_reason = choose_embedder_batch(self.settings.batch_size, info, self.precision)
        self.workers, self.workers_reason = choose_workers(workers, info)
        log.info("embedder on %s, %s: %s; batch %d: %s; workers %d: %s", self.device, self.precision,
                 self.precision_reason, self.batch_size, self.batch_reason, self.workers, self.workers_reason)

    @property
    def fingerprint(self) -> str:
        return self.weights.fingerprint

    @property
    def faces_per_pass(self) -> int:
        """Faces in one forward pass of ``embed``: ``batch_size`` rows, a face and its mirror two of them with flip."""
        return self._faces_per_pass(self.settings.flip)

    def _faces_per_pass(self, mirror: bool) -> int:
        return max(1, self.batch_size // 2) if mirror else self.batch_size

    def embed(self, faces: torch.Tensor | list[torch.Tensor]) -> np.ndarray:
        """[N, 3, 160, 160] standardised crops -> float32 [N, 512] unit vectors. With ``embedder.flip`` each row is
        the normalised mean of the face's and its mirror image's embedding (``flip_average``)."""
        if self.settings.flip:
            return flip_average(*self.embed_views(faces))
        return self._run(_as_batch(faces), mirror=False)[0]

    def embed_views(self, faces: torch.Tensor | list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(plain, mirrored): unit vectors of each face and of its horizontal mirror image, both from the same
        forward passes (each pass holds a chunk of faces and their mirrors, ``batch_size`` rows in all)."""
        return self._run(_as_batch(faces), mirror=True)

    def _run(self, faces: torch.Tensor, mirror: bool) -> tuple[np.ndarray, np.ndarray]:
        if not len(faces):
            empty = np.zeros((0, EMBEDDING_DIM), np.float32)
            return empty, empty
        # Even chunks (38 faces at batch size 32 -> 19 + 19, not 32 + 6): a small last chunk runs far below speed.
        # With the mirror, a chunk of n faces is a pass of 2n rows: batch_size keeps bounding the rows of a pass.
        # At least one chunk per worker, when there are faces enough: the workers embed chunks side by side.
        per_pass = self._faces_per_pass(mirror)
        workers = available_workers(self.workers)  # 1 on a model worker: its faces are its own to embed
        chunks = max(-(-len(faces) // per_pass), min(workers, len(faces)))
        outs = map_workers(lambda r: self._forward(faces[r.start:r.stop], mirror), split(len(faces), chunks),
                           workers)
        plain = torch.cat([o[0] for o in outs])
        mirrored = torch.cat([o[1] for o in outs])
        return _unit(plain), _unit(mirrored)

    def _forward(self, x: torch.Tensor, mirror: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass (inference mode and autocast are per thread: entered here, in the worker)."""
        autocast = self._autocast_dtype is not None
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self._autocast_dtype, enabled=autocast):
            x = x.to(self.device, non_blocking=True)
            if mirror:
                x = torch.cat([x, torch.flip(x, dims=[3])])  # [N, C, H, W]: dim 3 is left-right
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.model(x).float().cpu()
        half = len(out) // 2
        return (out[:half], out[half:]) if mirror else (out, out[:0])


def _as_batch(faces: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    if isinstance(faces, list):
        return torch.stack(faces) if faces else torch.zeros((0, 3, 160, 160))
    return faces


def _unit(rows: torch.Tensor) -> np.ndarray:
    vectors = rows.numpy().astype(np.float32, copy=False)
    # The network already L2-normalises; renormalise in float32 so stored rows are unit to the last bit.
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)


def flip_average(plain: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """The flip-averaged embedding: the normalised mean of a face's and its mirror image's unit vectors."""
    return _unit(torch.from_numpy(np.ascontiguousarray(plain + mirrored, dtype=np.float32)))
