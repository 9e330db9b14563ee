"""Random polygons: the paper's dynamic masks for the consistency branch (section 2.2).

Every call draws a new random polygon for every cell, so the dynamic decoder never sees
the same cell shape twice and the encoder learns features invariant to shape and size.

Why not rasterise with ``skimage.draw.polygon``: this runs every training iteration, and
one ``skimage`` call per cell costs tens of microseconds of Python overhead each. The
polygons are star-shaped around their point (vertices sorted by angle), so a pixel lies
inside exactly when it lies on the inner side of the edge of its angular sector; that
test vectorises over all cells at once. [`RandomPolygonMask.polygons`][] returns the
same polygons as shapely geometries (for plots, and the tests check that the raster
matches ``shapely.contains_xy`` on the pixel centres).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from cellkit.masks.base import (
    as_rng,
    check_call,
    check_positive,
    nearest_point_filter,
    point_pixels,
    rasterize,
    window_pixels,
)
from cellkit.points import as_points
from cellkit.registry import MASKS

__all__ = ["PolygonDraw", "RandomPolygonMask"]

_TWO_PI = 2.0 * np.pi


class PolygonDraw(NamedTuple):
    """The random draw of one call, vertices relative to each point.

    Attributes:
        num_vertices: ``(N,)`` int64 vertex count of each polygon.
        angles: ``(N, V)`` vertex angles in radians, increasing along each row, inside
            ``[rotation, rotation + 2 pi)``; ``V = max_vertices``, entries past
            ``num_vertices`` are padding (``inf``).
        radii: ``(N, V)`` vertex distances to the point in pixels (padding 0).
    """

    num_vertices: np.ndarray
    angles: np.ndarray
    radii: np.ndarray


@MASKS.register("random_polygon")
@dataclass
class RandomPolygonMask:
    """One binary channel per class with a new random polygon around every point.

    For each cell and each call: a vertex count uniform in ``[min_vertices,
    max_vertices]``, a scale uniform in ``[min_scale, max_scale]`` of ``base_radius``, a
    random rotation, vertex angles evenly spaced then shifted by up to ``angle_jitter``
    of the spacing, and a radius per vertex of ``base_radius * scale * (1 + u)`` with
    ``u`` uniform in ``[-jitter, jitter]``. Every pixel whose centre lies inside the
    polygon (or on its boundary) is set, and each point's own pixel always is.

    Overlapping polygons of one class are a union; channels of different classes are
    independent (a pixel may be set in several), unless ``exclusive=True``: then each
    pixel belongs to its nearest point only.

    The draw is deterministic for a given seed and changes from call to call when ``rng``
    is one ``np.random.Generator`` that advances.

    Args:
        base_radius: the typical cell radius in pixels (> 0).
        min_vertices, max_vertices: range of the vertex count (3 <= min <= max).
        min_scale, max_scale: range of the per-cell scale of ``base_radius`` (0 < min <= max).
        jitter: relative spread of the vertex radii, in ``[0, 1)``.
        angle_jitter: shift of each vertex angle as a fraction of the even spacing, in
            ``[0, 1)``; must keep every angular gap below pi
            (``2 * (1 + angle_jitter) < min_vertices``) so each polygon stays star-shaped.
        exclusive: give each pixel to its nearest point only (default False).

    Attributes:
        max_radius: ``base_radius * max_scale * (1 + jitter)``: no pixel of a class channel
            is farther than this from a point of that class, except points' own pixels
            (always set, at most sqrt(2) from their point).

    Shapes:
        points ``(N, 2)`` ``(x, y)``, classes ``(N,)`` -> ``(num_classes, H, W)`` float32.

    Raises:
        ValueError: for invalid parameters, and (on call) points outside the image, wrong
            shapes or classes >= ``num_classes``.

    Examples:
        >>> gen = RandomPolygonMask(base_radius=2.5)
        >>> rng = np.random.default_rng(0)
        >>> for _ in range(2):  # a new polygon at every call
        ...     mask = gen([[3, 3]], [0], shape=(7, 7), num_classes=1, rng=rng)
        ...     print(mask[0].astype(int))
        [[0 0 0 0 0 0 0]
         [0 0 0 1 0 0 0]
         [0 0 1 1 1 0 0]
         [0 0 1 1 1 0 0]
         [0 0 1 1 1 0 0]
         [0 0 0 1 1 0 0]
         [0 0 0 0 0 0 0]]
        [[0 0 1 1 1 0 0]
         [1 1 1 1 1 1 0]
         [1 1 1 1 1 1 0]
         [1 1 1 1 1 1 1]
         [0 1 1 1 1 1 1]
         [0 0 1 1 1 1 1]
         [0 0 1 1 0 0 0]]
        >>> gen.max_radius
        4.375
    """

    base_radius: float = 4.0
    min_vertices: int = 5
    max_vertices: int = 12
    min_scale: float = 0.6
    max_scale: float = 1.4
    jitter: float = 0.25
    angle_jitter: float = 0.3
    exclusive: bool = False

    #: Keyword arguments that scale with the cell diameter (as a multiple of it), set by
    #: ``cellkit.geometry.apply_geometry`` when the geometry comes from the points.
    geometry: ClassVar[dict[str, float]] = {"base_radius": 0.5}
    per_image: ClassVar[bool] = False

    def __post_init__(self) -> None:
        owner = "random_polygon mask"
        self.base_radius = check_positive("base_radius", self.base_radius, owner)
        self.min_scale = check_positive("min_scale", self.min_scale, owner)
        self.max_scale = check_positive("max_scale", self.max_scale, owner)
        self.jitter = check_positive("jitter", self.jitter, owner, allow_zero=True)
        self.angle_jitter = check_positive("angle_jitter", self.angle_jitter, owner, allow_zero=True)
        self.exclusive = bool(self.exclusive)
        if self.min_scale > self.max_scale:
            raise ValueError(
                f"{owner}: min_scale ({self.min_scale}) must be <= max_scale ({self.max_scale})."
            )
        if self.jitter >= 1:
            raise ValueError(f"{owner}: jitter must be in [0, 1) so radii stay positive, got {self.jitter}.")
        if self.angle_jitter >= 1:
            raise ValueError(f"{owner}: angle_jitter must be in [0, 1), got {self.angle_jitter}.")
        if int(self.min_vertices) != self.min_vertices or int(self.max_vertices) != self.max_vertices:
            raise ValueError(
                f"{owner}: min_vertices and max_vertices must be integers, got "
                f"{self.min_vertices!r} and {self.max_vertices!r}."
            )
        self.min_vertices, self.max_vertices = int(self.min_vertices), int(self.max_vertices)
        if not 3 <= self.min_vertices <= self.max_vertices:
            raise ValueError(
                f"{owner}: need 3 <= min_vertices <= max_vertices, got {self.min_vertices} "
                f"and {self.max_vertices}."
            )
        if 2 * (1 + self.angle_jitter) >= self.min_vertices:
            raise ValueError(
                f"{owner}: with min_vertices={self.min_vertices}, angle_jitter must be below "
                f"{self.min_vertices / 2 - 1:g} (got {self.angle_jitter}) so that no angular gap "
                "between vertices reaches pi; raise min_vertices or lower angle_jitter."
            )

    @property
    def max_radius(self) -> float:
        """The largest possible vertex distance, ``base_radius * max_scale * (1 + jitter)``."""
        return self.base_radius * self.max_scale * (1.0 + self.jitter)

    def channels(self, num_classes: int) -> int:
        """One channel per class."""
        return num_classes

    def draw(self, num_points: int, rng: np.random.Generator | int | None = None) -> PolygonDraw:
        """Draw the random polygons of ``num_points`` cells (vectorised).

        The generator is consumed the same way whatever the image, so a seed fixes the
        polygons of a point list.
        """
        gen = as_rng(rng)
        n, v = int(num_points), self.max_vertices
        counts = gen.integers(self.min_vertices, self.max_vertices + 1, size=n)
        scales = gen.uniform(self.min_scale, self.max_scale, size=n)
        rotations = gen.uniform(0.0, _TWO_PI, size=n)
        shifts = gen.uniform(0.0, self.angle_jitter, size=(n, v))
        factors = gen.uniform(1.0 - self.jitter, 1.0 + self.jitter, size=(n, v))
        k = np.arange(v)
        valid = k[None, :] < counts[:, None]
        # Shifts in [0, angle_jitter) of the spacing keep the angles increasing and inside
        # [rotation, rotation + 2 pi).
        angles = rotations[:, None] + _TWO_PI * (k[None, :] + shifts) / counts[:, None]
        angles = np.where(valid, angles, np.inf)
        radii = np.where(valid, self.base_radius * scales[:, None] * factors, 0.0)
        return PolygonDraw(counts.astype(np.int64), angles, radii)

    def polygons(self, points: Any, rng: np.random.Generator | int | None = None) -> list[Any]:
        """The polygons a call with the same ``points`` and ``rng`` seed would rasterise.

        Returns:
            one ``shapely.Polygon`` per point, in pixel coordinates ``(x, y)``, not clipped
            to the image (clip with ``shapely.clip_by_rect`` if needed).

        Examples:
            >>> import shapely
            >>> gen = RandomPolygonMask(base_radius=3)
            >>> polygons = gen.polygons([[5, 5]], rng=0)
            >>> [p.contains(shapely.Point(5, 5)) for p in polygons]
            [True]
        """
        import shapely

        pts = as_points(points, where="random_polygon mask")
        draw = self.draw(len(pts), rng)
        result = []
        for i, (x, y) in enumerate(pts):
            n = draw.num_vertices[i]
            a, r = draw.angles[i, :n], draw.radii[i, :n]
            result.append(shapely.Polygon(np.column_stack([x + r * np.cos(a), y + r * np.sin(a)])))
        return result

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
        """The random polygon masks of one image (``image`` and ``key`` are not used)."""
        pts, cls, hw, _ = check_call(
            points, classes, shape, num_classes, image, where="random_polygon mask"
        )
        draw = self.draw(len(pts), rng)
        if len(pts) == 0:
            return np.zeros((int(num_classes), *hw), dtype=np.float32)
        counts = draw.num_vertices
        # Vertex angles relative to each rotation, in [0, 2 pi), and vertex coordinates.
        rel = draw.angles - draw.angles[:, :1]
        rel[:, 0] = 0.0
        vx = draw.radii * np.cos(np.where(np.isfinite(draw.angles), draw.angles, 0.0))
        vy = draw.radii * np.sin(np.where(np.isfinite(draw.angles), draw.angles, 0.0))
        reach2 = np.max(draw.radii, axis=1) ** 2
        parts_i, parts_r, parts_c = [], [], []
        for index, rows, cols, dx, dy in window_pixels(pts, float(np.max(draw.radii)), hw):
            near = dx * dx + dy * dy <= reach2[index] * (1 + 1e-9)
            index, rows, cols, dx, dy = index[near], rows[near], cols[near], dx[near], dy[near]
            # The sector of each pixel: the last vertex at or before its angle (wrapping
            # to the last vertex for angles before the first one).
            phi = np.mod(np.arctan2(dy, dx) - draw.angles[index, 0], _TWO_PI)
            sector = np.sum(rel[index] <= phi[:, None], axis=1) - 1
            sector = np.where(sector < 0, counts[index] - 1, sector)
            following = (sector + 1) % counts[index]
            ax, ay = vx[index, sector], vy[index, sector]
            bx, by = vx[index, following], vy[index, following]
            # Inside the triangle (point, a, b) when on the point's side of edge a -> b.
            cross = (bx - ax) * (dy - ay) - (by - ay) * (dx - ax)
            inside = cross >= -1e-9 * (1.0 + np.abs(ax * by - ay * bx))
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
