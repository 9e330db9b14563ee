"""Tests of cellkit.postprocess.peaks: local-peak picking on per-class probability maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage.feature import peak_local_max

from cellkit.points import Detections
from cellkit.postprocess import LocalPeaks, PostProcessor, window_max
from cellkit.postprocess import peaks as peaks_module
from cellkit.postprocess.peaks import _sparse_window_peaks as sparse_window_peaks
from cellkit.postprocess.peaks import peaks
from cellkit.registry import POSTPROCESSORS


def as_set(det: Detections, cls: int | None = None) -> set[tuple[int, int]]:
    """(row, col) of the detections, optionally of one class."""
    pts = det.points if cls is None else det.points[det.classes == cls]
    return {(int(y), int(x)) for x, y in pts.tolist()}


def labelled(det: Detections) -> set[tuple[int, int, int]]:
    """(class, row, col) of the detections."""
    return {(int(c), int(y), int(x)) for (x, y), c in zip(det.points.tolist(), det.classes)}


def smooth_maps(seed: int, shape: tuple[int, ...], sigma: float, dtype=np.float32) -> np.ndarray:
    """Gaussian-filtered noise rescaled to [0, 1]."""
    rng = np.random.default_rng(seed)
    maps = np.stack([ndi.gaussian_filter(rng.random(shape[1:]), sigma) for _ in range(shape[0])])
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    return maps.astype(dtype)


# --- hand-made maps ---------------------------------------------------------------------------


def test_single_peak_output_format():
    p = np.zeros((1, 9, 9), np.float32)
    p[0, 2, 6] = 0.8
    det = peaks(p)
    assert isinstance(det, Detections)
    assert det.points.dtype == np.float32 and det.classes.dtype == np.int64
    assert det.scores.dtype == np.float32
    assert det.points.tolist() == [[6.0, 2.0]]  # (x, y) = (column, row)
    assert det.classes.tolist() == [0]
    assert det.scores.tolist() == [pytest.approx(0.8)]


def test_two_peaks_closer_than_min_distance_keep_the_higher():
    p = np.zeros((1, 11, 11), np.float32)
    p[0, 5, 3], p[0, 5, 5] = 0.9, 0.8
    assert as_set(peaks(p, min_distance=3)) == {(5, 3)}
    # with a smaller window both are peaks
    assert as_set(peaks(p, min_distance=1)) == {(5, 3), (5, 5)}


def test_sorted_by_score_descending():
    p = np.zeros((2, 20, 20), np.float32)
    p[0, 2, 2], p[1, 10, 10], p[0, 17, 17] = 0.6, 0.95, 0.7
    det = peaks(p)
    assert det.scores.tolist() == sorted(det.scores.tolist(), reverse=True)
    assert det.classes.tolist() == [1, 0, 0]


def test_plateau_gives_one_point_near_its_centroid():
    p = np.zeros((1, 12, 12), np.float32)
    p[0, 3:6, 4:9] = 0.9  # 3x5 plateau, centroid (4, 6)
    det = peaks(p, min_distance=1)
    assert as_set(det) == {(4, 6)}
    # an L-shaped plateau: the point lies on the plateau
    q = np.zeros((1, 12, 12), np.float32)
    q[0, 2:9, 2] = 0.7
    q[0, 8, 2:9] = 0.7
    det = peaks(q, min_distance=2)
    assert len(det) == 1
    (r, c), = as_set(det)
    assert q[0, r, c] == np.float32(0.7)


def test_equal_separate_maxima_within_a_window_give_one_point():
    p = np.zeros((1, 9, 9), np.float32)
    p[0, 4, 2] = p[0, 4, 4] = 0.9  # equal, not adjacent, 2 apart
    p[0, 4, 3] = 0.6
    assert as_set(peaks(p, min_distance=3)) == {(4, 2)}  # first in raster order
    assert as_set(peaks(p, min_distance=1)) == {(4, 2), (4, 4)}


def test_constant_map_is_one_plateau():
    assert len(peaks(np.full((1, 5, 5), 0.9, np.float32), min_distance=1)) == 1
    assert len(peaks(np.full((1, 5, 5), 0.2, np.float32))) == 0


def test_threshold_is_strict():
    p = np.zeros((1, 9, 9), np.float32)
    p[0, 2, 2], p[0, 6, 6] = 0.5, np.nextafter(np.float32(0.5), np.float32(1))
    assert as_set(peaks(p, threshold=0.5)) == {(6, 6)}
    assert as_set(peaks(p, threshold=0.49)) == {(2, 2), (6, 6)}


def test_threshold_is_compared_in_the_map_dtype():
    # float32(0.3) > 0.3 in float64, but not in float32 (as numpy compares with a Python float)
    p = np.zeros((1, 5, 5), np.float32)
    p[0, 2, 2] = 0.3
    assert len(peaks(p, threshold=0.3)) == 0
    assert peak_local_max(p[0], threshold_abs=0.3, exclude_border=False).shape[0] == 0


def test_per_class_threshold_and_min_distance():
    p = np.zeros((2, 12, 12), np.float32)
    p[0, 2, 2] = p[1, 2, 2] = 0.6
    p[0, 2, 5], p[1, 2, 5] = 0.55, 0.55
    det = peaks(p, threshold=[0.5, 0.58], min_distance=[1, 3], exclusive=False)
    assert as_set(det, 0) == {(2, 2), (2, 5)}
    assert as_set(det, 1) == {(2, 2)}


def test_cross_class_exclusivity():
    p = np.zeros((2, 15, 15), np.float32)
    p[0, 5, 5], p[1, 6, 7] = 0.7, 0.9  # one cell seen by both classes
    p[0, 12, 12] = 0.8  # a lone class-0 cell
    assert labelled(peaks(p, min_distance=3)) == {(1, 6, 7), (0, 12, 12)}
    both = peaks(p, min_distance=3, exclusive=False)
    assert labelled(both) == {(1, 6, 7), (0, 5, 5), (0, 12, 12)}
    # the window of the dropped peak's class decides: with min_distance 1 for class 0,
    # the class-1 peak lies outside the class-0 peak's window
    assert len(peaks(p, min_distance=[1, 3])) == 3
    # equal scores: the lower class index wins
    q = np.zeros((2, 9, 9), np.float32)
    q[0, 4, 4] = q[1, 4, 5] = 0.8
    assert labelled(peaks(q, min_distance=2)) == {(0, 4, 4)}


def test_empty_map_gives_no_detections():
    det = peaks(np.zeros((3, 8, 8), np.float32))
    assert len(det) == 0
    assert det.points.shape == (0, 2) and det.classes.shape == (0,) and det.scores.shape == (0,)


def test_numpy_and_torch_agree_and_dtypes():
    maps = smooth_maps(3, (2, 40, 40), 2.0)
    a = peaks(maps, 0.5, 2)
    b = peaks(torch.from_numpy(maps), 0.5, 2)
    c = peaks(maps.astype(np.float64), 0.5, 2)
    for other in (b, c):
        np.testing.assert_array_equal(a.points, other.points)
        np.testing.assert_array_equal(a.classes, other.classes)
        np.testing.assert_allclose(a.scores, other.scores)
    assert len(a) > 0
    assert len(peaks((maps > 0.6).astype(np.uint8), 0, 1)) > 0  # integer maps are accepted


def test_window_max_methods_agree_with_scipy():
    maps = torch.rand(2, 17, 23)
    for d in (1, 2, 3, 5):
        ref = ndi.maximum_filter(maps.numpy(), size=(1, 2 * d + 1, 2 * d + 1), mode="nearest")
        for method in ("pool", "shift"):
            np.testing.assert_array_equal(window_max(maps, d, method=method).numpy(), ref)


@pytest.mark.parametrize(
    ("probs", "kwargs", "match"),
    [
        (np.zeros((5, 5)), {}, r"\(C, H, W\)"),
        (np.zeros((1, 2, 5, 5)), {}, "batch"),
        (np.zeros((0, 5, 5)), {}, "non-empty"),
        (np.array([[[0.1, np.nan]]]), {}, "finite"),
        (torch.tensor([[[0.1, float("inf")]]]), {}, "finite"),
        (np.zeros((2, 5, 5)), {"threshold": [0.5, 0.5, 0.5]}, "one per class"),
        (np.zeros((2, 5, 5)), {"min_distance": 0}, "integer >= 1"),
        (np.zeros((2, 5, 5)), {"min_distance": 1.5}, "integer >= 1"),
        (np.zeros((2, 5, 5)), {"threshold": float("nan")}, "finite"),
    ],
)
def test_bad_input_errors(probs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        peaks(probs, **kwargs)


def test_non_numeric_input_errors():
    with pytest.raises(TypeError, match="real numbers"):
        peaks(np.array([[["a"]]]))


# --- registry --------------------------------------------------------------------------------


def test_local_peaks_registered_and_agrees_with_function():
    maps = smooth_maps(5, (2, 32, 32), 2.0)
    post = POSTPROCESSORS.build("peaks", threshold=0.4, min_distance=2, exclusive=False)
    assert isinstance(post, LocalPeaks) and isinstance(post, PostProcessor)
    a, b = post(maps), peaks(maps, 0.4, 2, exclusive=False)
    np.testing.assert_array_equal(a.points, b.points)
    with pytest.raises(ValueError, match="integer >= 1"):
        LocalPeaks(min_distance=-1)


@pytest.mark.parametrize("name", POSTPROCESSORS.names())
def test_every_registered_postprocessor_follows_the_contract(name):
    """Built with its defaults, it turns (C, H, W) maps, numpy or torch, into detections of that image."""
    post = POSTPROCESSORS.build(name)
    assert isinstance(post, PostProcessor)
    maps = smooth_maps(3, (2, 29, 37), 2.0)
    maps[1, 20, 30] = 1.0  # at least one clear cell
    found = post(maps)
    assert isinstance(found, Detections) and len(found) >= 1
    assert found.points.shape == (len(found), 2) and found.classes.shape == found.scores.shape == (len(found),)
    assert np.all((found.points >= 0) & (found.points <= [36, 28])), "a detection outside the image"
    assert np.all((found.classes >= 0) & (found.classes < 2))
    assert np.all(np.isfinite(found.scores))
    again = post(torch.from_numpy(maps))
    np.testing.assert_array_equal(again.points, found.points)
    np.testing.assert_array_equal(again.classes, found.classes)
    assert len(post(np.zeros((2, 29, 37), np.float32))) == 0, "cells found in an empty map"
    # Its own checks of a config's arguments, when it declares them: none for its defaults.
    from cellkit.postprocess import postprocess_problems

    assert postprocess_problems(name, {}, num_classes=2) == []


def test_argument_checks_are_the_post_processor_s_own() -> None:
    from cellkit.config import CellkitConfig, PostprocessConfig
    from cellkit.postprocess import postprocess_problems
    from cellkit.registry import POSTPROCESSORS

    assert postprocess_problems("peaks", {"threshold": [0.5, 5]}, num_classes=2)
    assert postprocess_problems("not_registered", {"threshold": 5}) == []  # building reports the name

    @POSTPROCESSORS.register("ck_strict")
    class Strict:
        def __init__(self, level: int = 1) -> None:
            self.level = level

        def __call__(self, probs):
            return Detections()

        @staticmethod
        def kwargs_problems(kwargs, *, activation, num_classes, where):
            return [] if kwargs.get("level", 1) in (1, 2) else [f"{where}.level: expected 1 or 2"]

    try:
        cfg = CellkitConfig(postprocess=PostprocessConfig(name="ck_strict", kwargs={"level": 3}))
        assert cfg.problems() == ["config.postprocess.kwargs.level: expected 1 or 2"]
    finally:
        POSTPROCESSORS.unregister("ck_strict")


# --- agreement with skimage ------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    size=st.tuples(st.integers(8, 48), st.integers(8, 48)),
    sigma=st.sampled_from([1.0, 2.0, 3.0]),
    d=st.integers(1, 5),
    t=st.sampled_from([0.0, 0.3, 0.5, 0.7]),
)
def test_agrees_with_peak_local_max_on_plateau_free_maps(seed, size, sigma, d, t):
    maps = smooth_maps(seed, (2, *size), sigma, np.float64)  # float64: no ties in practice
    assume(all(len(np.unique(m)) == m.size for m in maps))  # ties: skimage's pick is arbitrary
    det = peaks(maps, threshold=t, min_distance=d, exclusive=False)
    for c in range(2):
        ref = peak_local_max(maps[c], min_distance=d, threshold_abs=t, exclude_border=False)
        assert as_set(det, c) == {tuple(rc) for rc in ref.tolist()}


# --- the sparse window test (large CPU maps with few pixels above the threshold) -------------


def tied_maps(seed: int, shape: tuple[int, int, int], levels: int) -> np.ndarray:
    """float32 maps with many ties and plateaus: smoothed noise rounded to ``levels`` values."""
    maps = smooth_maps(seed, shape, 1.0)
    return (np.round(maps * (levels - 1)) / (levels - 1)).astype(np.float32)


def detect(maps, threshold, min_distance, exclusive, *, sparse: bool) -> tuple[Detections, int]:
    """:func:`peaks` with the size limit of the sparse window test lifted (or raised out of
    reach), and how many groups of classes took the sparse test."""
    calls = []

    def spy(*args):
        calls.append(1)
        return sparse_window_peaks(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peaks_module, "_SPARSE_MIN_NUMEL", 1 if sparse else 1 << 62)
        mp.setattr(peaks_module, "_sparse_window_peaks", spy)
        det = peaks(maps, threshold, min_distance, exclusive)
    return det, len(calls)


def assert_same(a: Detections, b: Detections) -> None:
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_array_equal(a.scores, b.scores)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    levels=st.sampled_from([4, 5, 9, 17]),
    d=st.integers(1, 4),
    exclusive=st.booleans(),
)
def test_sparse_window_test_equals_dense_with_ties_and_plateaus(seed, size, levels, d, exclusive):
    maps = tied_maps(seed, (3, *size), levels)
    # The lowest level with at most 1 pixel in 8 above it, so the sparse test runs.
    threshold = min(float(v) for v in np.unique(maps) if (maps > v).sum() * 8 <= maps.size)
    assume((maps > np.float32(threshold)).any())
    dense, used = detect(maps, threshold, d, exclusive, sparse=False)
    assert used == 0
    sparse, used = detect(maps, threshold, d, exclusive, sparse=True)
    assert used == 1
    assert_same(dense, sparse)
    # and the candidate set itself, in raster order, before ties are settled
    m = torch.from_numpy(maps)
    thr = torch.full((3, 1, 1), threshold, dtype=m.dtype)
    expected = torch.nonzero((m == window_max(m, d)) & (m > thr)).numpy()
    above_idx = np.flatnonzero(maps > np.float32(threshold))
    np.testing.assert_array_equal(sparse_window_peaks(maps, above_idx, d), expected)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    size=st.tuples(st.integers(4, 40), st.integers(4, 40)),
    levels=st.sampled_from([4, 5, 9, 17]),
    thresholds=st.lists(st.sampled_from([0.5, 0.7, 0.75, 0.8, 0.9]), min_size=3, max_size=3),
    distances=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    exclusive=st.booleans(),
)
def test_sparse_window_test_per_class_settings(
    seed, size, levels, thresholds, distances, exclusive
):
    maps = tied_maps(seed, (3, *size), levels)
    dense, _ = detect(maps, thresholds, distances, exclusive, sparse=False)
    sparse, used = detect(maps, thresholds, distances, exclusive, sparse=True)
    assume(used > 0)  # one group of classes (one min_distance) with few pixels above
    assert_same(dense, sparse)


def test_sparse_window_test_is_used_only_for_few_candidates(monkeypatch):
    maps = tied_maps(1, (2, 32, 32), 5)
    monkeypatch.setattr(peaks_module, "_SPARSE_MIN_NUMEL", 1)
    calls = []
    monkeypatch.setattr(
        peaks_module, "_sparse_window_peaks", lambda *a: calls.append(1) or sparse_window_peaks(*a)
    )
    m = torch.from_numpy(maps)
    for threshold, sparse in ((0.9, True), (0.0, False)):  # 1 in 8 or fewer above it, or not
        thr = torch.full((2, 1, 1), threshold)
        share = float((m > thr).float().mean())
        assert (share <= 1 / 8) == sparse
        calls.clear()
        got = peaks_module._window_peaks(m, thr, 2)
        assert bool(calls) == sparse
        np.testing.assert_array_equal(got, torch.nonzero((m == window_max(m, 2)) & (m > thr)))
    # a map below the size limit takes the dense test
    monkeypatch.setattr(peaks_module, "_SPARSE_MIN_NUMEL", m.numel() + 1)
    calls.clear()
    peaks_module._window_peaks(m, torch.full((2, 1, 1), 0.9), 2)
    assert not calls


def test_sparse_window_test_on_a_non_contiguous_tensor(monkeypatch):
    maps = torch.from_numpy(tied_maps(2, (2, 30, 20), 5)).transpose(1, 2)  # (2, 20, 30) view
    assert not maps.is_contiguous()
    dense, _ = detect(maps, 0.8, 2, True, sparse=False)
    sparse, used = detect(maps, 0.8, 2, True, sparse=True)
    assert len(dense) > 0 and used == 1
    assert_same(dense, sparse)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    size=st.tuples(st.integers(8, 48), st.integers(8, 48)),
    sigma=st.sampled_from([1.0, 2.0, 3.0]),
    d=st.integers(1, 5),
    t=st.sampled_from([0.5, 0.7, 0.9]),
)
def test_sparse_window_test_agrees_with_peak_local_max(seed, size, sigma, d, t):
    maps = smooth_maps(seed, (2, *size), sigma, np.float64)  # float64: no ties in practice
    assume(all(len(np.unique(m)) == m.size for m in maps))
    det, used = detect(maps, t, d, False, sparse=True)
    assume(used == 1)
    for c in range(2):
        ref = peak_local_max(maps[c], min_distance=d, threshold_abs=t, exclude_border=False)
        assert as_set(det, c) == {tuple(rc) for rc in ref.tolist()}
