"""Training data from annotated whole slides: the ``slides`` dataset format.

A folder of slides (any format [`open_slide`][cellkit.wsi.open_slide] reads: SVS, NDPI, MRXS,
pyramidal TIFF...), each with a QuPath GeoJSON export of the same stem beside it:

```text
slides/
    case-01.svs      case-01.geojson
    case-02.ndpi     case-02.geojson
```

The GeoJSON holds the cells (point annotations, or cell / detection polygons, their class
by ``classification.name``, as [`read_geojson_points`][cellkit.data.readers.read_geojson_points]
reads them) and, optionally, **annotation polygons that mark where every cell was clicked**
(the exhaustively annotated regions, [`read_regions`][cellkit.wsi.regions.read_regions]).
Each region becomes training images: its bounding box read from the slide at the training
pixel size (``data.mpp``, ``cellkit train --mpp``; by default the slides' own), the pixels
outside the polygon set to white so that no unannotated cell is taught as background, and the
cells inside it. A slide without regions gives the box around its cells (plus a margin). A box
larger than [`MAX_SIDE`][] is cut into pieces; the whole dataset is refused above
[`MAX_PIXELS`][] (memory stays bounded, whatever the slides declare). Keys are
``<slide>/<region>`` (``/<piece>`` for pieces) and the group of every image is its slide, so
validation and test images never share a slide with training ones.

Examples:
    Not run here (it needs annotated slides):

    >>> from cellkit.data import load_dataset
    >>> samples = load_dataset("slides/", "slides", mpp=0.5)  # doctest: +SKIP
    >>> samples[0].key  # doctest: +SKIP
    'case-01/Tumor 1'
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cellkit.data.classes import ClassMap
from cellkit.data.formats import FORMATS, DatasetFormat
from cellkit.data.io import SLIDE_SUFFIXES, DataError
from cellkit.data.readers import GEOJSON_EXTENSIONS, PointRecords, ReadJob, read_geojson_points
from cellkit.wsi.reader import SlideError, open_slide
from cellkit.wsi.regions import Region, read_regions

__all__ = ["MARGIN_PX", "MAX_PIXELS", "MAX_SIDE", "SLIDES_FORMAT", "slide_pixel_sizes", "slide_samples"]

MAX_SIDE = 2048
"""The largest side of one training image cut from a slide, in training pixels."""

MAX_PIXELS = 400_000_000
"""The most training pixels (all images together, 1.2 GB of RGB) read from slides."""

MARGIN_PX = 32
"""Training pixels kept around the cells of a slide without regions."""


def _slides(root: Path) -> list[tuple[Path, Path | None]]:
    """``(slide, its GeoJSON or None)`` of a folder, by name (``<stem>.geojson``, ``.json`` or ``.geojson.gz``)."""
    labels = {p.stem: p for p in root.iterdir() if p.is_file() and p.suffix.lower() in GEOJSON_EXTENSIONS}
    labels.update({p.name[: -len(".geojson.gz")]: p for p in root.iterdir()
                   if p.is_file() and p.name.lower().endswith(".geojson.gz") and p.name[:-11] not in labels})
    slides = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
                    and not p.name.startswith("."))
    return [(p, labels.get(p.stem)) for p in slides]


def slide_pixel_sizes(root: str | Path) -> dict[str, float | None]:
    """``{slide file name: micrometres per pixel of its level 0}`` of a ``slides`` folder."""
    sizes: dict[str, float | None] = {}
    for slide, _ in _slides(Path(root)):
        try:
            with open_slide(slide) as s:
                sizes[slide.name] = s.mpp
        except SlideError:
            sizes[slide.name] = None
    return sizes


def _boxes(slide: str, regions: Sequence[Region], points: np.ndarray, margin: float,
           size: tuple[int, int]) -> list[tuple[str, Any, tuple[float, float, float, float]]]:
    """``(name, polygon or None, level-0 box)`` of each area to train on."""
    if regions:
        return [(r.name, r.geometry, tuple(float(v) for v in r.geometry.bounds)) for r in regions]
    if not len(points):
        return []
    x0, y0 = points.min(0) - margin
    x1, y1 = points.max(0) + margin
    return [("cells", None, (max(0.0, x0), max(0.0, y0), min(float(size[0]), x1), min(float(size[1]), y1)))]


def _pieces(box: tuple[float, float, float, float], scale: float) -> list[tuple[int, int, int, int]]:
    """Level-0 boxes ``(x, y, w, h)`` of at most [`MAX_SIDE`][] training pixels a side covering ``box``."""
    x0, y0 = math.floor(box[0]), math.floor(box[1])
    w, h = max(1, math.ceil(box[2]) - x0), max(1, math.ceil(box[3]) - y0)
    step = int(MAX_SIDE * scale)
    return [(x, y, min(step, x0 + w - x), min(step, y0 + h - y))
            for y in range(y0, y0 + h, step) for x in range(x0, x0 + w, step)]


def _polygon_mask(polygon: Any, x: int, y: int, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """Where ``polygon`` (level 0) covers an image read from ``(x, y)`` at ``scale``, holes honoured."""
    mask = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(mask)
    for part in getattr(polygon, "geoms", [polygon]):
        if not hasattr(part, "exterior"):
            continue
        draw.polygon([((px - x) / scale, (py - y) / scale) for px, py in part.exterior.coords], fill=1)
        for hole in part.interiors:
            draw.polygon([((px - x) / scale, (py - y) / scale) for px, py in hole.coords], fill=0)
    return np.asarray(mask, dtype=bool)


def _inside(polygon: Any, points: np.ndarray) -> np.ndarray:
    if polygon is None:
        return np.ones(len(points), bool)
    import shapely  # shapely >= 2 (a dependency of the regions reader)

    return np.asarray(shapely.contains_xy(polygon, points[:, 0], points[:, 1]), bool) if len(points) else \
        np.zeros(0, bool)


def slide_samples(slide: str | Path, labels: str | Path, class_map: ClassMap | None, mpp: float,
                  budget: int = MAX_PIXELS) -> list[tuple[str, np.ndarray, PointRecords]]:
    """``(key, image, records in image pixels)`` of every area of one annotated slide (see the module).

    Args:
        slide: the slide file.
        labels: its QuPath GeoJSON.
        class_map: maps the class names.
        mpp: micrometres per pixel to read at.
        budget: the most training pixels to read: more is refused before anything is read.

    Raises:
        DataError: naming the slide for one that cannot be read, has no pixel size, or whose
            areas exceed ``budget``.
    """
    slide, labels = Path(slide), Path(labels)
    records = read_geojson_points(labels, class_map)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the points and cells are not areas: said by the reader
        try:
            regions = read_regions(labels)
        except DataError as err:
            if "no Polygon or MultiPolygon annotation" not in str(err):
                raise
            regions = []  # no annotated regions: the box around the cells
    try:
        handle = open_slide(slide)
    except SlideError as err:
        raise DataError(str(err)) from None
    with handle as s:
        if s.mpp is None:
            raise DataError(f"{slide} records no pixel size, so it cannot be read at {mpp:g} um/px; write it into "
                            "the file (or convert it with its scanner's software to a format that keeps it).")
        scale = mpp / s.mpp  # level-0 pixels per training pixel
        areas = [(name, polygon, _pieces(box, scale))
                 for name, polygon, box in _boxes(slide.stem, regions, records.points, MARGIN_PX * scale,
                                                  s.dimensions)]
        pixels = sum(w * h for _, _, pieces in areas for _, _, w, h in pieces) / scale**2
        if pixels > budget:
            raise DataError(f"{labels}: the annotated areas of {slide.name} hold {pixels / 1e6:.0f} MP at {mpp:g} "
                            f"um/px, more than the {budget / 1e6:.0f} MP cellkit reads for training; annotate "
                            "smaller regions (annotation polygons around the clicked cells), or train at a coarser "
                            "--mpp.")
        out = []
        for name, polygon, pieces in areas:
            in_area = _inside(polygon, records.points)  # once per area, not per piece
            for i, (x, y, w, h) in enumerate(pieces):
                image = s.read(x, y, w, h, scale)
                inside = in_area & ((records.points[:, 0] >= x) & (records.points[:, 0] < x + w)
                           & (records.points[:, 1] >= y) & (records.points[:, 1] < y + h))
                if polygon is not None:
                    image = np.where(_polygon_mask(polygon, x, y, scale, image.shape[:2])[..., None], image,
                                     np.uint8(255))
                pts = (records.points[inside] - [x, y]) / scale
                pts = np.clip(pts, 0, [image.shape[1] - 1e-3, image.shape[0] - 1e-3])
                key = f"{slide.stem}/{name}" + (f"/{i + 1}" if len(pieces) > 1 else "")
                scores = None if records.scores is None else records.scores[inside]
                out.append((key, image, PointRecords(pts, records.classes[inside], scores,
                                                     [records.where[j] for j in np.flatnonzero(inside)])))
    return out


def _slide_jobs(root: Path, class_map: ClassMap | None, split: Any, mpp: float | None = None) -> list[ReadJob]:
    """The read jobs of a ``slides`` folder: one per area of every annotated slide."""
    if split is not None:
        raise ValueError("the slides format has no split folders: its validation and test images are whole "
                         "slides held out by the group split (one group per slide).")
    pairs = _slides(root)
    if not pairs:
        raise DataError(f"{root} holds no slides (files ending in {', '.join(SLIDE_SUFFIXES)}) for --format slides.")
    if mpp is None:
        sizes = sorted({v for v in slide_pixel_sizes(root).values() if v})
        raise DataError(f"training from slides needs the pixel size to train at: pass --mpp (data.mpp; the slides "
                        f"of {root} record {', '.join(f'{v:g}' for v in sizes) or 'none'} um/px).")
    jobs: list[ReadJob] = []
    total = 0
    for slide, labels in pairs:
        if labels is None:
            jobs.append(ReadJob(slide.stem, slide, None, error=f"{slide}: slide with no annotations; expected "
                                f"{slide.stem}.geojson (a QuPath export of its cells) beside it."))
            continue
        for key, image, records in slide_samples(slide, labels, class_map, mpp, budget=MAX_PIXELS - total):
            total += image.shape[0] * image.shape[1]
            jobs.append(ReadJob(key, slide, lambda records=records: records, label=labels,
                                load=lambda image=image: (image, [])))
    return jobs


def _slide_group(key: str) -> str:
    """The group of an image cut from a slide: its slide."""
    return str(key).split("/", 1)[0]


SLIDES_FORMAT = DatasetFormat(
    name="slides",
    jobs=_slide_jobs,
    group=_slide_group,
    takes_mpp=True,
    description="whole slides, each with a QuPath GeoJSON beside it",
)
"""The ``slides`` dataset format (registered in [`FORMATS`][cellkit.data.formats.FORMATS])."""

if "slides" not in FORMATS:
    FORMATS.register("slides")(lambda: SLIDES_FORMAT)
