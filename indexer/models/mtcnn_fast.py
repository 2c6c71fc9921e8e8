"""MTCNN's three stages run on facenet-pytorch's own networks and helpers, with two CPU hot spots replaced.

Profiling ``MTCNN.detect`` on LFW (2 CPU threads) put 38 % of the time in max pooling and 27 % in the loop that
cuts and resizes every candidate box one by one before RNet and ONet (~60 boxes per photo, each an
``F.interpolate(mode="area")`` call plus Python overhead). Both are replaced by equivalents that give the same
numbers, bit for bit:

- ``CeilMaxPool2d``: ``nn.MaxPool2d(k, s, ceil_mode=True)`` as separable maxima of strided slices. PyTorch runs
  max pooling on CPU as ``max_pool2d_with_indices``, 3-10x slower at these shapes. ``fast_pools`` swaps it into
  facenet-pytorch's PNet/RNet/ONet modules in place.
- ``area_crops``: all boxes of a stage at once from one summed-area table per photo. Area resizing averages
  integer pixel values over bins ``[floor(i*h/n), ceil((i+1)*h/n))``; integer table sums are exact and are divided
  as PyTorch divides them (``sum / kh / kw``), so every crop equals the interpolate call it replaces.

``detect_faces`` is facenet-pytorch's ``detect_face`` orchestration (same pyramid, thresholds, NMS, box
regression) with the per-box loops replaced by ``area_crops``. It takes the networks as arguments, as
facenet-pytorch's own function does. One deliberate change: RNet and ONet run on batches padded to a multiple of
32 boxes. Their batch sizes otherwise vary with every photo, and glibc's heap fragmented on the many sizes until
resident memory grew ~0.7 MB per photo (786 -> 1469 MB over 1000 LFW photos); padded, it levels off (~930 MB).
A batch-size-dependent kernel can round the last bit differently, so tests/test_mtcnn_fast.py checks that
``detect_faces`` finds exactly the faces ``MTCNN.detect`` finds, with boxes, probabilities and landmarks equal to
float32 rounding. The networks, weights and helper functions are facenet-pytorch's, imported, not copied.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from facenet_pytorch.models.utils.detect_face import (
    batched_nms_numpy,
    bbreg,
    fixed_batch_process,
    generateBoundingBox,
    imresample,
    pad,
    rerec,
)
from torch import nn
from torchvision.ops.boxes import batched_nms


class CeilMaxPool2d(nn.Module):
    """``nn.MaxPool2d(kernel, stride, ceil_mode=True)`` (no padding) as separable maxima of strided slices."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def _pool(self, x: torch.Tensor, dim: int, layout: torch.memory_format) -> torch.Tensor:
        k, s, length = self.kernel_size, self.stride, x.shape[dim]
        n = math.ceil((length - k) / s) + 1  # ceil mode: a last, partial window (it always starts inside)
        out = None
        for j in range(k):
            m = min(n, math.ceil((length - j) / s))  # windows that reach offset j (the partial one may not)
            part = x.narrow(dim, j, (m - 1) * s + 1)[(slice(None),) * dim + (slice(None, None, s),)]
            if out is None:
                out = part.contiguous(memory_format=layout)
            else:
                head = out.narrow(dim, 0, m)
                torch.maximum(head, part, out=head)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:  # in-place maxima cannot be differentiated; inference never gets here
            return F.max_pool2d(x, self.kernel_size, self.stride, ceil_mode=True)
        # Keep the input's memory layout, as nn.MaxPool2d does: the next convolution's rounding depends on it.
        layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        return self._pool(self._pool(x, 3, layout), 2, layout)


def fast_pools(module: nn.Module) -> int:
    """Replace every ceil-mode, unpadded ``nn.MaxPool2d`` with int sizes by ``CeilMaxPool2d``; returns how many."""
    swapped = 0
    for name, child in list(module.named_children()):
        if (isinstance(child, nn.MaxPool2d) and child.ceil_mode and child.padding in (0, (0, 0))
                and child.dilation in (1, (1, 1)) and isinstance(child.kernel_size, int)
                and isinstance(child.stride, int) and not child.return_indices):
            setattr(module, name, CeilMaxPool2d(child.kernel_size, child.stride))
            swapped += 1
        else:
            swapped += fast_pools(child)
    return swapped


def _bins(start: np.ndarray, length: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-resize bin edges [floor(i*len/size), ceil((i+1)*len/size)) per box, offset by the box start."""
    i = np.arange(size, dtype=np.int64)
    lo = start[:, None] + (i[None] * length[:, None]) // size
    hi = start[:, None] + ((i[None] + 1) * length[:, None] + size - 1) // size
    return torch.from_numpy(lo), torch.from_numpy(hi)


class SummedAreaTables:
    """One summed-area table per photo of a batch, built on first use and shared by the RNet and ONet stages.

    The photos hold integer pixel values (MTCNN casts uint8 to float), so integer tables are exact: int32 while
    255 * H * W fits, int64 beyond.
    """

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        h, w = images.shape[2:4]
        self.dtype = torch.int32 if 255 * (h + 1) * (w + 1) < 2**31 else torch.int64
        self.tables: dict[int, torch.Tensor] = {}

    def __getitem__(self, b: int) -> torch.Tensor:
        if b not in self.tables:
            img = self.images[b].to(self.dtype)
            self.tables[b] = F.pad(img.cumsum(1, dtype=self.dtype).cumsum(2, dtype=self.dtype), (1, 0, 1, 0))
        return self.tables[b]


def _corner(sat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Table values at every (row, col) pair of each box: [C, boxes, size, size]."""
    return sat[:, rows[:, :, None], cols[:, None, :]]


def area_crops(tables: SummedAreaTables, image_inds: np.ndarray, y0: np.ndarray, y1: np.ndarray,
               x0: np.ndarray, x1: np.ndarray, size: int) -> torch.Tensor:
    """``F.interpolate(images[i, :, y0:y1, x0:x1], (size, size), mode="area")`` for every box, stacked.

    Each bin sum comes exactly from four table corners; the division is done as PyTorch does it (``sum / kh / kw``)
    so the result is bit-identical.
    """
    dtype = tables.images.dtype
    out = torch.empty(len(y0), tables.images.shape[1], size, size, dtype=dtype)
    for b in np.unique(image_inds):
        sel = np.flatnonzero(image_inds == b)
        sat = tables[int(b)]
        rs, re = _bins(y0[sel], y1[sel] - y0[sel], size)
        cs, ce = _bins(x0[sel], x1[sel] - x0[sel], size)

        total = (_corner(sat, re, ce) - _corner(sat, rs, ce) - _corner(sat, re, cs) + _corner(sat, rs, cs))
        total = total.permute(1, 0, 2, 3)
        kh = (re - rs).to(dtype)[:, None, :, None]
        kw = (ce - cs).to(dtype)[:, None, None, :]
        out[torch.from_numpy(sel)] = total.to(dtype) / kh / kw  # the order PyTorch divides in
    return out


def _stage_input(tables: SummedAreaTables, boxes: torch.Tensor, image_inds: torch.Tensor, size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised size x size crops of the boxes that overlap the image; the boxes and indices kept."""
    h, w = tables.images.shape[2:4]
    y, ey, x, ex = pad(boxes, w, h)
    valid = (ey > y - 1) & (ex > x - 1)  # facenet-pytorch skips empty crops (and then misaligns; we drop them)
    keep = torch.from_numpy(np.flatnonzero(valid))
    inds = image_inds.cpu().numpy()[valid]
    crops = area_crops(tables, inds, y[valid] - 1, ey[valid], x[valid] - 1, ex[valid], size)
    return (crops - 127.5) * 0.0078125, boxes[keep], image_inds[keep]


def _run_padded(data: torch.Tensor, net: nn.Module, bucket: int = 32) -> tuple[torch.Tensor, ...]:
    """``net`` on ``data`` padded with zero rows to a multiple of ``bucket`` (few distinct sizes: see above)."""
    n = len(data)
    padded = -(-n // bucket) * bucket
    if padded > n:
        data = torch.cat([data, data.new_zeros((padded - n, *data.shape[1:]))])
    return tuple(out[:n] for out in fixed_batch_process(data, net))


@torch.inference_mode()
def detect_faces(imgs: np.ndarray, pnet: nn.Module, rnet: nn.Module, onet: nn.Module, minsize: int,
                 thresholds: list[float], factor: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Faces in a batch of same-shape uint8 RGB images [B, H, W, 3]: per image (boxes [n, 5] with the score
    last, landmarks [n, 5, 2]), as facenet-pytorch's ``detect_face`` returns them (CPU)."""
    dtype = next(pnet.parameters()).dtype
    images = torch.from_numpy(np.array(imgs, dtype=np.uint8)).permute(0, 3, 1, 2).type(dtype)  # a copy, as theirs
    batch_size, (h, w) = len(images), images.shape[2:4]
    scales = _pyramid_scales(h, w, minsize, factor)
    if not scales:  # smaller than the minimum face size: nothing to look at
        return [(np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)) for _ in range(batch_size)]

    boxes, image_inds = _pnet_stage(images, pnet, scales, thresholds[0])
    tables = SummedAreaTables(images)  # shared by the RNet and ONet crops
    boxes, image_inds = _rnet_stage(tables, boxes, image_inds, rnet, thresholds[1])
    boxes, image_inds, points = _onet_stage(tables, boxes, image_inds, onet, thresholds[2])

    boxes_np, points_np, inds_np = boxes.cpu().numpy(), points.cpu().numpy(), image_inds.cpu().numpy()
    return [(boxes_np[inds_np == b].copy(), points_np[inds_np == b].copy()) for b in range(batch_size)]


def _pyramid_scales(h: int, w: int, minsize: int, factor: float) -> list[float]:
    """The image scales PNet runs at: the smallest face of ``minsize`` becomes PNet's 12 pixels, then by ``factor``
    down to where the shorter side is 12 pixels. Empty when the image is smaller than ``minsize``."""
    m = 12.0 / minsize
    minl = min(h, w) * m
    scales, scale = [], m
    while minl >= 12:
        scales.append(scale)
        scale, minl = scale * factor, minl * factor
    return scales


def _pnet_stage(images: torch.Tensor, pnet: nn.Module, scales: list[float], threshold: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: PNet over the scale pyramid, NMS per scale and image, then per image; regressed, squared boxes."""
    h, w = images.shape[2:4]
    boxes_all, inds_all, picks, offset = [], [], [], 0
    for scale in scales:
        data = imresample(images, (int(h * scale + 1), int(w * scale + 1)))
        reg, probs = pnet((data - 127.5) * 0.0078125)
        boxes_s, inds_s = generateBoundingBox(reg, probs[:, 1], scale, threshold)
        boxes_all.append(boxes_s)
        inds_all.append(inds_s)
        picks.append(batched_nms(boxes_s[:, :4], boxes_s[:, 4], inds_s, 0.5) + offset)
        offset += boxes_s.shape[0]
    pick = torch.cat(picks)
    boxes, image_inds = torch.cat(boxes_all)[pick], torch.cat(inds_all)[pick]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                         boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh,
                         boxes[:, 4]]).permute(1, 0)
    return rerec(boxes), image_inds


def _rnet_stage(tables: SummedAreaTables, boxes: torch.Tensor, image_inds: torch.Tensor, rnet: nn.Module,
                threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: RNet on 24x24 crops rejects most candidates and refines the rest (NMS, regression, squared)."""
    if len(boxes) > 0:
        data, boxes, image_inds = _stage_input(tables, boxes, image_inds, 24)
    if len(boxes) > 0:
        reg, prob = _run_padded(data, rnet)
        score = prob[:, 1]
        ipass = score > threshold
        boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
        image_inds, mv = image_inds[ipass], reg[ipass]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds, mv = boxes[pick], image_inds[pick], mv[pick]
        boxes = rerec(bbreg(boxes, mv))
    return boxes, image_inds


def _onet_stage(tables: SummedAreaTables, boxes: torch.Tensor, image_inds: torch.Tensor, onet: nn.Module,
                threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 3: ONet on 48x48 crops: final boxes [n, 5], their image indices and landmarks [n, 5, 2]."""
    points = torch.zeros(0, 5, 2)
    if len(boxes) > 0:
        data, boxes, image_inds = _stage_input(tables, boxes, image_inds, 48)
    if len(boxes) == 0:
        return torch.zeros(0, 5), image_inds, points
    reg, landmarks, prob = _run_padded(data, onet)
    score = prob[:, 1]
    ipass = score > threshold
    landmarks = landmarks[ipass].permute(1, 0)
    boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
    image_inds, mv = image_inds[ipass], reg[ipass]
    w_i = boxes[:, 2] - boxes[:, 0] + 1
    h_i = boxes[:, 3] - boxes[:, 1] + 1
    points_x = w_i.repeat(5, 1) * landmarks[:5, :] + boxes[:, 0].repeat(5, 1) - 1
    points_y = h_i.repeat(5, 1) * landmarks[5:10, :] + boxes[:, 1].repeat(5, 1) - 1
    points = torch.stack((points_x, points_y)).permute(2, 1, 0)
    boxes = bbreg(boxes, mv)
    pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
    return boxes[pick], image_inds[pick], points[pick]
