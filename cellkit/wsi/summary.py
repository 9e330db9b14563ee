"""What a slide holds: cell counts, the index of the class of interest and densities, per slide and region.

[`summarize`][] turns the classes of a slide's detected cells into a JSON-ready report (counts
per class, the share of the class of interest such as the Ki-67 index, cells per mm² of tissue,
the same per annotated region), [`write_summary`][] writes it as JSON and CSV, and
[`draw_thumbnail`][] draws the slide's thumbnail with the tissue outline, the cells and a
cell-density map:

```python
from cellkit.wsi.summary import summarize, write_summary

summary = summarize(det.classes, ["negative", "positive"], mpp=0.25,
                    tissue_area_px=tissue_px, region_index=region_index,
                    regions=regions)
summary["index"]                  # {'class': 'positive', 'value': 0.23}
# out/slide-01.summary.json, out/slide-01.summary.csv
write_summary("out", "slide-01", summary)
```

Areas are in mm², from level-0 pixel areas and the slide's microns per pixel (``mpp``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellkit.data.guard import write_png
from cellkit.data.io import atomic_write
from cellkit.lookup import look_up_option
from cellkit.viz import class_colors

__all__ = ["INDEX_CLASS_NAMES", "UNCERTAIN_BELOW", "confidence_summary", "density_map", "draw_thumbnail", "summarize",
           "write_summary"]

UNCERTAIN_BELOW = 0.5
"""A cell whose confidence is below this is counted as uncertain in the summaries."""

INDEX_CLASS_NAMES: tuple[str, ...] = ("positive", "ki67", "ki-67", "tumor_positive")
"""Class names (compared case-insensitively) that [`summarize`][] takes as the class of interest
when no ``index_class`` is given: the first class so named gives the index (the Ki-67 index, the
share of positive cells); without one, class 1 (cellkit's class of interest) gives it.
"""

_DISPLAY_PX = 640  # the longer side of the images as drawn (about the figure's pixels per panel)
_MAX_POINTS_DRAWN = 5000  # more points hide the thumbnail; the density map shows them instead


def _scale_mm2(mpp: float | Sequence[float] | None, what: str = "summarize: mpp") -> float | None:
    """mm² per pixel for ``mpp`` (one number, or ``(mpp_x, mpp_y)``), None without it."""
    if mpp is None:
        return None
    if isinstance(mpp, (int, float, np.integer, np.floating)):
        mx = my = float(mpp)
    else:
        values = [float(v) for v in mpp]
        if len(values) != 2:
            raise ValueError(f"{what} must be one number or a pair (x, y), got {mpp!r}.")
        mx, my = values
    if not (math.isfinite(mx) and math.isfinite(my) and mx > 0 and my > 0):
        raise ValueError(
            f"{what} must be > 0 microns per pixel (about 0.25 at 40x, 0.5 at 20x), got {mpp!r}; "
            "pass None when the slide does not record it."
        )
    return mx * my / 1e6


def _index_class(index_class: str | None, names: list[str]) -> str | None:
    if index_class is not None:
        return str(
            look_up_option(
                index_class,
                names,
                what="index class",
                hint="index_class must be one of class_names.",
            )
        )
    wanted = {n.lower() for n in INDEX_CLASS_NAMES}
    named = next((n for n in names if n.strip().lower() in wanted), None)
    if named is not None:
        return named
    # cellkit's convention (the paper's P columns): class 1 is the class of interest.
    return names[1] if len(names) >= 2 else None


def _scope(
    cls: np.ndarray, names: list[str], index_name: str | None, area_mm2: float | None
) -> dict[str, Any]:
    """cells, counts, index and cells_per_mm2 of the cells ``cls`` on ``area_mm2``."""
    counts = np.bincount(cls, minlength=len(names)) if cls.size else np.zeros(len(names), np.int64)
    n = int(cls.size)
    by_name = {name: int(c) for name, c in zip(names, counts)}
    index = None
    if index_name is not None:
        index = {"class": index_name, "value": by_name[index_name] / n if n else None}
    density = None
    if area_mm2 is not None and area_mm2 > 0:
        density = {"all": n / area_mm2, **{name: c / area_mm2 for name, c in by_name.items()}}
    return {"cells": n, "counts": by_name, "index": index, "cells_per_mm2": density}


def confidence_summary(confidence: Any) -> dict[str, Any]:
    """``{"mean", "uncertain_cells", "uncertain_share", "below"}`` of cells' confidences.

    Examples:
        >>> confidence_summary([0.9, 0.3, 0.7, 0.1])
        {'mean': 0.5, 'uncertain_cells': 2, 'uncertain_share': 0.5, 'below': 0.5}
        >>> confidence_summary([])["mean"] is None
        True
    """
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    uncertain = int((conf < UNCERTAIN_BELOW).sum())
    return {"mean": round(float(conf.mean()), 4) if conf.size else None, "uncertain_cells": uncertain,
            "uncertain_share": round(uncertain / conf.size, 4) if conf.size else None, "below": UNCERTAIN_BELOW}


def summarize(
    classes: Any,
    class_names: Sequence[str],
    *,
    mpp: float | Sequence[float] | None = None,
    tissue_area_px: float | None = None,
    index_class: str | None = None,
    region_index: Any = None,
    regions: Sequence[Any] | None = None,
    region_tissue_px: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Counts per class, the index of the class of interest and cell densities, for a slide and its regions.

    The index is the share of the cells that belong to ``index_class`` (the Ki-67 index: positive
    tumour cells / all tumour cells, when the classes are ``negative`` and ``positive``). Areas
    need the slide's microns per pixel: ``area_mm2 = area_px * mpp ** 2 / 1e6``; without ``mpp``
    every area and density is None. A cell counts in one region at most (the first holding it,
    as [`cellkit.wsi.regions.assign_regions`][] gives it).

    Args:
        classes: ``(N,)`` class index of each cell, in ``[0, len(class_names))``.
        class_names: the name of each class index.
        mpp: microns per level-0 pixel (``openslide.mpp-x``), or ``(mpp_x, mpp_y)``.
        tissue_area_px: the slide's tissue area in level-0 pixels (squared), the area the
            slide's density is taken over.
        index_class: the class of interest; default the first class named (case-insensitively)
            as in [`INDEX_CLASS_NAMES`][] (``positive``, ``ki67``, ``ki-67``,
            ``tumor_positive``), else class 1 (cellkit's class of interest, the paper's P:
            ``epithelium`` for the shipped ``endonuke-epithelium`` model); with one class,
            ``index`` is None.
        region_index: ``(N,)`` index into ``regions`` of the region holding each cell, -1 for
            none (the output of [`assign_regions`][cellkit.wsi.regions.assign_regions]); needs ``regions``.
        regions: the [`Region`][cellkit.wsi.regions.Region] objects (``name``, ``classification``,
            ``area_px``).
        region_tissue_px: the tissue area inside each region, in level-0 pixels (squared): a
            region's density is taken over it (glass inside a drawn outline holds no cells).
            Default: each region's whole area. With regions, ``tissue_area_px`` should be the
            tissue inside them (cells are found there only), as ``cellkit predict`` passes it.

    Returns:
        A dict that `json.dumps` writes as is: ``{"cells": N, "counts": {name: n},
            "index": {"class": name, "value": share} | None, "tissue_area_mm2": float | None,
            "cells_per_mm2": {"all": d, name: d} | None, "regions": [{"name", "classification",
            "area_mm2", "tissue_area_mm2", "cells", "counts", "index", "cells_per_mm2"}, ...]}``
            (a region's ``area_mm2`` is its outline's, its density is over ``tissue_area_mm2``). ``index["value"]`` is
            None when there are no cells; ``cells_per_mm2`` is None without an area (no ``mpp``, no
            ``tissue_area_px``, or an area of 0); ``regions`` is ``[]`` without regions. Counts
            list every class, in the order of ``class_names``.

    Raises:
        ValueError: for classes that are not integers in range, duplicate class names, an
            unknown ``index_class`` (the message lists the classes), an ``mpp`` or area that is
            not > 0, or a ``region_index`` that does not match the cells or the regions.

    Examples:
        >>> s = summarize([0, 1, 1, 0, 0], ["negative", "positive"], mpp=0.5,
        ...               tissue_area_px=4e6)
        >>> s["counts"], s["index"]
        ({'negative': 3, 'positive': 2}, {'class': 'positive', 'value': 0.4})
        >>> s["tissue_area_mm2"], s["cells_per_mm2"]["all"]
        (1.0, 5.0)
        >>> summarize([0, 1, 1, 1], ["a", "b"])["index"]  # no "positive": class 1
        {'class': 'b', 'value': 0.75}
        >>> summarize([0, 0], ["cells"])["index"] is None
        True
    """
    names, cls = _summary_classes(classes, class_names)
    to_mm2 = _scale_mm2(mpp)
    index_name = _index_class(index_class, names)

    tissue_mm2 = None
    if tissue_area_px is not None:
        area = float(tissue_area_px)
        if not (math.isfinite(area) and area >= 0):
            raise ValueError(
                f"summarize: tissue_area_px must be >= 0 (pixels squared), got {tissue_area_px!r}."
            )
        tissue_mm2 = area * to_mm2 if to_mm2 is not None else None
    slide = _scope(cls, names, index_name, tissue_mm2)
    out: dict[str, Any] = {
        "cells": slide["cells"],
        "counts": slide["counts"],
        "index": slide["index"],
        "tissue_area_mm2": tissue_mm2,
        "cells_per_mm2": slide["cells_per_mm2"],
        "regions": [],
    }
    if regions is None:
        if region_index is not None:
            raise ValueError("summarize: region_index was given without regions; pass regions=... too.")
        return out
    regions = list(regions)
    ridx = _region_indices(region_index, regions, len(cls))
    if region_tissue_px is not None and len(region_tissue_px) != len(regions):
        raise ValueError(f"summarize: region_tissue_px has {len(region_tissue_px)} areas for {len(regions)} regions; "
                         "give one per region.")
    for r, region in enumerate(regions):
        area_px = float(region.area_px)
        tissue_px = float(region_tissue_px[r]) if region_tissue_px is not None else area_px
        if not (math.isfinite(tissue_px) and tissue_px >= 0):
            raise ValueError(f"summarize: region_tissue_px must be >= 0 (pixels squared), got {tissue_px!r}.")
        area_mm2 = area_px * to_mm2 if to_mm2 is not None else None
        tissue_mm2_r = tissue_px * to_mm2 if to_mm2 is not None else None
        scope = _scope(cls[ridx == r], names, index_name, tissue_mm2_r)
        out["regions"].append(
            {
                "name": str(region.name),
                "classification": region.classification,
                "area_mm2": area_mm2,
                "tissue_area_mm2": tissue_mm2_r,
                **scope,
            }
        )
    return out


def _summary_classes(classes: Any, class_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """``summarize``'s class names (unique) and classes (integers naming one of them), checked."""
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError("summarize: class_names is empty; pass the name of each class index.")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"summarize: class_names must be unique, got {names} ({dup} repeated).")
    raw = np.asarray(classes)
    if raw.size == 0:
        raw = raw.reshape(0)
    if raw.ndim != 1:
        raise ValueError(f"summarize: expected classes of shape (N,), got shape {raw.shape}.")
    integral = raw.dtype.kind in "iu" or (raw.dtype.kind == "f" and bool(np.all(np.mod(raw, 1) == 0)))
    if raw.size and not integral:
        raise ValueError(f"summarize: classes must be integer class indices, got dtype {raw.dtype}.")
    cls = raw.astype(np.int64)
    if cls.size and (cls.min() < 0 or cls.max() >= len(names)):
        bad = int(cls.min()) if cls.min() < 0 else int(cls.max())
        raise ValueError(
            f"summarize: class {bad} has no name: expected classes in 0..{len(names) - 1} for "
            f"class_names {names}."
        )
    return names, cls


def _region_indices(region_index: Any, regions: list[Any], n: int) -> np.ndarray:
    """``summarize``'s region of each cell (-1: none), checked against the regions."""
    if region_index is None:
        if regions:
            raise ValueError(
                "summarize: regions were given without region_index; compute it with "
                "cellkit.wsi.regions.assign_regions(points, regions)."
            )
        return np.full(n, -1, np.int64)
    ridx = np.asarray(region_index)
    if ridx.size == 0:
        ridx = ridx.reshape(0)
    if ridx.shape != (n,):
        raise ValueError(
            f"summarize: region_index has shape {ridx.shape}, expected one region per cell: ({n},)."
        )
    ridx = ridx.astype(np.int64)
    if ridx.size and (ridx.min() < -1 or ridx.max() >= len(regions)):
        raise ValueError(
            f"summarize: region_index must lie in -1..{len(regions) - 1} (-1: in no region) for "
            f"{len(regions)} regions, got {int(ridx.min())}..{int(ridx.max())}."
        )
    return ridx


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return repr(float(value))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_summary(folder: str | os.PathLike[str], stem: str, summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write a summary as ``STEM.summary.json`` and ``STEM.summary.csv``, atomically.

    The JSON holds the summary as is (indented by 2). The CSV has one row per scope, ``slide``
    first, then each region, with the columns ``scope, name, cells, area_mm2, cells_per_mm2``,
    one count column per class (named by the class; ``count_<class>`` where a class is named
    like a fixed column) and ``index``. The slide's ``name`` is ``stem``; ``area_mm2`` is the
    area the density is taken over: the tissue (inside the regions, when there are regions),
    a region's tissue; ``cells_per_mm2`` is that of all cells; a missing value is an empty field.

    Args:
        folder: the output folder (created when missing).
        stem: the file name stem, usually the slide's (``"slide-01"``).
        summary: the output of [`summarize`][].

    Returns:
        The paths of the JSON and the CSV file.

    Raises:
        ValueError: for an empty ``stem`` or one with a path separator, or a summary that does
            not have the keys [`summarize`][] writes, or holds NaN or infinity.
        cellkit.data.io.WriteError: when a file cannot be written (the message names it).

    Examples:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> summary = summarize([1, 0], ["negative", "positive"])
        >>> json_path, csv_path = write_summary(folder, "s1", summary)
        >>> json_path.name
        's1.summary.json'
        >>> print(csv_path.read_text(), end="")
        scope,name,cells,area_mm2,cells_per_mm2,negative,positive,index
        slide,s1,2,,,1,1,0.5
    """
    stem = str(stem)
    if not stem or "/" in stem or "\\" in stem or stem in (".", ".."):
        raise ValueError(
            f"write_summary: stem must be a file name without a folder, got {stem!r}; pass the folder "
            "as the first argument."
        )
    missing = [
        k for k in ("cells", "counts", "index", "tissue_area_mm2", "cells_per_mm2") if k not in summary
    ]
    if missing:
        raise ValueError(
            f"write_summary: the summary lacks {missing}; expected the dict that "
            "cellkit.wsi.summary.summarize returns."
        )
    try:
        text = json.dumps(summary, indent=2, allow_nan=False, default=_json_default)
    except ValueError as exc:
        raise ValueError(
            f"write_summary: the summary holds NaN or infinity, which JSON cannot hold ({exc})."
        ) from None
    base = Path(folder)
    json_path = base / f"{stem}.summary.json"
    csv_path = base / f"{stem}.summary.csv"

    class_names = [str(n) for n in summary["counts"]]
    fixed = ["scope", "name", "cells", "area_mm2", "cells_per_mm2"]
    count_columns = [f"count_{n}" if n in fixed or n == "index" else n for n in class_names]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*fixed, *count_columns, "index"])

    def row(scope: str, name: str, part: Mapping[str, Any], area: Any) -> list[str]:
        density = part.get("cells_per_mm2")
        index = part.get("index")
        counts = part.get("counts") or {}
        return [
            scope,
            name,
            _number(part.get("cells")),
            _number(area),
            _number(density.get("all") if density else None),
            *(_number(counts.get(n, 0)) for n in class_names),
            _number(index.get("value") if index else None),
        ]

    writer.writerow(row("slide", stem, summary, summary.get("tissue_area_mm2")))
    for region in summary.get("regions") or []:
        area = region.get("tissue_area_mm2", region.get("area_mm2"))  # the area its density is over
        writer.writerow(row("region", str(region.get("name", "")), region, area))

    with atomic_write(json_path, "w") as f:
        f.write(text + "\n")
    with atomic_write(csv_path, "w", newline="") as f:
        f.write(buf.getvalue())
    return json_path, csv_path


def _check_points(points: Any, classes: Any) -> tuple[np.ndarray, np.ndarray | None]:
    pts = np.asarray(points if points is not None else np.zeros((0, 2)), dtype=np.float64)
    if pts.size == 0:
        pts = pts.reshape(0, 2)
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.all(np.isfinite(pts)):
        raise ValueError(
            f"draw_thumbnail: expected points of shape (N, 2) as finite (x, y) thumbnail pixels, got shape "
            f"{pts.shape}."
        )
    if classes is None:
        return pts, None
    cls = np.asarray(classes)
    if cls.size == 0:
        cls = cls.reshape(0)
    if cls.shape != (len(pts),):
        raise ValueError(
            f"draw_thumbnail: {cls.size} classes for {len(pts)} points; pass one class per point."
        )
    if cls.size and (not np.issubdtype(cls.dtype, np.integer) or cls.min() < 0):
        raise ValueError(f"draw_thumbnail: classes must be integers >= 0, got dtype {cls.dtype}.")
    return pts, cls.astype(np.int64)


def density_map(
    points: np.ndarray, shape: tuple[int, int], sigma: float, pixel_area_mm2: float | None = None
) -> np.ndarray:
    """Cell density on a pixel grid: a 2-D histogram of ``points`` smoothed by a Gaussian.

    Args:
        points: ``(N, 2)`` positions ``(x, y)`` in the grid's pixels.
        shape: ``(h, w)`` of the grid.
        sigma: the Gaussian's standard deviation in pixels (0: the histogram as is). Cells near
            the border lose the part of their Gaussian that falls outside (zero padding).
        pixel_area_mm2: the area of one pixel; with it the map is in cells per mm², else in
            cells per pixel.

    Returns:
        ``(h, w)`` float64; its sum is the number of cells (less what the smoothing moves out of
        the grid), times ``1 / pixel_area_mm2`` when that is given.

    Examples:
        >>> d = density_map(np.array([[2.0, 1.0]]), (3, 4), sigma=0,
        ...                 pixel_area_mm2=0.01)
        >>> float(d[1, 2]), float(d.sum())
        (100.0, 100.0)
    """
    from scipy import ndimage

    pts = np.asarray(points, np.float64).reshape(-1, 2)
    h, w = shape
    density, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=(h, w), range=((0, h), (0, w)))
    if sigma > 0:
        density = ndimage.gaussian_filter(density, sigma=float(sigma), mode="constant")
    if pixel_area_mm2 is not None:
        density /= pixel_area_mm2
    return density


def draw_thumbnail(
    thumbnail: np.ndarray,
    path: str | os.PathLike[str],
    *,
    tissue: np.ndarray | None = None,
    points: Any = None,
    classes: Any = None,
    class_names: Sequence[str] | None = None,
    density_sigma: float | None = None,
    pixel_um: float | Sequence[float] | None = None,
    regions: Sequence[tuple[str, Any]] | None = None,
    density_class: int | None = None,
) -> None:
    """Draw a slide's overview as a PNG: the thumbnail with tissue and cells, and a cell-density map.

    Two panels side by side. Left: the thumbnail, the outline of the tissue mask and, when there
    are fewer than 5000, the cells as dots coloured by class ([`cellkit.viz.class_colors`][],
    as in cellkit's overlays), with a legend. Right: the density of cells, a 2-D histogram of the
    points on the thumbnail's pixel grid smoothed by a Gaussian of ``density_sigma`` pixels,
    over a faded thumbnail. Drawn on matplotlib's Agg canvas without pyplot (no figure is left
    open), then written atomically.

    Args:
        thumbnail: ``(h, w, 3)`` uint8 RGB.
        path: the PNG file to write.
        tissue: ``(h, w)`` bool tissue mask on the thumbnail
            ([`tissue_mask`][cellkit.wsi.tissue.tissue_mask]).
        points: ``(N, 2)`` cell positions ``(x, y)`` in *thumbnail* pixels (level-0 positions
            times the thumbnail's scale).
        classes: ``(N,)`` class of each cell (default: all drawn in one colour).
        class_names: the name of each class, for the legend.
        density_sigma: the smoothing, in thumbnail pixels; default 1 % of the thumbnail's
            larger side (at least 1).
        pixel_um: micrometres per *thumbnail* pixel (one number, or ``(x, y)``): the slide's
            mpp divided by the thumbnail's scale. With it the density map is in cells per mm²
            (what [`summarize`][] reports) and its smoothing in µm; without it, in cells per
            thumbnail pixel.
        regions: ``(name, (K, 2) outline)`` of each region, in thumbnail pixels: drawn and
            named on the left panel (the regions a slide's summary counts in).
        density_class: draw the density of this class's cells (the class of interest, e.g.
            Ki-67 positive: its hot spots) instead of all cells'.

    Raises:
        ValueError: for a thumbnail that is not ``(h, w, 3)`` uint8, a mask of another size,
            points that are not ``(N, 2)``, classes that do not match them, a
            ``density_sigma`` below 0, or a ``pixel_um`` that is not > 0.
        cellkit.data.io.WriteError: when the file cannot be written.

    Examples:
        >>> import tempfile, os
        >>> thumb = np.full((60, 80, 3), 240, np.uint8)
        >>> path = os.path.join(tempfile.mkdtemp(), "overview.png")
        >>> draw_thumbnail(thumb, path, points=[[10, 20], [40, 30]], classes=[0, 1],
        ...                class_names=["negative", "positive"])
        >>> os.path.getsize(path) > 0
        True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image
    thumb, mask, pts, cls, names, colours = _thumbnail_inputs(thumbnail, tissue, points, classes, class_names)
    h, w = thumb.shape[:2]
    area_mm2 = _scale_mm2(pixel_um, "draw_thumbnail: pixel_um")  # of one thumbnail pixel
    if density_sigma is None:
        density_sigma = max(1.0, 0.01 * max(h, w))
    if not (math.isfinite(float(density_sigma)) and float(density_sigma) >= 0):
        raise ValueError(
            f"draw_thumbnail: density_sigma must be >= 0 thumbnail pixels, got {density_sigma!r}."
        )
    # Panels keep the thumbnail's shape within bounds, so the figure is always wider than tall.
    panel_h = 5.0
    panel_w = float(np.clip(panel_h * w / h, 2.6, 9.0))
    fig = Figure(figsize=(2 * panel_w + 1.6, panel_h + 0.9), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    # Images are drawn at about the figure's resolution (drawing a 1024-px thumbnail and
    # contouring its mask cost seconds): shrunk, placed with `extent` in thumbnail pixels.
    step = max(1, int(math.ceil(max(h, w) / _DISPLAY_PX)))
    shown_size = (max(1, w // step), max(1, h // step))
    small = np.asarray(Image.fromarray(thumb).resize(shown_size, Image.Resampling.BOX)) if step > 1 else thumb
    _draw_tissue_and_cells(left, small, mask, step, (h, w), pts, cls, names, colours)
    for name, outline in regions or ():
        xy = np.asarray(outline, np.float64).reshape(-1, 2)
        left.plot(xy[:, 0], xy[:, 1], color="#ffb000", linewidth=1.2)
        left.annotate(str(name), (float(xy[:, 0].min()), float(xy[:, 1].min())), color="#7a4d00", fontsize="x-small",
                      va="bottom")
    label = None
    if density_class is not None:
        if cls is None or not 0 <= int(density_class) < len(colours):
            raise ValueError(f"draw_thumbnail: density_class {density_class!r} is not one of the cells' classes.")
        pts = pts[cls == int(density_class)]
        label = names[int(density_class)] if names is not None else f"class {int(density_class)}"
    _draw_density(fig, right, small, step, (h, w), pts, float(density_sigma), area_mm2, label)
    for ax in (left, right):
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", pil_kwargs={"compress_level": 1})  # fast; a few % larger
    write_png(path, buf.getvalue())


def _thumbnail_inputs(thumbnail: Any, tissue: Any, points: Any, classes: Any,
                      class_names: Sequence[str] | None) -> tuple[Any, ...]:
    """``draw_thumbnail``'s inputs checked: thumbnail, mask, points, classes, names, colours."""
    thumb = np.asarray(thumbnail)
    if thumb.ndim != 3 or thumb.shape[2] != 3 or thumb.dtype != np.uint8 or 0 in thumb.shape[:2]:
        raise ValueError(
            f"draw_thumbnail: expected a (h, w, 3) uint8 RGB thumbnail, got shape {thumb.shape} dtype "
            f"{thumb.dtype}."
        )
    h, w = thumb.shape[:2]
    mask = None
    if tissue is not None:
        mask = np.asarray(tissue).astype(bool)
        if mask.shape != (h, w):
            raise ValueError(
                f"draw_thumbnail: the tissue mask has shape {mask.shape}, the thumbnail {(h, w)}; "
                "compute the mask on this thumbnail."
            )
    pts, cls = _check_points(points, classes)
    names = [str(n) for n in class_names] if class_names is not None else None
    n_classes = max(int(cls.max()) + 1 if cls is not None and cls.size else 1, len(names) if names else 0)
    if names is not None and cls is not None and cls.size and cls.max() >= len(names):
        raise ValueError(
            f"draw_thumbnail: class {int(cls.max())} has no name: class_names has {len(names)} "
            f"entries {names}."
        )
    return thumb, mask, pts, cls, names, class_colors(n_classes) / 255.0


def _draw_tissue_and_cells(ax: Any, small: np.ndarray, mask: np.ndarray | None, step: int, size: tuple[int, int],
                           pts: np.ndarray, cls: np.ndarray | None, names: list[str] | None,
                           colours: np.ndarray) -> None:
    """The left panel: the thumbnail, the tissue outline, the cells as dots (when not too many)."""
    from matplotlib.lines import Line2D
    from PIL import Image
    from scipy import ndimage

    h, w = size
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    ax.imshow(small, interpolation="nearest", extent=extent)
    if mask is not None and mask.any() and not mask.all():
        shown_size = (small.shape[1], small.shape[0])
        small_mask = (np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(shown_size, Image.Resampling.BOX))
                      >= 128) if step > 1 else mask
        edge = small_mask & ~ndimage.binary_erosion(small_mask, iterations=1, border_value=1)
        edge = ndimage.binary_dilation(edge)
        outline = np.zeros((*edge.shape, 4), np.float32)
        outline[edge] = (0.0, 0.63, 1.0, 1.0)  # #00a0ff
        ax.imshow(outline, interpolation="nearest", extent=extent)
    n = len(pts)
    drawn = 0 < n < _MAX_POINTS_DRAWN
    if drawn:
        point_cls = cls if cls is not None else np.zeros(n, np.int64)
        ax.scatter(pts[:, 0], pts[:, 1], s=4, c=colours[point_cls], linewidths=0)
        handles = []
        for c in np.unique(point_cls):
            label = names[c] if names is not None else (f"class {c}" if cls is not None else "cells")
            handles.append(
                Line2D([], [], marker="o", linestyle="", color=colours[c], markersize=5, label=label)
            )
        ax.legend(handles=handles, loc="upper right", fontsize="small", framealpha=0.8)
    title = ("tissue (outline)" if mask is not None else "thumbnail") + (" and cells" if drawn else "")
    if n >= _MAX_POINTS_DRAWN:
        title += f"\n({n} cells: too many to draw as dots)"
    ax.set_title(title, fontsize="medium")


def _draw_density(fig: Any, ax: Any, small: np.ndarray, step: int, size: tuple[int, int], pts: np.ndarray,
                  density_sigma: float, area_mm2: float | None, label: str | None = None) -> None:
    """The right panel: the smoothed cell density over the faded thumbnail, with its colour bar."""
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    h, w = size
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    density = density_map(pts, (h, w), density_sigma, area_mm2)
    faded = (0.4 * small.astype(np.float32) + 0.6 * 255.0).astype(np.uint8)
    ax.imshow(faded, interpolation="nearest", extent=extent)
    if step > 1:  # the mean density over each shown pixel
        hh, ww = (h // step) * step, (w // step) * step
        density = density[:hh, :ww].reshape(hh // step, step, ww // step, step).mean(axis=(1, 3))
    peak = float(density.max())
    shown = np.ma.masked_less_equal(density, 0.02 * peak) if peak > 0 else np.ma.masked_all(density.shape)
    image = ax.imshow(shown, cmap="inferno_r", vmin=0.0, vmax=peak if peak > 0 else 1.0, alpha=0.85,
                      interpolation="nearest", extent=extent)
    bar_ax = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.08)  # panels stay equal
    bar = fig.colorbar(image, cax=bar_ax)
    n = len(pts)
    what = f"density of {label} cells" if label else "cell density"
    cells = f"{n} {label} cells" if label else f"{n} cells"
    if area_mm2 is not None:
        bar.set_label(f"{label + ' ' if label else ''}cells per mm² (smoothed)")
        sigma_um = density_sigma * math.sqrt(area_mm2) * 1e3
        ax.set_title(f"{what} ({cells}, sigma {sigma_um:.0f} µm)", fontsize="medium")
    else:
        bar.set_label(f"{label + ' ' if label else ''}cells per thumbnail pixel (smoothed)")
        ax.set_title(f"{what} ({cells}, sigma {density_sigma:g} px)", fontsize="medium")
