"""Reusable hypothesis strategies for cellkit's tests.

Annotations are drawn the way they reach cellkit: ``(x, y)`` points inside an image of a
given ``(H, W)`` shape, float64, with integer classes below ``num_classes``. The draws
favour the cases that break code: empty point sets, points on the border (``x = 0``,
``x = W - 1``, the largest float below ``W``), integer and fractional coordinates,
coincident points and images of one pixel in width or height.

Example:
    >>> from hypothesis import given
    >>> @given(annotations(max_side=16))
    ... def test_inside(ann):
    ...     assert np.all(ann.points[:, 0] < ann.shape[1])
    >>> test_inside()
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

__all__ = [
    "Annotations",
    "annotations",
    "coordinates",
    "image_shapes",
    "images",
    "point_sets",
    "seeds",
]


class Annotations(NamedTuple):
    """The point annotations of one image.

    Attributes:
        points: ``(N, 2)`` float64 ``(x, y)``, inside the image.
        classes: ``(N,)`` int64, below ``num_classes``.
        shape: ``(H, W)`` of the image.
        num_classes: number of classes (classes may be missing from ``classes``).
    """

    points: np.ndarray
    classes: np.ndarray
    shape: tuple[int, int]
    num_classes: int


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``np.random.default_rng``."""
    return st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def image_shapes(draw: st.DrawFn, min_side: int = 1, max_side: int = 48) -> tuple[int, int]:
    """An image size ``(H, W)`` with sides in ``[min_side, max_side]``."""
    h = draw(st.integers(min_value=min_side, max_value=max_side))
    w = draw(st.integers(min_value=min_side, max_value=max_side))
    return h, w


@st.composite
def coordinates(draw: st.DrawFn, size: int) -> float:
    """One coordinate in ``[0, size)``: an integer pixel, a fraction, or a border value."""
    border = [0.0, float(size - 1), max(0.0, size - 0.5), float(np.nextafter(float(size), 0.0))]
    return draw(
        st.one_of(
            st.integers(min_value=0, max_value=size - 1).map(float),
            st.floats(min_value=0.0, max_value=float(size), exclude_max=True, allow_nan=False),
            st.sampled_from(border),
        )
    )


@st.composite
def point_sets(
    draw: st.DrawFn, shape: tuple[int, int], min_points: int = 0, max_points: int = 20
) -> np.ndarray:
    """``(N, 2)`` float64 ``(x, y)`` points inside an image of ``shape`` (possibly empty).

    Some points may repeat another one exactly (annotators click twice).
    """
    h, w = shape
    point = st.tuples(coordinates(w), coordinates(h))
    pts = draw(st.lists(point, min_size=min_points, max_size=max_points))
    if len(pts) >= 2 and draw(st.booleans()):
        pts.append(pts[draw(st.integers(0, len(pts) - 1))])
        pts = pts[: max(max_points, min_points)]
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


@st.composite
def annotations(
    draw: st.DrawFn,
    shape: tuple[int, int] | None = None,
    num_classes: int | None = None,
    min_points: int = 0,
    max_points: int = 20,
    min_side: int = 1,
    max_side: int = 48,
    max_classes: int = 4,
) -> Annotations:
    """Points with classes inside an image; ``shape`` and ``num_classes`` drawn unless given."""
    if shape is None:
        shape = draw(image_shapes(min_side=min_side, max_side=max_side))
    if num_classes is None:
        num_classes = draw(st.integers(min_value=1, max_value=max_classes))
    pts = draw(point_sets(shape, min_points=min_points, max_points=max_points))
    cls = draw(st.lists(st.integers(0, num_classes - 1), min_size=len(pts), max_size=len(pts)))
    return Annotations(pts, np.asarray(cls, dtype=np.int64).reshape(-1), tuple(shape), num_classes)


@st.composite
def images(draw: st.DrawFn, shape: tuple[int, int], points: np.ndarray | None = None) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image: noise, one colour, or dark cells (at ``points``) on a
    bright noisy background."""
    h, w = shape
    rng = np.random.default_rng(draw(seeds()))
    kind = draw(st.sampled_from(["noise", "constant", "cells"]))
    if kind == "noise":
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    if kind == "constant":
        return np.full((h, w, 3), draw(st.integers(0, 255)), dtype=np.uint8)
    image = rng.normal(220.0, 10.0, size=(h, w, 3))
    if points is not None and len(points):
        rows, cols = np.mgrid[0:h, 0:w]
        for x, y in np.asarray(points).reshape(-1, 2):
            radius = rng.uniform(1.5, 4.0)
            colour = rng.uniform(40.0, 140.0, size=3)
            image[(cols - x) ** 2 + (rows - y) ** 2 <= radius**2] = colour
    return np.clip(image, 0, 255).astype(np.uint8)
