"""The models' workers: how many, and that running chunks side by side changes nothing but the time."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from indexer.images import decode
from indexer.models.device import DeviceInfo
from indexer.models.parallel import (
    available_workers,
    choose_workers,
    map_workers,
    one_intra_op_thread,
    plan_chunks,
    split,
)
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


def test_work_handed_to_a_worker_stays_on_that_worker():
    outer = threading.get_ident()

    def inner(x: int) -> tuple[int, int, int]:
        return x, threading.get_ident(), available_workers(2)

    def work(xs: list[int]) -> list[tuple[int, int, int]]:
        got = map_workers(inner, xs, workers=2)  # from a worker: runs here, one after another
        assert {ident for _, ident, _ in got} == {threading.get_ident()}
        return got

    results = map_workers(work, [[1, 2], [3, 4]], workers=2)
    assert [[x for x, _, _ in r] for r in results] == [[1, 2], [3, 4]]
    assert {n for r in results for _, _, n in r} == {1}
    assert {ident for r in results for _, ident, _ in r}.isdisjoint({outer})
    assert available_workers(2) == 2  # the caller's own thread is no worker


@pytest.mark.parametrize("groups,costs,workers,most,want", [
    # 16 same-shape photos (LFW) on 2 workers: two halves, as the detector batched them before
    ([list(range(16))], [1] * 16, 2, 16, [list(range(8)), list(range(8, 16))]),
    # one worker: every group whole, cut only at ``most``
    ([list(range(5)), [5, 6]], [1] * 7, 1, 4, [[2, 3, 4], [0, 1], [5, 6]]),
    # camera photos of several shapes: groups stay apart, the costliest chunk first
    ([[0, 1], [2], [3, 4, 5]], [4, 4, 9, 1, 1, 1], 2, 16, [[2], [0, 1], [3, 4, 5]]),
    ([[0], [1], [2]], [1, 3, 2], 2, 16, [[1], [2], [0]]),
    # a group holding most of the photos is cut for the workers; a small one stays whole
    ([list(range(6)), [6]], [1] * 7, 2, 16, [[0, 1, 2], [3, 4, 5], [6]]),
    ([], [], 2, 16, []),
])
def test_plan_chunks_table(groups, costs, workers, most, want):
    got = plan_chunks(groups, costs, workers, most)
    assert got == want
    assert sorted(i for c in got for i in c) == sorted(i for g in groups for i in g)


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


def test_face_stage_on_two_workers_gives_what_one_worker_gives(tmp_path):
    """Each worker detects, crops and embeds its own photos (FaceStage): the same faces and vectors as one."""
    from indexer.config import Settings
    from indexer.models.detector import FaceDetector
    from indexer.models.embedder import FaceEmbedder
    from indexer.pipeline.faces import FaceStage, StageTimer
    from indexer.pipeline.records import ReadItem

    paths = sorted((SAMPLES / "photos").rglob("*.jp*g")) + sorted((SAMPLES / "group").glob("*.jpg"))
    settings = Settings(index_dir=tmp_path)
    out = []
    for workers in (1, 2):
        models = (FaceDetector(workers=workers), FaceEmbedder(workers=workers))
        items = [ReadItem(path=str(p), image=decode(p, 10**9), size=1, mtime_ns=1, sha256="x") for p in paths]
        timer = StageTimer()
        out.append(FaceStage(settings, lambda models=models: models)(items, timer))
        assert {"detect", "crop", "embed"} <= set(timer.seconds)
    one, two = out
    assert [len(a.faces) for a in one] == [len(b.faces) for b in two] and sum(len(a.faces) for a in one) >= len(paths)
    for a, b in zip(one, two, strict=True):
        assert a.read.image is None and b.read.image is None  # the pixels are freed once the faces are out
        for fa, fb in zip(a.faces, b.faces, strict=True):
            np.testing.assert_allclose(fa.box, fb.box, atol=1e-2)
            assert float(np.dot(fa.vector, fb.vector)) > 0.9999
