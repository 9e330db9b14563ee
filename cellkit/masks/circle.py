"""Fixed-radius discs: the paper's proximity masks for the main decoder (section 2.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from cellkit.masks.base import (
    check_call,
    check_positive,
    nearest_point_filter,
    point_pixels,
    rasterize,
    window_pixels,
)
from cellkit.registry import MASKS

__all__ = ["CircleMask"]


@MASKS.register("circle")
@dataclass
class CircleMask:
    """One binary channel per class with a disc at every point of that class.

    A pixel is set when its centre lies within ``radius`` of a point (distance
    ``<= radius``); each point's own pixel is always set. Overlapping discs of one class
    are a union; channels of different classes are independent (a pixel may be set in
    several), unless ``exclusive=True``: then each pixel belongs to its nearest point
    only, so touching cells are split along their Voronoi boundary.

    Args:
        radius: disc radius in pixels (> 0).
        exclusive: give each pixel to its nearest point only (default False, the paper's
            independent per-class maps).

    Shapes:
        points ``(N, 2)`` ``(x, y)``, classes ``(N,)`` -> ``(num_classes, H, W)`` float32.

    Raises:
        ValueError: for a radius <= 0, and (on call) points outside the image, wrong
            shapes or classes >= ``num_classes``.

    Examples:
        >>> gen = CircleMask(radius=1)
        >>> mask = gen([[2, 1], [4, 2]], [0, 1], shape=(3, 6), num_classes=2)
        >>> mask.shape, mask.dtype
        ((2, 3, 6), dtype('float32'))
        >>> print(mask.astype(int))
        [[[0 0 1 0 0 0]
          [0 1 1 1 0 0]
          [0 0 1 0 0 0]]
        <BLANKLINE>
         [[0 0 0 0 0 0]
          [0 0 0 0 1 0]
          [0 0 0 1 1 1]]]
    """

    radius: float = 4.0
    exclusive: bool = False

    #: Keyword arguments that scale with the cell diameter (as a multiple of it), set by
    #: ``cellkit.geometry.apply_geometry`` when the geometry comes from the points.
    geometry: ClassVar[dict[str, float]] = {"radius": 0.5}
    per_image: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.radius = check_positive("radius", self.radius, "circle mask")
        self.exclusive = bool(self.exclusive)

    @property
    def max_radius(self) -> float:
        """No pixel is set farther than this from a point of its class (but own pixels)."""
        return self.radius

    def channels(self, num_classes: int) -> int:
        """One channel per class."""
        return num_classes

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
        """The disc masks of one image (``rng``, ``image`` and ``key`` are not used)."""
        pts, cls, hw, _ = check_call(points, classes, shape, num_classes, image, where="circle mask")
        r2 = self.radius**2
        parts_i, parts_r, parts_c = [], [], []
        for index, rows, cols, dx, dy in window_pixels(pts, self.radius, hw):
            inside = dx * dx + dy * dy <= r2
            parts_i.append(index[inside])
            parts_r.append(rows[inside])
            parts_c.append(cols[inside])
        own_r, own_c = point_pixels(pts, hw)
        index = np.concatenate([*parts_i, np.arange(len(pts))])
        rows = np.concatenate([*parts_r, own_r])
        cols = np.concatenate([*parts_c, own_c])
        if self.exclusive:
            keep = nearest_point_filter(index, rows, cols, pts, hw)
            index, rows, cols = index[keep], rows[keep], cols[keep]
        return rasterize(index, rows, cols, cls, hw, int(num_classes))
