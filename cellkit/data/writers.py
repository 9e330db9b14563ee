"""Writers: cellkit CSV and QuPath GeoJSON, both written atomically.

``write_csv`` writes cellkit's own format (``x,y,class`` and, for detections, ``score``),
which [`read_csv_points`][cellkit.data.readers.read_csv_points] reads back.
``write_geojson`` writes a GeoJSON FeatureCollection of Point features the way QuPath
(0.4 and later) writes its objects, so *File > Import objects from file* (or drag and
drop) opens them with their classes, class colours and scores:

```json
{"type": "Feature",
 "geometry": {"type": "Point", "coordinates": [12.0, 34.0]},
 "properties": {"objectType": "detection",
                "classification": {"name": "positive",
                                   "color": [220, 50, 47]},
                "measurements": {"score": 0.93}}}
```

Coordinates are pixels ``(x, y)`` of the full-resolution image, as QuPath expects.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np

from cellkit.lookup import look_up_option
from cellkit.points import Detections, validate_points
from cellkit.viz import BASE_COLORS

from .io import atomic_write

__all__ = ["DEFAULT_COLORS", "write_csv", "write_geojson"]

DEFAULT_COLORS: tuple[tuple[int, int, int], ...] = BASE_COLORS
"""The class colours written into GeoJSON files:
[`cellkit.viz.BASE_COLORS`][cellkit.viz.BASE_COLORS], the colours of the overlays (the same
table, owned by [`cellkit.viz`][cellkit.viz]), cycled when there are more classes.
"""


def _unpack(
    detections: Any, points: Any, classes: Any, scores: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if detections is not None:
        if points is not None or classes is not None or scores is not None:
            raise ValueError("pass either detections or points/classes/scores, not both.")
        points = getattr(detections, "points")
        classes = getattr(detections, "classes")
        scores = getattr(detections, "scores", None)
    if points is None or classes is None:
        raise ValueError("write needs detections, or points and classes.")
    pts, cls = validate_points(points, np.asarray(classes).reshape(-1))
    sc = None
    if scores is not None:
        sc = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(sc) != len(pts):
            raise ValueError(f"{len(sc)} scores for {len(pts)} points.")
    return pts, cls, sc


def _csv_name(name: Any) -> str:
    """A class name as a CSV column name: no commas, quotes, spaces or line breaks."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name)) or "class"


@contextlib.contextmanager
def _text_out(path: str | os.PathLike[str]) -> Iterator[IO[str]]:
    """A text file written atomically; gzipped when ``path`` ends in ``.gz`` (no time stamp inside,
    so the same cells give the same bytes)."""
    if not str(path).endswith(".gz"):
        with atomic_write(path, "w") as f:
            yield f
        return
    with atomic_write(path, "wb") as raw, gzip.GzipFile("", "wb", 6, raw, mtime=0) as gz, \
            io.TextIOWrapper(gz, encoding="utf-8") as text:
        yield text


def _prob_keys(probs: np.ndarray | None, named: Sequence[Any]) -> list[str]:
    """The measurement names of the classes' probabilities: ``prob <name>``."""
    if probs is None:
        return []
    return [f"prob {named[j] if j < len(named) else f'class{j}'}" for j in range(probs.shape[1])]


def _with_probs(tails: Sequence[str], cls: np.ndarray, sc: np.ndarray, probs: np.ndarray,
                keys: Sequence[str]) -> list[str]:
    """Each feature's measurements text after its score: the confidence, every class's probability."""
    columns = [_json_floats(_texts(_confidence(cls, sc, probs)))] + [
        _json_floats(_texts(probs[:, j])) for j in range(probs.shape[1])]
    heads = [', "confidence": '] + [f", {json.dumps(k)}: " for k in keys]
    return [t + "".join(k + col[i] for k, col in zip(heads, columns)) for i, t in enumerate(tails)]


def _confidence(cls: np.ndarray, sc: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """[`Detections.confidence`][cellkit.points.Detections.confidence] of written cells."""
    return Detections(np.zeros((len(cls), 2), np.float32), cls, sc.astype(np.float32), probs).confidence


def _probs(detections: Any, n: int) -> np.ndarray | None:
    """The ``(N, C)`` float32 per-class probabilities of ``detections`` (``probs``), or ``None``."""
    probs = getattr(detections, "probs", None) if detections is not None else None
    if probs is None:
        return None
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or len(probs) != n:
        raise ValueError(f"probs must be (N, C) with N = {n} points, got {probs.shape}.")
    return probs


def _native(detections: Any, points: Any, pts: np.ndarray) -> np.ndarray:
    """Points in their own precision, so float32 values print short ("0.1", not
    "0.10000000149011612") and still read back equal."""
    source = np.asarray(getattr(detections, "points", None) if detections is not None else points)
    return pts.astype(np.float32) if source.dtype == np.float32 else pts


def _num(value: Any) -> str:
    """Shortest text that reads back as the same number (``12``, ``3.5``, ``0.1``)."""
    return np.format_float_positional(value, trim="-")


def _texts(values: np.ndarray) -> list[str]:
    """[`_num`][] of every value of a float32 or float64 array, without a Python call per value
    (a slide's hundreds of thousands of cells).

    Python's ``repr`` (float64) and numpy's ``astype(str)`` (float32) give the same shortest
    digits as ``_num``; they differ only in spelling ``12.0`` and exponents, fixed here.

    Examples:
        >>> _texts(np.array([12.0, 3.5, 1e-7], np.float32))
        ['12', '3.5', '0.0000001']
    """
    arr = np.asarray(values)
    if arr.dtype == np.float32:
        raw = arr.astype(str).tolist()
    else:
        arr = arr.astype(np.float64)
        raw = [repr(v) for v in arr.tolist()]
    out = []
    for i, text in enumerate(raw):
        if text.endswith(".0"):
            text = text[:-2]
        elif "e" in text or "n" in text:  # exponents, inf, nan: numpy's positional spelling
            text = _num(arr[i])
        out.append(text)
    return out


def _json_float(text: str) -> str:
    """How ``json.dumps`` writes ``float(text)``."""
    r = repr(float(text))
    return {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}.get(r, r)


def _json_floats(texts: Sequence[str]) -> list[str]:
    """[`_json_float`][] of each of [`_texts`][]'s texts, without parsing most of them.

    A shortest text with a point is ``repr``'s own, unless the number is below 1e-3 (``repr``
    may write an exponent); an integer gets ``.0``, unless it is long (``repr``'s ``1e+16``)."""
    out = []
    for text in texts:
        if "." in text:
            if text.startswith(("0.000", "-0.000")):
                text = _json_float(text)
        elif text.lstrip("-").isdigit() and len(text) <= 16:
            text += ".0"
        else:  # inf, nan, long integers
            text = _json_float(text)
        out.append(text)
    return out


def write_csv(
    path: str | os.PathLike[str],
    detections: Any = None,
    *,
    points: Any = None,
    classes: Any = None,
    scores: Any = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """Write points to a cellkit CSV (``x,y,class`` plus ``score`` when there are scores).

    Detections that carry ``probs`` (every class's probability at the cell) add, after the
    score, ``confidence`` ([`Detections.confidence`][cellkit.points.Detections.confidence]) and
    one column per class, ``prob_<name>`` (``class_names``; default ``prob_0``, ...).

    Args:
        path: the ``.csv`` file (written atomically; the folder is created).
        detections: a [`Detections`][cellkit.points.Detections], a
            [`Sample`][cellkit.data.Sample] or anything with ``points``, ``classes`` and
            optionally ``scores``; or pass them as keywords.
        points: ``(N, 2)`` ``(x, y)``.
        classes: ``(N,)`` integers >= 0.
        scores: optional ``(N,)``.
        class_names: the names of the probability columns.

    Raises:
        ValueError: for points that are not ``(N, 2)`` and finite, mismatched lengths,
            non-integer or negative classes.

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "a.csv")
        >>> write_csv(path, points=[[3, 4.5]], classes=[1])
        >>> open(path).read()
        'x,y,class\\n3,4.5,1\\n'
    """
    pts, cls, sc = _unpack(detections, points, classes, scores)
    pts_out = _native(detections, points, pts)
    probs = _probs(detections, len(pts)) if sc is not None else None
    lines = ["x,y,class" + (",score" if sc is not None else "")]
    xs, ys, cs = _texts(pts_out[:, 0]), _texts(pts_out[:, 1]), [str(int(c)) for c in cls.tolist()]
    if sc is None:
        lines += [f"{x},{y},{c}" for x, y, c in zip(xs, ys, cs)]
    elif probs is None:
        lines += [f"{x},{y},{c},{v}" for x, y, c, v in zip(xs, ys, cs, _texts(sc.astype(np.float32)))]
    else:
        names = list(class_names) if class_names is not None else []
        lines[0] += ",confidence" + "".join(f",prob_{_csv_name(names[j]) if j < len(names) else j}"
                                            for j in range(probs.shape[1]))
        columns = [_texts(_confidence(cls, sc, probs))] + [_texts(probs[:, j]) for j in range(probs.shape[1])]
        rest = [",".join(row) for row in zip(*columns)] if columns else [""] * len(pts)
        lines += [f"{x},{y},{c},{v},{r}" for x, y, c, v, r in zip(xs, ys, cs, _texts(sc.astype(np.float32)), rest)]
    with atomic_write(path, "w", newline="") as f:
        f.write("\n".join(lines) + "\n")


def qupath_positivity_names(class_names: Sequence[str], positive: str) -> list[str]:
    """Class names that QuPath's positivity understands: ``positive`` becomes ``Positive``, every
    other class ``Negative``.

    QuPath counts a detection classified ``Positive`` or ``Negative`` in an annotation's
    ``Num Positive``, ``Num Negative`` and ``Positive %`` (its positive cell detection's own
    classes); cellkit's CSV and summaries keep the model's names.

    Raises:
        ValueError: when ``positive`` is not one of ``class_names`` (the message lists them).

    Examples:
        >>> qupath_positivity_names(["negative", "positive"], "positive")
        ['Negative', 'Positive']
    """
    names = [str(n) for n in class_names]
    chosen = look_up_option(positive, names, what="positive class")
    return ["Positive" if n == chosen else "Negative" for n in names]


def _names_and_palette(cls: np.ndarray, class_names: Sequence[str] | None,
                       colors: Sequence[Sequence[int]] | None) -> tuple[list[Any], list[tuple[int, ...]]]:
    """The class names (checked to name every class) and the colours of a GeoJSON."""
    n_classes = int(cls.max()) + 1 if cls.size else 0
    names = list(class_names) if class_names is not None else [f"class{i}" for i in range(n_classes)]
    if n_classes > len(names):
        raise ValueError(f"class {n_classes - 1} has no name: class_names has {len(names)} entries {names}.")
    palette = [tuple(int(v) for v in c) for c in (colors if colors is not None else DEFAULT_COLORS)]
    if not palette:
        raise ValueError("colors must hold at least one (r, g, b) colour.")
    return names, palette


def _feature_ids(xs: Sequence[str], ys: Sequence[str], cls: np.ndarray, scores: Sequence[str] | None) -> list[str]:
    """Name-based UUIDs of the cells (the texts of their coordinates, class and score)."""
    return [str(uuid.uuid5(_ID_NAMESPACE, f"{x}|{y}|{int(c)}|{scores[i] if scores else ''}"))
            for i, (x, y, c) in enumerate(zip(xs, ys, cls))]


_ID_NAMESPACE = uuid.UUID("6c1b9d3e-2f5a-4c8e-9a7d-0e3f1b2c4d5e")
"""The namespace of the features' name-based UUIDs (fixed: the same cell, the same id)."""


def write_geojson(
    path: str | os.PathLike[str],
    detections: Any = None,
    class_names: Sequence[str] | None = None,
    *,
    points: Any = None,
    classes: Any = None,
    scores: Any = None,
    object_type: str | None = None,
    colors: Sequence[Sequence[int]] | None = None,
    score_name: str = "score",
    indent: int | None = None,
    ids: bool = True,
    prob_names: Sequence[str] | None = None,
) -> None:
    """Write points as a QuPath-compatible GeoJSON FeatureCollection of Point features.

    Every feature has an ``id`` (a UUID, as QuPath gives its objects): a name-based UUID of
    the cell's position, class and score, so the same predictions written again (a resumed
    run) get the same ids, and objects imported twice are seen to be the same.

    Args:
        path: the ``.geojson`` file (written atomically; the folder is created).
        detections: a [`Detections`][cellkit.points.Detections], a Sample or anything with
            ``points``, ``classes`` (and ``scores``); or pass them as keywords.
        class_names: the name of each class index (QuPath's classification); default
            ``class0, class1, ...``. Read back with ``ClassMap.from_names(class_names)``.
        object_type: ``"detection"`` or ``"annotation"``; default detection when there are
            scores (predictions: QuPath handles many detections quickly and lists their
            measurements), annotation otherwise (ground-truth points).
        colors: RGB colour of each class (default [`DEFAULT_COLORS`][]).
        score_name: the measurement name of the score.
        indent: JSON indentation (None: compact).
        ids: write the features' ``id`` (``False``: none).
        prob_names: the classes' names in the measurements ``prob <name>`` written for
            detections that carry ``probs`` (every class's probability at the cell);
            default ``class_names``. Give the model's names when ``class_names`` are
            QuPath's ``Positive``/``Negative`` (two classes may share one of those).

    Raises:
        ValueError: for points that are not ``(N, 2)`` and finite, mismatched lengths,
            bad classes, a class without a name, or an unknown ``object_type``.

    Examples:
        >>> import tempfile, os, json
        >>> path = os.path.join(tempfile.mkdtemp(), "a.geojson")
        >>> write_geojson(path, points=[[3, 4]], classes=[1],
        ...               class_names=["other", "positive"])
        >>> feature = json.load(open(path))["features"][0]
        >>> feature["properties"]["classification"]["name"]
        'positive'
    """
    pts, cls, sc = _unpack(detections, points, classes, scores)
    pts_out = _native(detections, points, pts)
    if object_type is None:
        object_type = "detection" if sc is not None else "annotation"
    if object_type not in ("detection", "annotation"):
        raise ValueError(f"object_type must be 'detection' or 'annotation', got {object_type!r}.")
    names, palette = _names_and_palette(cls, class_names, colors)
    xs, ys = _json_floats(_texts(pts_out[:, 0])), _json_floats(_texts(pts_out[:, 1]))
    tails = _json_floats(_texts(sc.astype(np.float32))) if sc is not None else None
    uuids = _feature_ids(xs, ys, cls, tails) if ids else None
    probs = _probs(detections, len(pts)) if sc is not None else None
    prob_names = _prob_keys(probs, list(prob_names) if prob_names is not None else names)
    tails = _with_probs(tails, cls, sc, probs, prob_names) if probs is not None and tails and sc is not None else tails

    def feature(i: int) -> dict[str, Any]:
        c = int(cls[i])
        props: dict[str, Any] = {
            "objectType": object_type,
            "classification": {"name": str(names[c]), "color": list(palette[c % len(palette)])},
        }
        if sc is not None:
            props["measurements"] = {score_name: float(_num(np.float32(sc[i])))}
            if probs is not None:
                props["measurements"]["confidence"] = float(_num(_confidence(cls[i : i + 1], sc[i : i + 1],
                                                                             probs[i : i + 1])[0]))
                props["measurements"].update({k: float(_num(probs[i, j])) for j, k in enumerate(prob_names)})
        return {
            "type": "Feature",
            **({"id": uuids[i]} if uuids is not None else {}),
            "geometry": {
                "type": "Point",
                "coordinates": [float(_num(pts_out[i, 0])), float(_num(pts_out[i, 1]))],
            },
            "properties": props,
        }

    with _text_out(path) as f:
        if indent is not None:
            json.dump({"type": "FeatureCollection", "features": [feature(i) for i in range(len(pts))]}, f,
                      indent=indent)
            f.write("\n")
            return
        # Compact: the text json.dumps(feature(i)) gives, put together from each class's
        # properties (dumped once) and the numbers' texts (a slide's million cells never sit
        # in memory as dicts, nor cost a json.dumps each).
        heads = {}
        for c in np.unique(cls).tolist():
            props = {"objectType": object_type,
                     "classification": {"name": str(names[c]), "color": list(palette[c % len(palette)])}}
            text = json.dumps(props)
            heads[c] = text[:-1] + (f', "measurements": {{{json.dumps(score_name)}: ' if sc is not None else "")
        f.write('{"type": "FeatureCollection", "features": [')
        for i, c in enumerate(cls.tolist()):
            f.write((", " if i else "") + '{"type": "Feature", '
                    + (f'"id": "{uuids[i]}", ' if uuids is not None else "")
                    + '"geometry": {"type": "Point", "coordinates": ['
                    + xs[i] + ", " + ys[i] + ']}, "properties": ' + heads[c]
                    + (tails[i] + "}}}" if tails is not None else "}}"))
        f.write("]}")
        f.write("\n")
