"""The adaptive method's second pass on cluster centers, and the people folds of the cross-validation (issue 11)."""

from __future__ import annotations

import numpy as np

from benchmarks.cluster_cv import people_folds, worst_fold_best
from indexer.cluster import cluster_identities
from indexer.cluster.identity import merge_close_centers

DIM = 512


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def test_two_tight_halves_of_one_person_join_and_strangers_do_not():
    rng = np.random.default_rng(5)
    person, stranger = unit(rng.normal(size=DIM)), unit(rng.normal(size=DIM))
    look = unit(rng.normal(size=DIM))
    # One person in two looks (center cosine ~0.8), each look tight; a stranger far from both; one noise face.
    noise = lambda: 0.5 * rng.normal(size=(6, DIM)) / np.sqrt(DIM)  # noqa: E731  (norm ~0.5 a face)
    young, old = unit(person + 0.3 * look + noise()), unit(person - 0.3 * look + noise())
    other = unit(stranger + noise())
    x = np.concatenate([young, old, other, unit(rng.normal(size=(1, DIM)))])
    labels = np.array([0] * 6 + [1] * 6 + [2] * 6 + [-1])
    merged = merge_close_centers(x, labels, 0.7)
    assert len(set(merged[:12])) == 1
    assert merged[12] != merged[0] and len(set(merged[12:18])) == 1
    assert merged[18] == -1
    assert (merge_close_centers(x, labels, 0.99) == labels).all()  # nothing that close: unchanged


def test_the_second_pass_off_is_the_plain_adaptive_method():
    rng = np.random.default_rng(1)
    x = unit(rng.normal(size=(60, DIM)) + np.repeat(rng.normal(size=(6, DIM)) * 0.2, 10, axis=0))
    plain = cluster_identities(x, "adaptive", threshold=0.3, pair_margin=0.03)
    assert (cluster_identities(x, "adaptive", threshold=0.3, pair_margin=0.03, center_merge=0.0) == plain).all()


def test_people_folds_are_disjoint_and_share_the_big_identities():
    people = np.array(["big"] * 50 + ["big2"] * 40 + ["mid"] * 10 + [f"s{i}" for i in range(47)])
    folds = people_folds(people, k=5)
    for name in np.unique(people):
        assert len(set(folds[people == name])) == 1  # a person lies in one fold
    assert folds[0] != folds[50]  # the two largest people go to different folds
    strangers = np.array([p.startswith("s") for p in people])
    assert sorted(np.bincount(folds[strangers]).tolist()) == [9, 9, 9, 10, 10]  # dealt round-robin


def test_the_worst_fold_best_rule():
    balanced = np.array([[0.99, 0.80, 0.99], [0.90, 0.90, 0.91], [0.90, 0.90, 0.90]])
    assert worst_fold_best(balanced, [0, 1, 2]) == 1    # best minimum (0.90), then best mean
    assert worst_fold_best(balanced, [0, 2]) == 0       # without the bad fold, row 0 is best
