"""Parameters that generalise (issue 11): the default clustering method's parameters chosen by cross-validation over
disjoint people folds of LFW dev-train, instead of the single best point on all of it. The grid: threshold x pair
margin x the second pass on cluster centers (``center_merge``, 0 = off).

People (not photos) are dealt into ``FOLDS`` folds, largest first and round-robin (ties in a seeded random order), so
every fold holds a share of the big identities and of the strangers seen once. Each fold is clustered on its own
for every (threshold, pair margin) of the grid. For each held-out fold the parameters are chosen on the other folds
by the rule "the point whose worst fold is best" (the highest minimum, over those folds, of the mean of pairwise and
BCubed F1; ties broken by the mean), then scored on the held-out fold: the mean, spread and worst of those held-out
scores are the cross-validated figures. The default is the same rule applied to all folds.

Per held-out fold, "split" counts the people with >= ``BIG`` photos whose largest cluster holds less than 90 % of
them (a large identity split in two, or partly left unassigned): what a recall fix would have to mend.
"""

from __future__ import annotations

import numpy as np

FOLDS = 5
SEED = 1234
THRESHOLDS = tuple(round(float(t), 2) for t in np.arange(0.41, 0.70, 0.02))  # 0.41 ... 0.69
PAIR_MARGINS = (0.0, 0.03, 0.06, 0.09, 0.12)
CENTER_MERGES = (0.0, 0.65, 0.70, 0.75)   # the second pass (identity.merge_close_centers); 0 = none
BIG = 10


def people_folds(people: np.ndarray, k: int = FOLDS, seed: int = SEED) -> np.ndarray:
    """The fold (0..k-1) of each row: people dealt largest first, round-robin, ties in seeded random order."""
    names, inverse, counts = np.unique(people, return_inverse=True, return_counts=True)
    tie = np.random.default_rng(seed).random(len(names))
    order = np.lexsort((tie, -counts))
    fold_of_person = np.empty(len(names), np.int64)
    fold_of_person[order] = np.arange(len(names)) % k
    return fold_of_person[inverse]


def split_identities(people: np.ndarray, labels: np.ndarray, big: int = BIG) -> tuple[int, int]:
    """(people with >= ``big`` photos whose largest cluster holds < 90 % of them, people with >= ``big`` photos)."""
    split = total = 0
    for name in np.unique(people):
        rows = labels[people == name]
        if len(rows) < big:
            continue
        total += 1
        clustered = rows[rows >= 0]
        largest = np.bincount(clustered).max() if len(clustered) else 0
        split += largest < 0.9 * len(rows)
    return split, total


def fold_scores(x: np.ndarray, people: np.ndarray, folds: np.ndarray, cluster) -> dict:
    """Scores of every grid point on every fold: ``pairwise``, ``bcubed`` [P, k], ``split`` [P, k], ``params``.

    ``cluster(x, forest, threshold, pair_margin, min_cluster_size, center_merge)`` -> labels: the method as the
    library runs it (``identity.adaptive_labels``)."""
    from indexer.cluster import external_scores
    from indexer.cluster.identity import average_linkage_forest

    params = [(t, m, c) for t in THRESHOLDS for m in PAIR_MARGINS for c in CENTER_MERGES]
    k = int(folds.max()) + 1
    pairwise, bcubed, split = (np.zeros((len(params), k)) for _ in range(3))
    for f in range(k):
        rows = np.flatnonzero(folds == f)
        forest = average_linkage_forest(x[rows], min(THRESHOLDS))
        for p, (t, m, c) in enumerate(params):
            labels = cluster(x[rows], forest, t, m, 2, c)
            s = external_scores(people[rows], labels)
            pairwise[p, f], bcubed[p, f] = s["pairwise_f1"], s["bcubed_f1"]
            split[p, f] = split_identities(people[rows], labels)[0]
    return {"params": params, "pairwise": pairwise, "bcubed": bcubed, "split": split}


def worst_fold_best(balanced: np.ndarray, folds: list[int]) -> int:
    """The grid point whose worst score over ``folds`` is highest (ties: the higher mean)."""
    sub = balanced[:, folds]
    return int(np.lexsort((sub.mean(axis=1), sub.min(axis=1)))[-1])


KEYS = ("threshold", "pair_margin", "center_merge")


def cross_validate(x: np.ndarray, people: np.ndarray, cluster, default: tuple[float, float, float],
                   k: int = FOLDS) -> dict:
    """Nested choice and held-out scores (see the module doc), and the fold scores of ``default`` parameters."""
    folds = people_folds(people, k)
    s = fold_scores(x, people, folds, cluster)
    balanced = (s["pairwise"] + s["bcubed"]) / 2
    held = []
    for f in range(k):
        p = worst_fold_best(balanced, [g for g in range(k) if g != f])
        held.append({"fold": f, "people": int(len(np.unique(people[folds == f]))), "faces": int((folds == f).sum()),
                     **dict(zip(KEYS, s["params"][p], strict=True)),
                     "pairwise_f1": round(float(s["pairwise"][p, f]), 4),
                     "bcubed_f1": round(float(s["bcubed"][p, f]), 4), "split_big": int(s["split"][p, f])})
    final = worst_fold_best(balanced, list(range(k)))
    pw, bc = np.array([h["pairwise_f1"] for h in held]), np.array([h["bcubed_f1"] for h in held])
    out = {"cv_pairwise_f1_mean": round(float(pw.mean()), 4), "cv_pairwise_f1_min": round(float(pw.min()), 4),
           "cv_pairwise_f1_std": round(float(pw.std()), 4), "cv_bcubed_f1_mean": round(float(bc.mean()), 4),
           "cv_bcubed_f1_min": round(float(bc.min()), 4), "cv_bcubed_f1_std": round(float(bc.std()), 4),
           "cv_folds": held,
           "cv_choice": {**dict(zip(KEYS, s["params"][final], strict=True)),
                         "rule": "highest worst-fold mean of pairwise and BCubed F1, all folds", **_row(s, final)}}
    if tuple(default) in s["params"]:
        out["cv_default_folds"] = {**dict(zip(KEYS, default, strict=True)), **_row(s, s["params"].index(default))}
    return out


def _row(s: dict, p: int) -> dict:
    return {"pairwise_f1_folds": [round(float(v), 4) for v in s["pairwise"][p]],
            "bcubed_f1_folds": [round(float(v), 4) for v in s["bcubed"][p]],
            "split_big_folds": [int(v) for v in s["split"][p]]}


def _params(d: dict) -> str:
    return f"threshold {d['threshold']:.2f}, pair margin {d['pair_margin']:.2f}, center merge {d['center_merge']:.2f}"


def report_lines(cv: dict) -> list[str]:
    lines = [f"  cross-validated over {len(cv['cv_folds'])} disjoint people folds (parameters chosen on the other "
             "folds, worst fold best; scored on the held-out fold):",
             "    fold  people  faces  threshold  pair margin  center merge  pairwise F1  BCubed F1  big people split"]
    for h in cv["cv_folds"]:
        lines.append(f"    {h['fold']:4d}  {h['people']:6d}  {h['faces']:5d}  {h['threshold']:9.2f}  "
                     f"{h['pair_margin']:11.2f}  {h['center_merge']:12.2f}  {h['pairwise_f1']:11.4f}  "
                     f"{h['bcubed_f1']:9.4f}  {h['split_big']:6d}")
    lines.append(f"    held-out pairwise F1 {cv['cv_pairwise_f1_mean']:.4f} +- {cv['cv_pairwise_f1_std']:.4f} "
                 f"(worst {cv['cv_pairwise_f1_min']:.4f}), BCubed F1 {cv['cv_bcubed_f1_mean']:.4f} +- "
                 f"{cv['cv_bcubed_f1_std']:.4f} (worst {cv['cv_bcubed_f1_min']:.4f})")
    for label, d in (("choice on all folds", cv["cv_choice"]), ("library default", cv.get("cv_default_folds"))):
        if d is not None:
            lines.append(f"    {label} ({_params(d)}) per fold: pairwise {d['pairwise_f1_folds']}, BCubed "
                         f"{d['bcubed_f1_folds']}, big people split {d['split_big_folds']}")
    return lines
