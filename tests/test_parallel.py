"""The models' workers: how many, and that running chunks side by side changes nothing but the time."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from indexer.images import decode
from indexer.models.device import DeviceInfo
from indexer.models.parallel import choose_workers, map_workers, one_intra_op_thread, split
from tests.conftest import SAMPLES


@pytest.mark.parametrize("requested,device,want", [
    (0, DeviceInfo(kind="cpu", cpu_cores=2), 2),
    (0, DeviceInfo(kind="cpu", cpu_cores=16), 16),
    (0, DeviceInfo(kind="cpu", cpu_cores=0), 1),          # affinity unknown: still one
    (3, DeviceInfo(kind="cpu", cpu_cores=2), 3),          # the user's number wins
    (0, DeviceInfo(kind="cuda", name="NVIDIA H200", total_memory=141 << 30, capability=(9, 0), cpu_cores=16), 1),
    (2, DeviceInfo(kind="cuda", name="NVIDIA H200", total_memory=141 << 30, capability=(9, 0), cpu_cores=16), 2),
])
def test_choose_workers_table(requested, device, want):
    n, reason = choose_workers(requested, device)
    assert n == want and reason


@pytest.mark.parametrize("n,parts,want", [
    (10, 2, [range(0, 5), range(5, 10)]), (5, 2, [range(0, 2), range(2, 5)]), (1, 4, [range(0, 1)]), (0, 2, []),
])
def test_split_is_contiguous_and_near_equal(n, parts, want):
    assert split(n, parts) == want


def test_map_workers_keeps_order_runs_side_by_side_and_restores_torch_threads():
    before = torch.get_num_threads()
    seen, barrier = [], threading.Barrier(2, timeout=30)

    def work(x: int) -> int:
        seen.append(torch.get_num_threads())
        barrier.wait()  # both chunks in flight at once, or this times out
        return x * x

    assert map_workers(work, [3, 4], workers=2) == [9, 16]
    assert seen == [1, 1]
    assert torch.get_num_threads() == before
    with pytest.raises(ZeroDivisionError):
        map_workers(lambda x: 1 // x, [1, 0, 2], workers=2)
    assert torch.get_num_threads() == before


def test_nested_callers_restore_threads_once_the_last_leaves():
    before = torch.get_num_threads()
    with one_intra_op_thread():
        with one_intra_op_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_two_workers_find_and_embed_what_one_does():
    from indexer.models.detector import FaceDetector
    from indexer.models.embedder import FaceEmbedder

    photos = [decode(p, 10**9) for p in sorted((SAMPLES / "photos").rglob("*.jp*g"))]
    photos += [decode(p, 10**9) for p in sorted((SAMPLES / "group").glob("*.jpg"))]
    one_d, two_d = FaceDetector(workers=1), FaceDetector(workers=2)
    one, two = one_d.detect(photos), two_d.detect(photos)
    assert [len(f) for f in one] == [len(f) for f in two] and sum(map(len, one)) >= len(photos)
    for a, b in zip(one, two, strict=True):
        for fa, fb in zip(a, b, strict=True):
            np.testing.assert_allclose(fa.box, fb.box, atol=1e-2)
    crops = [one_d.crop(im, f) for im, faces in zip(photos, one, strict=True) for f in faces]
    e1, e2 = FaceEmbedder(workers=1), FaceEmbedder(workers=2)
    np.testing.assert_allclose(e1.embed(crops), e2.embed(crops), atol=1e-4)
