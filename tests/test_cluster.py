"""Clustering library: K-Means, identity methods, metrics and stable ids on small seeded data, plus a real-model
check on a small LFW subset (marked ``lfw``)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from indexer.cluster import (
    assign_to_centers,
    centers_from_labels,
    choose_k,
    cluster_identities,
    external_scores,
    fit_kmeans,
    internal_scores,
    match_ids,
    purity,
)
from indexer.cluster.graph_linkage import graph_average_linkage
from indexer.cluster.identity import (
    LinkageForest,
    _tree_exact,
    average_linkage_forest,
    renumber,
)
from indexer.cluster.kmeans import kmeanspp_seeds
from indexer.errors import ClusteringError


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def blobs(people: int = 6, per_person: int = 8, noise: float = 0.03, seed: int = 7):
    """Well separated identities: random unit centers (nearly orthogonal in 512-d) plus small noise."""
    rng = np.random.default_rng(seed)
    centers = unit(rng.normal(size=(people, 512)))
    truth = np.repeat(np.arange(people), per_person)
    x = unit(centers[truth] + noise * rng.normal(size=(len(truth), 512)))
    return x, truth, centers


# --- K-Means -------------------------------------------------------------------------------------------------------

# K-Means tests use tight identities (cosine ~0.95 to their center): with face-like spread (noise 0.03, cosine
# ~0.8) and k equal to the number of people, even k-means++ sometimes seeds one person twice, a local minimum
# that Lloyd iterations cannot leave and not what these tests are about.

def test_kmeans_recovers_separated_identities():
    x, truth, _ = blobs(noise=0.01)
    result = fit_kmeans(x, 6, seed=1)
    assert result.centers.shape == (6, 512) and result.centers.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.centers, axis=1), 1.0, atol=1e-5)
    assert result.labels.dtype == np.int64 and result.labels.shape == (48,)
    assert purity(truth, result.labels) == 1.0
    # similarity is the cosine to the assigned center, and inertia is the sum of squared distances to it.
    expected_sims = np.sum(x * result.centers[result.labels], axis=1)
    np.testing.assert_allclose(result.similarity, expected_sims, atol=1e-5)
    dist2 = np.sum((x - result.centers[result.labels]) ** 2, axis=1)
    assert result.inertia == pytest.approx(float(dist2.sum()), rel=1e-4)


def test_kmeans_is_reproducible_with_a_seed():
    x, _, _ = blobs(people=10, per_person=5, noise=0.3)
    a, b = fit_kmeans(x, 7, seed=3), fit_kmeans(x, 7, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_kmeans_warm_start_keeps_center_order():
    x, truth, centers = blobs()
    # Starting from the true centers in a shuffled order, cluster i must stay around init center i.
    order = np.array([3, 0, 5, 1, 4, 2])
    result = fit_kmeans(x, 6, init_centers=centers[order], niter=5)
    np.testing.assert_array_equal(result.labels, np.argsort(order)[truth])


@pytest.mark.parametrize(
    ("n", "k", "message"),
    [(3, 5, "3 faces cannot make 5 clusters"), (0, 2, "no faces to cluster"), (10, 0, "k must be at least 1")],
)
def test_kmeans_rejects_impossible_k(n, k, message):
    x = unit(np.random.default_rng(0).normal(size=(max(n, 1), 512)))[:n]
    with pytest.raises(ClusteringError, match=message):
        fit_kmeans(x, k)


def test_kmeans_rejects_warm_start_of_wrong_shape():
    x, _, centers = blobs()
    with pytest.raises(ClusteringError, match="Initial centers have shape"):
        fit_kmeans(x, 5, init_centers=centers)


def test_choose_k_prefers_the_true_number_of_identities():
    x, _, _ = blobs(people=5, per_person=10, noise=0.01)
    best, table = choose_k(x, [2, 3, 5, 8, 12], seed=0)
    assert best == 5
    assert [row["k"] for row in table] == [2, 3, 5, 8, 12]
    assert all(set(row) == {"k", "inertia", "silhouette"} for row in table)
    # Inertia falls as k grows: the elbow part of the table.
    assert table[0]["inertia"] > table[2]["inertia"]


def test_choose_k_rejects_tiny_input():
    with pytest.raises(ClusteringError, match="cannot be split"):
        choose_k(blobs(people=1, per_person=2)[0], [2, 3])


# --- identity methods --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["threshold", "agglomerative", "adaptive", "hdbscan"])
def test_identity_methods_find_people_and_mark_singletons_as_noise(method):
    x, truth, _ = blobs(people=5, per_person=6)
    loner = unit(np.random.default_rng(99).normal(size=(1, 512)))
    labels = cluster_identities(np.vstack([x, loner]), method, threshold=0.5, min_cluster_size=2)
    assert labels.dtype == np.int64
    assert labels[-1] == -1                       # a face seen once is not a person yet
    assert external_scores(truth, labels[:-1])["pairwise_f1"] == 1.0
    assert set(labels[:-1].tolist()) == set(range(5))   # renumbered 0..C-1


def test_kmeans_method_needs_k():
    x, truth, _ = blobs(noise=0.01)
    with pytest.raises(ClusteringError, match="kmeans needs k"):
        cluster_identities(x, "kmeans")
    assert purity(truth, cluster_identities(x, "kmeans", k=6)) == 1.0


def test_unknown_method_and_empty_input_are_clear_errors():
    x, _, _ = blobs()
    with pytest.raises(ClusteringError, match="Unknown clustering method 'dbscan'"):
        cluster_identities(x, "dbscan")
    with pytest.raises(ClusteringError, match="no faces to cluster"):
        cluster_identities(np.zeros((0, 512), np.float32), "agglomerative")


def test_agglomerative_threshold_is_average_not_single_linkage():
    # A chain a-b-c on a circle: cos(a, b) = 0.85 and cos(b, c) = 0.8 but cos(a, c) ~ 0.36. Single linkage at 0.6
    # joins all three; average linkage at 0.6 must keep c apart from {a, b} (mean cosine (0.8 + 0.36) / 2 < 0.6).
    e = np.eye(2, 512, dtype=np.float32)
    t1, t2 = np.arccos(0.85), np.arccos(0.8)
    a, b, c = e[0], np.cos(t1) * e[0] + np.sin(t1) * e[1], np.cos(t1 + t2) * e[0] + np.sin(t1 + t2) * e[1]
    x = unit(np.stack([a, b, c]))
    assert len(set(cluster_identities(x, "threshold", threshold=0.6, min_cluster_size=1).tolist())) == 1
    labels = cluster_identities(x, "agglomerative", threshold=0.6, min_cluster_size=1)
    assert labels[0] == labels[1] != labels[2]


def test_adaptive_asks_more_of_a_single_pair_than_of_big_clusters():
    # Two lone faces at cosine 0.6: enough for plain average linkage at 0.55, not for the adaptive cut, which
    # wants 0.55 + 0.09 / sqrt(1 * 1) = 0.64 from a single pair.
    e = np.eye(2, 512, dtype=np.float32)
    pair = unit(np.stack([e[0], 0.6 * e[0] + 0.8 * e[1]]))
    assert cluster_identities(pair, "agglomerative", threshold=0.55).tolist() == [0, 0]
    assert cluster_identities(pair, "adaptive", threshold=0.55, pair_margin=0.09).tolist() == [-1, -1]
    # Two groups of 8 whose mean cross cosine is ~0.6 pass: 0.55 + 0.09 / 8 < 0.6.
    rng = np.random.default_rng(3)
    base = unit(np.stack([e[0], 0.6 * e[0] + 0.8 * e[1]]))
    groups = np.vstack([unit(base[i] + 0.002 * rng.normal(size=(8, 512))) for i in range(2)])
    labels = cluster_identities(groups, "adaptive", threshold=0.55, pair_margin=0.09)
    assert len(set(labels.tolist())) == 1 and labels[0] == 0


def test_a_component_too_big_for_exact_linkage_is_linked_over_the_graph_to_the_same_persons():
    x, truth, _ = blobs(people=4, per_person=12)
    exact = average_linkage_forest(x, 0.5)
    graph = average_linkage_forest(x, 0.5, exact_max=5)   # every person's component is past the exact size
    assert graph.split == len(x) and exact.split == 0
    for margin in (0.0, 0.06):
        assert external_scores(truth, renumber(exact.cut(0.5, margin), 2))["pairwise_f1"] == 1.0
        np.testing.assert_array_equal(renumber(graph.cut(0.5, margin)), renumber(exact.cut(0.5, margin)))
    with pytest.raises(ClusteringError, match="built for thresholds >= 0.50"):
        exact.cut(0.4)


def test_graph_linkage_over_every_pair_is_exact_average_linkage():
    # Reciprocal nearest clusters merged in rounds, each cluster a sum: on the complete graph the tree is scipy's.
    rng = np.random.default_rng(0)
    centers = unit(rng.normal(size=(20, 64)))
    x = unit(np.repeat(centers, 15, axis=0) + 0.12 * rng.normal(size=(300, 64)))
    a, b = np.triu_indices(len(x), 1)
    tree, sims, rounds = graph_average_linkage(x, [a, b, np.einsum("ij,ij->i", x[a], x[b])], -1.0)
    exact_tree, exact_sims = _tree_exact(x)
    assert len(sims) == len(x) - 1 and rounds < len(x) - 1   # many merges per round
    np.testing.assert_allclose(np.sort(sims), np.sort(exact_sims), atol=1e-5)
    for threshold, margin in ((0.3, 0.0), (0.5, 0.06), (0.7, 0.0)):
        np.testing.assert_array_equal(renumber(LinkageForest(len(x), -1, tree, sims, 0).cut(threshold, margin)),
                                      renumber(LinkageForest(len(x), -1, exact_tree, exact_sims, 0).cut(threshold,
                                                                                                         margin)))


def test_graph_linkage_stops_at_the_floor_and_never_joins_what_no_edge_joins():
    x = np.eye(4, 8, dtype=np.float32)
    x[1] = unit((x[0] + 0.2 * x[1])[None])[0]               # 0-1 close; 2 and 3 apart; 0-2 has an edge below floor
    a, b = np.array([0, 0]), np.array([1, 2])
    tree, sims, _ = graph_average_linkage(x, [a, b, np.einsum("ij,ij->i", x[a], x[b])], 0.5)
    assert tree.tolist() == [[0, 1]] and sims[0] > 0.9


def test_kmeanspp_seeds_spread_over_identities():
    x, truth, _ = blobs(people=8, per_person=20, noise=0.01)
    seeds = kmeanspp_seeds(x, 8, seed=5, sample_per_center=5)
    owners = truth[np.argmax(seeds @ x.T, axis=1)]
    assert sorted(owners.tolist()) == list(range(8))


def test_renumber_orders_by_size_and_drops_small_clusters():
    np.testing.assert_array_equal(renumber(np.array([7, 3, 3, 9, 3, 7, -1]), 2), [1, 0, 0, -1, 0, 1, -1])


def test_centers_from_labels_skips_noise():
    x, truth, centers = blobs()
    labels = truth.copy()
    labels[:8] = -1
    found, ids = centers_from_labels(x, labels * 10)
    np.testing.assert_array_equal(ids, [10, 20, 30, 40, 50])
    assert found.shape == (5, 512)
    assert np.all(np.sum(found * centers[1:], axis=1) > 0.95)


def test_assign_to_centers_thresholds_and_maps_ids():
    e = np.eye(4, 512, dtype=np.float32)
    faces = unit(np.stack([e[0] + 0.1 * e[2], e[1] + 0.1 * e[2], e[2] + e[3]]))
    labels, sims = assign_to_centers(faces, e[:2], 0.9)
    np.testing.assert_array_equal(labels, [0, 1, -1])
    assert sims[0] == pytest.approx(1 / np.sqrt(1.01), abs=1e-5)
    # Rows that are not unit are normalised first: scale must not change a cosine.
    _, scaled_sims = assign_to_centers(3.0 * faces, 2.0 * e[:2], 0.9)
    np.testing.assert_allclose(scaled_sims, sims, atol=1e-5)  # float32 rounding on any CPU
    labels, _ = assign_to_centers(faces, e[:2], 0.0, ids=np.array([40, 41]))
    np.testing.assert_array_equal(labels[:2], [40, 41])
    empty, _ = assign_to_centers(faces, np.zeros((0, 512), np.float32), 0.5)
    np.testing.assert_array_equal(empty, [-1, -1, -1])


# --- metrics ---------------------------------------------------------------------------------------------------------

def test_external_scores_match_hand_computed_values():
    # true:  A A A B B ;  pred: 0 0 1 1 -1   (the -1 is its own singleton)
    s = external_scores(np.array(list("AAABB")), np.array([0, 0, 1, 1, -1]))
    # pairs: predicted {01, 23} -> 2; true {01, 02, 12, 34} -> 4; together: 01 only -> 1
    assert s["pairwise_precision"] == pytest.approx(1 / 2)
    assert s["pairwise_recall"] == pytest.approx(1 / 4)
    assert s["pairwise_f1"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    # BCubed precision per face: 1, 1, 1/2, 1/2, 1 ; recall: 2/3, 2/3, 1/3, 1/2, 1/2
    assert s["bcubed_precision"] == pytest.approx(4 / 5)
    assert s["bcubed_recall"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 / 2 + 1 / 2) / 5)
    assert s["n_clusters"] == 3 and s["n_noise"] == 1 and s["n_people"] == 2


def test_external_scores_perfect_and_all_singletons():
    truth = np.array([0, 0, 1, 1, 2])
    perfect = external_scores(truth, np.array([5, 5, 9, 9, 1]))
    assert perfect["pairwise_f1"] == perfect["bcubed_f1"] == perfect["nmi"] == perfect["ari"] == pytest.approx(1.0)
    alone = external_scores(truth, np.full(5, -1))
    assert alone["pairwise_precision"] == 1.0 and alone["pairwise_recall"] == 0.0
    assert alone["bcubed_precision"] == 1.0 and alone["bcubed_recall"] == pytest.approx((0.5 * 4 + 1) / 5)


def test_external_scores_rejects_mismatched_lengths():
    with pytest.raises(ClusteringError, match="differ in length"):
        external_scores(np.zeros(3), np.zeros(4))


def test_internal_scores_sample_and_degenerate_cases():
    x, truth, _ = blobs(people=4, per_person=10)
    scores = internal_scores(x, truth, sample=20, seed=0)
    assert scores["k"] == 4 and scores["n_faces"] == 40 and scores["silhouette_sample"] == 20
    assert scores["davies_bouldin_clusters"] == 4
    assert scores["silhouette"] > 0.5 and scores["davies_bouldin"] < 1.0 and scores["calinski_harabasz"] > 1.0
    sampled = internal_scores(x, truth, sample_clusters=2, seed=0)   # O(clusters^2): whole clusters sampled
    assert sampled["davies_bouldin_clusters"] == 2 and sampled["davies_bouldin"] > 0
    one = internal_scores(x, np.where(truth == 0, 0, -1))
    assert one["k"] == 1 and one["n_noise"] == 30
    assert one["silhouette"] is None and one["davies_bouldin"] is None and one["calinski_harabasz"] is None


def test_calinski_harabasz_equals_scikit_learns():
    from sklearn.metrics import calinski_harabasz_score

    from indexer.cluster.metrics import calinski_harabasz

    x, truth, _ = blobs(people=6, per_person=9)
    labels = np.where(np.arange(len(truth)) % 7 == 0, 99, truth)   # uneven clusters, an id out of order
    assert calinski_harabasz(x, labels) == pytest.approx(calinski_harabasz_score(x, labels), rel=1e-9)


# --- stable ids ------------------------------------------------------------------------------------------------------

def test_match_ids_survives_permutation_and_gives_new_cluster_fresh_id():
    _, _, centers = blobs(people=5)
    old_ids = np.array([4, 9, 2, 7, 11])
    rng = np.random.default_rng(5)
    order = rng.permutation(4)                     # old cluster 4 disappears
    newcomer = unit(rng.normal(size=(1, 512)))
    moved = unit(centers[order] + 0.02 * rng.normal(size=(4, 512)))
    new_ids, log = match_ids(centers, old_ids, np.vstack([moved, newcomer]))
    np.testing.assert_array_equal(new_ids[:4], old_ids[order])
    assert new_ids[4] == 12                        # fresh: above every old id, even the retired 11
    assert any("fresh id 12" in line for line in log) and any("old id 11 retired" in line for line in log)


def test_match_ids_is_one_to_one_and_respects_min_similarity():
    _, _, centers = blobs(people=2)
    # Two new clusters near the same old one: only one may inherit its id.
    near = unit(np.stack([centers[0], centers[0] + 0.05 * centers[1]]))
    new_ids, _ = match_ids(centers[:1], [3], near)
    assert sorted(new_ids.tolist()) == [3, 4]
    # Nothing similar enough: everything is new.
    new_ids, _ = match_ids(centers[:1], [3], centers[1:], min_similarity=0.5)
    np.testing.assert_array_equal(new_ids, [4])
    # No previous clustering at all.
    new_ids, _ = match_ids(np.zeros((0, 512), np.float32), [], centers)
    np.testing.assert_array_equal(new_ids, [0, 1])


# --- real models on a small LFW subset --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lfw_subset():
    from benchmarks.lfw_data import data_root, embed_centre_faces, lfw_images

    root = data_root()
    if root is None:
        pytest.skip("LFW not found: set FACEINDEX_DATA or put shared/data beside the checkout")
    from indexer.config import DetectorSettings
    from indexer.models.detector import FaceDetector
    from indexer.models.embedder import FaceEmbedder

    paths, people = lfw_images(root)
    by_person: dict[str, list[str]] = {}
    for path, person in zip(paths, people, strict=True):
        by_person.setdefault(person, []).append(path)
    # 12 people with at least 4 photos, 5 photos each (sorted, so the subset is the same on every run).
    chosen = sorted(p for p, ps in by_person.items() if len(ps) >= 4)
    chosen = [chosen[i] for i in np.random.default_rng(1234).choice(len(chosen), 12, replace=False)]
    sel_paths = [p for person in chosen for p in by_person[person][:5]]
    truth = np.array([person for person in chosen for _ in by_person[person][:5]])
    x, _ = embed_centre_faces(sel_paths, FaceDetector(DetectorSettings(min_prob=0.5)), FaceEmbedder(),
                              batch=16, progress=False)
    return x, truth


@pytest.mark.lfw
def test_lfw_kmeans_with_known_k_is_pure(lfw_subset):
    x, truth = lfw_subset
    labels = fit_kmeans(x, len(set(truth.tolist())), seed=1234).labels
    assert purity(truth, labels) >= 0.9


def _lfw_sets(seeds: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Small LFW collections embedded by the real models: per seed, 12 people with >= 4 photos, 5 photos each."""
    from benchmarks.lfw_data import data_root, embed_centre_faces, lfw_images
    from indexer.config import DetectorSettings
    from indexer.models.detector import FaceDetector
    from indexer.models.embedder import FaceEmbedder

    paths, people = lfw_images(data_root())
    by_person: dict[str, list[str]] = {}
    for path, person in zip(paths, people, strict=True):
        by_person.setdefault(person, []).append(path)
    eligible = sorted(p for p, ps in by_person.items() if len(ps) >= 4)
    detector, embedder = FaceDetector(DetectorSettings(min_prob=0.5)), FaceEmbedder()
    out = []
    for seed in seeds:
        chosen = [eligible[i] for i in np.random.default_rng(seed).choice(len(eligible), 12, replace=False)]
        sel = [p for person in chosen for p in by_person[person][:5]]
        truth = np.array([person for person in chosen for _ in by_person[person][:5]])
        out.append((embed_centre_faces(sel, detector, embedder, batch=16, progress=False)[0], truth))
    return out


@pytest.mark.lfw
def test_lfw_default_identity_method_finds_people(shared_data):
    """The default method with the default parameters on eight small LFW collections (the lfw_subset above is the
    first). One collection is weak evidence either way: measured, the default before issue 11's recall passes
    (0.53 + 0.06, passes off) scored mean 0.968 and worst 0.857 here (set 3); the defaults with
    the passes score mean 0.983, worst 0.896 (set 1234: the merge pass joins Walter Mondale and Charlton Heston,
    5 photos each). The mean is what a user meets on average; the floor catches a method that merges strangers
    wholesale."""
    from indexer.config import ClusterSettings

    d = ClusterSettings()
    scores = []
    for x, truth in _lfw_sets([1234, 1, 2, 3, 4, 5, 6, 7]):
        labels = cluster_identities(x, d.method, threshold=d.threshold, min_cluster_size=d.min_cluster_size,
                                    seed=d.seed, pair_margin=d.pair_margin, center_merge=d.center_merge,
                                    center_lead=d.center_lead, attach_similarity=d.attach_similarity)
        scores.append(external_scores(truth, labels)["pairwise_f1"])
    assert np.mean(scores) >= 0.975, scores
    assert min(scores) >= 0.85, scores


def test_the_library_defaults_are_the_products():
    """cluster_identities called without settings clusters as `faceindex cluster` does on the built-in defaults."""
    from indexer.cluster import identity
    from indexer.config import ClusterSettings

    s = ClusterSettings()
    assert identity.DEFAULT_THRESHOLD[s.method] == s.threshold
    assert (identity.DEFAULT_PAIR_MARGIN, identity.DEFAULT_CENTER_MERGE, identity.DEFAULT_CENTER_LEAD,
            identity.DEFAULT_ATTACH_SIMILARITY) == (s.pair_margin, s.center_merge, s.center_lead,
                                                     s.attach_similarity)


def test_later_merge_rounds_search_only_what_changed_and_agree_with_searching_everything(monkeypatch, caplog):
    from indexer.cluster import passes

    # 60 people photographed in 5 looks each (pieces of 2-9 faces): the center pass joins looks over 3 rounds.
    rng = np.random.default_rng(11)
    people = unit(rng.normal(size=(60, 512)))
    looks = unit(np.repeat(people, 5, axis=0) + 0.9 * unit(rng.normal(size=(300, 512))))
    look = np.repeat(np.arange(300), rng.integers(2, 10, size=300))
    x = unit(looks[look] + 0.6 * unit(rng.normal(size=(len(look), 512))))
    caplog.set_level("DEBUG", logger="indexer.cluster.passes")
    full = passes.merge_close_centers(x, look, 0.5, 0.1)
    monkeypatch.setattr(passes, "INCREMENTAL_MIN_CLUSTERS", 0)
    caplog.clear()
    incremental = passes.merge_close_centers(x, look, 0.5, 0.1)
    rounds = [re.findall(r"of (\d+) clusters join, (\d+) searched", r.getMessage())[0] for r in caplog.records
              if "center merge round" in r.getMessage()]
    assert len(rounds) >= 3 and any(int(searched) < int(there) for there, searched in rounds[1:])
    np.testing.assert_array_equal(renumber(incremental), renumber(full))
    assert len(set(full.tolist())) < 300      # looks were joined
