"""Cell geometry from the points: one cell diameter, and every size derived from it.

A point annotation says where a cell is, not how big it is; but the clicks of one dataset
say how close cells sit, and touching cells sit one diameter apart. cellkit estimates the
**cell diameter** ``d`` of a dataset as a low quantile (10 %) of the distances from every
annotated point to its nearest annotated neighbour (all classes together, since cells of
different classes touch too):

* exact duplicate clicks are merged first, and distances under a quarter of the median
  (double clicks on one cell) are dropped, so duplicates do not shrink the estimate;
* the quantile is taken over the points of all images pooled, so a few images or a rare
  class do not move it much; images with fewer than two points add nothing;
* it is scale-equivariant: scaling every coordinate by ``s`` scales ``d`` by ``s``.

The 10 % quantile and not the median, because annotations are often sparse (BCData marks
tumour cells only): the closest neighbours are the cells that touch. On the bundled
EndoNuke sample it gives ``d`` = 8.0 px (the 4-px circles chosen by hand), on the BCData
sample 23.6 px (its nuclei are about 20-30 px wide; the 8-px circles chosen by hand were
small, see ``docs/training.md``).

From ``d`` ([`Geometry`][]): the circle radius and the random-polygon base radius
``d / 2``, the Gaussian sigma ``d / 4`` (mask generators declare these in their
``geometry`` class attribute, so a plug-in can take part), the peak minimum distance
``round(3 d / 8)`` (at least 1) and the validation matching radius ``3 d / 4``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellkit.registry import MASKS

__all__ = [
    "Geometry",
    "apply_geometry",
    "check_estimated_diameter",
    "estimate_cell_diameter",
    "nearest_neighbour_distances",
    "resolve_geometry",
]

#: The smallest cell diameter (pixels) an estimate may give; below it the points are wrong.
MIN_CELL_DIAMETER = 2.0

#: The quantile of nearest-neighbour distances taken as the cell diameter.
DIAMETER_QUANTILE = 0.10
#: Distances under this fraction of the median are double clicks on one cell, not neighbours.
DOUBLE_CLICK_FRACTION = 0.25


@dataclass(frozen=True)
class Geometry:
    """The cell diameter of a dataset (pixels) and the sizes derived from it.

    Attributes:
        cell_diameter: in pixels.
        source: how it was obtained (for the log and the run's config).
        mpp: micrometres per pixel, when known.

    Examples:
        >>> g = Geometry(16.0, "given")
        >>> g.radius, g.sigma, g.min_distance, g.match_radius
        (8.0, 4.0, 6, 12.0)
    """

    cell_diameter: float
    source: str = "given"
    mpp: float | None = None

    def __post_init__(self) -> None:
        d = self.cell_diameter
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
            raise ValueError(f"cell_diameter must be a positive number of pixels, got {d!r}.")

    @property
    def radius(self) -> float:
        """Circle radius (half a diameter), rounded to 0.1 px."""
        return round(self.cell_diameter / 2, 1)

    @property
    def sigma(self) -> float:
        """Gaussian sigma of the density baseline (a quarter diameter)."""
        return round(self.cell_diameter / 4, 2)

    @property
    def min_distance(self) -> int:
        """Peak minimum distance: ``round(3 d / 8)``, at least 1 pixel."""
        return max(1, int(round(3 * self.cell_diameter / 8)))

    @property
    def match_radius(self) -> float:
        """Matching radius of the validation F1: three quarters of a diameter."""
        return round(0.75 * self.cell_diameter, 1)

    def describe(self) -> str:
        """One line for the log."""
        um = f" = {self.cell_diameter * self.mpp:.1f} um at {self.mpp} um/px" if self.mpp else ""
        return (
            f"cell diameter {self.cell_diameter:.1f} px{um} ({self.source}) -> circle radius "
            f"{self.radius}, polygon base radius {self.radius}, Gaussian sigma {self.sigma}, peak "
            f"min distance {self.min_distance}, validation matching radius {self.match_radius}"
        )


def nearest_neighbour_distances(points: np.ndarray) -> np.ndarray:
    """Distance from each distinct point to its nearest other point (empty below 2 points).

    Exact duplicates are merged first.

    Examples:
        >>> nearest_neighbour_distances(np.array([[0, 0], [3, 4], [3, 4]])).tolist()
        [5.0, 5.0]
    """
    from scipy.spatial import cKDTree

    pts = np.unique(np.asarray(points, dtype=np.float64).reshape(-1, 2), axis=0)
    if len(pts) < 2:
        return np.zeros(0)
    dist, _ = cKDTree(pts).query(pts, k=2)
    return dist[:, 1]


def estimate_cell_diameter(point_sets: Iterable[Any], quantile: float = DIAMETER_QUANTILE) -> tuple[float, str]:
    """The cell diameter (pixels) of a dataset from its point annotations.

    Args:
        point_sets: per image, an ``(N, 2)`` array of points, or a
            [`Sample`][cellkit.data.Sample] (its ``points``).
        quantile: the quantile of nearest-neighbour distances taken (see the module).

    Returns:
        ``(diameter, source)``: source says from what, for the log.

    Raises:
        ValueError: when no image has two distinct points.

    Examples:
        >>> grid = np.array([[x, y] for x in range(0, 100, 10)
        ...                  for y in range(0, 100, 10)])
        >>> estimate_cell_diameter([grid])[0]
        10.0
    """
    distances, images = [], 0
    for item in point_sets:
        pts = getattr(item, "points", item)
        d = nearest_neighbour_distances(np.asarray(pts))
        if len(d):
            distances.append(d)
            images += 1
    if not distances:
        raise ValueError(
            "Cannot estimate the cell diameter: no image has two distinct annotated points. Give it "
            "(--cell-diameter PIXELS, or --radius for the circle radius)."
        )
    d = np.concatenate(distances)
    d = d[d >= DOUBLE_CLICK_FRACTION * np.median(d)]
    value = float(np.quantile(d, quantile))
    source = (f"{int(quantile * 100)}th percentile of the nearest-neighbour distances of {len(d)} "
              f"annotated cells in {images} training images")
    return value, source


def apply_geometry(cfg: Any, geometry: Geometry) -> Any:
    """A copy of ``cfg`` (and its stage 1) whose sizes follow ``geometry``.

    Sets every target's geometric keyword arguments (declared by the mask generator's
    ``geometry`` class attribute, e.g. circle ``radius`` = d / 2), the peaks'
    ``min_distance``, the validation matching radius ``train.radius`` and
    ``data.cell_diameter``. A density model (``activation: identity``) gets the fallback
    peak threshold of 30 % of a kernel's peak, ``0.3 scale / (2 pi sigma^2)``, used where no
    validation images calibrate it.
    """
    out = copy.deepcopy(cfg)
    for stage in out.stages():
        sigma, scale = None, 1.0
        for spec in stage.targets.values():
            factory = MASKS.get(spec.name) if spec.name in MASKS else None
            for key, multiple in dict(getattr(factory, "geometry", {}) or {}).items():
                value = round(float(multiple) * geometry.cell_diameter, 2)
                spec.kwargs[key] = value
                if key == "sigma" and sigma is None:  # a density target's kernel (gaussian's, a plug-in's)
                    sigma, scale = value, float(spec.kwargs.get("scale", 1.0))
        if "min_distance" in stage.postprocess.kwargs:
            stage.postprocess.kwargs["min_distance"] = geometry.min_distance
        if stage.model.activation == "identity" and sigma is not None:
            stage.postprocess.kwargs["threshold"] = round(0.3 * scale / (2 * math.pi * sigma**2), 4)
        stage.train.radius = geometry.match_radius
        stage.data.cell_diameter = round(float(geometry.cell_diameter), 2)
        if geometry.mpp is not None:
            stage.data.mpp = geometry.mpp
    return out


def check_estimated_diameter(value: float, samples: Sequence[Any]) -> None:
    """Stop training on points that sit closer than any cell is wide (`MIN_CELL_DIAMETER`).

    A dataset whose estimated diameter is below 2 px has wrong annotations (points repeated
    with jitter, coordinates in another unit or scale): the error names the densest image.

    Examples:
        >>> check_estimated_diameter(8.0, [])
        >>> check_estimated_diameter(0.05, [])
        Traceback (most recent call last):
        ...
        ValueError: The annotated points sit 0.05 px apart ...
    """
    if value >= MIN_CELL_DIAMETER:
        return
    densest: tuple[float, str, int] = (0.0, "", 0)  # points per 100 x 100 px, image, points
    for item in samples:
        image = getattr(item, "image", None)
        pts = np.asarray(getattr(item, "points", item)).reshape(-1, 2)
        if image is not None and len(pts):
            per = len(pts) / max(1.0, image.shape[0] * image.shape[1] / 1e4)
            if per > densest[0]:
                densest = (per, str(getattr(item, "path", None) or getattr(item, "key", "?")), len(pts))
    where = (f" The densest image is {densest[1]}: {densest[2]} points, {densest[0]:.0f} per 100 x 100 "
             "pixels." if densest[1] else "")
    raise ValueError(
        f"The annotated points sit {value:.2g} px apart (the cell diameter estimated from their "
        f"nearest-neighbour distances), closer than any cell is wide (cellkit expects at least "
        f"{MIN_CELL_DIAMETER:g} px): the annotations look wrong.{where} Are points repeated, or their "
        "coordinates in another unit or scale than the image's pixels? Fix the files; if the cells really "
        "are that small, enlarge the images."
    )


def resolve_geometry(cfg: Any, samples: Sequence[Any]) -> tuple[Any, Geometry | None]:
    """Apply ``cfg.data.cell_diameter``: ``"auto"`` = estimate from ``samples``, a number = given.

    ``None`` keeps the config's sizes as written. Returns the config to train and the
    geometry used (``None`` when kept as written).

    Raises:
        ValueError: for ``"auto"`` when the points cannot give an estimate, or a value that
            is neither ``"auto"``, ``None`` nor a positive number.
    """
    value = cfg.data.cell_diameter
    mpp = cfg.data.mpp
    if value is None:
        return cfg, None
    if isinstance(value, str):
        if value.strip().lower() != "auto":
            raise ValueError(
                f"data.cell_diameter must be 'auto', a number of pixels or null, got {value!r}."
            )
        diameter, source = estimate_cell_diameter(samples)
        check_estimated_diameter(diameter, samples)
        geometry = Geometry(round(diameter, 2), source, mpp)
    else:
        geometry = Geometry(float(value), "given", mpp)
    return apply_geometry(cfg, geometry), geometry
