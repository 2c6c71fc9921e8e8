"""MTCNN's three stages run on facenet-pytorch's own networks and helpers, with the CPU hot spots replaced.

Profiles of ``MTCNN.detect`` on CPU found the time in places other than the networks' arithmetic: max pooling
(38 % on LFW), the loop that cuts and resizes every candidate box one by one before RNet and ONet (27 %), and, on
camera-size photos, the pyramid's area resizes and the summed-area tables. What replaces them:

- ``CeilMaxPool2d``: ``nn.MaxPool2d(k, s, ceil_mode=True)`` as separable maxima of strided slices, bit-identical.
  PyTorch runs max pooling on CPU as ``max_pool2d_with_indices``, 3-10x slower at these shapes. ``fast_pools``
  swaps it into facenet-pytorch's PNet/RNet/ONet modules in place; ``prepare_nets`` also stores their weights
  channels-last (oneDNN's convolutions and the element-wise layers run 1.3-2x faster on that layout here).
- ``area_crops``: all boxes of a stage at once from one summed-area table per photo (OpenCV's ``integral``,
  exact integer sums, ~50x faster than two ``cumsum`` passes). Area resizing averages integer pixel values over
  bins ``[floor(i*h/n), ceil((i+1)*h/n))``; the sums are divided as PyTorch divides them (``sum / kh / kw``), so
  every crop equals the ``F.interpolate(mode="area")`` call it replaces, bit for bit.
- ``pyramid_level``: PNet's scale pyramid from the same tables, ~3x faster than ``imresample``'s area resize and
  equal to it bit for bit.

With the weights channels-last, the networks round differently in the last bits, so ``detect_faces`` finds the
faces ``MTCNN.detect`` finds with boxes, probabilities and landmarks equal to float32 rounding
(tests/test_mtcnn_fast.py).

``detect_faces`` is facenet-pytorch's ``detect_face`` orchestration (same pyramid scales, thresholds, NMS, box
regression) with those pieces swapped in. It takes the networks as arguments, as facenet-pytorch's own function
does. RNet and ONet run on batches padded to a multiple of 32 boxes: their batch sizes otherwise vary with every
photo, and glibc's heap fragmented on the many sizes until resident memory grew ~0.7 MB per photo (786 -> 1469 MB
over 1000 LFW photos); padded, it levels off (~930 MB). The networks, weights and helper functions are
facenet-pytorch's, imported, not copied.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.boxes import batched_nms

from indexer.models.facenet_api import helper

batched_nms_numpy, bbreg, fixed_batch_process, generateBoundingBox, pad, rerec = (
    helper(name) for name in ("batched_nms_numpy", "bbreg", "fixed_batch_process", "generateBoundingBox", "pad",
                              "rerec"))


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


class RowPReLU(nn.Module):
    """``nn.PReLU`` (per-channel weights) for channels-last activations, bit-identical, 3-5x faster there.

    PyTorch's PReLU kernel on a channels-last tensor broadcasts its weight over the innermost dimension, which
    holds just the 10-64 channels: measured on PNet's first activation of a 1280 px photo (1 x 10 x 574 x 766),
    6.8-12.7 ms against 1.3 ms for the same data laid out NCHW, and 39 % of PNet's time. The same bytes seen as
    ``[N * H, W * C]`` (one row per image row) with the weight repeated ``W`` times give the kernel long rows to
    vectorise over: 2.3 ms, the same arithmetic (``x if x > 0 else w * x``) on the same values. Other inputs (a
    dense layer's [N, C], NCHW tensors) go to ``F.prelu`` as they are."""

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        self.weight = prelu.weight
        self._repeated: dict[int, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
            return F.prelu(x, self.weight)
        n, c, h, w = x.shape
        weight = self._repeated.get(w)
        if weight is None or weight.dtype != x.dtype:
            weight = self._repeated[w] = self.weight.detach().to(x.dtype).repeat(w)
        rows = x.permute(0, 2, 3, 1).reshape(n * h, w * c)  # a view: channels-last memory is N, H, W, C
        return F.prelu(rows, weight).view(n, h, w, c).permute(0, 3, 1, 2)


def fast_prelus(module: nn.Module) -> int:
    """Replace every ``nn.PReLU`` with per-channel weights by ``RowPReLU``, in place; returns how many."""
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.PReLU) and child.weight.numel() > 1:
            setattr(module, name, RowPReLU(child))
            swapped += 1
        else:
            swapped += fast_prelus(child)
    return swapped


class FastPNet(nn.Module):
    """facenet-pytorch's PNet (its own layers and weights), with its two 1x1 heads as one matrix product on the
    channels-last features (PyTorch runs 1x1 convolutions with few outputs on its slow, non-oneDNN path) and the
    face probability as ``sigmoid(l1 - l0)``: the two-way softmax's second output, without computing the first.
    Returns (box regression [B, 4, h, w], face probability [B, h, w])."""

    def __init__(self, pnet: nn.Module) -> None:
        super().__init__()
        self.pnet = pnet
        heads = (pnet.conv4_1, pnet.conv4_2)
        self.register_buffer("weight", torch.cat([h.weight.detach() for h in heads]).flatten(1).t().contiguous())
        self.register_buffer("bias", torch.cat([h.bias.detach() for h in heads]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pnet
        x = p.prelu3(p.conv3(p.prelu2(p.conv2(p.pool1(p.prelu1(p.conv1(x)))))))
        n, c, h, w = x.shape
        out = torch.addmm(self.bias, x.permute(0, 2, 3, 1).reshape(-1, c), self.weight).view(n, h, w, 6)
        face = torch.sigmoid(out[..., 1] - out[..., 0])
        return out[..., 2:].permute(0, 3, 1, 2), face


def prepare_nets(pnet: nn.Module, rnet: nn.Module, onet: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """facenet-pytorch's P/R/ONet made fast on CPU: ``fast_pools``, ``fast_prelus`` and channels-last weights in
    place, PNet's heads fused (``FastPNet``). Returns the networks to pass to ``detect_faces``."""
    for net in (pnet, rnet, onet):
        fast_pools(net)
        fast_prelus(net)
        net.to(memory_format=torch.channels_last)
    return FastPNet(pnet).eval(), rnet, onet


def _bins(start: np.ndarray, length: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-resize bin edges [floor(i*len/size), ceil((i+1)*len/size)) per box, offset by the box start."""
    i = np.arange(size, dtype=np.int64)
    lo = start[:, None] + (i[None] * length[:, None]) // size
    hi = start[:, None] + ((i[None] + 1) * length[:, None] + size - 1) // size
    return torch.from_numpy(lo), torch.from_numpy(hi)


class SummedAreaTables:
    """One summed-area table per photo of a batch of uint8 RGB photos [B, H, W, 3], built on first use and shared by
    the RNet and ONet stages: [H + 1, W + 1, 3], OpenCV's ``integral`` (exact: int32 while 255 * H * W fits, float64
    beyond, exact to 2**53)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        h, w = images.shape[1:3]
        self.shape = (h, w)
        self.depth = cv2.CV_32S if 255 * (h + 1) * (w + 1) < 2**31 else cv2.CV_64F
        self.tables: dict[int, torch.Tensor] = {}

    def __getitem__(self, b: int) -> torch.Tensor:
        if b not in self.tables:
            self.tables[b] = torch.from_numpy(cv2.integral(np.ascontiguousarray(self.images[b]), sdepth=self.depth))
        return self.tables[b]


def pyramid_level(tables: SummedAreaTables, size: tuple[int, int]) -> torch.Tensor:
    """Every photo of the batch area-resized to ``size`` [B, 3, h, w] (float32, channels-last): one level of PNet's
    pyramid, equal bit for bit to facenet-pytorch's ``imresample`` (``F.interpolate(mode="area")``), from the
    summed-area tables: rows first, then columns, so each level costs four gathers and two subtractions."""
    h, w = tables.shape
    rs, re = (v[0] for v in _bins(np.zeros(1, np.int64), np.array([h]), size[0]))
    cs, ce = (v[0] for v in _bins(np.zeros(1, np.int64), np.array([w]), size[1]))
    kh = (re - rs).to(torch.float32)[:, None, None]
    kw = (ce - cs).to(torch.float32)[None, :, None]
    levels = []
    for b in range(len(tables.images)):
        sat = tables[b]
        rows = sat.index_select(0, re) - sat.index_select(0, rs)
        total = rows.index_select(1, ce) - rows.index_select(1, cs)
        levels.append(total.to(torch.float32).div_(kh).div_(kw))  # the order PyTorch divides in
    return torch.stack(levels).permute(0, 3, 1, 2)


def _corner(sat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Table values at every (row, col) pair of each box: [boxes, size, size, C]."""
    return sat[rows[:, :, None], cols[:, None, :]]


def area_crops(tables: SummedAreaTables, image_inds: np.ndarray, y0: np.ndarray, y1: np.ndarray,
               x0: np.ndarray, x1: np.ndarray, size: int) -> torch.Tensor:
    """``F.interpolate(images[i, :, y0:y1, x0:x1], (size, size), mode="area")`` for every box, stacked
    [boxes, C, size, size] (float32, channels-last).

    Each bin sum comes exactly from four table corners; the division is done as PyTorch does it (``sum / kh / kw``)
    so the result is bit-identical.
    """
    channels = tables.images.shape[3]
    dtype = torch.float32
    out = torch.empty(len(y0), size, size, channels, dtype=dtype)
    for b in np.unique(image_inds):
        sel = np.flatnonzero(image_inds == b)
        sat = tables[int(b)]
        rs, re = _bins(y0[sel], y1[sel] - y0[sel], size)
        cs, ce = _bins(x0[sel], x1[sel] - x0[sel], size)
        total = _corner(sat, re, ce) - _corner(sat, rs, ce) - _corner(sat, re, cs) + _corner(sat, rs, cs)
        kh = (re - rs).to(dtype)[:, :, None, None]
        kw = (ce - cs).to(dtype)[:, None, :, None]
        out[torch.from_numpy(sel)] = total.to(dtype) / kh / kw  # the order PyTorch divides in
    return out.permute(0, 3, 1, 2)


def _stage_input(tables: SummedAreaTables, boxes: torch.Tensor, image_inds: torch.Tensor, size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised size x size crops of the boxes that overlap the image; the boxes and indices kept."""
    h, w = tables.shape
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
    if padded > n:  # padded in place of a torch.cat, which would give back the slow (non-channels-last) layout
        full = data.new_zeros((padded, *data.shape[1:])).contiguous(memory_format=torch.channels_last)
        full[:n] = data
        data = full
    return tuple(out[:n] for out in fixed_batch_process(data, net))


@torch.inference_mode()
def detect_faces(imgs: np.ndarray, pnet: nn.Module, rnet: nn.Module, onet: nn.Module, minsize: int,
                 thresholds: list[float], factor: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Faces in a batch of same-shape uint8 RGB images [B, H, W, 3]: per image (boxes [n, 5] with the score
    last, landmarks [n, 5, 2]), as facenet-pytorch's ``detect_face`` returns them (CPU)."""
    imgs = np.ascontiguousarray(imgs, dtype=np.uint8)
    batch_size, (h, w) = len(imgs), imgs.shape[1:3]
    scales = _pyramid_scales(h, w, minsize, factor)
    if not scales:  # smaller than the minimum face size: nothing to look at
        return [(np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)) for _ in range(batch_size)]

    tables = SummedAreaTables(imgs)  # shared by the pyramid and the RNet and ONet crops
    boxes, image_inds = _pnet_stage(tables, pnet, scales, thresholds[0])
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


def _pnet_stage(tables: SummedAreaTables, pnet: nn.Module, scales: list[float], threshold: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: PNet over the scale pyramid, NMS per scale and image, then per image; regressed, squared boxes."""
    h, w = tables.shape
    boxes_all, inds_all, picks, offset = [], [], [], 0
    for scale in scales:
        data = pyramid_level(tables, (int(h * scale + 1), int(w * scale + 1)))
        reg, probs = pnet((data - 127.5) * 0.0078125)
        face = probs if probs.dim() == 3 else probs[:, 1]  # FastPNet gives the face probability alone
        boxes_s, inds_s = generateBoundingBox(reg, face, scale, threshold)
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
