"""The CPU detector's replacements for facenet-pytorch's hot spots give facenet-pytorch's numbers.

Pooling, cropping and the pyramid's resizes are bit-identical on any CPU, and the tests say so with torch.equal: a
maximum, one multiplication (PReLU) and area means of whole-number pixel sums (exact in float32, then one division)
round the same way whatever the kernels. Whole detection finds the same faces with equal boxes, probabilities and
landmarks to float32 rounding: channels-last weights, the fused PNet heads and padded RNet/ONet batches sum in
another order, and how much that moves the last bits depends on the CPU's kernels. Tolerances are set for any CPU:
on this repository's Intel CPUs the largest differences were 1.2e-4 px (boxes, landmarks) and 3.6e-7
(probabilities), an AMD EPYC gave 1.8e-6 on a probability (it failed the old 1e-6); the tests allow 1e-2 px and
1e-5, which no real change of detection stays within.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from facenet_pytorch import MTCNN
from PIL import Image
from torch import nn

from indexer.models.facenet_api import helper
from indexer.models.mtcnn_fast import (
    CeilMaxPool2d,
    FastPNet,
    RowPReLU,
    SummedAreaTables,
    area_crops,
    detect_faces,
    fast_pools,
    fast_prelus,
    prepare_nets,
    pyramid_level,
)
from tests.conftest import SAMPLES

imresample = helper("imresample")


@pytest.mark.parametrize("kernel", [2, 3])
@pytest.mark.parametrize("size", [(7, 7), (8, 9), (150, 149), (3, 4), (3, 3)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_ceil_max_pool_is_bit_identical_and_keeps_the_layout(kernel, size, layout):
    x = torch.randn(3, 10, *size, generator=torch.Generator().manual_seed(7)).contiguous(memory_format=layout)
    with torch.inference_mode():
        want = nn.MaxPool2d(kernel, 2, ceil_mode=True)(x)
        got = CeilMaxPool2d(kernel, 2)(x)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    assert got.stride() == want.stride()  # the next convolution rounds differently on another layout


@pytest.mark.parametrize("shape", [(1, 10, 57, 77), (3, 16, 9, 11), (2, 32, 1, 1), (5, 64, 3, 3)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_row_prelu_is_bit_identical_and_keeps_the_layout(shape, layout):
    torch.manual_seed(sum(shape))
    prelu = nn.PReLU(shape[1])
    prelu.weight.data = torch.randn(shape[1])  # any sign and size, not just MTCNN's (0, 1) slopes
    x = torch.randn(*shape).contiguous(memory_format=layout)
    fast = RowPReLU(prelu)
    with torch.inference_mode():
        want, got = prelu(x), fast(x)
        assert torch.equal(got, want)
        assert got.stride() == want.stride()
        dense = torch.randn(7, shape[1])  # a dense layer's [N, C] (RNet's and ONet's last PReLU)
        assert torch.equal(fast(dense), prelu(dense))


def test_fast_prelus_swaps_per_channel_prelus_only():
    model = nn.Sequential(nn.PReLU(8), nn.Sequential(nn.PReLU(4)), nn.PReLU())
    assert fast_prelus(model) == 2
    assert [type(m).__name__ for m in (model[0], model[1][0], model[2])] == ["RowPReLU", "RowPReLU", "PReLU"]


def test_fast_pools_swaps_only_what_it_can_reproduce():
    model = nn.Sequential(nn.MaxPool2d(2, 2, ceil_mode=True), nn.MaxPool2d(3, 2),
                          nn.Sequential(nn.MaxPool2d(3, 2, ceil_mode=True)), nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    assert fast_pools(model) == 2
    assert [type(m).__name__ for m in (model[0], model[1], model[2][0], model[3])] == \
        ["CeilMaxPool2d", "MaxPool2d", "CeilMaxPool2d", "MaxPool2d"]


@pytest.mark.parametrize("size", [24, 48])
def test_area_crops_equal_one_interpolate_per_box(size):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 120, 90, 3), dtype=np.uint8)
    photos = torch.as_tensor(pixels).permute(0, 3, 1, 2).float()
    n = 400
    inds = rng.integers(0, 3, n)
    y0, x0 = rng.integers(0, 119, n), rng.integers(0, 89, n)
    # From 1-pixel boxes (upsampled) to boxes larger than the output, clipped at the borders.
    y1 = np.minimum(y0 + rng.integers(1, 110, n), 120)
    x1 = np.minimum(x0 + rng.integers(1, 90, n), 90)
    got = area_crops(SummedAreaTables(pixels), inds, y0, y1, x0, x1, size)
    for k in range(n):
        one = F.interpolate(photos[inds[k], :, y0[k]:y1[k], x0[k]:x1[k]].unsqueeze(0), size=(size, size), mode="area")
        assert torch.equal(got[k:k + 1], one), k


@pytest.mark.parametrize("shape", [(2, 250, 250), (1, 37, 53), (1, 960, 1280)])
def test_pyramid_levels_equal_facenet_pytorchs_imresample(shape):
    pixels = np.random.default_rng(5).integers(0, 256, (*shape, 3), dtype=np.uint8)
    tables = SummedAreaTables(pixels)
    photos = torch.as_tensor(pixels).permute(0, 3, 1, 2).float()
    h, w = shape[1:]
    for scale in (1.3, 0.6, 0.6 * 0.709, 0.1, 12 / min(h, w)):
        size = (int(h * scale + 1), int(w * scale + 1))
        assert torch.equal(pyramid_level(tables, size), imresample(photos, size)), scale


def test_fast_pnet_gives_pnets_regression_and_face_probability():
    pnet = MTCNN().pnet.eval()
    x = torch.randn(2, 3, 61, 47, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want_reg, want_prob = pnet(x)
        fast, _, _ = prepare_nets(pnet, MTCNN().rnet, MTCNN().onet)
        assert isinstance(fast, FastPNet)
        reg, face = fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(reg, want_reg, rtol=0, atol=1e-5)  # measured here: 2.1e-7 (20 shapes)
    torch.testing.assert_close(face, want_prob[:, 1], rtol=0, atol=1e-5)  # 1.2e-7 here, 1.8e-6 on an AMD EPYC


def _photos(paths, shape=None) -> list[np.ndarray]:
    images = [Image.open(p).convert("RGB") for p in paths]
    return [np.asarray(im.resize(shape) if shape else im) for im in images]


def _compare(batches: list[np.ndarray]) -> int:
    """Run both detectors on each same-shape batch; assert the same faces; return how many."""
    reference = MTCNN(keep_all=True, select_largest=False).eval()
    fast = MTCNN(keep_all=True, select_largest=False).eval()
    nets = prepare_nets(fast.pnet, fast.rnet, fast.onet)
    assert sum(isinstance(m, CeilMaxPool2d) for m in fast.modules()) == 6
    faces = 0
    for batch in batches:
        boxes, probs, points = reference.detect(batch, landmarks=True)
        found = detect_faces(batch, *nets, fast.min_face_size, fast.thresholds, fast.factor)
        for (got_boxes, got_points), want_boxes, want_probs, want_points in zip(found, boxes, probs, points,
                                                                              strict=True):
            if want_boxes is None:
                assert len(got_boxes) == 0
                continue
            assert got_boxes.shape == (len(want_boxes), 5)
            np.testing.assert_allclose(got_boxes[:, :4], np.asarray(want_boxes, np.float32), rtol=0, atol=1e-2)
            np.testing.assert_allclose(got_boxes[:, 4], np.asarray(want_probs, np.float32), rtol=0, atol=1e-5)
            np.testing.assert_allclose(got_points, np.asarray(want_points, np.float32), rtol=0, atol=1e-2)
            faces += len(got_boxes)
    return faces


def test_detect_faces_equals_facenet_pytorch_on_the_bundled_photos():
    paths = sorted((SAMPLES / "photos").rglob("*.jp*g")) + sorted((SAMPLES / "group").glob("*.jpg"))
    # One batch of every photo at one shape (as the detector groups them), and each group photo at its own size.
    batches = [np.stack(_photos(paths, (400, 300)))] + [a[None] for a in _photos(sorted((SAMPLES / "group").glob("*")))]
    assert _compare(batches) >= len(paths)


@pytest.mark.lfw
def test_detect_faces_equals_facenet_pytorch_on_lfw_and_multi_face_photos(shared_data):
    from benchmarks.lfw_data import lfw_images

    paths, _ = lfw_images(shared_data)
    lfw = np.stack(_photos(paths[::97][:96]))
    batches = [lfw[i:i + 16] for i in range(0, len(lfw), 16)]
    multi = sorted((shared_data / "multi_face" / "face_recognition").glob("*"))
    batches += [a[None] for a in _photos(multi) if max(a.shape) <= 1280]
    assert _compare(batches) >= len(lfw)
