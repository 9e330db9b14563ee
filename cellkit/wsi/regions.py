"""Regions drawn on a slide (QuPath annotations) and which region each cell falls in.

Draw the regions to report on (tumour, invasive margin, hot spots) as area annotations in
QuPath, export them with *File > Export objects as GeoJSON* and read them with
[`read_regions`][]; [`assign_regions`][] then gives each detected cell the region it lies
in, for counts and indices per region ([`cellkit.wsi.summary.summarize`][]):

```python
from cellkit.wsi.regions import assign_regions, read_regions

regions = read_regions("slide.geojson")
region_index = assign_regions(detections.points, regions)  # -1: in no region
```

Coordinates are level-0 slide pixels ``(x, y)``, as QuPath exports them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellkit.data.io import DataError, DataWarning
from cellkit.data.readers import (
    CELL_OBJECT_TYPES,
    _geojson_object_type,
    geojson_classification,
    geojson_features,
)

__all__ = ["Region", "assign_regions", "read_regions"]

# QuPath objects whose polygons are not regions to report on: cells and detections, tiles.
_NOT_REGIONS = CELL_OBJECT_TYPES | {"tile", "pathtileobject"}


@dataclass(frozen=True)
class Region:
    """A named area of a slide.

    Attributes:
        name: unique among the regions read from one file (QuPath's name, else its class,
            else ``region 1``, ``region 2``...).
        classification: QuPath's class of the annotation (``"Tumor"``), or None.
        geometry: a shapely ``Polygon`` or ``MultiPolygon`` (holes included) in level-0 pixels
            ``(x, y)``.

    Examples:
        >>> from shapely.geometry import box
        >>> Region("tumour", "Tumor", box(0, 0, 10, 20)).area_px
        200.0
    """

    name: str
    classification: str | None
    geometry: Any

    @property
    def area_px(self) -> float:
        """The area in level-0 pixels (squared), holes excluded."""
        return float(self.geometry.area)


def _polygonal(geom: Any) -> Any:
    """The Polygon / MultiPolygon made of the polygonal parts of ``geom`` (possibly empty)."""
    from shapely.geometry import MultiPolygon, Polygon

    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts: list[Any] = []
    for part in getattr(geom, "geoms", []):
        sub = _polygonal(part)
        if isinstance(sub, Polygon) and not sub.is_empty:
            parts.append(sub)
        elif isinstance(sub, MultiPolygon):
            parts.extend(g for g in sub.geoms if not g.is_empty)
    if len(parts) == 1:
        return parts[0]
    return MultiPolygon(parts)


def _geometry(geometry: Mapping[str, Any], where: str) -> Any:
    """A valid Polygon / MultiPolygon from a GeoJSON geometry; a DataError naming ``where``."""
    import shapely
    from shapely.errors import ShapelyError
    from shapely.geometry import shape

    try:
        geom = shape(geometry)
    except (ShapelyError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise DataError(
            f"{where}: not a GeoJSON {geometry.get('type')} ({type(exc).__name__}: {exc}); expected "
            "coordinates as GeoJSON writes them: Polygon [[[x, y], ...], ...] (the outline, then "
            "its holes), MultiPolygon [[[[x, y], ...]], ...]. Re-export the annotations from QuPath."
        ) from None
    coords = shapely.get_coordinates(geom)
    if coords.size and not np.all(np.isfinite(coords)):
        raise DataError(f"{where}: the coordinates are not finite numbers (NaN or infinity).")
    if not geom.is_valid:  # self-intersecting outlines, drawn by hand
        geom = shapely.make_valid(geom)
    return _polygonal(geom)


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name} ({k})" in taken:
        k += 1
    return f"{name} ({k})"


def _region_geometry(feature: Any, loc: str, skipped: dict[str, int]) -> tuple[Any, Any] | None:
    """``(shapely geometry, properties)`` of a feature that is a region, else ``None`` (counted in ``skipped``)."""
    if not isinstance(feature, Mapping) or feature.get("type", "Feature") != "Feature":
        got = feature.get("type") if isinstance(feature, Mapping) else type(feature).__name__
        raise DataError(f"{loc}: expected a GeoJSON Feature object, got {got!r}.")
    props = feature.get("properties") or {}
    if not isinstance(props, Mapping):
        raise DataError(f"{loc}: 'properties' must be an object, got {type(props).__name__}.")
    geometry = feature.get("geometry")
    if geometry is None:
        skipped["without geometry"] = skipped.get("without geometry", 0) + 1
        return None
    if not isinstance(geometry, Mapping) or not isinstance(geometry.get("type"), str):
        raise DataError(
            f"{loc}: 'geometry' is not a GeoJSON geometry (an object with a 'type'), "
            f"got {geometry!r:.80}."
        )
    kind = geometry["type"]
    if kind not in ("Polygon", "MultiPolygon", "GeometryCollection"):
        skipped[kind] = skipped.get(kind, 0) + 1
        return None
    object_type = _geojson_object_type(feature, props)
    if object_type in _NOT_REGIONS:
        key = f"{object_type} {kind}"
        skipped[key] = skipped.get(key, 0) + 1
        return None
    geom = _geometry(geometry, f"{loc} ({kind})")
    if geom.is_empty or geom.area <= 0:
        key = "empty " + (kind if kind != "GeometryCollection" else "GeometryCollection (no polygon)")
        skipped[key] = skipped.get(key, 0) + 1
        return None
    return geom, props


def read_regions(path: str | os.PathLike[str]) -> list[Region]:
    """Read the area annotations of a QuPath GeoJSON export as regions.

    Reads a FeatureCollection, a single Feature or a JSON list of Features (QuPath writes all
    three). Each Polygon or MultiPolygon feature is one region, its holes honoured; a
    GeometryCollection counts by its polygonal parts. An invalid outline (one that crosses
    itself) is repaired with `shapely.make_valid`, keeping its polygonal parts.

    Skipped, with one [`DataWarning`][cellkit.data.io.DataWarning] saying how many and why: features
    that are not areas (Point, LineString... and features without a geometry), polygons of
    cells, detections and tiles (``properties.objectType``), and polygons empty after repair.

    The name is ``properties.name``, else the class (``properties.classification.name``), else
    ``region K`` with K the region's place in the returned list, from 1; a repeated name gets
    a space and ``(2)``, ``(3)``... appended (``Tumor (2)``), so names are unique. The file is
    parsed as JSON: nothing in it is executed.

    Args:
        path: the ``.geojson`` (or ``.json``) file.

    Returns:
        The regions, in the order of the file.

    Raises:
        FileNotFoundError: when the file does not exist.
        DataError: (a ``ValueError``) naming the file for text that is not JSON or not GeoJSON
            features, a geometry that is not GeoJSON, or a file without any polygon.

    Examples:
        >>> import tempfile, os, json
        >>> path = os.path.join(tempfile.mkdtemp(), "regions.geojson")
        >>> square = {"type": "Polygon",
        ...           "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 100],
        ...                            [0, 0]]]}
        >>> feature = {"type": "Feature", "geometry": square,
        ...            "properties": {"classification": {"name": "Tumor"}}}
        >>> collection = {"type": "FeatureCollection", "features": [feature]}
        >>> _ = open(path, "w").write(json.dumps(collection))
        >>> [(r.name, r.classification, r.area_px) for r in read_regions(path)]
        [('Tumor', 'Tumor', 10000.0)]
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such GeoJSON file of regions.")
    features = geojson_features(p)
    regions: list[Region] = []
    taken: set[str] = set()
    skipped: dict[str, int] = {}
    for i, feature in enumerate(features):
        found = _region_geometry(feature, f"{p}: feature {i}", skipped)
        if found is None:
            continue
        geom, props = found
        classification = geojson_classification(props)
        raw_name = props.get("name")
        name = str(raw_name).strip() if raw_name is not None and str(raw_name).strip() else None
        name = _unique(name or classification or f"region {len(regions) + 1}", taken)
        taken.add(name)
        regions.append(Region(name=name, classification=classification, geometry=geom))
    what = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()))
    if not regions:
        found = f" (found {what})" if what else " (the file holds no features)"
        raise DataError(
            f"{p}: no Polygon or MultiPolygon annotation to read as a region{found}; expected the "
            "regions as area annotations: draw them with QuPath's rectangle, ellipse, polygon or brush "
            "tool and export them with File > Export objects as GeoJSON."
        )
    if skipped:
        n = sum(skipped.values())
        warnings.warn(
            f"{p}: skipped {n} feature{'s' if n != 1 else ''} that {'are' if n != 1 else 'is'} not "
            f"region{'s' if n != 1 else ''} ({what}); regions are Polygon or MultiPolygon annotations.",
            DataWarning,
            stacklevel=2,
        )
    return regions


def assign_regions(points: Any, regions: Sequence[Region | Any]) -> np.ndarray:
    """The index of the first region holding each point, or -1.

    A point on a region's boundary is inside it; a point in a hole is not. Where regions
    overlap, a point belongs to the first (the one earlier in ``regions``). Vectorised: the
    points are sorted by ``x`` once, each region's bounding box picks its candidates by binary
    search, and `shapely.intersects_xy` on the prepared geometry tests them all at once,
    so a million points and hundreds of regions take well under a second.

    Args:
        points: ``(N, 2)`` ``(x, y)`` in the regions' coordinates (level-0 pixels).
        regions: [`Region`][] objects (or bare shapely geometries).

    Returns:
        ``(N,)`` int64 region indices, -1 for points in no region.

    Shapes:
        points: (N, 2) -> (N,) int64.

    Raises:
        ValueError: for points that are not ``(N, 2)`` finite numbers.

    Examples:
        >>> from shapely.geometry import box
        >>> regions = [Region("a", None, box(0, 0, 10, 10)),
        ...            Region("b", None, box(5, 0, 20, 10))]
        >>> assign_regions([[1, 1], [7, 5], [15, 5], [10, 10], [30, 5]], regions)
        array([ 0,  0,  1,  0, -1])
    """
    import shapely

    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        pts = pts.reshape(0, 2)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"assign_regions: expected points of shape (N, 2) as (x, y), got shape {pts.shape}.")
    if not np.all(np.isfinite(pts)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(pts), axis=1))[0])
        raise ValueError(
            f"assign_regions: point {bad} is not finite ({pts[bad].tolist()}); drop such points first."
        )
    out = np.full(len(pts), -1, dtype=np.int64)
    geoms = [getattr(r, "geometry", r) for r in regions]
    if not len(pts) or not geoms:
        return out
    # Points sorted by x once: each region's candidates (its bounding box) are then one slice
    # found by binary search, so many small regions cost little more than a few large ones.
    order = np.argsort(pts[:, 0])
    xs = pts[order, 0]
    for r, geom in enumerate(geoms):
        if geom is None or geom.is_empty:
            continue
        x0, y0, x1, y1 = geom.bounds
        lo, hi = np.searchsorted(xs, x0, side="left"), np.searchsorted(xs, x1, side="right")
        idx = order[lo:hi]
        idx = idx[(out[idx] < 0) & (pts[idx, 1] >= y0) & (pts[idx, 1] <= y1)]
        if not len(idx):
            continue
        if not shapely.is_prepared(geom):
            shapely.prepare(geom)
        inside = shapely.intersects_xy(geom, pts[idx, 0], pts[idx, 1])
        out[idx[inside]] = r
    return out
