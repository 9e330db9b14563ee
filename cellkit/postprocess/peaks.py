"""Cells as local peaks of per-class probability maps (the paper's post-processing, its ref. [2]).

A *peak* of class ``c`` is a pixel of ``probs[c]`` that is above the class's threshold and
equal to the maximum of ``probs[c]`` over the ``(2 * min_distance + 1)`` square window centred
on it (the window is clipped at the image border). On maps without ties this is exactly
``skimage.feature.peak_local_max(probs[c], min_distance=d, threshold_abs=t,
exclude_border=False)``; ties are resolved as described in [`peaks`][].

The window test runs on the map's device (CPU or GPU); only the candidate pixels (a few per
cell) travel to the host, where ties and cross-class conflicts are settled on that small set.
On the CPU, large maps with few pixels above the threshold are tested at those pixels only
(see `_window_peaks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from cellkit.points import Detections
from cellkit.registry import POSTPROCESSORS

__all__ = ["LocalPeaks", "check_peak_kwargs", "peak_kwargs_problems", "peaks", "per_class", "window_max"]

#: The sparse window test (see `_window_peaks`) is used on the CPU for maps of at least
#: this many values (below, the dense window maximum is about as fast and simpler) ...
_SPARSE_MIN_NUMEL = 1 << 22
#: ... when at most one value in this many is above the threshold.
_SPARSE_MAX_CANDIDATE_SHARE = 8


def peaks(
    probs: torch.Tensor | np.ndarray,
    threshold: float | Sequence[float] = 0.5,
    min_distance: int | Sequence[int] = 3,
    exclusive: bool = True,
) -> Detections:
    """Find cells as local maxima of each class's probability map.

    A pixel ``(row, col)`` is a peak of class ``c`` when ``probs[c, row, col] > threshold[c]``
    (strictly, as ``peak_local_max``'s ``threshold_abs``; the comparison is done in the map's
    dtype) and it equals the maximum of ``probs[c]`` over the window of half-size
    ``min_distance[c]`` around it, clipped at the border (as ``peak_local_max`` with
    ``exclude_border=False``). Ties, which only occur when equal values lie within one window:

    * a connected (8-neighbour) plateau of peak pixels gives one point: the plateau pixel
      closest to the plateau's centroid (the first in raster order on a tie), so the point
      always lies on the plateau;
    * of the remaining points of one class, those closer than ``min_distance`` (Chebyshev
      distance ``< min_distance``, as ``peak_local_max``'s spacing rule) to a point kept
      earlier are dropped, visiting points by score, then raster order.

    Unlike ``peak_local_max``, a constant map above the threshold gives one point (one
    plateau), not none.

    Cross-class exclusivity (``exclusive=True``): one cell should not be reported in two classes.
    Points of all classes are visited by score (descending; then class, row, column); a point is
    dropped when an already kept point of *another* class lies in its own window, i.e. at
    Chebyshev distance ``<= min_distance`` of the dropped point's class. So of two peaks of
    different classes on one cell, the more probable class wins. ``exclusive=False`` keeps
    every class's peaks independently.

    Args:
        probs: ``(C, H, W)`` probability maps, a torch tensor on any device or a numpy array
            (any real dtype; integer and boolean maps are read as float32).
        threshold: minimum value (exclusive) of a peak, ``>= 0``; one number or one per class.
        min_distance: half-size of the peak window in pixels (an integer >= 1); one number or
            one per class.
        exclusive: settle cells found in several classes in favour of the highest score.

    Returns:
        [`Detections`][cellkit.points.Detections] with ``points`` as float32 ``(x, y) = (column,
        row)``, ``classes`` int64, ``scores`` float32 (the map's value at the peak), sorted by
        score descending (then class, row, column).

    Shapes:
        probs: ``(C, H, W)`` -> ``N`` detections.

    Raises:
        ValueError: for a map that is not 3-D, is empty or holds NaN/infinity; for a
            threshold or min_distance of the wrong length or value.
        TypeError: for ``probs`` that is neither a tensor nor array-like.

    Examples:
        >>> p = np.zeros((2, 5, 5), np.float32)
        >>> p[1, 2, 3] = 0.9
        >>> p[0, 2, 2] = 0.7  # the same cell, less probable as class 0
        >>> det = peaks(p, threshold=0.5, min_distance=2)
        >>> det.points.tolist(), det.classes.tolist()
        ([[3.0, 2.0]], [1])
        >>> peaks(p, min_distance=2, exclusive=False).classes.tolist()
        [1, 0]
    """
    maps = _as_maps(probs)
    num_classes = maps.shape[0]
    thresholds = per_class(threshold, num_classes, "threshold", integer=False)
    distances = per_class(min_distance, num_classes, "min_distance", integer=True)

    # Candidates: window maxima above threshold, found on the map's device, one group of
    # classes per min_distance.
    parts = []
    for d in sorted(set(distances.tolist())):
        channels = np.flatnonzero(distances == d)
        index = torch.as_tensor(channels, device=maps.device)
        whole = len(channels) == num_classes
        sub = maps if whole else maps.index_select(0, index)
        # Compare in the map's dtype, as numpy does with a Python float threshold.
        thr = torch.as_tensor(thresholds[channels], dtype=maps.dtype, device=maps.device)
        found = _window_peaks(sub, thr.view(-1, 1, 1), int(d))
        if not whole:
            found[:, 0] = index[found[:, 0]]  # back to the class index
        parts.append(found)
    where = parts[0]
    if len(parts) > 1:  # one raster order over (class, row, col), as one nonzero would give
        where = torch.cat(parts)
        _, h, w = maps.shape
        where = where[torch.argsort((where[:, 0] * h + where[:, 1]) * w + where[:, 2])]
    values = maps[where[:, 0], where[:, 1], where[:, 2]]
    where_np = where.cpu().numpy().astype(np.int64, copy=False)
    values_np = values.double().cpu().numpy()

    # Ties within each class (rare: only equal values within one window).
    keep_parts = []
    for c in range(num_classes):
        idx = np.flatnonzero(where_np[:, 0] == c)
        if len(idx) > 1:
            idx = idx[_settle_ties(where_np[idx, 1:], values_np[idx], int(distances[c]))]
        keep_parts.append(idx)
    kept = np.concatenate(keep_parts) if keep_parts else np.zeros(0, np.int64)
    cls, rc, val = where_np[kept, 0], where_np[kept, 1:], values_np[kept]

    order = _rank(val, cls, rc)
    cls, rc, val = cls[order], rc[order], val[order]
    if exclusive and num_classes > 1 and len(cls) > 1:
        keep = _exclusive(cls, rc, distances)
        cls, rc, val = cls[keep], rc[keep], val[keep]
    return Detections(
        points=rc[:, ::-1].astype(np.float32),
        classes=cls.astype(np.int64),
        scores=val.astype(np.float32),
    )


def window_max(maps: torch.Tensor, min_distance: int, *, method: str = "auto") -> torch.Tensor:
    """Maximum over the ``(2 * min_distance + 1)`` square window of every pixel, border clipped.

    Two exact implementations of one separable max filter: ``"pool"`` (two 1-D
    ``torch.nn.functional.max_pool2d`` passes, fast on GPUs) and ``"shift"`` (a 1-D sliding
    maximum by window doubling, ``O(log k)`` elementwise maxima per axis; on CPUs about 3x
    faster than ``max_pool2d``, which compares every window element). ``"auto"`` picks
    ``"shift"`` on the CPU and ``"pool"`` elsewhere. Both pad with ``-inf``, so the window is
    clipped at the border, like ``scipy.ndimage.maximum_filter(mode="nearest")``.

    Shapes:
        maps: ``(C, H, W)`` floating point -> ``(C, H, W)``.

    Examples:
        >>> x = torch.tensor([[[0.0, 1.0, 0.0, 0.0, 2.0]]])
        >>> window_max(x, 1).tolist()
        [[[1.0, 1.0, 1.0, 2.0, 2.0]]]
    """
    is_int = isinstance(min_distance, (int, np.integer)) and not isinstance(min_distance, bool)
    if not is_int or min_distance < 0:
        raise ValueError(f"min_distance must be an integer >= 0, got {min_distance!r}.")
    if method == "auto":
        method = "shift" if maps.device.type == "cpu" else "pool"
    if method == "pool":
        k = 2 * min_distance + 1
        out = F.max_pool2d(maps, (1, k), stride=1, padding=(0, min_distance))
        return F.max_pool2d(out, (k, 1), stride=1, padding=(min_distance, 0))
    if method == "shift":
        # One -inf padding of both axes, then an unpadded sliding maximum along each.
        d = min_distance
        padded = F.pad(maps, (d, d, d, d), value=float("-inf"))
        return _sliding_max(_sliding_max(padded, 2 * d + 1, 2), 2 * d + 1, 1)
    raise ValueError(f"window_max method must be 'auto', 'pool' or 'shift', got {method!r}.")


def _window_peaks(maps: torch.Tensor, thresholds: torch.Tensor, min_distance: int) -> torch.Tensor:
    """``(class, row, col)`` of the pixels above threshold that equal their window maximum.

    Exactly ``torch.nonzero((maps == window_max(maps, d)) & (maps > thresholds))``: the same
    pixels in the same (raster) order, ties included. On the CPU, large maps with few pixels
    above the threshold (the usual probability map: mostly background) take the sparse test
    of `_sparse_window_peaks`, several times faster there than the dense window
    maximum of every pixel; elsewhere (GPUs, small maps, low thresholds) the dense one is.

    Shapes:
        maps ``(C, H, W)``, thresholds ``(C, 1, 1)`` in the maps' dtype -> ``(N, 3)`` int64.
    """
    if maps.device.type == "cpu" and maps.numel() >= _SPARSE_MIN_NUMEL:
        # numpy: its comparison and flatnonzero are several times faster than torch's here.
        values = maps.numpy()
        above = np.flatnonzero(values > thresholds.numpy())
        if len(above) * _SPARSE_MAX_CANDIDATE_SHARE <= maps.numel():
            return torch.from_numpy(_sparse_window_peaks(values, above, min_distance))
    return torch.nonzero((maps == window_max(maps, min_distance)) & (maps > thresholds))


def _sparse_window_peaks(maps: np.ndarray, above: np.ndarray, min_distance: int) -> np.ndarray:
    """``(N, 3)`` (class, row, col) of the pixels ``above`` that equal their window maximum.

    Only a pixel above the threshold can be a peak, so the window is tested at those pixels
    alone (``above``: their flat indices in ``maps``, ascending), one ring of neighbours at a
    time (the ``8 r`` pixels at Chebyshev distance ``r``), outward: a pixel drops out at the
    first ring holding a larger value, and most drop in the first ring. A neighbour outside
    the image is read at clipped coordinates, which lie in the border-clipped window, so a
    pixel passes every ring exactly when it equals its window's maximum (as the dense test).
    """
    _, h, w = maps.shape
    flat = maps.reshape(-1)
    plane, rest = np.divmod(above, h * w)
    row, col = np.divmod(rest, w)
    # The pixels still in the running: their position in `above`, row, column, the flat
    # index of their plane's first pixel, and value.
    alive = np.arange(len(above))
    base, value = plane * (h * w), flat[above]
    for ring in range(1, min_distance + 1):
        if len(alive) == 0:
            break
        is_max = np.ones(len(alive), bool)
        for dr, dc in _ring_offsets(ring):  # one offset at a time: memory stays O(len(alive))
            r = np.clip(row + dr, 0, h - 1)
            c = np.clip(col + dc, 0, w - 1)
            is_max &= flat[base + r * w + c] <= value
        alive, row, col, base, value = (a[is_max] for a in (alive, row, col, base, value))
    return np.stack([plane[alive], row, col], axis=1).astype(np.int64, copy=False)


def _ring_offsets(ring: int) -> list[tuple[int, int]]:
    """The ``8 * ring`` offsets ``(dr, dc)`` at Chebyshev distance ``ring`` of the origin."""
    span = range(-ring, ring + 1)
    return [(dr, dc) for dr in span for dc in span if max(abs(dr), abs(dc)) == ring]


def _sliding_max(y: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """``out[i] = max(y[i : i + k])`` along ``dim`` (``k - 1`` shorter), by window doubling."""
    width = 1  # y[i] holds the maximum over [i, i + width) of the input
    while 2 * width <= k:
        n = y.size(dim) - width
        y = torch.maximum(y.narrow(dim, 0, n), y.narrow(dim, width, n))
        width *= 2
    if width < k:  # two overlapping windows of size `width` cover [i, i + k)
        shift = k - width
        n = y.size(dim) - shift
        y = torch.maximum(y.narrow(dim, 0, n), y.narrow(dim, shift, n))
    return y


def _as_maps(probs: Any) -> torch.Tensor:
    """The maps as a floating tensor on their own device, validated."""
    if isinstance(probs, torch.Tensor):
        maps = probs.detach()
    else:
        try:
            arr = np.asarray(probs)
        except Exception as err:  # pragma: no cover - exotic inputs
            raise TypeError(
                f"probs must be a torch tensor or a numpy array of shape (C, H, W), got "
                f"{type(probs).__name__}."
            ) from err
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            raise TypeError(
                f"probs must hold real numbers, got a {type(probs).__name__} of dtype {arr.dtype}."
            )
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr).copy()
        maps = torch.from_numpy(arr)
    if maps.is_complex():
        raise ValueError(f"probs must be real, got dtype {maps.dtype}.")
    if maps.ndim != 3:
        hint = " For a batch (B, C, H, W), call peaks on each image, e.g. probs[0]." if (
            maps.ndim == 4
        ) else " For a single class (H, W) map, add a class axis: probs[None]."
        raise ValueError(
            f"probs must have shape (C, H, W), got {maps.ndim}-D shape {tuple(maps.shape)}.{hint}"
        )
    if min(maps.shape) == 0:
        raise ValueError(f"probs must be non-empty (C, H, W), got shape {tuple(maps.shape)}.")
    if not maps.is_floating_point():
        maps = maps.float()
    elif maps.device.type == "cpu" and maps.dtype in (torch.float16, torch.bfloat16):
        maps = maps.float()  # exact, and CPU kernels for half precision are slow
    low, high = torch.aminmax(maps)  # NaN propagates through both
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        raise ValueError(
            f"probs must be finite, got min={float(low)}, max={float(high)}; "
            "replace NaN/infinity first (e.g. torch.nan_to_num)."
        )
    return maps


def per_class(value: Any, num_classes: int, name: str, *, integer: bool) -> np.ndarray:
    """``value`` (one number, or one per class) broadcast to one entry per class and checked.

    The one reading of "one value or one per class" (peaks, calibration, export).

    Examples:
        >>> per_class(0.5, 2, "threshold", integer=False).tolist()
        [0.5, 0.5]
    """
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.full(num_classes, arr)
    if arr.ndim != 1 or len(arr) != num_classes:
        raise ValueError(
            f"{name} must be one number or one per class ({num_classes} classes), "
            f"got {value!r}."
        )
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got {value!r}.")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    if integer:
        if np.any(arr != np.round(arr)) or np.any(arr < 1):
            raise ValueError(
                f"{name} must be an integer >= 1 (pixels), got {value!r}; "
                "use 1 for the smallest window (3x3)."
            )
        return arr.astype(np.int64)
    if np.any(arr < 0):
        raise ValueError(
            f"{name} must be >= 0, got {value!r}: a negative threshold keeps every local maximum "
            "of the map, background included. Use a value in [0, 1] for probability maps "
            "(0.5 is the default)."
        )
    return arr


def peak_kwargs_problems(
    kwargs: Any,
    *,
    activation: str = "sigmoid",
    num_classes: int | None = None,
    where: str = "postprocess.kwargs",
) -> list[str]:
    """Every problem of the ``peaks`` post-processor's arguments, as messages.

    ``threshold`` (one number or one per class) must lie in ``[0, 1]`` for probability maps
    (``activation="sigmoid"``: a sigmoid never exceeds 1, so a threshold above it finds no
    cell); density maps (``"identity"``, FCRN) take any threshold ``>= 0``, since their peaks
    exceed 1. ``min_distance`` is an integer ``>= 1`` (pixels), one or one per class; with
    ``num_classes`` a per-class list must have one entry per class. Each message starts with
    ``where.<argument>`` (the bare argument name when ``where`` is empty).

    Examples:
        >>> problems = peak_kwargs_problems({"threshold": 5, "min_distance": 0})
        >>> print(*problems, sep="\\n")  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
        postprocess.kwargs.threshold: expected a value in [0, 1] (...), got 5;
        use e.g. 0.5
        postprocess.kwargs.min_distance: expected an integer >= 1 (...), got 0;
        use 1 for ... (3x3)
        >>> peak_kwargs_problems({"threshold": 1.2}, activation="identity")
        []
    """
    if not isinstance(kwargs, Mapping):
        return [f"{where}: expected a mapping of the peaks' arguments, got {kwargs!r}"]
    problems: list[str] = []
    for name, integer in (("threshold", False), ("min_distance", True)):
        if name not in kwargs:
            continue
        value = kwargs[name]
        label = f"{where}.{name}" if where else name
        if isinstance(value, np.ndarray):
            value = value.tolist()
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        numeric = all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            for v in values
        )
        if not values or not numeric:
            problems.append(f"{label}: expected one number or a list of one number per class, got {value!r}")
            continue
        per_class = isinstance(value, (list, tuple))
        if per_class and num_classes is not None and len(values) not in (1, num_classes):
            problems.append(f"{label}: expected one value or one per class ({num_classes} classes), got "
                            f"{len(values)} values {list(value)!r}; give one value, or {num_classes}")
        arr = np.asarray(values, dtype=np.float64)
        shown = value if isinstance(value, (list, tuple)) else values[0]
        if not np.all(np.isfinite(arr)):
            problems.append(f"{label}: expected finite numbers, got {shown!r}")
        elif integer:
            if np.any(arr != np.round(arr)) or np.any(arr < 1):
                problems.append(f"{label}: expected an integer >= 1 (pixels, the half-size of the peak "
                                f"window), got {shown!r}; use 1 for the smallest window (3x3)")
        elif activation == "identity":
            if np.any(arr < 0):
                problems.append(f"{label}: expected a value >= 0 (a peak of the density map), got {shown!r}")
        elif np.any((arr < 0) | (arr > 1)):
            problems.append(f"{label}: expected a value in [0, 1] (the peaks of a probability map), got "
                            f"{shown!r}; use e.g. 0.5")
    if "exclusive" in kwargs and not isinstance(kwargs["exclusive"], (bool, np.bool_)):
        problems.append(f"{where}.exclusive: expected true or false, got {kwargs['exclusive']!r}")
    return problems


def check_peak_kwargs(
    kwargs: Any,
    *,
    activation: str = "sigmoid",
    num_classes: int | None = None,
    where: str = "postprocess.kwargs",
) -> None:
    """Raise ``ValueError`` listing [`peak_kwargs_problems`][], if any.

    Examples:
        >>> check_peak_kwargs({"threshold": [0.5, 5]}, where="")
        ... # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        ValueError: threshold: expected a value in [0, 1] (...), got [0.5, 5];
        use e.g. 0.5
    """
    problems = peak_kwargs_problems(kwargs, activation=activation, num_classes=num_classes, where=where)
    if problems:
        raise ValueError("; ".join(problems))


def _rank(values: np.ndarray, classes: np.ndarray, rc: np.ndarray) -> np.ndarray:
    """Order by value descending, then class, row, column ascending."""
    return np.lexsort((rc[:, 1], rc[:, 0], classes, -values.astype(np.float64)))


def _settle_ties(rc: np.ndarray, values: np.ndarray, d: int) -> np.ndarray:
    """Indices of one class's candidates to keep: one per plateau, then spaced (see peaks)."""
    n = len(rc)
    tree = cKDTree(rc)
    pairs = tree.query_pairs(r=d, p=np.inf, output_type="ndarray")
    if len(pairs) == 0:
        # Candidates farther apart than the window never tie: the usual case.
        return np.arange(n)
    cheb = np.abs(rc[pairs[:, 0]] - rc[pairs[:, 1]]).max(axis=1)

    # One point per 8-connected plateau: the member closest to its centroid.
    adjacent = pairs[cheb == 1]
    keep = np.arange(n)
    if len(adjacent):
        graph = coo_matrix((np.ones(len(adjacent)), (adjacent[:, 0], adjacent[:, 1])), shape=(n, n))
        n_labels, labels = connected_components(graph, directed=False)
        counts = np.bincount(labels, minlength=n_labels).astype(np.float64)
        centroid = np.stack(
            [np.bincount(labels, rc[:, i].astype(np.float64), n_labels) / counts for i in (0, 1)],
            axis=1,
        )
        dist2 = ((rc - centroid[labels]) ** 2).sum(axis=1)
        order = np.lexsort((rc[:, 1], rc[:, 0], dist2, labels))
        first = np.ones(n, bool)
        first[1:] = labels[order][1:] != labels[order][:-1]
        keep = np.sort(order[first])
    if d <= 1:
        return keep

    # Spacing among the plateau representatives: drop those closer than d to a kept one.
    sub = rc[keep]
    close = cKDTree(sub).query_pairs(r=d - 1, p=np.inf, output_type="ndarray")
    if len(close) == 0:
        return keep
    rank = np.empty(len(keep), np.int64)
    rank[_rank(values[keep], np.zeros(len(keep), np.int64), sub)] = np.arange(len(keep))
    return keep[_greedy_suppress(rank, close)]


def _exclusive(classes: np.ndarray, rc: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Mask of ranked points kept after cross-class suppression (see peaks)."""
    n = len(classes)
    pairs = cKDTree(rc).query_pairs(r=int(distances.max()), p=np.inf, output_type="ndarray")
    if len(pairs) == 0:
        return np.ones(n, bool)
    i, j = pairs.min(axis=1), pairs.max(axis=1)  # points are ranked: i outranks j
    cheb = np.abs(rc[i] - rc[j]).max(axis=1)
    conflict = (classes[i] != classes[j]) & (cheb <= distances[classes[j]])
    if not conflict.any():
        return np.ones(n, bool)
    return _greedy_suppress(np.arange(n), np.stack([i[conflict], j[conflict]], axis=1))


def _greedy_suppress(rank: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Keep-mask after visiting points by ``rank``: a kept point drops its lower-ranked partners.

    Only points that appear in ``pairs`` are visited, so the Python loop stays small.
    """
    a, b = pairs[:, 0], pairs[:, 1]
    high = np.where(rank[a] < rank[b], a, b)
    low = np.where(rank[a] < rank[b], b, a)
    order = np.argsort(rank[high], kind="stable")
    high, low = high[order], low[order]
    starts = np.flatnonzero(np.r_[True, high[1:] != high[:-1]])
    keep = np.ones(len(rank), bool)
    # Visiting `high` in rank order: every point that could drop it has been visited already.
    for start, stop in zip(starts, np.r_[starts[1:], len(high)]):
        if keep[high[start]]:
            keep[low[start:stop]] = False
    return keep


@POSTPROCESSORS.register("peaks")
@dataclass
class LocalPeaks:
    """Post-processor: probability maps -> cells, by [`peaks`][].

    Args:
        threshold: minimum value (exclusive) of a peak; one number or one per class, ``>= 0``.
            On probability maps (sigmoid models) it lies in ``[0, 1]``: a config's check
            ([`CellkitConfig.check`][cellkit.config.CellkitConfig.check],
            [`peak_kwargs_problems`][]) rejects other values; density maps (FCRN) take thresholds above 1.
        min_distance: half-size of the peak window in pixels, an integer ``>= 1``; one number
            or one per class.
        exclusive: settle cells found in several classes in favour of the highest score.

    Raises:
        ValueError: for a negative or non-finite threshold, or a min_distance below 1.

    Examples:
        >>> post = POSTPROCESSORS.build("peaks", threshold=0.5, min_distance=2)
        >>> p = torch.zeros(1, 4, 4)
        >>> p[0, 1, 2] = 0.8
        >>> post(p).points.tolist()
        [[2.0, 1.0]]
    """

    threshold: float | Sequence[float] = 0.5
    min_distance: int | Sequence[int] = 3
    exclusive: bool = True

    def __post_init__(self) -> None:
        # Check what can be checked before the number of classes is known.
        for name, integer in (("threshold", False), ("min_distance", True)):
            value = getattr(self, name)
            if np.ndim(value) == 0:
                per_class(value, 1, name, integer=integer)
            else:
                per_class(value, len(value), name, integer=integer)

    def __call__(self, probs: torch.Tensor | np.ndarray) -> Detections:
        """Detections of one ``(C, H, W)`` probability map (see [`peaks`][])."""
        return peaks(probs, self.threshold, self.min_distance, self.exclusive)

    @staticmethod
    def kwargs_problems(kwargs: Any, *, activation: str = "sigmoid", num_classes: int | None = None,
                        where: str = "postprocess.kwargs") -> list[str]:
        """The problems of a config's arguments for it ([`peak_kwargs_problems`][]).

        What configs, checkpoints and ``--threshold`` are checked with
        ([`postprocess_problems`][cellkit.postprocess.postprocess_problems]).
        """
        return peak_kwargs_problems(kwargs, activation=activation, num_classes=num_classes, where=where)
