"""The two-stage schedule of the model workers (detect-and-crop jobs, batched embedding), with stand-in stages."""

from __future__ import annotations

import threading

import pytest

from indexer.pipeline.schedule import run_two_stages


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_item_is_handled_once_in_batches_of_at_most_batch(workers):
    jobs = [list(range(start, start + n)) for start, n in ((0, 5), (5, 1), (6, 0), (6, 7), (13, 2))]
    batches: list[list[int]] = []
    lock = threading.Lock()

    def second(items: list[int]) -> None:
        with lock:
            batches.append(items)

    run_two_stages(jobs, lambda job: list(job), second, batch=4, workers=workers)
    assert sorted(i for b in batches for i in b) == list(range(15))
    assert all(1 <= len(b) <= 4 for b in batches)


def test_embedding_starts_while_detection_still_runs():
    """With a barrier between the stages this would wait forever: the slow job ends only once the quick job's
    items went through the second stage."""
    second_ran = threading.Event()

    def first(job: str) -> list[str]:
        if job == "slow":
            assert second_ran.wait(timeout=60), "the second stage never ran beside the first"
        return [job + "-face"]

    seen: list[list[str]] = []
    run_two_stages(["slow", "quick"], first, lambda items: (seen.append(items), second_ran.set()), batch=8,
                   workers=2)
    assert sorted(i for b in seen for i in b) == ["quick-face", "slow-face"]


def test_the_last_items_are_shared_among_the_workers():
    sizes: list[int] = []
    lock = threading.Lock()

    def second(items: list[int]) -> None:
        with lock:
            sizes.append(len(items))

    run_two_stages([list(range(8))], lambda job: job, second, batch=16, workers=2)
    assert sorted(sizes) == [4, 4]  # one job's 8 items: half each, not 8 on one worker and none on the other


@pytest.mark.parametrize("where", ["first", "second"])
def test_a_failure_stops_the_workers_and_is_raised(where):
    started = []

    def first(job: int) -> list[int]:
        started.append(job)
        if where == "first" and job == 0:
            raise ValueError("bad photo")
        return [job]

    def second(items: list[int]) -> None:
        if where == "second":
            raise ValueError("bad crop")

    with pytest.raises(ValueError, match="bad"):
        run_two_stages(list(range(50)), first, second, batch=1, workers=2)
    assert len(started) < 50  # the others stopped at their next step instead of running every job


def test_no_jobs_runs_nothing():
    run_two_stages([], lambda job: pytest.fail("ran"), lambda items: pytest.fail("ran"), batch=4, workers=2)
