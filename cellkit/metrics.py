"""Detection metrics for point annotations: matching within a radius, totalF1, meanF1, F1 by radius.

A predicted cell is a true positive when it is matched, one to one, to a ground-truth point of
the same class at distance ``<= radius`` pixels (the paper says "less than r"; the two differ
only for distances that are exactly ``r``, and ``<=`` is what KD-tree radius queries and
most published evaluation code use). The paper's two scores (section 3.2):

* **totalF1**: precision and recall of all cells of the test set pooled (tp, fp, fn summed over
  images), then F1;
* **meanF1**: F1 of each image, averaged over images.

Examples:
    >>> from cellkit.points import Detections
    >>> pred = Detections(points=[[10, 10], [30, 30]], classes=[1, 1],
    ...                   scores=[0.9, 0.8])
    >>> truth = ([[11, 10], [50, 50]], [1, 1])
    >>> report = evaluate([pred], [truth], radius=5, num_classes=2)
    >>> report.tp.tolist(), report.fp.tolist(), report.fn.tolist()
    ([0, 1], [0, 1], [0, 1])
    >>> float(report.total_f1[1])
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

from cellkit.lookup import look_up_option
from cellkit.points import Detections, as_points, validate_points

__all__ = [
    "EvaluationReport",
    "MATCHING_METHODS",
    "detection_counts",
    "evaluate",
    "f1_vs_radius",
    "match_points",
    "precision_recall_f1",
]

MATCHING_METHODS = ("hungarian", "greedy")

#: Problems with at most this many (prediction, truth) pairs are matched densely: one distance
#: matrix (`scipy.spatial.distance.cdist`) and, for ``"hungarian"``, one assignment over
#: every point with a partner in range. At this size (at most 200 points on the smaller side)
#: that costs less than building KD-trees, the radius graph and its components, whose fixed
#: costs dominate an image of a few hundred cells.
_DENSE_MAX_PAIRS = 40_000


def match_points(
    pred: Any,
    true: Any,
    radius: float,
    method: str = "hungarian",
    scores: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Match predicted points to true points one to one, within ``radius``.

    Two points may be matched when their Euclidean distance is ``<= radius``.

    * ``"hungarian"`` (default): a matching of maximum cardinality (the most true positives
      possible); among those, one with the smallest sum of distances. Small problems (at most
      40,000 prediction-truth pairs) are solved with one
      `scipy.optimize.linear_sum_assignment` over the points that have a partner in
      range; larger ones split the radius graph into connected components, each solved
      alone, and leave a point with no partner in range unmatched without any assignment, so
      large sparse images stay fast. Where several matchings tie on both counts, which one is
      returned is not specified.
    * ``"greedy"`` (as OCELOT's evaluation): predictions are visited by ``scores`` descending
      (input order when ``scores`` is None, and for equal scores), each matched to the nearest
      still unmatched true point in range (the lowest index on a distance tie). It may match
      fewer pairs than ``"hungarian"``.

    Args:
        pred: ``(N, 2)`` predicted ``(x, y)`` points.
        true: ``(M, 2)`` ground-truth ``(x, y)`` points.
        radius: the largest distance (inclusive) of a match, in pixels, ``>= 0``.
        method: ``"hungarian"`` or ``"greedy"``.
        scores: ``(N,)`` prediction scores, used by ``"greedy"`` only.

    Returns:
        ``(pred_idx, true_idx)``: int64 arrays of equal length ``K``; ``pred[pred_idx[k]]`` is
        matched to ``true[true_idx[k]]``. Sorted by ``pred_idx``.

    Shapes:
        pred ``(N, 2)``, true ``(M, 2)`` -> ``(K,)``, ``(K,)`` with ``K <= min(N, M)``.

    Raises:
        ValueError: for points that are not ``(N, 2)`` finite, a negative or non-finite
            radius, an unknown method, or scores of the wrong shape.

    Examples:
        >>> p, t = match_points([[0, 0], [1, 0]], [[0.5, 0]], radius=1)
        >>> p.tolist(), t.tolist()  # one truth, two candidates: one match only
        ([0], [0])
    """
    pred = as_points(pred, name="pred points")
    true = as_points(true, name="true points")
    radius = _radius(radius)
    method = _method(method)
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape != (len(pred),):
            raise ValueError(
                f"scores must have shape ({len(pred)},), one per prediction, got {scores.shape}."
            )
        if not np.all(np.isfinite(scores)):
            raise ValueError("scores must be finite, got NaN or infinity.")
    empty = np.zeros(0, np.int64)
    if len(pred) == 0 or len(true) == 0:
        return empty, empty.copy()
    pi, ti, dist = _edges(pred, true, radius)
    if len(pi) == 0:
        return empty, empty.copy()
    if method == "greedy":
        p_idx, t_idx = _greedy(pi, ti, dist, len(pred), scores)
    else:
        p_idx, t_idx = _hungarian(pi, ti, dist, len(pred), len(true), radius)
    order = np.argsort(p_idx, kind="stable")
    return p_idx[order], t_idx[order]


def _edges(
    pred: np.ndarray, true: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs within ``radius`` (distance ``<= radius``): prediction and truth indices, distances.

    Small problems use a dense distance matrix, larger ones KD-trees. Both keep a pair when
    its squared distance is ``<= radius ** 2`` (as the KD-tree does) and report the square
    root of that squared distance, so the two give the same edges to the last bit.
    """
    if len(pred) * len(true) <= _DENSE_MAX_PAIRS:
        squared = cdist(pred, true, "sqeuclidean")
        pi, ti = np.nonzero(squared <= radius * radius)
        return pi.astype(np.int64), ti.astype(np.int64), np.sqrt(squared[pi, ti])
    edges = cKDTree(pred).sparse_distance_matrix(cKDTree(true), radius, output_type="ndarray")
    return edges["i"].astype(np.int64), edges["j"].astype(np.int64), edges["v"].astype(np.float64)


def _greedy(
    pi: np.ndarray, ti: np.ndarray, dist: np.ndarray, n_pred: int, scores: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    rank = np.arange(n_pred)
    if scores is not None:
        rank = np.empty(n_pred, np.int64)
        rank[np.argsort(-scores, kind="stable")] = np.arange(n_pred)
    # Edges by prediction rank, then distance, then true index: for each prediction the first
    # edge to a free truth is its nearest free truth.
    order = np.lexsort((ti, dist, rank[pi]))
    taken_pred = np.zeros(n_pred, bool)
    taken_true: set[int] = set()
    p_out, t_out = [], []
    for p, t in zip(pi[order].tolist(), ti[order].tolist()):
        if taken_pred[p] or t in taken_true:
            continue
        taken_pred[p] = True
        taken_true.add(t)
        p_out.append(p)
        t_out.append(t)
    return np.asarray(p_out, np.int64), np.asarray(t_out, np.int64)


def _hungarian(
    pi: np.ndarray, ti: np.ndarray, dist: np.ndarray, n_pred: int, n_true: int, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    n_rows, n_cols = len(np.unique(pi)), len(np.unique(ti))
    if n_rows * n_cols <= _DENSE_MAX_PAIRS:
        # One assignment over every point with a partner in range. The cost rule of _assign
        # makes the optimum a maximum matching of least total distance on any edge set, and
        # the components share no point, so solving them together is as exact as one by one.
        return _assign(pi, ti, dist, radius)

    # Components of the bipartite radius graph (nodes: predictions, then truths).
    n = n_pred + n_true
    graph = coo_matrix((np.ones(len(pi)), (pi, n_pred + ti)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    edge_label = labels[pi]
    pred_count = np.bincount(labels[:n_pred], minlength=n)
    true_count = np.bincount(labels[n_pred:], minlength=n)

    # A component of one prediction and one truth is a single edge: matched as is.
    simple = (pred_count[edge_label] == 1) & (true_count[edge_label] == 1)
    p_out, t_out = [pi[simple]], [ti[simple]]

    rest = np.flatnonzero(~simple)
    rest = rest[np.argsort(edge_label[rest], kind="stable")]
    bounds = np.flatnonzero(np.r_[True, edge_label[rest][1:] != edge_label[rest][:-1], True])
    for start, stop in zip(bounds[:-1], bounds[1:]):
        e = rest[start:stop]
        p, t = _assign(pi[e], ti[e], dist[e], radius)
        p_out.append(p)
        t_out.append(t)
    return np.concatenate(p_out).astype(np.int64), np.concatenate(t_out).astype(np.int64)


def _assign(
    pi: np.ndarray, ti: np.ndarray, dist: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """A maximum matching of least total distance on the edges ``(pi, ti)``, by one assignment."""
    rows, r_local = np.unique(pi, return_inverse=True)
    cols, c_local = np.unique(ti, return_inverse=True)
    # Cost: an allowed pair costs d / radius in [0, 1], a forbidden one k + 1, where
    # k = min(rows, cols) is the number of pairs every full assignment makes. With m
    # allowed pairs an assignment costs at least (k - m)(k + 1); with m + 1 at most
    # (m + 1) + (k - m - 1)(k + 1) = (k - m)(k + 1) - (k - m), which is less. So the
    # optimum has the most allowed pairs (a maximum cardinality matching once forbidden
    # pairs are dropped) and, among those, the smallest total distance. Costs stay below
    # (k + 1)^2 for components of a few hundred points, far from float precision limits.
    k = min(len(rows), len(cols))
    cost = np.full((len(rows), len(cols)), float(k + 1))
    cost[r_local, c_local] = dist / radius if radius > 0 else 0.0
    allowed = np.zeros(cost.shape, bool)
    allowed[r_local, c_local] = True
    r, c = linear_sum_assignment(cost)
    ok = allowed[r, c]
    return rows[r[ok]].astype(np.int64), cols[c[ok]].astype(np.int64)


def precision_recall_f1(tp: Any, fp: Any, fn: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 from counts, with every zero denominator defined.

    * precision = tp / (tp + fp); with no predictions: 1 when there is also nothing to find
      (fn = 0), else 0;
    * recall = tp / (tp + fn); with no true points: 1 when nothing was predicted (fp = 0),
      else 0;
    * F1 = 2 tp / (2 tp + fp + fn); 1 when there are neither predictions nor true points
      (and 0 whenever exactly one side is empty).

    Shapes:
        any broadcastable shapes -> float64 arrays of the broadcast shape.

    Examples:
        >>> [x.tolist() for x in precision_recall_f1([1, 0, 0], [1, 0, 2], [0, 3, 0])]
        [[0.5, 0.0, 0.0], [1.0, 0.0, 0.0], [0.6666666666666666, 0.0, 0.0]]
    """
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.where(fn == 0, 1.0, 0.0))
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.where(fp == 0, 1.0, 0.0))
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 1.0)
    return precision, recall, f1


def detection_counts(
    pred_points: Any,
    pred_classes: Any,
    true_points: Any,
    true_classes: Any,
    radius: float,
    num_classes: int,
    method: str = "hungarian",
    scores: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, false positives and false negatives per class, for one image.

    Points are matched within each class separately ([`match_points`][]): a prediction of
    the wrong class is a false positive of its class and leaves a false negative in the true one.

    Args:
        pred_points, pred_classes: ``(N, 2)`` predicted ``(x, y)`` and ``(N,)`` classes.
        true_points, true_classes: ``(M, 2)`` true ``(x, y)`` and ``(M,)`` classes.
        radius: the largest distance (inclusive) of a match, in pixels.
        num_classes: number of classes ``C``; classes must lie in ``0..C-1``.
        method: ``"hungarian"`` or ``"greedy"`` (see [`match_points`][]).
        scores: ``(N,)`` prediction scores for ``"greedy"``.

    Returns:
        ``(tp, fp, fn)``, int64 arrays of shape ``(C,)``.

    Raises:
        ValueError: for malformed points or classes out of range.

    Examples:
        >>> tp, fp, fn = detection_counts([[0, 0], [9, 9]], [0, 1],
        ...                               [[1, 0]], [0], 2, 2)
        >>> tp.tolist(), fp.tolist(), fn.tolist()
        ([1, 0], [0, 1], [0, 0])
    """
    num_classes = _num_classes(num_classes)
    pp, pc = validate_points(
        pred_points, pred_classes, num_classes=num_classes, where="predictions"
    )
    tpts, tc = validate_points(true_points, true_classes, num_classes=num_classes, where="truths")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape != (len(pp),):
            raise ValueError(
                f"scores must have shape ({len(pp)},), one per prediction, got {scores.shape}."
            )
    tp = np.zeros(num_classes, np.int64)
    for c in range(num_classes):
        in_pred, in_true = pc == c, tc == c
        if in_pred.any() and in_true.any():
            p_idx, _ = match_points(
                pp[in_pred], tpts[in_true], radius, method,
                None if scores is None else scores[in_pred],
            )
            tp[c] = len(p_idx)
    fp = np.bincount(pc, minlength=num_classes)[:num_classes] - tp
    fn = np.bincount(tc, minlength=num_classes)[:num_classes] - tp
    return tp, fp.astype(np.int64), fn.astype(np.int64)


@dataclass(eq=False)
class EvaluationReport:
    """Detection scores of a set of images, per class.

    Attributes:
        class_names: ``C`` names.
        radius: the matching radius in pixels.
        method: the matching method.
        tp, fp, fn: ``(C,)`` int64 counts summed over images.
        precision, recall, total_f1: ``(C,)`` pooled over all images (totalF1).
        mean_f1: ``(C,)`` F1 of each image averaged over the images counted for the class
            (meanF1); NaN for a class counted in no image.
        n_images: ``(C,)`` number of images counted in ``mean_f1`` (those with true or
            predicted points of the class).
        per_image_f1: ``(n_images_total, C)`` F1 of each image, NaN where skipped.
    """

    class_names: list[str]
    radius: float
    method: str
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    total_f1: np.ndarray
    mean_f1: np.ndarray
    n_images: np.ndarray
    per_image_f1: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types for JSON/YAML: ``{"radius", "method", "classes": {name: {...}}}``."""
        classes = {}
        for c, name in enumerate(self.class_names):
            classes[name] = {
                "tp": int(self.tp[c]),
                "fp": int(self.fp[c]),
                "fn": int(self.fn[c]),
                "precision": float(self.precision[c]),
                "recall": float(self.recall[c]),
                "total_f1": float(self.total_f1[c]),
                "mean_f1": float(self.mean_f1[c]),
                "n_images": int(self.n_images[c]),
            }
        return {"radius": float(self.radius), "method": self.method, "classes": classes}

    def to_markdown(self, digits: int = 3) -> str:
        """A Markdown table, one row per class."""
        head = "| class | tp | fp | fn | precision | recall | totalF1 | meanF1 | images |"
        lines = [head, "|" + "---|" * 9]
        for c, name in enumerate(self.class_names):
            lines.append(
                f"| {name} | {self.tp[c]} | {self.fp[c]} | {self.fn[c]} | "
                f"{self.precision[c]:.{digits}f} | {self.recall[c]:.{digits}f} | "
                f"{self.total_f1[c]:.{digits}f} | {self.mean_f1[c]:.{digits}f} | "
                f"{self.n_images[c]} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"radius={self.radius:g} px, matching={self.method}\n{self.to_markdown()}"


def evaluate(
    predictions: Sequence[Detections],
    truths: Sequence[tuple[Any, Any]],
    radius: float,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    method: str = "hungarian",
) -> EvaluationReport:
    """totalF1 and meanF1 per class over a set of images.

    * totalF1 pools tp, fp and fn of all images, then takes precision, recall and F1.
    * meanF1 averages the per-image F1. **Skip rule**: an image with neither true nor predicted
      points of a class is left out of that class's mean (F1 is undefined there); an image
      with true points but no predictions (or the reverse) counts with F1 = 0. A class left
      out of every image has ``mean_f1`` NaN and ``n_images`` 0.

    Zero denominators are defined as in [`precision_recall_f1`][] (e.g. a class with no
    predictions and no true points at all has precision = recall = totalF1 = 1).

    Args:
        predictions: one [`Detections`][cellkit.points.Detections] per image.
        truths: one ``(points (M, 2) (x, y), classes (M,))`` pair per image, in the same order.
        radius: the largest distance (inclusive) of a match, in pixels.
        num_classes: number of classes ``C``.
        class_names: ``C`` names for the report (default ``"0"``, ``"1"``, ...).
        method: ``"hungarian"`` (maximum matching) or ``"greedy"`` (see [`match_points`][]).

    Returns:
        An [`EvaluationReport`][].

    Raises:
        ValueError: when predictions and truths differ in number of images, for malformed
            points, classes out of range, or ``class_names`` of the wrong length.
        TypeError: for a prediction that is not a Detections.

    Examples:
        >>> pred = [Detections([[0, 0]], [0], [0.9]),
        ...         Detections([[5, 5]], [0], [0.9])]
        >>> truth = [([[1, 0]], [0]), ([[5, 5], [20, 20]], [0, 0])]
        >>> r = evaluate(pred, truth, radius=2, num_classes=1)
        >>> round(float(r.total_f1[0]), 3), round(float(r.mean_f1[0]), 3)
        (0.8, 0.833)
    """
    num_classes = _num_classes(num_classes)
    names = _class_names(class_names, num_classes)
    radius = _radius(radius)
    method = _method(method)
    counts = _per_image_counts(predictions, truths, radius, num_classes, method)
    return _report(counts, names, radius, method)


def f1_vs_radius(
    predictions: Sequence[Detections],
    truths: Sequence[tuple[Any, Any]],
    radii: Sequence[float],
    num_classes: int,
    class_names: Sequence[str] | None = None,
    method: str = "hungarian",
) -> dict[str, Any]:
    """totalF1 and meanF1 per class for several matching radii (the paper's Fig. 3).

    With ``"hungarian"`` matching both scores are non-decreasing in the radius (a larger
    radius only adds allowed pairs, so the maximum matching cannot shrink).

    Args:
        predictions, truths, num_classes, class_names, method: as in [`evaluate`][].
        radii: ``R`` radii in pixels.

    Returns:
        ``{"radii": (R,) float64, "classes": names, "total_f1": {name: (R,)},
        "mean_f1": {name: (R,)}}``.

    Raises:
        ValueError: as [`evaluate`][], or for an empty ``radii``.

    Examples:
        >>> pred = [Detections([[0, 0]], [0], [0.9])]
        >>> curve = f1_vs_radius(pred, [([[3, 0]], [0])], [1, 5], num_classes=1)
        >>> curve["total_f1"]["0"].tolist()
        [0.0, 1.0]
    """
    num_classes = _num_classes(num_classes)
    names = _class_names(class_names, num_classes)
    method = _method(method)
    radii_arr = np.asarray(radii, dtype=np.float64).reshape(-1)
    if radii_arr.size == 0:
        raise ValueError("radii must hold at least one radius, got none.")
    total = np.zeros((len(radii_arr), num_classes))
    mean = np.zeros((len(radii_arr), num_classes))
    for i, r in enumerate(radii_arr):
        counts = _per_image_counts(predictions, truths, _radius(r), num_classes, method)
        report = _report(counts, names, r, method)
        total[i], mean[i] = report.total_f1, report.mean_f1
    return {
        "radii": radii_arr,
        "classes": names,
        "total_f1": {name: total[:, c] for c, name in enumerate(names)},
        "mean_f1": {name: mean[:, c] for c, name in enumerate(names)},
    }


def _per_image_counts(
    predictions: Sequence[Detections],
    truths: Sequence[tuple[Any, Any]],
    radius: float,
    num_classes: int,
    method: str,
) -> np.ndarray:
    """``(n_images, 3, C)`` tp, fp, fn per image and class."""
    predictions, truths = list(predictions), list(truths)
    if len(predictions) != len(truths):
        raise ValueError(
            f"predictions and truths must cover the same images: got {len(predictions)} "
            f"predictions and {len(truths)} truths. Pass one Detections and one "
            "(points, classes) pair per image, in the same order."
        )
    if not predictions:
        raise ValueError("evaluate needs at least one image, got no predictions and no truths.")
    counts = np.zeros((len(predictions), 3, num_classes), np.int64)
    for i, (pred, truth) in enumerate(zip(predictions, truths)):
        if not all(hasattr(pred, a) for a in ("points", "classes", "scores")):
            raise TypeError(
                f"predictions[{i}] must be a Detections (points, classes, scores), "
                f"got {type(pred).__name__}."
            )
        try:
            true_points, true_classes = truth
        except (TypeError, ValueError):
            raise ValueError(
                f"truths[{i}] must be a (points, classes) pair, got {type(truth).__name__}."
            ) from None
        pp, pc = validate_points(
            pred.points, pred.classes, num_classes=num_classes, where=f"predictions[{i}]"
        )
        tpts, tc = validate_points(
            true_points, true_classes, num_classes=num_classes, where=f"truths[{i}]"
        )
        counts[i] = detection_counts(pp, pc, tpts, tc, radius, num_classes, method, pred.scores)
    return counts


def _report(counts: np.ndarray, names: list[str], radius: float, method: str) -> EvaluationReport:
    tp, fp, fn = counts.sum(axis=0)
    precision, recall, total_f1 = precision_recall_f1(tp, fp, fn)
    _, _, image_f1 = precision_recall_f1(counts[:, 0], counts[:, 1], counts[:, 2])
    counted = (counts.sum(axis=1)) > 0  # any tp, fp or fn: true or predicted points exist
    image_f1 = np.where(counted, image_f1, np.nan)
    n_images = counted.sum(axis=0)
    mean_f1 = np.nansum(image_f1, axis=0) / np.maximum(n_images, 1)
    mean_f1 = np.where(n_images > 0, mean_f1, np.nan)
    return EvaluationReport(
        class_names=names,
        radius=float(radius),
        method=method,
        tp=tp,
        fp=fp,
        fn=fn,
        precision=precision,
        recall=recall,
        total_f1=total_f1,
        mean_f1=mean_f1,
        n_images=n_images.astype(np.int64),
        per_image_f1=image_f1,
    )


def _radius(radius: Any) -> float:
    try:
        r = float(radius)
    except (TypeError, ValueError):
        raise ValueError(f"radius must be a number of pixels, got {radius!r}.") from None
    if not np.isfinite(r) or r < 0:
        raise ValueError(f"radius must be a finite number of pixels >= 0, got {radius!r}.")
    return r


def _method(method: Any) -> str:
    name: str = look_up_option(method, MATCHING_METHODS, what="matching method")
    return name


def _num_classes(num_classes: Any) -> int:
    is_int = isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool)
    if not is_int or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}.")
    return int(num_classes)


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(
            f"class_names must have one name per class ({num_classes}), got {len(names)}: {names}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be distinct, got {names}.")
    return names
