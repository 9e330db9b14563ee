"""Calibrated peaks: the threshold (and minimum distance) per class that maximises F1.

A model's probability maps are seldom calibrated at 0.5: after a short training a rare
class often peaks at 0.3. [`calibrate_peaks`][] takes the validation images' maps (from
the same tiled inference as ``cellkit predict``), tries a grid of thresholds (and,
optionally, minimum distances) per class and keeps, for each class, the value whose total F1
on those images is highest. Classes are tuned one at a time with the others fixed
(coordinate ascent), because the cross-class rule of [`peaks`][cellkit.postprocess.peaks.peaks]
lets one class's threshold move another's peaks; ``rounds`` passes are made.

Training calls it at every validation (thresholds only, one round: the score that picks
``best.pt`` is the calibrated one), then once more on the best checkpoint with the minimum
distance too, and stores the result in ``best.pt`` (``postprocess``) and
``<run>/calibration.json``. [`Predictor`][cellkit.engine.predict.Predictor] uses it unless a
threshold is given.

A class with no annotated cell in the validation images is left out: its F1 is undefined
(``None``), it keeps the config's values, and it does not count in the score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellkit.metrics import evaluate
from cellkit.postprocess.peaks import LocalPeaks, per_class
from cellkit.registry import POSTPROCESSORS

__all__ = ["THRESHOLD_GRID", "Calibration", "calibrate_peaks", "class_counts", "score_maps"]

#: Thresholds tried on probability maps (sigmoid). For density maps (``relative=True``)
#: these are fractions of the class's highest map value.
THRESHOLD_GRID: tuple[float, ...] = tuple(round(v, 2) for v in np.arange(0.1, 0.91, 0.05))


@dataclass
class Calibration:
    """The result of [`calibrate_peaks`][].

    Attributes:
        kwargs: the post-processor's keyword arguments, with per-class ``threshold`` (and
            ``min_distance``) lists.
        f1: total F1 per class name with those values (``None`` for a class without cells
            in the images).
        score: mean of the defined F1 values (``nan`` when none is).
        before: the same score with the original arguments.
        counts: annotated cells per class name in the images.
    """

    kwargs: dict[str, Any]
    f1: dict[str, float | None]
    score: float
    before: float
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {"postprocess": self.kwargs, "f1": self.f1, "score": _num(self.score),
                "score_before": _num(self.before), "cells": self.counts}


def _num(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)


def score_maps(maps: Sequence[np.ndarray], truths: Sequence[tuple[Any, Any]], *, radius: float,
               class_names: Sequence[str], name: str = "peaks", kwargs: Mapping[str, Any] | None = None,
               ) -> tuple[dict[str, float | None], float]:
    """Total F1 per class (``None`` where a class has no true cell) and their mean.

    Examples:
        >>> m = np.zeros((1, 9, 9), np.float32); m[0, 4, 4] = 0.9
        >>> score_maps([m], [([[4, 4]], [0])], radius=2, class_names=["a"],
        ...            kwargs={"threshold": 0.5})
        ({'a': 1.0}, 1.0)
    """
    post = POSTPROCESSORS.build(name, **dict(kwargs or {}))
    predictions = [post(m) for m in maps]
    return _f1(predictions, truths, radius, class_names)


def _f1(predictions: Sequence[Any], truths: Sequence[tuple[Any, Any]], radius: float,
        class_names: Sequence[str]) -> tuple[dict[str, float | None], float]:
    k = len(class_names)
    report = evaluate(predictions, truths, radius=radius, num_classes=k, class_names=list(class_names))
    present = class_counts(truths, k) > 0
    f1 = {n: (float(report.total_f1[c]) if present[c] else None) for c, n in enumerate(class_names)}
    values = [v for v in f1.values() if v is not None]
    return f1, (float(np.mean(values)) if values else float("nan"))


def _class_f1_per_threshold(name: str, kwargs: Mapping[str, Any], c: int, grid: Sequence[float],
                            maps: Sequence[np.ndarray], truths: Sequence[tuple[Any, Any]], radius: float,
                            class_names: Sequence[str]) -> list[float]:
    """Class ``c``'s total F1 with each threshold of ``grid`` for it (the others as in ``kwargs``).

    For [`LocalPeaks`][cellkit.postprocess.peaks.LocalPeaks] the peaks are found once, at the
    lowest threshold, and filtered: a class-``c`` point's fate (plateaus, spacing, the
    cross-class rule) depends only on points of higher value, which a higher threshold for
    ``c`` keeps, so its points at threshold ``t`` are exactly those above ``t`` (compared in the
    map's dtype, as [`peaks`][cellkit.postprocess.peaks.peaks] does). Other classes' points
    may change, but not class ``c``'s F1 (matching is per class). Any other post-processor
    is built once per threshold.
    """
    def with_threshold(t: float) -> dict[str, Any]:
        trial = dict(kwargs)
        trial["threshold"] = list(kwargs["threshold"])
        trial["threshold"][c] = t
        return trial

    def f1_of(predictions: list[Any]) -> float:
        return _f1(predictions, truths, radius, class_names)[0][class_names[c]] or 0.0

    if POSTPROCESSORS.get(name) is not LocalPeaks or not len(grid):
        return [f1_of([POSTPROCESSORS.build(name, **with_threshold(t))(m) for m in maps]) for t in grid]
    post = POSTPROCESSORS.build(name, **with_threshold(min(grid)))
    found = []  # per map: its detections, which are class c, their map values, the compare dtype
    for m in maps:
        arr = np.asarray(m)
        det = post(m)
        col, row = det.points.astype(np.int64).T
        found.append((det, det.classes == c, arr[c][row, col], arr.dtype if arr.dtype.kind == "f" else np.float32))
    return [f1_of([det.subset(~is_c | (v > np.asarray(t, dtype))) for det, is_c, v, dtype in found]) for t in grid]


def class_counts(truths: Sequence[tuple[Any, Any]], k: int) -> np.ndarray:
    """Annotated cells per class (``(k,)`` int64) over ``(points, classes)`` pairs.

    Examples:
        >>> class_counts([([[0, 0], [1, 1]], [1, 1]), ([], [])], 3).tolist()
        [0, 2, 0]
    """
    counts = np.zeros(k, np.int64)
    for _, classes in truths:
        cls = np.asarray(classes, np.int64).reshape(-1)
        if len(cls):
            counts += np.bincount(cls, minlength=k)[:k]
    return counts


def calibrate_peaks(
    maps: Sequence[np.ndarray],
    truths: Sequence[tuple[Any, Any]],
    *,
    radius: float,
    class_names: Sequence[str],
    kwargs: Mapping[str, Any],
    name: str = "peaks",
    thresholds: Sequence[float] = THRESHOLD_GRID,
    min_distances: Sequence[int] | None = None,
    relative: bool = False,
    rounds: int = 1,
) -> Calibration:
    """Per-class peak thresholds (and minimum distances) that maximise total F1 on ``maps``.

    Args:
        maps: ``(C, H, W)`` maps of the images (after the activation).
        truths: per image ``(points (N, 2), classes (N,))``.
        radius: matching radius in pixels.
        class_names: ``C`` names.
        kwargs: the post-processor's arguments to start from (``threshold``,
            ``min_distance``, ``exclusive``); a post-processor without ``threshold`` is
            returned unchanged.
        name: the post-processor's registry name.
        thresholds: the grid tried per class.
        min_distances: minimum distances tried per class (``None``: keep the given one).
        relative: the grid is a fraction of each class's highest map value (density maps).
        rounds: passes over the classes.

    Returns:
        A [`Calibration`][]; ties keep the value nearest the starting one (here 0.25, the
        highest threshold below the 0.3 peaks, is nearest 0.5).

    Examples:
        >>> m = np.zeros((1, 9, 9), np.float32); m[0, 2, 2] = 0.3; m[0, 6, 6] = 0.3
        >>> cal = calibrate_peaks([m], [([[2, 2], [6, 6]], [0, 0])], radius=2,
        ...                       class_names=["a"],
        ...                       kwargs={"threshold": 0.5, "min_distance": 1})
        >>> cal.kwargs["threshold"], cal.f1, cal.before
        ([0.25], {'a': 1.0}, 0.0)
    """
    k = len(class_names)
    base = dict(kwargs)
    f1_before, before = score_maps(maps, truths, radius=radius, class_names=class_names, name=name, kwargs=base)
    counts = {n: int(c) for n, c in zip(class_names, class_counts(truths, k))}
    if "threshold" not in base or not maps:
        return Calibration(base, f1_before, before, before, counts)
    current = dict(base)
    current["threshold"] = per_class(base["threshold"], k, "threshold", integer=False).tolist()
    tune_d = min_distances is not None and "min_distance" in base
    if "min_distance" in base:
        current["min_distance"] = per_class(base["min_distance"], k, "min_distance", integer=True).tolist()
    present = [c for c, n in enumerate(class_names) if counts[n] > 0]
    for _ in range(max(1, int(rounds))):
        for c in present:
            scale = max(float(np.max(m[c])) for m in maps) if relative else 1.0
            if relative and scale <= 0:
                continue
            grid_t = sorted({round(float(t) * scale, 6) for t in thresholds})
            grid_d = sorted({int(d) for d in min_distances}) if tune_d else [None]
            best_key, best = None, None
            for d in grid_d:
                trial_d = dict(current)
                if d is not None:
                    trial_d["min_distance"] = list(current["min_distance"])
                    trial_d["min_distance"][c] = d
                for t, value in zip(grid_t, _class_f1_per_threshold(name, trial_d, c, grid_t, maps, truths,
                                                                     radius, class_names)):
                    trial = dict(trial_d)
                    trial["threshold"] = list(current["threshold"])
                    trial["threshold"][c] = t
                    # ties: nearest the current value (stable across validations)
                    key = (round(value, 9), -abs(t - current["threshold"][c]) / max(scale, 1e-12),
                           -abs((d or 0) - (current.get("min_distance") or [0] * k)[c]))
                    if best_key is None or key > best_key:
                        best_key, best = key, trial
            assert best is not None
            current = best
    f1, score = score_maps(maps, truths, radius=radius, class_names=class_names, name=name, kwargs=current)
    return Calibration(current, f1, score, before, counts)
