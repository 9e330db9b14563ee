"""Readers of point-annotation datasets: cellkit CSV, BCData, EndoNuke and QuPath GeoJSON.

Every reader gives the same thing per image, a [`Sample`][cellkit.data.dataset.Sample]:
the image as ``(H, W, 3)`` uint8 RGB (see [`read_image`][cellkit.data.io.read_image]) and
the points as ``(x, y)`` float pixel coordinates with integer classes. Source labels become
class indices through a [`ClassMap`][cellkit.data.classes.ClassMap].

Layouts (``root`` is the folder passed to [`load_dataset`][]; with ``split`` the
csv/endonuke/geojson readers read ``root/<split>``):

| format | layout |
|---|---|
| ``csv`` | ``<stem>.png|.jpg|.tif`` beside ``<stem>.csv`` with the header ``x,y,class`` (an optional ``score`` column is kept). cellkit's own format, also what ``cellkit predict`` writes. |
| ``bcdata`` | ``images/<split>/<i>.png`` and ``annotations/<split>/<label>/<i>.h5`` with ``<label>`` in ``positive``/``negative``; each ``.h5`` holds the dataset ``coordinates``, ``(N, 2)`` int64, column 0 = x. An empty float64 array of shape ``(0,)`` means no points. |
| ``endonuke`` | ``images/<id>.png`` and ``labels/<id>.txt``, one ``x y class`` per line (``root`` may also be the folder holding ``endonuke_data/``). |
| ``geojson`` | ``<stem>.png|.jpg|.tif`` beside ``<stem>.geojson`` (or ``.json``), as QuPath exports: Point and MultiPoint features are cells; Polygon and MultiPolygon *detections* (``properties.objectType`` ``"detection"`` or ``"cell"``) are cells at their centroids; the class from ``properties.classification.name``. Annotation polygons (regions drawn by hand), tiles and other geometries are skipped and counted. |

A dataset in which no image has a single cell is an error naming the folder; when some
images have no points, one [`DataWarning`][] says how many and names a few.

Every file is validated: a point outside its image, a negative or non-integer class, a
label file without an image (or the reverse), a truncated or corrupt file each raise a
[`DataError`][cellkit.data.io.DataError] naming the file and the line, feature or dataset.
With ``on_error="skip"`` such images are left out and one [`DataWarning`][] lists them.

Coordinates follow cellkit's convention: ``(x, y)`` = (column, row), pixel ``j`` is at
coordinate ``j``. QuPath's origin is the top-left corner of the image, half a pixel away;
cellkit reads and writes QuPath coordinates unchanged (immaterial for cells ~10 px wide).
"""

from __future__ import annotations

import csv
import gzip
import io as _io
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cellkit.data.guard import is_marked_png
from cellkit.lookup import look_up_option
from cellkit.points import as_points

from .bundled import BUNDLED_KNOWN_NOTES, is_bundled
from .classes import BCDATA, ClassMap
from .dataset import Sample
from .io import IMAGE_EXTENSIONS, DataError, DataWarning, load_image

__all__ = [
    "PointRecords",
    "ReadJob",
    "detect_format",
    "geojson_classification",
    "geojson_features",
    "load_dataset",
    "read_bcdata_h5",
    "read_csv_points",
    "read_endonuke_labels",
    "read_geojson_points",
]

OnError = Literal["raise", "skip"]
ClassMapSpec = ClassMap | Mapping[Any, Any] | Sequence[str] | str | None

GEOJSON_EXTENSIONS = (".geojson", ".json")
UNCLASSIFIED = "Unclassified"  # QuPath's name for an object without a class

#: QuPath object types (``properties.objectType``; QuPath 0.2 wrote the Java class as the
#: feature's ``id``) whose polygons are cells, read at their centroids ...
CELL_OBJECT_TYPES = frozenset({"detection", "cell", "pathdetectionobject", "pathcellobject"})
#: ... and those whose polygons are not: regions drawn by hand, tiles, TMA cores.
REGION_OBJECT_TYPES = frozenset({
    "annotation", "tile", "tma_core", "pathannotationobject", "pathtileobject", "tmacoreobject",
})


@dataclass
class PointRecords:
    """Points read from one annotation file.

    Attributes:
        points: ``(N, 2)`` float64 ``(x, y)`` pixel coordinates.
        classes: ``(N,)`` int64 class indices.
        scores: ``(N,)`` float32 scores when the file has them for every point, else None.
        where: for each point, where it came from (``"line 5"``, ``"feature 3"``), for
            error messages.
        ignored: what was skipped -> number of features (GeoJSON): ``"Polygon"`` (a
            polygon that says nothing of its object type), ``"annotation Polygon"`` (a
            region), ``"LineString"``...
    """

    points: np.ndarray
    classes: np.ndarray
    scores: np.ndarray | None = None
    where: list[str] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.points)


# --------------------------------------------------------------------------- helpers


def _natural_key(text: str) -> list[Any]:
    """Sort ``2`` before ``10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _class_of(label: str, class_map: ClassMap | None, where: str) -> int:
    """The class index of a label read from a file, or a DataError naming ``where``."""
    if class_map is not None:
        return class_map(label, where)
    text = str(label).strip()
    try:
        value = float(text)
    except ValueError:
        raise DataError(
            f"{where}: class {text!r} is not an integer; pass a class map that maps it, "
            f"e.g. class_map={{'{text}': 1}} (--class-map '{text}=1')."
        ) from None
    if not math.isfinite(value) or not value.is_integer():
        raise DataError(f"{where}: class {text!r} is not an integer; classes are 0, 1, 2, ...")
    if value < 0:
        raise DataError(f"{where}: class {text!r} is negative; classes are 0, 1, 2, ...")
    return int(value)


def _coordinate(text: str, name: str, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {name} = {text!r} is not a number.") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: {name} = {text!r} is not finite.")
    return value


def _records(
    points: list[tuple[float, float]],
    classes: list[int],
    where: list[str],
    scores: list[float] | None = None,
    ignored: dict[str, int] | None = None,
) -> PointRecords:
    return PointRecords(
        points=np.asarray(points, dtype=np.float64).reshape(-1, 2),
        classes=np.asarray(classes, dtype=np.int64).reshape(-1),
        scores=None if scores is None else np.asarray(scores, dtype=np.float32).reshape(-1),
        where=where,
        ignored=ignored or {},
    )


def check_inside(records: PointRecords, shape: tuple[int, int], path: str | os.PathLike[str]) -> None:
    """Raise a DataError naming the file and line when a point lies outside the image.

    Points must satisfy ``0 <= x < W`` and ``0 <= y < H``.
    """
    if not len(records):
        return
    h, w = int(shape[0]), int(shape[1])
    x, y = records.points[:, 0], records.points[:, 1]
    outside = (x < 0) | (x >= w) | (y < 0) | (y >= h)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        more = int(outside.sum()) - 1
        loc = records.where[i] if i < len(records.where) else f"point {i}"
        raise DataError(
            f"{path}: {loc}: point (x={x[i]:g}, y={y[i]:g}) lies outside the {h}x{w} (HxW) "
            f"image{f' ({more} more points too)' if more else ''}; expected 0 <= x < {w} and "
            f"0 <= y < {h}. Check that the columns are (x, y), not (row, col), and that the "
            "label file belongs to this image."
        )


MAX_GZIP_TEXT = 4 * 1024**3
"""The most bytes a gzipped label file (``.geojson.gz``) may expand to: more is refused (a gzip bomb)."""


def _read_gzip_text(path: Path) -> str:
    """A gzipped UTF-8 file's text, decompressed in blocks up to [`MAX_GZIP_TEXT`][] bytes."""
    chunks, total = [], 0
    try:
        with gzip.open(path, "rb") as fh:
            while block := fh.read(64 * 1024 * 1024):
                total += len(block)
                if total > MAX_GZIP_TEXT:
                    raise DataError(f"{path}: expands to more than {MAX_GZIP_TEXT / 1024**3:.0f} GB; it is not a "
                                    "GeoJSON export of cells (or it is one of hundreds of millions: split it).")
                chunks.append(block)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc}); the file is truncated or corrupt.") from exc
    try:
        return b"".join(chunks).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text once decompressed (byte {exc.start}).") from exc


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte {exc.start}); the file is corrupt or not a label file."
        ) from exc


# --------------------------------------------------------------------------- single files


def read_csv_points(path: str | os.PathLike[str], class_map: ClassMap | None = None) -> PointRecords:
    """Read a cellkit CSV: a header ``x,y,class`` (any order, optional ``score``), one point a row.

    Args:
        path: the ``.csv`` file.
        class_map: maps the ``class`` column; by default it must hold integers ``>= 0``.

    Raises:
        DataError: naming the file and line for a missing header, a wrong number of
            fields, a non-number, a negative or non-integer class, or an unmapped label.

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "a.csv")
        >>> _ = open(path, "w").write("x,y,class\\n3,4,1\\n")
        >>> read_csv_points(path).points.tolist()
        [[3.0, 4.0]]
    """
    p = Path(path)
    text = _read_text(p)
    reader = csv.reader(_io.StringIO(text))
    header: list[str] | None = None
    points: list[tuple[float, float]] = []
    classes: list[int] = []
    scores: list[float] = []
    where: list[str] = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line = f"line {reader.line_num}"
            if header is None:
                header = [cell.strip().lower() for cell in row]
                missing = [c for c in ("x", "y", "class") if c not in header]
                if missing:
                    raise DataError(
                        f"{p}: {line}: expected a header with the columns x,y,class (and an "
                        f"optional score), got {','.join(row)!r}; missing {missing}. Add the "
                        "header line 'x,y,class'."
                    )
                if len(set(header)) != len(header):
                    raise DataError(f"{p}: {line}: the header repeats a column: {row}.")
                ix, iy, ic = header.index("x"), header.index("y"), header.index("class")
                isc = header.index("score") if "score" in header else None
                continue
            loc = f"{p}: {line}"
            if len(row) != len(header):
                raise DataError(
                    f"{loc}: expected {len(header)} fields ({','.join(header)}), got "
                    f"{len(row)}: {','.join(row)!r}. The file may be truncated."
                )
            points.append((_coordinate(row[ix], "x", loc), _coordinate(row[iy], "y", loc)))
            classes.append(_class_of(row[ic], class_map, loc))
            if isc is not None:
                scores.append(_coordinate(row[isc], "score", loc))
            where.append(line)
    except csv.Error as exc:
        raise DataError(f"{p}: line {reader.line_num}: malformed CSV ({exc}).") from exc
    if header is None:
        raise DataError(
            f"{p}: the file is empty; expected at least the header line 'x,y,class' "
            "(an image without cells has a CSV with only the header)."
        )
    return _records(points, classes, where, scores if "score" in header else None)


def read_endonuke_labels(
    path: str | os.PathLike[str], class_map: ClassMap | None = None
) -> PointRecords:
    """Read an EndoNuke label file: one ``x y class`` per line (x = column, y = row).

    Raises:
        DataError: naming the file and line for a wrong number of fields, a non-number,
            a negative or non-integer class, or an unmapped label.

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "1.txt")
        >>> _ = open(path, "w").write("54 25 0\\n98 13 1\\n")
        >>> read_endonuke_labels(path).classes.tolist()
        [0, 1]
    """
    p = Path(path)
    points: list[tuple[float, float]] = []
    classes: list[int] = []
    where: list[str] = []
    for number, raw in enumerate(_read_text(p).splitlines(), start=1):
        fields = raw.replace(",", " ").split()
        if not fields:
            continue
        loc = f"{p}: line {number}"
        if len(fields) != 3:
            raise DataError(
                f"{loc}: expected 3 fields 'x y class', got {len(fields)}: {raw.strip()!r}. "
                "The file may be truncated."
            )
        points.append((_coordinate(fields[0], "x", loc), _coordinate(fields[1], "y", loc)))
        classes.append(_class_of(fields[2], class_map, loc))
        where.append(f"line {number}")
    return _records(points, classes, where)


def read_bcdata_h5(path: str | os.PathLike[str], dataset: str = "coordinates") -> np.ndarray:
    """Read the ``(N, 2)`` ``(x, y)`` points of one BCData ``.h5`` file as float64.

    An empty array of any dtype (BCData stores some as float64 of shape ``(0,)``) is read
    as no points.

    Raises:
        DataError: naming the file and dataset when the file is not HDF5, is truncated,
            lacks the dataset, or the dataset is not ``(N, 2)`` numbers.

    Examples:
        >>> import tempfile, os, h5py
        >>> path = os.path.join(tempfile.mkdtemp(), "0.h5")
        >>> with h5py.File(path, "w") as f:
        ...     _ = f.create_dataset("coordinates", data=np.zeros((0,)))
        >>> read_bcdata_h5(path).shape
        (0, 2)
    """
    import h5py

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such annotation file.")
    try:
        with h5py.File(p, "r") as f:
            if dataset not in f:
                raise DataError(
                    f"{p}: no dataset {dataset!r} in the HDF5 file (it holds {sorted(f.keys())}); "
                    "BCData files hold the points in 'coordinates'."
                )
            node = f[dataset]
            if not isinstance(node, h5py.Dataset):
                raise DataError(f"{p}: {dataset!r} is a group, expected a dataset of points.")
            try:
                arr = np.asarray(node[()])
            except Exception as exc:
                raise DataError(
                    f"{p}: dataset {dataset!r}: cannot read it ({exc}); the file is truncated "
                    "or corrupt."
                ) from exc
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"{p}: cannot open the HDF5 file ({exc}); the file is truncated, corrupt or not HDF5."
        ) from exc
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{p}: dataset {dataset!r} holds {arr.dtype}, expected numbers.")
    try:
        return as_points(arr, where=f"{p}: dataset {dataset!r}")
    except ValueError as err:
        raise DataError(str(err)) from None


def geojson_features(path: str | os.PathLike[str]) -> list[Any]:
    """The features of a GeoJSON file, as QuPath writes them: a FeatureCollection, one Feature or a list.

    Raises:
        DataError: naming the file, for text that is not UTF-8 or not JSON, or JSON that is none
            of the three.
    """
    p = Path(path)
    text = _read_gzip_text(p) if p.name.lower().endswith(".gz") else _read_text(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{p}: line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}); the file is "
            "truncated, corrupt or not GeoJSON."
        ) from exc
    except RecursionError:
        raise DataError(
            f"{p}: the JSON is nested deeper than it can be read (thousands of [ or {{ inside each other); "
            "GeoJSON nests a few levels. The file is corrupt or not GeoJSON."
        ) from None
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise DataError(f"{p}: the FeatureCollection has no 'features' list.")
        return features
    if isinstance(data, Mapping) and data.get("type") == "Feature":
        return [data]
    got = data.get("type") if isinstance(data, Mapping) else type(data).__name__
    raise DataError(
        f"{p}: expected a GeoJSON FeatureCollection, Feature or list of Features, got {got!r}; "
        "export the objects from QuPath with File > Export objects as GeoJSON."
    )


def geojson_classification(props: Mapping[str, Any]) -> str | None:
    """The class name of a QuPath GeoJSON feature's ``properties``, or ``None`` when unclassified.

    Takes ``classification.name``, QuPath's derived classes ``classification.names``
    (joined with ``": "``) or a plain string.

    Examples:
        >>> geojson_classification({"classification": {"name": "Tumor"}})
        'Tumor'
        >>> geojson_classification({}) is None
        True
    """
    cls = props.get("classification")
    if isinstance(cls, Mapping):
        if cls.get("name"):
            return str(cls["name"])
        names = cls.get("names")
        if isinstance(names, list) and names:
            return ": ".join(str(n) for n in names)  # QuPath's derived classes
        return None
    if isinstance(cls, str) and cls:
        return cls
    return None


def _geojson_label(props: Mapping[str, Any]) -> str:
    return geojson_classification(props) or UNCLASSIFIED


def _geojson_score(props: Mapping[str, Any], name: str) -> float | None:
    measurements = props.get("measurements")
    if isinstance(measurements, Mapping):  # QuPath >= 0.4
        for key, value in measurements.items():
            if str(key).lower() == name and isinstance(value, (int, float)):
                return float(value)
    elif isinstance(measurements, list):  # QuPath 0.2-0.3: [{"name": ..., "value": ...}]
        for item in measurements:
            if isinstance(item, Mapping) and str(item.get("name", "")).lower() == name:
                value = item.get("value")
                if isinstance(value, (int, float)):
                    return float(value)
    return None


def _geojson_object_type(feature: Mapping[str, Any], props: Mapping[str, Any]) -> str | None:
    """QuPath's object type of a feature, lower case (``"detection"``, ``"annotation"``...).

    ``properties.objectType`` (QuPath >= 0.3), else the feature ``id`` when it names a
    QuPath object class (QuPath 0.2: ``"PathCellObject"``), else ``None``.
    """
    value = props.get("objectType", props.get("object_type"))
    if isinstance(value, str) and value.strip():
        return value.strip().lower()
    ident = feature.get("id")
    if isinstance(ident, str) and ident.strip().lower() in CELL_OBJECT_TYPES | REGION_OBJECT_TYPES:
        return ident.strip().lower()
    return None


def _polygon_centroid(geometry: Mapping[str, Any], where: str) -> list[float]:
    """``[x, y]`` of a Polygon/MultiPolygon's centroid, or a DataError naming ``where``."""
    from shapely.geometry import shape

    try:
        geom = shape(geometry)
        centroid = geom.centroid
    except Exception as exc:  # shapely raises several types for malformed coordinates
        raise DataError(
            f"{where}: cannot read the polygon ({exc}); expected coordinates as GeoJSON writes "
            "them: Polygon [[[x, y], ...]], MultiPolygon [[[[x, y], ...]], ...]."
        ) from None
    if not centroid.is_empty and not (math.isfinite(centroid.x) and math.isfinite(centroid.y)):
        raise DataError(f"{where}: the polygon's coordinates are not finite numbers (NaN or infinity).")
    if centroid.is_empty:
        raise DataError(
            f"{where}: the polygon is empty, so it has no centroid to read as the cell; "
            "expected an outline of at least 3 points: delete the object or redraw it."
        )
    return [float(centroid.x), float(centroid.y)]


def _feature_coordinates(feature: Any, loc: str, ignored: dict[str, int]) -> tuple[str, list[Any], Any] | None:
    """``(geometry type, the cells' coordinates, properties)`` of a feature, or ``None`` (counted
    in ``ignored``) when it is not a cell."""
    if not isinstance(feature, Mapping):
        raise DataError(f"{loc}: expected a Feature object, got {type(feature).__name__}.")
    geometry = feature.get("geometry")
    props = feature.get("properties") or {}
    if not isinstance(props, Mapping):
        raise DataError(f"{loc}: 'properties' must be an object.")
    if geometry is None:
        ignored["null"] = ignored.get("null", 0) + 1
        return None
    if not isinstance(geometry, Mapping):
        raise DataError(f"{loc}: 'geometry' must be an object.")
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Point":
        return kind, [coords], props
    if kind == "MultiPoint":
        if not isinstance(coords, list):
            raise DataError(f"{loc}: MultiPoint coordinates must be a list of [x, y].")
        return kind, coords, props
    if kind in ("Polygon", "MultiPolygon"):
        object_type = _geojson_object_type(feature, props)
        if object_type not in CELL_OBJECT_TYPES:
            named = props.get("objectType") or feature.get("id")
            skipped = kind if object_type is None else f"{named} {kind}"
            ignored[skipped] = ignored.get(skipped, 0) + 1
            return None
        return kind, [_polygon_centroid(geometry, f"{loc} ({kind} {object_type})")], props
    ignored[str(kind)] = ignored.get(str(kind), 0) + 1
    return None


def read_geojson_points(
    path: str | os.PathLike[str], class_map: ClassMap | None = None, score_name: str = "score"
) -> PointRecords:
    """Read the cells of a GeoJSON file as QuPath writes it.

    Reads a FeatureCollection, a list of Features or one Feature. A cell is

    * each point of a Point or MultiPoint feature (QuPath's point annotations), or
    * a Polygon or MultiPolygon *detection*, one cell at the centroid of its geometry
      (QuPath's cell detections: ``properties.objectType`` is ``"detection"`` or
      ``"cell"``; QuPath 0.2 wrote ``"id": "PathDetectionObject"`` / ``"PathCellObject"``).
      For a cell object that is the centroid of the cell outline, not of its
      ``nucleusGeometry``.

    The class is ``properties.classification.name`` (an object without a class is
    ``"Unclassified"``), the score ``properties.measurements.score``. Polygons of
    annotations (regions drawn by hand), tiles and TMA cores, polygons that do not say
    their object type, and other geometries are not cells: they are counted in
    ``ignored`` and skipped.

    Args:
        path: the ``.geojson`` file.
        class_map: maps class names; without one the names must be integers
            (``ClassMap.from_names(names)`` reads what [`write_geojson`][] wrote).
        score_name: the measurement read as the score (case-insensitive).

    Raises:
        DataError: naming the file and the feature (or the JSON line) for invalid JSON,
            a malformed feature (an empty polygon detection) or an unmapped class.

    Examples:
        >>> import tempfile, os, json
        >>> path = os.path.join(tempfile.mkdtemp(), "a.geojson")
        >>> feature = {"type": "Feature",
        ...            "geometry": {"type": "Point", "coordinates": [3, 4]},
        ...            "properties": {"classification": {"name": "Positive"}}}
        >>> _ = open(path, "w").write(json.dumps([feature]))
        >>> class_map = ClassMap({"Positive": 1}, ["other", "positive"])
        >>> read_geojson_points(path, class_map).classes
        array([1])
    """
    p = Path(path)
    features = geojson_features(p)
    points: list[tuple[float, float]] = []
    classes: list[int] = []
    scores: list[float | None] = []
    where: list[str] = []
    ignored: dict[str, int] = {}
    for i, feature in enumerate(features):
        loc = f"{p}: feature {i}"
        found = _feature_coordinates(feature, loc, ignored)
        if found is None:
            continue
        kind, coord_list, props = found
        label = _geojson_label(props)
        cls = _class_of(label, class_map, f"{loc} (class {label!r})")
        score = _geojson_score(props, score_name.lower())
        for j, c in enumerate(coord_list):
            ploc = f"feature {i}"
            if kind == "MultiPoint":
                ploc += f" point {j}"
            elif kind != "Point":
                ploc += f" ({kind} centroid)"
            if not isinstance(c, (list, tuple)) or len(c) < 2:
                raise DataError(f"{p}: {ploc}: coordinates must be [x, y], got {c!r}.")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in c[:2]):
                raise DataError(
                    f"{p}: {ploc}: coordinates must be numbers [x, y] (GeoJSON writes them unquoted), got "
                    f"{c[:2]!r}; fix the file's writer, or write the points as numbers."
                )
            points.append((_coordinate(c[0], "x", f"{p}: {ploc}"), _coordinate(c[1], "y", f"{p}: {ploc}")))
            classes.append(cls)
            scores.append(score)
            where.append(ploc)
    kept = [float(s) for s in scores if s is not None]
    has_scores = bool(scores) and len(kept) == len(scores)
    return _records(points, classes, where, kept if has_scores else None, ignored)


# --------------------------------------------------------------------------- datasets


@dataclass
class _Job:
    """One image to read: where it is, how to read its points, or why it cannot be read.

    ``load``, when given, returns the image and its notes instead of reading the file
    ``image`` whole (an area of a whole slide: [`cellkit.wsi.training`][]).
    """

    key: str
    image: Path | None
    read: Callable[[], PointRecords] | None
    label: Path | None = None
    error: str | None = None
    load: Callable[[], tuple[np.ndarray, list[Any]]] | None = None


ReadJob = _Job
"""One image of a dataset format's ``jobs`` (key, image file, points reader; see [`DatasetFormat`][cellkit.data.formats.DatasetFormat])."""


def _find_images(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for f in folder.iterdir():
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."):
                found.setdefault(f.stem, []).append(f)
    return found


def _find_labels(folder: Path, extensions: Sequence[str]) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for f in folder.iterdir():
            if f.is_file() and f.suffix.lower() in extensions and not f.name.startswith("."):
                found.setdefault(f.stem, []).append(f)
    return found


def _is_cellkit_overlay(path: Path) -> bool:
    """Whether an image is an overlay of ``cellkit predict`` (its name, and cellkit's mark or record)."""
    if not path.name.endswith("_overlay.png"):
        return False
    return is_marked_png(path) or (path.parent / "predict.json").is_file()


def _pair_jobs(
    image_dir: Path,
    label_dir: Path,
    extensions: Sequence[str],
    reader: Callable[[Path], PointRecords],
    key_prefix: str = "",
) -> list[_Job]:
    """Pair ``<stem>.<image ext>`` with ``<stem>.<label ext>``; unpaired files become errors."""
    images = _find_images(image_dir)
    labels = _find_labels(label_dir, extensions)
    jobs: list[_Job] = []
    for stem in sorted(set(images) | set(labels), key=_natural_key):
        key = key_prefix + stem
        imgs, labs = images.get(stem, []), labels.get(stem, [])
        if len(imgs) > 1 or len(labs) > 1:
            several = sorted(str(f) for f in (imgs if len(imgs) > 1 else labs))
            error = f"{several[0]}: several files share the stem {stem!r}: {several}; keep one."
            jobs.append(_Job(key, None, None, error=error))
        elif not imgs:
            want = ", ".join(f"{stem}{e}" for e in IMAGE_EXTENSIONS[:3])
            error = f"{labs[0]}: label file with no image; expected one of {want} in {image_dir}."
            jobs.append(_Job(key, None, None, error=error))
        elif not labs:
            want = " or ".join(f"{stem}{e}" for e in extensions)
            error = f"{imgs[0]}: image with no label file; expected {want} in {label_dir}."
            if _is_cellkit_overlay(imgs[0]):
                error = (f"{imgs[0]}: an overlay that cellkit predict drew (the predicted cells on an image), not an "
                         f"image to train on; move the prediction files (*_overlay.png, predict.json, counts.csv) "
                         f"out of {image_dir}, and predict into a folder of its own (--out).")
            jobs.append(_Job(key, imgs[0], None, error=error))
        else:
            lab = labs[0]
            jobs.append(_Job(key, imgs[0], (lambda lab=lab: reader(lab)), label=lab))
    return jobs


def _split_dirs(root: Path, split: str | Sequence[str] | None) -> list[tuple[Path, str]]:
    if split is None:
        return [(root, "")]
    splits = [split] if isinstance(split, str) else list(split)
    out = []
    for s in splits:
        folder = root / s
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such split folder (split={s!r}) under {root}.")
        out.append((folder, f"{s}/" if len(splits) > 1 else ""))
    return out


def _csv_jobs(root: Path, class_map: ClassMap | None, split: Any) -> list[_Job]:
    jobs = []
    for folder, prefix in _split_dirs(root, split):
        jobs += _pair_jobs(folder, folder, (".csv",), lambda f: read_csv_points(f, class_map), prefix)
    return jobs


def _geojson_jobs(root: Path, class_map: ClassMap | None, split: Any) -> list[_Job]:
    jobs = []
    for folder, prefix in _split_dirs(root, split):
        jobs += _pair_jobs(
            folder, folder, GEOJSON_EXTENSIONS, lambda f: read_geojson_points(f, class_map), prefix
        )
    return jobs


def _endonuke_root(root: Path) -> Path:
    if not (root / "images").is_dir() and (root / "endonuke_data" / "images").is_dir():
        return root / "endonuke_data"  # the upstream folder layout
    return root


def _endonuke_jobs(root: Path, class_map: ClassMap | None, split: Any) -> list[_Job]:
    jobs = []
    for folder, prefix in _split_dirs(_endonuke_root(root), split):
        folder = _endonuke_root(folder)
        for sub in ("images", "labels"):
            if not (folder / sub).is_dir():
                raise FileNotFoundError(
                    f"{folder / sub}: no such folder; the EndoNuke layout is images/<id>.png "
                    "and labels/<id>.txt."
                )
        jobs += _pair_jobs(
            folder / "images", folder / "labels", (".txt",),
            lambda f: read_endonuke_labels(f, class_map), prefix,
        )
    return jobs


def _bcdata_jobs(root: Path, class_map: ClassMap | None, split: Any) -> list[_Job]:
    class_map = class_map if class_map is not None else BCDATA
    images_root, labels_root = root / "images", root / "annotations"
    for folder in (images_root, labels_root):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder}: no such folder; the BCData layout is images/<split>/<i>.png and "
                "annotations/<split>/{positive,negative}/<i>.h5."
            )
    if split is None:
        splits = sorted(
            {d.name for d in images_root.iterdir() if d.is_dir()}
            | {d.name for d in labels_root.iterdir() if d.is_dir()}
        )
    else:
        splits = [split] if isinstance(split, str) else list(split)
    jobs: list[_Job] = []
    for s in splits:
        image_dir, label_dir = images_root / s, labels_root / s
        if not image_dir.is_dir() and not label_dir.is_dir():
            available = sorted(d.name for d in images_root.iterdir() if d.is_dir())
            raise FileNotFoundError(f"{image_dir}: no such split {s!r}; splits found: {available}.")
        label_names = sorted(d.name for d in label_dir.iterdir() if d.is_dir()) if label_dir.is_dir() else []
        if not label_names:
            raise FileNotFoundError(
                f"{label_dir}: no label folders (expected positive/ and negative/ holding <i>.h5)."
            )
        images = _find_images(image_dir)
        labels = {name: _find_labels(label_dir / name, (".h5",)) for name in label_names}
        stems = set(images).union(*[set(v) for v in labels.values()])
        for stem in sorted(stems, key=_natural_key):
            key = f"{s}/{stem}"
            imgs = images.get(stem, [])
            if not imgs:
                first = next(v[stem][0] for v in labels.values() if stem in v)
                error = f"{first}: label file with no image; expected {image_dir / (stem + '.png')}."
                jobs.append(_Job(key, None, None, error=error))
                continue
            if len(imgs) > 1:
                error = f"{imgs[0]}: several images share the stem {stem!r}: {sorted(map(str, imgs))}."
                jobs.append(_Job(key, None, None, error=error))
                continue
            missing = [label_dir / name / f"{stem}.h5" for name in label_names if stem not in labels[name]]
            if missing:
                error = f"{imgs[0]}: image with no label file {missing[0]}."
                jobs.append(_Job(key, imgs[0], None, error=error))
                continue
            files = {name: labels[name][stem][0] for name in label_names}
            read = lambda files=files: _read_bcdata(files, class_map)  # noqa: E731
            jobs.append(_Job(key, imgs[0], read, label=next(iter(files.values()))))
    return jobs


def _read_bcdata(files: Mapping[str, Path], class_map: ClassMap) -> PointRecords:
    points, classes, where = [], [], []
    for name, f in files.items():
        pts = read_bcdata_h5(f)
        cls = class_map(name, f"{f} (label folder {name!r})")
        points.append(pts)
        classes.append(np.full(len(pts), cls, np.int64))
        where += [f"{f.parent.name}/{f.name} dataset 'coordinates' row {i}" for i in range(len(pts))]
    return PointRecords(np.concatenate(points).reshape(-1, 2), np.concatenate(classes), None, where)



_NOTE_TEXT = {
    "transparent": "had transparent pixels; the alpha channel was dropped, so those pixels "
    "show the RGB values stored under them",
    "16bit": "were 16-bit and were scaled to 8 bits (value / 257)",
    "cmyk": "were CMYK and were converted to RGB without a colour profile (save them as RGB for exact colours)",
    "pages": "were TIFFs of several pages, of which only the first is read (save each page as its own file)",
}


def check_classes(
    records: PointRecords,
    num_classes: int,
    path: str | os.PathLike[str],
    class_map: ClassMap | None = None,
) -> None:
    """Raise a DataError naming the file and line when a class is ``num_classes`` or more."""
    if not len(records):
        return
    too_big = records.classes >= num_classes
    if not too_big.any():
        return
    i = int(np.flatnonzero(too_big)[0])
    loc = records.where[i] if i < len(records.where) else f"point {i}"
    found = sorted({int(c) for c in records.classes})
    more = int(too_big.sum()) - 1
    k = num_classes
    if class_map is None:
        example = ",".join(f"{c}={min(c, k - 1)}" for c in found)
        how = (f"map the labels onto 0..{k - 1} with --class-map (e.g. --class-map {example}) or "
               f"data.class_map in a config, or train {found[-1] + 1} classes")
    else:
        how = (f"the class map gives {class_map.num_classes} classes: train with as many classes, "
               f"or map the labels onto 0..{k - 1} (--class-map, data.class_map)")
    raise DataError(
        f"{path}: {loc}: class {int(records.classes[i])}{f' ({more} more points too)' if more else ''}, "
        f"but the model has {k} classes; expected classes 0..{k - 1} (this file has classes "
        f"{found}). Fix: {how}."
    )


def _label_name(job: _Job, root: Path, fmt: str) -> str:
    """How a warning names an image's annotations: its label file, relative to ``root``."""
    if fmt == "bcdata" or job.label is None:
        return job.key
    try:
        return str(job.label.relative_to(root))
    except ValueError:
        return str(job.label)


def _ignored_hint(ignored: Mapping[str, int]) -> str:
    kinds = set(ignored)
    hints = []
    if kinds & {"Polygon", "MultiPolygon"}:
        hints.append(" A polygon is read as a cell (at its centroid) only when it is a detection: "
                     "properties.objectType 'detection' or 'cell', as QuPath exports its cells.")
    if any(k.lower().startswith(("annotation", "pathannotationobject")) for k in kinds):
        hints.append(" Annotation polygons are regions drawn by hand, not cells; annotate cells as "
                     "points, or export QuPath's cell detections.")
    return "".join(hints)


def _no_cells_message(root: Path, fmt: str, n_images: int, ignored: Mapping[str, int]) -> str:
    # Here, not at the top: the formats module registers this module's readers.
    from .formats import get_format

    msg = (f"{root}: none of the {n_images} images has a cell (every annotation file is "
           f"empty), so there is nothing to learn from; expected point annotations in the "
           f"{fmt!r} layout: {get_format(fmt).description}.")
    if ignored:
        msg += (" Skipped GeoJSON features that are not cells: "
                + ", ".join(f"{n} {kind}" for kind, n in sorted(ignored.items())) + "."
                + _ignored_hint(ignored))
    else:
        msg += " Check --format and that the annotation files belong to these images."
    return msg


def detect_format(root: str | os.PathLike[str]) -> str:
    """Guess the layout of a dataset folder.

    Examples:
        >>> import tempfile, os
        >>> root = tempfile.mkdtemp(); os.makedirs(os.path.join(root, "labels"))
        >>> os.makedirs(os.path.join(root, "images")); detect_format(root)
        'endonuke'
    """
    r = Path(root)
    if (r / "annotations").is_dir() and (r / "images").is_dir():
        return "bcdata"
    if (_endonuke_root(r) / "labels").is_dir() and (_endonuke_root(r) / "images").is_dir():
        return "endonuke"
    suffixes = {f.suffix.lower() for f in r.iterdir() if f.is_file()} if r.is_dir() else set()
    if suffixes & set(GEOJSON_EXTENSIONS):
        return "geojson"
    if ".csv" in suffixes:
        return "csv"
    raise DataError(
        f"{r}: cannot tell the dataset format (expected images/ + labels/ for endonuke, "
        "images/ + annotations/ for bcdata, or images beside .csv or .geojson files); pass "
        "format= one of cellkit.data.FORMATS."
    )


def load_dataset(
    root: str | os.PathLike[str],
    format: str = "auto",
    class_map: ClassMapSpec = None,
    split: str | Sequence[str] | None = None,
    on_error: OnError = "raise",
    *,
    num_classes: int | None = None,
    require_cells: bool = True,
    mpp: float | None = None,
) -> list[Sample]:
    """Read a dataset folder into a list of samples, one per image.

    Args:
        root: the dataset folder (layouts in the module docstring).
        format: one of [`FORMATS`][cellkit.data.formats.FORMATS], or ``"auto"`` to guess
            from the folder.
        class_map: a [`ClassMap`][], a preset name (``"bcdata"``,
            ``"endonuke_epithelium"``), a dict or ``"src=dst"`` strings. Default: BCData's
            ``negative=0, positive=1`` for bcdata; the integer classes as written for the
            others (EndoNuke: 0 stroma, 1 epithelium, 2 other; use
            ``"endonuke_epithelium"`` for the paper's two-class form).
        split: BCData split(s) (``"test"``); for the other formats a subfolder (or list of
            subfolders) of ``root``. Default: every BCData split, or ``root`` itself.
        on_error: ``"raise"`` stops at the first bad image; ``"skip"`` leaves bad images
            out and warns once, listing them.
        num_classes: the number of classes the data is for (a model's); a point whose
            class is ``num_classes`` or more is then a bad input, naming its file and line.
        require_cells: a dataset in which no image has a point is an error (it would train
            on nothing); ``False`` reads it (the ground truth of images known to be empty).
        mpp: micrometres per pixel to read the images at, for the formats that read at a
            pixel size (``slides``: [`cellkit.wsi.training`][]); the others ignore it.

    Returns:
        Samples in natural order of their keys (``"2"`` before ``"10"``). Keys are the
        file stems, prefixed by the split (``"test/3"``) for BCData or several splits.

    Warns:
        DataWarning: once when some images (not all) have no points, saying how many and
            naming a few (they are read as images without cells); also for images that
            were converted, GeoJSON features that are not cells, and skipped images.

    Raises:
        FileNotFoundError: when ``root`` or a required subfolder is missing.
        DataError: naming the file and the line/feature/dataset of the first bad input;
            also when nothing could be read, or (``require_cells``) no image has a cell.

    Examples:
        >>> from cellkit.data import bundled_endonuke
        >>> samples = load_dataset(bundled_endonuke(), "endonuke")  # doctest: +SKIP
        >>> len(samples), samples[0].image.shape  # doctest: +SKIP
        (251, (200, 200, 3))
    """
    r = Path(root).expanduser()
    if not r.is_dir():
        raise FileNotFoundError(f"{r}: no such dataset folder.")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    # Here, not at the top: the formats module registers this module's readers.
    from .formats import FORMATS, get_format

    fmt = detect_format(r) if format.lower().strip() == "auto" else format
    fmt = look_up_option(fmt, FORMATS.names(), what="dataset format", normalize=True,
                         hint="Or pass 'auto' to detect the layout of the folder.")
    cmap = None if class_map is None else ClassMap.parse(class_map)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}.")

    chosen = get_format(fmt)
    jobs = chosen.jobs(r, cmap, split, mpp=mpp) if chosen.takes_mpp else chosen.jobs(r, cmap, split)
    if not jobs:
        raise DataError(f"{r}: no images or label files found for format {fmt!r}.")
    samples: list[Sample] = []
    skipped: list[str] = []
    notes: dict[str, list[str]] = {}
    ignored: dict[str, int] = {}
    empty: list[str] = []
    for job in jobs:
        try:
            sample, records, image_notes = _read_job(job, num_classes, cmap)
        except (DataError, OSError) as exc:
            if on_error == "raise":
                raise
            skipped.append(str(exc))
            continue
        samples.append(sample)
        if not len(records):
            empty.append(_label_name(job, r, fmt))
        for note in image_notes:
            notes.setdefault(note.kind, []).append(Path(sample.path or "").name)
        for kind, n in records.ignored.items():
            ignored[kind] = ignored.get(kind, 0) + n
    _report_reading(r, fmt, len(jobs), samples, notes, ignored, empty, skipped, require_cells)
    return samples


def _read_job(job: _Job, num_classes: int | None, cmap: ClassMap | None) -> tuple[Sample, PointRecords, list[Any]]:
    """One image and its points, checked (inside the image, classes in range)."""
    if job.error is not None:
        raise DataError(job.error)
    assert job.image is not None and job.read is not None
    image, image_notes = job.load() if job.load is not None else load_image(job.image)
    records = job.read()
    check_inside(records, image.shape[:2], job.label or job.image)
    if num_classes is not None:
        check_classes(records, num_classes, job.label or job.image, cmap)
    return Sample(image, records.points, records.classes, job.key, str(job.image), records.scores), records, image_notes


def _report_reading(r: Path, fmt: str, n_jobs: int, samples: list[Sample], notes: dict[str, list[str]],
                    ignored: dict[str, int], empty: list[str], skipped: list[str], require_cells: bool) -> None:
    """The warnings (and errors) of a dataset read: conversions, ignored features, empty and skipped images."""
    for kind, names in notes.items():
        if is_bundled(r) and set(names) <= set(BUNDLED_KNOWN_NOTES.get(kind, ())):
            continue  # known, and said once in data/endonuke/NOTICE.md
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        warnings.warn(
            f"{r}: {len(names)} of {n_jobs} images {_NOTE_TEXT.get(kind, kind)}: {shown}.",
            DataWarning,
            stacklevel=3,
        )
    if samples and require_cells and len(empty) == len(samples):
        raise DataError(_no_cells_message(r, fmt, len(samples), ignored))
    if ignored:
        warnings.warn(
            f"{r}: ignored GeoJSON features that are not cells: "
            + ", ".join(f"{n} {kind}" for kind, n in sorted(ignored.items())) + "."
            + _ignored_hint(ignored),
            DataWarning,
            stacklevel=3,
        )
    if empty and len(empty) < len(samples):
        shown = ", ".join(empty[:5]) + (f", ... ({len(empty) - 5} more)" if len(empty) > 5 else "")
        warnings.warn(
            f"{r}: {len(empty)} of {len(samples)} images have no points and are read as "
            f"images without cells: {shown}. If those images do have cells, their annotations "
            "are missing: check these files.",
            DataWarning,
            stacklevel=3,
        )
    if skipped:
        if not samples:
            raise DataError(f"{r}: all {n_jobs} images were skipped; the first error: {skipped[0]}")
        warnings.warn(
            f"{r}: skipped {len(skipped)} of {n_jobs} images:\n  " + "\n  ".join(skipped),
            DataWarning,
            stacklevel=3,
        )
