"""Point annotations and detections: the one representation every part of cellkit shares.

Points are ``(x, y) = (column, row)`` in pixels, as a float array of shape ``(N, 2)``;
classes are integers of shape ``(N,)``. Class 1 is the class of interest (the paper's
positive tumour cells) and class 0 the other cells, but nothing assumes two classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Detections", "as_points", "validate_points"]


def as_points(points: Any, *, name: str = "points", where: str = "") -> np.ndarray:
    """Check an ``(N, 2)`` array of ``(x, y)`` points and return it as float64.

    The one check of a point array in cellkit (readers, writers, augmentation, metrics,
    mask generators): every caller fails with the same message.

    Args:
        points: ``(N, 2)`` array-like of ``(x, y)`` pixel coordinates. An empty array
            of any shape is read as no points, ``(0, 2)``.
        name: what the points are, for messages (``"pred points"``).
        where: a prefix naming the source (a file, an image) for error messages.

    Raises:
        ValueError: for another shape, or a coordinate that is NaN or infinite.

    Examples:
        >>> as_points([[1, 2]]).tolist(), as_points([]).shape
        ([[1.0, 2.0]], (0, 2))
    """
    prefix = f"{where}: " if where else ""
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        return pts.reshape(0, 2)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(
            f"{prefix}{name} must have shape (N, 2) with columns (x, y), got shape {pts.shape}."
        )
    finite = np.isfinite(pts).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{prefix}{name} must be finite, got NaN or infinity in row {row} "
            f"(x={pts[row, 0]}, y={pts[row, 1]}); drop or fix that point."
        )
    return pts


def validate_points(
    points: Any,
    classes: Any,
    shape: tuple[int, int] | None = None,
    num_classes: int | None = None,
    where: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Check point annotations and return them as ``(float64 (N, 2), int64 (N,))`` arrays.

    Args:
        points: ``(N, 2)`` array-like of ``(x, y)`` pixel coordinates, checked with
            [`as_points`][] (an empty array is read as no points).
        classes: ``(N,)`` array-like of non-negative integer classes.
        shape: ``(H, W)`` of the image; when given, every point must lie in
            ``0 <= x < W`` and ``0 <= y < H``.
        num_classes: when given, every class must be below it.
        where: a prefix naming the source (a file, an image) for error messages.

    Raises:
        ValueError: naming what was expected, what was got and how to fix it.

    Examples:
        >>> p, c = validate_points([[1.0, 2.0]], [1], shape=(4, 4), num_classes=2)
        >>> p.shape, c.tolist()
        ((1, 2), [1])
    """
    prefix = f"{where}: " if where else ""
    pts = as_points(points, where=where)
    cls = np.asarray(classes)
    if cls.size == 0:
        cls = cls.reshape(0)
    if cls.ndim != 1 or cls.shape[0] != pts.shape[0]:
        raise ValueError(
            f"{prefix}classes must have shape (N,) matching {pts.shape[0]} points, got shape {cls.shape}."
        )
    if cls.size and not np.issubdtype(cls.dtype, np.integer):
        as_float = cls.astype(np.float64)
        if not np.all(np.isfinite(as_float)) or not np.all(as_float == np.round(as_float)):
            bad = cls[~(np.isfinite(as_float) & (as_float == np.round(as_float)))][:3]
            raise ValueError(f"{prefix}classes must be integers, got {bad.tolist()}.")
    cls = cls.astype(np.int64)
    if cls.size and cls.min() < 0:
        raise ValueError(f"{prefix}classes must be >= 0, got {int(cls.min())}.")
    if num_classes is not None and cls.size and cls.max() >= num_classes:
        raise ValueError(
            f"{prefix}class {int(cls.max())} is out of range for num_classes={num_classes} "
            f"(expected 0..{num_classes - 1}); raise num_classes or map the class."
        )
    if shape is not None and pts.size:
        h, w = int(shape[0]), int(shape[1])
        outside = (pts[:, 0] < 0) | (pts[:, 0] >= w) | (pts[:, 1] < 0) | (pts[:, 1] >= h)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"{prefix}{int(outside.sum())} point(s) lie outside the {h}x{w} (HxW) image, "
                f"e.g. point {i} at (x={pts[i, 0]:g}, y={pts[i, 1]:g}); expected 0 <= x < {w} "
                f"and 0 <= y < {h}. Check that columns are (x, y), not (row, col)."
            )
    return pts, cls


@dataclass
class Detections:
    """Cells found in one image.

    Attributes:
        points: ``(N, 2)`` float32 ``(x, y)`` pixel coordinates.
        classes: ``(N,)`` int64 class indices.
        scores: ``(N,)`` float32 scores (the probability at the peak).
        probs: ``(N, C)`` float32, every class's map value at the cell (the pixel nearest
            its point), or ``None``. The ``C`` probabilities do not sum to one with
            per-class sigmoid maps: each says how much that class's map shows a cell there.

    Examples:
        >>> det = Detections([[1, 2], [3, 4]], [0, 1], [0.5, 0.75],
        ...                  [[0.5, 0.25], [0.5, 0.75]])
        >>> det.subset([1]).probs.tolist(), len(Detections.concatenate([det, det]))
        ([[0.5, 0.75]], 4)
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    probs: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float32).reshape(-1, 2)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        n = len(self.points)
        if len(self.classes) != n or len(self.scores) != n:
            raise ValueError(
                f"Detections need as many classes and scores as points: got {n} points, "
                f"{len(self.classes)} classes, {len(self.scores)} scores."
            )
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float32)
            if self.probs.ndim != 2 or len(self.probs) != n:
                raise ValueError(f"Detections' probs must be (N, C) with N = {n} points, got {self.probs.shape}.")

    def __len__(self) -> int:
        return len(self.points)

    def subset(self, index: Any) -> Detections:
        """The detections at ``index`` (a boolean mask or positions), every field kept."""
        return Detections(self.points[index], self.classes[index], self.scores[index],
                          None if self.probs is None else self.probs[index])

    @staticmethod
    def concatenate(parts: Sequence[Detections]) -> Detections:
        """One ``Detections`` of several (``probs`` kept when every part has them, with as many classes)."""
        parts = list(parts)
        if not parts:
            return Detections()
        probs = [p.probs for p in parts]
        keep = all(p is not None for p in probs) and len({p.shape[1] for p in probs if p is not None}) == 1
        return Detections(np.concatenate([p.points for p in parts]), np.concatenate([p.classes for p in parts]),
                          np.concatenate([p.scores for p in parts]),
                          np.concatenate([p for p in probs if p is not None]) if keep else None)

    @property
    def class_share(self) -> np.ndarray:
        """``(N,)``: the cell's own class's probability over the sum of every class's (``probs``);
        1 without ``probs`` or with one class (nothing to tell apart)."""
        if self.probs is None or self.probs.shape[1] < 2:
            return np.ones(len(self), np.float32)
        own = self.probs[np.arange(len(self)), self.classes]
        total = np.maximum(self.probs.sum(1), 1e-6)
        return np.clip(own / total, 0.0, 1.0).astype(np.float32)

    @property
    def confidence(self) -> np.ndarray:
        """``(N,)`` in [0, 1]: how sure the model is that a cell of this class is there:
        ``scores`` (a cell) times [`class_share`][cellkit.points.Detections.class_share] (of this
        class). Checked on held-out regions in ``benchmarks/confidence_calibration.py``
        (docs: [Confidence](../training.md#confidence-per-cell)).

        Examples:
            >>> conf = Detections([[0, 0]], [1], [0.8], [[0.2, 0.8]]).confidence
            >>> round(float(conf[0]), 3)
            0.64
        """
        return np.clip(self.scores * self.class_share, 0.0, 1.0).astype(np.float32)

    def counts(self, num_classes: int) -> np.ndarray:
        """Number of detections per class, shape ``(num_classes,)``."""
        return np.bincount(self.classes, minlength=num_classes)[:num_classes]
