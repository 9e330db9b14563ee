"""Tests of cellkit.metrics: matching within a radius, totalF1 / meanF1, F1 over radius."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree

from cellkit import metrics
from cellkit.metrics import (
    EvaluationReport,
    detection_counts,
    evaluate,
    f1_vs_radius,
    match_points,
    precision_recall_f1,
)
from cellkit.points import Detections


def brute_force(pred: np.ndarray, true: np.ndarray, radius: float) -> tuple[int, float]:
    """(maximum number of pairs, smallest total distance among such matchings), by recursion."""
    dist = np.linalg.norm(pred[:, None] - true[None], axis=2) if len(pred) and len(true) else None
    best = (0, 0.0)

    def rec(i: int, used: frozenset, count: int, total: float) -> None:
        nonlocal best
        if i == len(pred):
            if count > best[0] or (count == best[0] and total < best[1]):
                best = (count, total)
            return
        rec(i + 1, used, count, total)
        for j in range(len(true)):
            if j not in used and dist[i, j] <= radius:
                rec(i + 1, used | {j}, count + 1, total + dist[i, j])

    if dist is not None:
        rec(0, frozenset(), 0, 0.0)
    return best


def check_matching(pred, true, radius, p_idx, t_idx):
    assert len(p_idx) == len(t_idx)
    assert len(set(p_idx.tolist())) == len(p_idx) and len(set(t_idx.tolist())) == len(t_idx)
    if len(p_idx):
        d = np.linalg.norm(np.asarray(pred, float)[p_idx] - np.asarray(true, float)[t_idx], axis=1)
        assert np.all(d <= radius)


# --- match_points: hand-made cases -----------------------------------------------------------


def test_one_to_one_two_predictions_near_one_truth():
    p, t = match_points([[0, 0], [1, 0]], [[0.4, 0]], radius=2)
    assert p.tolist() == [0] and t.tolist() == [0]  # the closer prediction
    tp, fp, fn = detection_counts([[0, 0], [1, 0]], [0, 0], [[0.4, 0]], [0], 2, 1)
    assert (tp.tolist(), fp.tolist(), fn.tolist()) == ([1], [1], [0])


def test_distance_equal_to_radius_matches():
    p, _ = match_points([[0, 0]], [[3, 4]], radius=5)
    assert p.tolist() == [0]
    p, _ = match_points([[0, 0]], [[3, 4]], radius=4.999)
    assert p.tolist() == []


def test_point_equidistant_from_two_truths():
    p, t = match_points([[0, 0]], [[-2, 0], [2, 0]], radius=2)
    assert p.tolist() == [0] and t.tolist() in ([0], [1])
    # with a second prediction next to one truth, both truths are used
    p, t = match_points([[0, 0], [2.5, 0]], [[-2, 0], [2, 0]], radius=2)
    assert sorted(zip(p.tolist(), t.tolist())) == [(0, 0), (1, 1)]


def test_ties_prefer_the_maximum_cardinality():
    # a greedy nearest-first choice would pair pred 0 with truth 1 and strand truth 0
    pred = [[1.0, 0.0], [3.0, 0.0]]
    true = [[0.0, 0.0], [2.0, 0.0]]
    p, t = match_points(pred, true, radius=1)
    assert len(p) == 2 and sorted(zip(p.tolist(), t.tolist())) == [(0, 0), (1, 1)]


def test_empty_inputs():
    for pred, true in (([], [[1, 1]]), ([[1, 1]], []), ([], []), (np.zeros((0, 2)), [[0, 0]])):
        p, t = match_points(pred, true, radius=3)
        assert p.dtype == np.int64 and len(p) == 0 and len(t) == 0
    assert len(match_points([[0, 0]], [[10, 10]], radius=3)[0]) == 0


def test_radius_zero_matches_identical_points_only():
    p, t = match_points([[1, 1], [2, 2]], [[2, 2], [5, 5]], radius=0)
    assert p.tolist() == [1] and t.tolist() == [0]


def test_many_components_large_case_is_consistent():
    rng = np.random.default_rng(0)
    true = rng.uniform(0, 500, (400, 2))
    pred = true + rng.normal(0, 2, true.shape)
    pred = np.concatenate([pred, rng.uniform(0, 500, (100, 2))])
    p, t = match_points(pred, true, radius=5)
    check_matching(pred, true, 5, p, t)
    # maximum cardinality, as found by scipy's bipartite matching on the whole graph
    within = np.linalg.norm(pred[:, None] - true[None], axis=2) <= 5
    best = maximum_bipartite_matching(csr_matrix(within), perm_type="column")
    assert len(p) == int((best >= 0).sum()) > 350
    assert np.all(np.diff(p) > 0)  # sorted by prediction index


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pred": [[0, 0, 0]]}, r"\(N, 2\)"),
        ({"true": [[np.nan, 0]]}, "finite"),
        ({"radius": -1}, ">= 0"),
        ({"radius": float("inf")}, "finite"),
        ({"method": "hungarain"}, "Did you mean 'hungarian'"),
        ({"scores": [0.5, 0.2]}, r"shape \(1,\)"),
    ],
)
def test_match_points_errors(kwargs, match):
    args = {"pred": [[0, 0]], "true": [[1, 1]], "radius": 2.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        match_points(**args)


# --- match_points: against brute force -------------------------------------------------------

coords = st.lists(
    st.tuples(st.integers(0, 8), st.integers(0, 8)).map(lambda xy: [float(xy[0]), float(xy[1])]),
    max_size=6,
)


@settings(max_examples=30, deadline=None)
@given(pred=coords, true=coords, radius=st.sampled_from([0.0, 1.0, 1.5, 2.0, 3.0, 5.0]))
def test_hungarian_agrees_with_brute_force(pred, true, radius):
    pred = np.asarray(pred, float).reshape(-1, 2)
    true = np.asarray(true, float).reshape(-1, 2)
    count, total = brute_force(pred, true, radius)
    # Both solvers: one dense assignment (small problems) and KD-tree edges + components.
    for dense_max_pairs in (metrics._DENSE_MAX_PAIRS, 0):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(metrics, "_DENSE_MAX_PAIRS", dense_max_pairs)
            p, t = match_points(pred, true, radius)
        check_matching(pred, true, radius, p, t)
        assert len(p) == count
        got = float(np.linalg.norm(pred[p] - true[t], axis=1).sum()) if len(p) else 0.0
        assert got == pytest.approx(total, abs=1e-9)


def test_dense_and_component_solvers_agree(monkeypatch):
    # Clustered points: components of several points, ties and points without partners.
    rng = np.random.default_rng(7)
    limit = metrics._DENSE_MAX_PAIRS
    for _ in range(20):
        true = rng.integers(0, 30, (rng.integers(1, 60), 2)).astype(float)
        pred = np.concatenate([true + rng.integers(-3, 4, true.shape), rng.uniform(0, 30, (5, 2))])
        radius = float(rng.choice([1.0, 2.0, 3.5]))
        assert len(pred) * len(true) <= limit
        found = []
        for dense_max_pairs in (limit, 0):
            monkeypatch.setattr(metrics, "_DENSE_MAX_PAIRS", dense_max_pairs)
            p, t = match_points(pred, true, radius)
            check_matching(pred, true, radius, p, t)
            found.append((len(p), float(np.linalg.norm(pred[p] - true[t], axis=1).sum())))
        assert found[0][0] == found[1][0]
        assert found[0][1] == pytest.approx(found[1][1], abs=1e-9)


def test_dense_edges_match_kd_tree_edges_at_the_radius():
    # A pair exactly at the radius, in floating point: both edge builders keep the same pairs.
    rng = np.random.default_rng(0)
    for _ in range(200):
        pred, true = rng.uniform(0, 5, (8, 2)), rng.uniform(0, 5, (9, 2))
        radius = float(np.linalg.norm(pred[0] - true[0]))
        dense = metrics._edges(pred, true, radius)
        edges = cKDTree(pred).sparse_distance_matrix(cKDTree(true), radius, output_type="ndarray")
        order = np.lexsort((dense[1], dense[0]))
        kd_order = np.lexsort((edges["j"], edges["i"]))
        np.testing.assert_array_equal(dense[0][order], edges["i"][kd_order])
        np.testing.assert_array_equal(dense[1][order], edges["j"][kd_order])
        np.testing.assert_array_equal(dense[2][order], edges["v"][kd_order])


@settings(max_examples=30, deadline=None)
@given(pred=coords, true=coords, radius=st.sampled_from([1.0, 2.0, 3.0]), data=st.data())
def test_greedy_is_a_valid_matching_no_larger_than_hungarian(pred, true, radius, data):
    pred = np.asarray(pred, float).reshape(-1, 2)
    true = np.asarray(true, float).reshape(-1, 2)
    n = len(pred)
    scores = np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)))
    p, t = match_points(pred, true, radius, method="greedy", scores=scores)
    check_matching(pred, true, radius, p, t)
    assert len(p) <= brute_force(pred, true, radius)[0]
    # greedy is maximal: no unmatched prediction has an unmatched truth in range
    free_p = np.setdiff1d(np.arange(len(pred)), p)
    free_t = np.setdiff1d(np.arange(len(true)), t)
    if len(free_p) and len(free_t):
        d = np.linalg.norm(pred[free_p][:, None] - true[free_t][None], axis=2)
        assert np.all(d > radius)


# --- greedy ----------------------------------------------------------------------------------


def test_greedy_follows_scores_and_may_match_fewer():
    pred = [[1.2, 0.0], [-1.0, 0.0]]
    true = [[0.0, 0.0], [2.5, 0.0]]
    # pred 0 (score 0.9) takes its nearest truth 0; pred 1 then has nothing in range
    p, t = match_points(pred, true, radius=1.5, method="greedy", scores=[0.9, 0.8])
    assert list(zip(p.tolist(), t.tolist())) == [(0, 0)]
    # hungarian finds both pairs
    p, t = match_points(pred, true, radius=1.5)
    assert sorted(zip(p.tolist(), t.tolist())) == [(0, 1), (1, 0)]
    # visiting pred 1 first lets both match
    p, t = match_points(pred, true, radius=1.5, method="greedy", scores=[0.1, 0.8])
    assert sorted(zip(p.tolist(), t.tolist())) == [(0, 1), (1, 0)]
    # without scores: input order
    p, _ = match_points(pred, true, radius=1.5, method="greedy")
    assert p.tolist() == [0]


def test_greedy_in_evaluate_uses_detection_scores():
    pred = Detections([[1.2, 0.0], [-1.0, 0.0]], [0, 0], [0.9, 0.8])
    truth = ([[0.0, 0.0], [2.5, 0.0]], [0, 0])
    assert evaluate([pred], [truth], 1.5, 1, method="greedy").tp.tolist() == [1]
    assert evaluate([pred], [truth], 1.5, 1).tp.tolist() == [2]


# --- counts and scores -----------------------------------------------------------------------


def test_detection_counts_match_within_each_class():
    pred_points = [[0, 0], [10, 10], [20, 20]]
    pred_classes = [0, 1, 1]
    true_points = [[0, 1], [10, 11], [40, 40]]
    true_classes = [1, 1, 0]  # the class-0 prediction at (0, 0) sits on a class-1 cell
    tp, fp, fn = detection_counts(pred_points, pred_classes, true_points, true_classes, 2, 2)
    assert tp.tolist() == [0, 1] and fp.tolist() == [1, 1] and fn.tolist() == [1, 1]
    with pytest.raises(ValueError, match="out of range"):
        detection_counts(pred_points, [0, 1, 2], true_points, true_classes, 2, 2)


def test_precision_recall_f1_zero_denominators():
    p, r, f = precision_recall_f1([0, 0, 0, 3], [0, 2, 0, 1], [0, 0, 4, 0])
    assert p.tolist() == [1.0, 0.0, 0.0, 0.75]  # no predictions: 1 only when nothing to find
    assert r.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert f.tolist() == [1.0, 0.0, 0.0, pytest.approx(6 / 7)]


def two_images():
    # image 0: class 1 has 2 truths, 2 predictions, 1 hit -> F1 0.5
    #          class 0 has 1 truth, 1 prediction, 1 hit -> F1 1
    pred0 = Detections([[0, 0], [50, 50], [30, 30]], [1, 1, 0], [0.9, 0.8, 0.7])
    truth0 = ([[1, 0], [80, 80], [30, 31]], [1, 1, 0])
    # image 1: class 1 has 4 truths, 4 predictions, 4 hits -> F1 1; no class-0 points at all
    pts = [[10, 10], [20, 20], [30, 30], [40, 40]]
    pred1 = Detections(pts, [1, 1, 1, 1], [0.9, 0.9, 0.9, 0.9])
    truth1 = ([[x + 1, y] for x, y in pts], [1, 1, 1, 1])
    return [pred0, pred1], [truth0, truth1]


def test_total_f1_and_mean_f1_hand_computed():
    preds, truths = two_images()
    report = evaluate(preds, truths, radius=3, num_classes=2, class_names=["other", "positive"])
    assert isinstance(report, EvaluationReport)
    assert report.tp.tolist() == [1, 5] and report.fp.tolist() == [0, 1]
    assert report.fn.tolist() == [0, 1]
    assert report.precision[1] == pytest.approx(5 / 6) and report.recall[1] == pytest.approx(5 / 6)
    assert report.total_f1[1] == pytest.approx(10 / 12)  # pooled: 2*5 / (2*5 + 1 + 1)
    assert report.mean_f1[1] == pytest.approx((0.5 + 1.0) / 2)  # per image, then averaged
    # skip rule: image 1 has no class-0 points at all, so class 0 counts image 0 only
    assert report.n_images.tolist() == [1, 2]
    assert report.mean_f1[0] == pytest.approx(1.0)
    assert math.isnan(report.per_image_f1[1, 0])
    d = report.to_dict()
    assert d["classes"]["positive"]["tp"] == 5 and d["radius"] == 3.0
    assert isinstance(d["classes"]["positive"]["mean_f1"], float)
    table = report.to_markdown()
    assert "| positive | 5 | 1 | 1 |" in table and "meanF1" in table


def test_mean_f1_counts_images_with_truths_but_no_predictions_as_zero():
    preds, truths = two_images()
    preds.append(Detections())  # image 2: two class-1 cells, nothing predicted
    truths.append(([[5, 5], [60, 60]], [1, 1]))
    report = evaluate(preds, truths, radius=3, num_classes=2)
    assert report.n_images.tolist() == [1, 3]
    assert report.mean_f1[1] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # and predictions without truths count as zero too
    preds.append(Detections([[1, 1]], [0], [0.9]))
    truths.append(([], []))
    report = evaluate(preds, truths, radius=3, num_classes=2)
    assert report.n_images.tolist() == [2, 3] and report.mean_f1[0] == pytest.approx(0.5)


def test_class_never_present_has_nan_mean_f1():
    report = evaluate([Detections([[1, 1]], [0], [0.9])], [([[1, 1]], [0])], 2, num_classes=2)
    assert report.n_images.tolist() == [1, 0]
    assert math.isnan(report.mean_f1[1]) and report.total_f1[1] == 1.0


def test_evaluate_errors():
    preds, truths = two_images()
    with pytest.raises(ValueError, match="same images: got 2 predictions and 1 truths"):
        evaluate(preds, truths[:1], radius=3, num_classes=2)
    with pytest.raises(ValueError, match="at least one image"):
        evaluate([], [], radius=3, num_classes=2)
    with pytest.raises(ValueError, match="one name per class"):
        evaluate(preds, truths, radius=3, num_classes=2, class_names=["a"])
    with pytest.raises(ValueError, match="out of range for num_classes=1"):
        evaluate(preds, truths, radius=3, num_classes=1)
    with pytest.raises(TypeError, match="must be a Detections"):
        evaluate([([[0, 0]], [0])], [([[0, 0]], [0])], radius=3, num_classes=1)
    with pytest.raises(ValueError, match=r"truths\[0\] must be a \(points, classes\) pair"):
        evaluate([Detections()], [None], radius=3, num_classes=1)


# --- F1 over radius --------------------------------------------------------------------------


def test_f1_vs_radius_is_monotone_for_hungarian():
    rng = np.random.default_rng(1)
    preds, truths = [], []
    for _ in range(3):
        true = rng.uniform(0, 100, (30, 2))
        true_cls = rng.integers(0, 2, 30)
        pred = np.concatenate([true[:25] + rng.normal(0, 3, (25, 2)), rng.uniform(0, 100, (5, 2))])
        pred_cls = np.where(rng.random(30) < 0.9, np.r_[true_cls[:25], rng.integers(0, 2, 5)], 1)
        preds.append(Detections(pred, pred_cls, rng.random(30)))
        truths.append((true, true_cls))
    radii = [0, 1, 2, 3, 4, 6, 8, 12, 16]
    curve = f1_vs_radius(preds, truths, radii, num_classes=2, class_names=["N", "P"])
    assert curve["radii"].tolist() == radii and curve["classes"] == ["N", "P"]
    for key in ("total_f1", "mean_f1"):
        for name in ("N", "P"):
            values = curve[key][name]
            assert values.shape == (len(radii),)
            assert np.all(np.diff(values) >= -1e-12)
            assert values[-1] > values[0]
    # each point of the curve is evaluate at that radius
    assert curve["total_f1"]["P"][3] == pytest.approx(evaluate(preds, truths, 3, 2).total_f1[1])
    with pytest.raises(ValueError, match="at least one radius"):
        f1_vs_radius(preds, truths, [], num_classes=2)
