"""The mask generator protocol and the helpers every generator shares.

A mask generator turns the point annotations of one image into a training target: an
``(C, H, W)`` float32 array. Every generator has the same call signature (see
[`MaskGenerator`][]), so the dataset, the configs and the tests treat them alike.

Conventions shared by all generators:

* Points are ``(x, y) = (column, row)`` floats; pixel ``(r, c)`` has its centre at
  ``(x=c, y=r)``. A point's *own pixel* is the pixel whose centre is nearest to it,
  ``(row, col) = (round(y), round(x))`` clipped to the image ([`point_pixels`][]).
  Generators that draw shapes always set each point's own pixel, however small the shape,
  so no annotated cell is ever missing from its target.
* Overlaps. Inside one class channel, the shapes of overlapping cells are a union (the
  masks are binary). Channels are independent: a pixel may be set in several class
  channels when cells of different classes overlap, as in the paper's per-class binary
  maps. Generators that draw shapes (``circle``, ``random_polygon``) offer
  ``exclusive=True``, where each pixel belongs to its nearest point only (ties go to the
  point listed first), which splits touching cells along their Voronoi boundary.
* Randomness comes only from the ``rng`` argument, normalised with
  ``np.random.default_rng(rng)`` ([`as_rng`][]): an int seed gives the same mask every
  time, a ``Generator`` advances from call to call, ``None`` draws fresh entropy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cellkit.imaging import check_image
from cellkit.points import validate_points

__all__ = [
    "MaskGenerator",
    "as_rng",
    "check_call",
    "check_positive",
    "nearest_point_filter",
    "point_pixels",
    "rasterize",
    "window_pixels",
]


@runtime_checkable
class MaskGenerator(Protocol):
    """What the dataset expects of a mask generator.

    Attributes:
        per_image: True when the target depends only on the full, untransformed image and
            its points (``prior``, ``estimated``): the dataset computes it once per image,
            caches it and crops/flips/rotates it with the image. False (``circle``,
            ``random_polygon``, ``gaussian``): the dataset builds it after augmentation
            from the transformed points, anew every iteration.
    """

    per_image: bool

    def channels(self, num_classes: int) -> int:
        """Number of output channels for ``num_classes`` classes."""
        ...

    def __call__(
        self,
        points: Any,
        classes: Any,
        *,
        shape: tuple[int, int],
        num_classes: int,
        image: np.ndarray | None = None,
        rng: np.random.Generator | int | None = None,
        key: str | None = None,
    ) -> np.ndarray:
        """The target of one image.

        Args:
            points: ``(N, 2)`` ``(x, y)`` pixel coordinates inside the image.
            classes: ``(N,)`` integer classes below ``num_classes``.
            shape: ``(H, W)`` of the image.
            num_classes: number of classes.
            image: ``(H, W, 3)`` uint8 image (needed by ``estimated`` and ``prior``).
            rng: seed or generator for random generators.
            key: an id of the image, for caching (``prior``).

        Returns:
            ``(C, H, W)`` float32 array with ``C = self.channels(num_classes)``.
        """
        ...


def as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """Normalise a seed or generator with ``np.random.default_rng``.

    A ``Generator`` is returned as is (so it advances across calls); an int gives a fresh
    generator seeded with it; ``None`` seeds from the operating system.

    Examples:
        >>> gen = np.random.default_rng(0)
        >>> same = int(as_rng(7).integers(100)) == int(as_rng(7).integers(100))
        >>> as_rng(gen) is gen, same
        (True, True)
    """
    return np.random.default_rng(rng)


def check_positive(name: str, value: float, owner: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float or raise a ``ValueError`` naming the parameter.

    Raises:
        ValueError: when ``value`` is not a finite number > 0 (>= 0 with ``allow_zero``).
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}.") from None
    if not np.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}: {name} must be a finite number {bound}, got {value!r}.")
    return number


def check_call(
    points: Any,
    classes: Any,
    shape: Any,
    num_classes: Any,
    image: Any = None,
    *,
    where: str,
    need_image: bool = False,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int], np.ndarray | None]:
    """Validate the arguments of a generator call.

    Args:
        points, classes: the annotations (checked with
            [`validate_points`][cellkit.points.validate_points]).
        shape: ``(H, W)`` of the image.
        num_classes: number of classes, a positive int.
        image: optional ``(H, W, 3)`` uint8 image; its size must match ``shape``.
        where: the generator's name, prefixed to error messages.
        need_image: raise when ``image`` is None.

    Returns:
        ``(points float64 (N, 2), classes int64 (N,), (H, W), image or None)``.

    Raises:
        ValueError: for points outside the image, wrong shapes, classes >= ``num_classes``,
            a bad ``shape`` or ``num_classes``, a missing or mismatched image.

    Examples:
        >>> p, c, hw, _ = check_call([[0, 1]], [0], (2, 3), 1, where="demo")
        >>> p.tolist(), c.tolist(), hw
        ([[0.0, 1.0]], [0], (2, 3))
    """
    try:
        h, w = (int(s) for s in shape)
        valid_shape = (h, w) == tuple(shape) and h > 0 and w > 0
    except (TypeError, ValueError):
        valid_shape = False
    if not valid_shape:
        raise ValueError(f"{where}: shape must be (H, W) with positive integers, got {shape!r}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"{where}: num_classes must be a positive int, got {num_classes!r}.")
    pts, cls = validate_points(points, classes, shape=(h, w), num_classes=int(num_classes), where=where)
    img = None
    if image is not None:
        img = check_image(image, where=where)
        if img.shape[:2] != (h, w):
            raise ValueError(
                f"{where}: the image is {img.shape[0]}x{img.shape[1]} (HxW) but shape is {h}x{w}; "
                "pass shape=image.shape[:2] and points in that image's coordinates."
            )
    elif need_image:
        raise ValueError(
            f"{where}: this mask is computed from the image; pass image=<(H, W, 3) uint8 array>."
        )
    return pts, cls, (h, w), img


def point_pixels(points: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Each point's own pixel: the pixel whose centre is nearest, clipped to the image.

    Shapes:
        points ``(N, 2)`` ``(x, y)``; returns rows ``(N,)`` and cols ``(N,)`` int64.

    Examples:
        >>> rows, cols = point_pixels(np.array([[0.4, 1.5], [2.9, 0.0]]), (3, 3))
        >>> rows.tolist(), cols.tolist()
        ([2, 0], [0, 2])
    """
    h, w = shape
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    # floor(v + 0.5): round half up, not numpy's round-half-to-even.
    cols = np.clip(np.floor(pts[:, 0] + 0.5), 0, w - 1).astype(np.int64)
    rows = np.clip(np.floor(pts[:, 1] + 0.5), 0, h - 1).astype(np.int64)
    return rows, cols


def window_pixels(
    points: np.ndarray, reach: float, shape: tuple[int, int], *, max_elements: int = 1 << 21
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The in-image pixels near each point, in chunks of points (vectorised local windows).

    Every pixel whose centre lies within ``reach`` of a point is yielded for that point
    (with a few more, from the square window around its own pixel); callers filter them.

    Args:
        points: ``(N, 2)`` ``(x, y)`` coordinates inside the image.
        reach: the largest distance of interest, in pixels.
        shape: ``(H, W)``.
        max_elements: bound on the candidates of one chunk (memory).

    Yields:
        ``(index, rows, cols, dx, dy)``: the point index (into ``points``) of each
        candidate pixel, its row and column (int64), and its offset from the point
        ``dx = col - x``, ``dy = row - y`` (float64), all of shape ``(P,)``.
    """
    h, w = shape
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0:
        return
    r0, c0 = point_pixels(pts, shape)
    # |col - x| <= reach and |x - c0| <= 0.5 inside the image (< 1 when clipped at the
    # right border, where the pixels beyond are outside anyway): ceil(reach) + 1 is enough.
    half = int(np.ceil(reach)) + 1
    offsets = np.arange(-half, half + 1)
    off_r = np.repeat(offsets, offsets.size)
    off_c = np.tile(offsets, offsets.size)
    chunk = max(1, max_elements // off_r.size)
    for start in range(0, len(pts), chunk):
        stop = min(start + chunk, len(pts))
        rows = (r0[start:stop, None] + off_r[None, :]).ravel()
        cols = (c0[start:stop, None] + off_c[None, :]).ravel()
        index = np.repeat(np.arange(start, stop), off_r.size)
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        index, rows, cols = index[inside], rows[inside], cols[inside]
        yield index, rows, cols, cols - pts[index, 0], rows - pts[index, 1]


def nearest_point_filter(
    index: np.ndarray, rows: np.ndarray, cols: np.ndarray, points: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Keep each candidate pixel only for its nearest point (the ``exclusive`` rule).

    A pixel is kept only when no point at all lies nearer to its centre than the point
    that drew it, so each shape is clipped to its point's Voronoi cell. Among points at
    the same distance that drew the pixel, the one listed first wins.

    Returns:
        a boolean ``(P,)`` array: True where ``index`` is the pixel's nearest point.
    """
    from scipy.spatial import cKDTree

    if index.size == 0:
        return np.zeros(0, dtype=bool)
    pts = np.asarray(points, dtype=np.float64)
    d2_own = (cols - pts[index, 0]) ** 2 + (rows - pts[index, 1]) ** 2
    nearest_d, _ = cKDTree(pts).query(np.column_stack([cols, rows]).astype(np.float64))
    keep = d2_own <= nearest_d**2 * (1 + 1e-9) + 1e-12
    # Exact ties leave a pixel with several candidates: the first listed point wins.
    flat = rows * shape[1] + cols
    kept = np.flatnonzero(keep)
    order = kept[np.lexsort((index[kept], flat[kept]))]
    first = np.ones(order.size, dtype=bool)
    first[1:] = flat[order[1:]] != flat[order[:-1]]
    result = np.zeros(index.size, dtype=bool)
    result[order[first]] = True
    return result


def rasterize(
    index: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    classes: np.ndarray,
    shape: tuple[int, int],
    num_classes: int,
) -> np.ndarray:
    """Binary class channels from pixels drawn by points: the union per class.

    Shapes:
        index, rows, cols ``(P,)``; classes ``(N,)``; returns ``(num_classes, H, W)`` float32.

    Examples:
        >>> m = rasterize(np.array([0, 1]), np.array([0, 1]), np.array([1, 0]),
        ...               np.array([1, 0]), (2, 2), 2)
        >>> print(m.astype(int))
        [[[0 0]
          [1 0]]
        <BLANKLINE>
         [[0 1]
          [0 0]]]
    """
    out = np.zeros((num_classes, *shape), dtype=np.float32)
    if index.size:
        out[classes[index], rows, cols] = 1.0
    return out
