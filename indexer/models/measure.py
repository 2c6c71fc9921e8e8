"""Measure on the device what ``device.py`` estimates: memory per face and per image, and speed by batch size.

Run by benchmarks/gpu.sh:  python -m indexer.models.measure --device cuda --out DIR  (``--smoke``: tiny sizes on
CPU, to check that it runs). It prints a table and writes DIR/measure.json: for the embedder (each precision) and
the detector, items/s and peak memory per item by batch size, next to the estimates ``choose_*_batch`` used, so
the constants in ``device.py`` can be replaced by measured ones.

The embedder runs with random weights (``InceptionResnetV1(pretrained=None)``): speed and memory do not depend on
the weight values, and the device machine needs no weights file. The detector is ``FaceDetector`` (facenet-pytorch's
MTCNN, whose weights ship with the package) on a bundled two-face photo resized to ``--max-side``, repeated: a
real photo, so P-Net passes a realistic number of candidate boxes to R-Net and O-Net. Memory is measured on CUDA
only (peak allocated by PyTorch's allocator above what was allocated before the batch); on CPU it is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from indexer.config import DetectorSettings
from indexer.models import device as dev

PHOTO = Path(__file__).resolve().parents[2] / "samples" / "group" / "obama_and_biden.jpg"
MIB = 2**20
SMOKE_SIDE = 320   # --smoke detects on a small copy: seconds on one CPU thread
MIN_FACE = DetectorSettings().min_face_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, run, items: int) -> tuple[float, float | None]:
    """(items/s, peak bytes per item above what was allocated before; None off CUDA) of one call of ``run``."""
    _sync(device)
    base = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    run()
    _sync(device)
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated(device) - base) / items if device.type == "cuda" else None
    return items / seconds, peak


def measure_embedder(device: torch.device, precision: str, sizes: list[int]) -> list[dict]:
    """faces/s and peak bytes a face of InceptionResnetV1 (random weights, channels_last, autocast) by batch."""
    from facenet_pytorch import InceptionResnetV1

    model = InceptionResnetV1(pretrained=None).eval().to(device).to(memory_format=torch.channels_last)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
    rows = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        model(torch.zeros(1, 3, 160, 160, device=device).contiguous(memory_format=torch.channels_last))  # warm-up
        for bs in sizes:
            x = torch.randn(bs, 3, 160, 160, device=device).contiguous(memory_format=torch.channels_last)
            model(x)  # this shape's first pass picks its kernels (cuDNN): not timed
            rate, peak = _timed(device, lambda x=x: model(x), bs)
            rows.append({"batch": bs, "faces_per_s": round(rate, 1), "peak_mib_per_face": _mib(peak)})
            del x
    return rows


def measure_detector(device: torch.device, max_side: int, sizes: list[int]) -> tuple[list[dict], list[int]]:
    """images/s and peak bytes an image of FaceDetector on copies of PHOTO by batch; and the photo's shape."""
    from indexer.models.detector import FaceDetector

    detector = FaceDetector(DetectorSettings(max_side=max_side, batch_size=max(sizes)), device=device)
    photo = Image.open(PHOTO).convert("RGB")
    factor = max_side / max(photo.size)
    photo = photo.resize((round(photo.width * factor), round(photo.height * factor)), Image.BILINEAR)
    detector.detect([photo])  # warm-up
    rows = []
    for bs in sizes:
        found: list = []
        rate, peak = _timed(device, lambda bs=bs, found=found: found.extend(detector.detect([photo] * bs)), bs)
        rows.append({"batch": bs, "images_per_s": round(rate, 2), "peak_mib_per_image": _mib(peak),
                     "peak_bytes_per_pixel": None if peak is None else round(peak / (photo.width * photo.height), 1),
                     "faces_per_image": len(found[0]) if found else 0})
    return rows, [photo.height, photo.width]


def marginal(rows: list[dict], key: str) -> float | None:
    """Memory per extra item between the two largest batches (fixed costs such as cuDNN workspaces and autocast's
    weight copies cancel out): what the estimates in device.py stand for."""
    if len(rows) < 2 or rows[-1][key] is None:
        return None
    a, b = rows[-2], rows[-1]
    return round((b[key] * b["batch"] - a[key] * a["batch"]) / (b["batch"] - a["batch"]), 2)


def _mib(value: float | None) -> float | None:
    return None if value is None else round(value / MIB, 2)


def _powers(cap: int, smoke: bool) -> list[int]:
    return [1, 2] if smoke else [b for b in (1, 4, 8, 16, 32, 64, 128, 256, 512) if b <= cap]


def run(device: torch.device, max_side: int, smoke: bool) -> dict:
    from indexer.models.embedder import choose_precision, native_bf16

    info = dev.describe_device(device)
    precision, _ = choose_precision("auto", device.type, native_bf16(device))
    out: dict = {"device": info.describe(), "torch": torch.__version__, "smoke": smoke, "max_side": max_side,
                 "chosen": {"embedder": dev.choose_embedder_batch(0, info, precision)._asdict(),
                            "detector": dev.choose_detector_batch(0, info, max_side, MIN_FACE)._asdict()},
                 "estimates": {"embedder_mib_per_face": {p: dev.embed_bytes_per_face(p) / MIB
                                                         for p in (precision, "float32")},
                               "detector_mib_per_image_square": round(
                                   dev.detect_bytes_per_image(max_side, MIN_FACE) / MIB, 1),
                               "detector_bytes_per_pixel": round(dev.detect_bytes_per_image(1000, MIN_FACE) / 1e6, 1),
                               "safety": dev.CUDA_SAFETY}}
    out["embedder"] = {p: measure_embedder(device, p, _powers(dev.CUDA_EMBEDDER_MAX, smoke))
                       for p in dict.fromkeys([precision, "float32"] if not smoke else [precision])}
    out["detector"], out["photo_shape"] = measure_detector(device, max_side, _powers(dev.CUDA_DETECTOR_MAX, smoke))
    out["marginal"] = {**{f"embedder_{p}_mib_per_face": marginal(rows, "peak_mib_per_face")
                          for p, rows in out["embedder"].items()},
                       "detector_mib_per_image": marginal(out["detector"], "peak_mib_per_image")}
    out["faiss_gpu"] = _faiss()
    return out


def _faiss() -> str:
    try:
        import faiss
    except ImportError:
        return "not installed"
    return dev.faiss_gpu(faiss)[1]


def print_table(result: dict) -> None:
    print(f"device {result['device']}, torch {result['torch']}" + (" (smoke: sizes too small to mean anything)"
                                                                   if result["smoke"] else ""))
    for model, choice in result["chosen"].items():
        print(f"  chosen {model} batch {choice['size']}: {choice['reason']}")
    print(f"  estimates (before the {result['estimates']['safety']:g}x safety factor): {result['estimates']}")
    for precision, rows in result["embedder"].items():
        print(f"embedder {precision}: " + ", ".join(
            f"{r['batch']}: {r['faces_per_s']} faces/s {r['peak_mib_per_face']} MiB/face" for r in rows))
    h, w = result["photo_shape"]
    print(f"detector on {w}x{h}: " + ", ".join(
        f"{r['batch']}: {r['images_per_s']} images/s {r['peak_mib_per_image']} MiB/image "
        f"({r['peak_bytes_per_pixel']} B/px, {r['faces_per_image']} faces)" for r in result["detector"]))
    print(f"memory per extra item between the two largest batches (MiB): {result['marginal']}")
    print(f"faiss on GPU: {result['faiss_gpu']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--max-side", type=int, default=None,
                        help=f"long side of the detection copy (default detector.max_side; --smoke: {SMOKE_SIDE})")
    parser.add_argument("--out", type=Path, default=None, help="write measure.json into this folder")
    parser.add_argument("--smoke", action="store_true", help="batch 1 and 2 only, one thread: checks that it runs")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("measure: no CUDA device visible to torch", file=sys.stderr)
        return 1
    if args.smoke:
        torch.set_num_threads(1)
    max_side = args.max_side or (SMOKE_SIDE if args.smoke else DetectorSettings().max_side)
    result = run(device, max_side, args.smoke)
    print_table(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "measure.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
