"""Where to click next: fields of view ranked by how much annotating them should help.

``cellkit suggest --pred OUT`` reads a predictions folder of ``cellkit predict`` (images or
whole slides), whose cells carry a confidence
([`Detections.confidence`][cellkit.points.Detections.confidence]), and cuts every image into
square fields of ``field_um`` micrometres (``field_px`` pixels where no pixel size is known).
A field's score is the sum over its cells of ``1 - confidence``: the uncertainty it holds,
so a dense field of doubtful cells comes before a sparse one, and a field of sure cells
scores little. Fields are taken greedily by score; each field taken halves the score of the
fields of the same image within [`SPREAD`][] field sizes of it, so the picks spread over the
tissue instead of piling up in one corner.

The default ranking (``"mix"``) also keeps the picks' class mix like the tissue's: the
fields are ordered by the predicted share of the class the model finds least often and cut
into ``top`` strata of equal size, and each stratum gives one field (its most doubtful). The
most doubtful fields tend to be alike (on a held-out EndoNuke range the top ten held twice the
range's share of epithelium), and a model fine-tuned on them learned less than from ten
random fields; one field per stratum taught more than random ones on both held-out ranges
measured (docs/new-slide.md). ``"doubt"`` is the score and the spreading alone.

It writes ``OUT/suggestions/``: ``suggestions.csv`` (rank, image, the field in the image's
or slide's level-0 pixels, score, cells, uncertain cells, mean confidence, the reason, the
predicted cells of each class),
``<stem>.geojson`` per image with its fields as QuPath annotation rectangles (class
``Suggested``, name ``#rank: reason``, the figures as measurements: import them onto the
image or slide, click the cells inside, export) and ``suggestions.png`` (the fields, cropped,
in rank order). It never replaces a file it did not write.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellkit.data.guard import check_outputs, write_png, written_by_cellkit
from cellkit.data.io import image_mpp, make_folder, read_image, write_text_atomic
from cellkit.engine.evaluate import PREDICT_META, read_prediction_record
from cellkit.wsi.reader import open_slide
from cellkit.wsi.summary import UNCERTAIN_BELOW

__all__ = ["FIELD_UM", "RANKINGS", "SPREAD", "Field", "rank_fields", "suggest_folder"]

FIELD_UM = 100.0
"""The default side of a field, micrometres (200 pixels at 0.5 um/px: one bundled EndoNuke tile)."""

SPREAD = 3.0
"""Fields of one image within this many field sizes of a field taken have their score halved."""

RANKINGS = ("mix", "doubt")
"""How fields are chosen: one per stratum of the class mix, most doubtful first (``mix``), or by doubt alone."""

FOLDER = "suggestions"
_MAX_CSV_BYTES = 2 * 1024**3


@dataclass
class Field:
    """One field of view to annotate.

    Attributes:
        image: the stem of its image or slide.
        x, y, width, height: the field in the image's (slide's level-0) pixels.
        score: the uncertainty it holds (sum of ``1 - confidence`` of its cells), before spreading.
        cells: cells predicted in it.
        uncertain: cells below 0.5 confidence.
        mean_confidence: of its cells (1 without cells).
        rank: 1 for the first to annotate.
        mix: predicted cells of each class in it (empty where unknown).
    """

    image: str
    x: int
    y: int
    width: int
    height: int
    score: float
    cells: int
    uncertain: int
    mean_confidence: float
    rank: int = 0
    mix: tuple[int, ...] = ()

    @property
    def reason(self) -> str:
        """Why it was chosen, in a few words."""
        return (f"{self.uncertain} of {self.cells} cells below {UNCERTAIN_BELOW:g} confidence, mean "
                f"{self.mean_confidence:.2f}")


def _grid_fields(stem: str, points: np.ndarray, confidence: np.ndarray, size: tuple[int, int],
                 side: int, classes: np.ndarray | None = None, num_classes: int = 0) -> list[Field]:
    """The fields of one image: a grid of ``side`` pixels over ``size`` (w, h), with their cells.

    ``classes`` (one per cell, below ``num_classes``) gives each field its class mix.
    """
    w, h = size
    cols, rows = max(1, math.ceil(w / side)), max(1, math.ceil(h / side))
    col = np.clip((points[:, 0] // side).astype(np.int64), 0, cols - 1) if len(points) else np.zeros(0, np.int64)
    row = np.clip((points[:, 1] // side).astype(np.int64), 0, rows - 1) if len(points) else np.zeros(0, np.int64)
    cell = row * cols + col
    n = np.bincount(cell, minlength=rows * cols)
    doubt = np.bincount(cell, weights=1.0 - confidence, minlength=rows * cols)
    unsure = np.bincount(cell, weights=(confidence < UNCERTAIN_BELOW).astype(np.float64), minlength=rows * cols)
    mix = np.zeros((rows * cols, 0), np.int64)
    if classes is not None and num_classes > 0:
        mix = np.zeros((rows * cols, num_classes), np.int64)
        np.add.at(mix, (cell, np.clip(classes.astype(np.int64), 0, num_classes - 1)), 1)
    fields = []
    for i in np.flatnonzero(n > 0):
        r, c = divmod(int(i), cols)
        x, y = c * side, r * side
        fields.append(Field(stem, x, y, min(side, w - x), min(side, h - y), round(float(doubt[i]), 4), int(n[i]),
                            int(unsure[i]), round(1.0 - float(doubt[i]) / int(n[i]), 4),
                            mix=tuple(int(v) for v in mix[i])))
    return fields


def _strata(fields: Sequence[Field], top: int) -> list[int]:
    """Each field's stratum of the class mix (see the module); all ``0`` where no mix tells classes apart.

    The fields are ordered by the share of their cells in the class predicted least often
    over all fields (of the classes predicted at all) and cut into ``top`` strata of equal size.
    """
    width = max((len(f.mix) for f in fields), default=0)
    if width < 2 or any(len(f.mix) != width for f in fields):
        return [0] * len(fields)
    mix = np.asarray([f.mix for f in fields], np.float64)
    totals = mix.sum(0)
    if np.count_nonzero(totals) < 2:
        return [0] * len(fields)
    rare = int(np.argmin(np.where(totals > 0, totals, np.inf)))
    share = mix[:, rare] / np.maximum(mix.sum(1), 1)
    stratum = [0] * len(fields)
    for s, part in enumerate(np.array_split(np.argsort(share, kind="stable"), min(top, len(fields)))):
        for i in part:
            stratum[int(i)] = s
    return stratum


def rank_fields(fields: Sequence[Field], top: int, spread: float = SPREAD, ranking: str = "mix") -> list[Field]:
    """The ``top`` fields by score, taken greedily with the spreading rule (see the module).

    With ``ranking="mix"`` a field is taken only from a stratum of the class mix that has
    given none yet (while one is left).

    Examples:
        >>> a, b, c = (Field("s", x, 0, 10, 10, score, 5, 5, 0.1)
        ...            for x, score in ((0, 4.0), (10, 3.9), (90, 3.0)))
        >>> [f.x for f in rank_fields([a, b, c], 2)]  # b is beside a
        [0, 90]
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking {ranking!r} is not one of {', '.join(RANKINGS)}")
    left = list(fields)
    weight = [1.0] * len(left)
    stratum = _strata(left, top) if ranking == "mix" else [0] * len(left)
    taken: set[int] = set()
    chosen: list[Field] = []
    while left and len(chosen) < top:
        open_ = [i for i in range(len(left)) if stratum[i] not in taken] or list(range(len(left)))
        best = max(open_, key=lambda i: (left[i].score * weight[i], -i))
        if left[best].score * weight[best] <= 0 and chosen:
            break
        taken.add(stratum.pop(best))
        field = left.pop(best)
        weight.pop(best)
        field.rank = len(chosen) + 1
        chosen.append(field)
        reach = spread * max(field.width, field.height)
        for i, other in enumerate(left):
            if other.image == field.image and math.hypot(other.x - field.x, other.y - field.y) <= reach:
                weight[i] *= 0.5
    return chosen


def _read_cells(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Points, confidences and classes (``None`` without a ``class`` column) of a predictions CSV."""
    if path.stat().st_size > _MAX_CSV_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size / 1e9:.1f} GB, larger than a predictions CSV of cellkit.")
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        if "confidence" not in header:
            raise ValueError(f"{path} has no confidence column (columns {header[:6]}): it was written by an older "
                             "cellkit; predict the images again with cellkit predict, then suggest.")
        ix, iy, ic = header.index("x"), header.index("y"), header.index("confidence")
        ik = header.index("class") if "class" in header else ic
        rows = [(float(r[ix]), float(r[iy]), float(r[ic]), float(r[ik])) for r in reader if r]
    data = np.asarray(rows, np.float64).reshape(-1, 4)
    classes = data[:, 3].astype(np.int64) if "class" in header else None
    return data[:, :2], np.clip(data[:, 2], 0.0, 1.0), classes


_MAX_CLASSES = 256


def _check_classes(path: Path, classes: np.ndarray | None, known: int) -> None:
    """Refuse class numbers outside the folder's classes (or above 255 where it names none).

    Each field counts its cells per class, so a class number sets the width of that table:
    a CSV from elsewhere must not make it as large as it likes.
    """
    if classes is None or not len(classes):
        return
    limit = known or _MAX_CLASSES
    low, high = int(classes.min()), int(classes.max())
    if low < 0 or high >= limit:
        expected = f"0-{limit - 1} (its {known} class names)" if known else f"0-{limit - 1}"
        raise ValueError(f"{path} has class {low if low < 0 else high} in its class column; expected {expected}. "
                         "Predict the images again with cellkit predict into a new folder, then suggest.")


def _extent(out: Path, stem: str, record: dict[str, Any], slides: set[str]) -> tuple[tuple[int, int], float | None,
                                                                                     Path | None]:
    """``((width, height), micrometres per pixel, source file)`` of one predicted image or slide."""
    if stem in slides:
        summary = json.loads((out / f"{stem}.summary.json").read_text(encoding="utf-8"))
        w, h = (int(v) for v in summary["dimensions"])
        return (w, h), summary.get("mpp"), Path(summary["slide"]) if summary.get("slide") else None
    paths = record.get("input_paths") if isinstance(record.get("input_paths"), list) else []
    source = next((Path(str(p)) for p in paths if Path(str(p)).stem == stem), None)
    if source is None or not source.is_file():
        return (0, 0), record.get("mpp"), None
    image = read_image(source, warn=False)
    mpp = record.get("mpp") or image_mpp(source)
    return (int(image.shape[1]), int(image.shape[0])), mpp, source


def suggest_folder(pred: str | Path, top: int = 10, field_um: float = FIELD_UM, field_px: int | None = None,
                   picture: bool = True, ranking: str = "mix") -> list[Field]:
    """Rank the fields of a ``cellkit predict`` folder and write ``PRED/suggestions/`` (see the module).

    Args:
        pred: the ``--out`` folder of ``cellkit predict``.
        top: how many fields to suggest.
        field_um: the side of a field in micrometres, where the image's pixel size is known.
        field_px: the side in pixels for images without a pixel size (default: ``field_um`` at
            0.5 um/px).
        picture: also draw ``suggestions.png``.
        ranking: ``"mix"`` (one field per stratum of the class mix) or ``"doubt"`` (see the module).

    Returns:
        the fields taken, in rank order.

    Raises:
        FileNotFoundError: ``pred`` is not a predictions folder of cellkit.
        ValueError: a predictions CSV without confidences (an older cellkit).
    """
    out = Path(pred).expanduser()
    record = read_prediction_record(out, "predict the images again into a new folder") if out.is_dir() else None
    if record is None:
        raise FileNotFoundError(f"{out} holds no predictions of cellkit predict ({PREDICT_META}); run cellkit predict "
                                "IMAGES --out DIR first, then cellkit suggest --pred DIR.")
    if ranking not in RANKINGS:
        raise ValueError(f"ranking {ranking!r} is not one of {', '.join(RANKINGS)}")
    slides = {str(s) for s in record.get("slides", [])}
    names = [str(n) for n in record.get("class_names") or []]
    fields, sources, cells, read = [], {}, {}, {}
    for stem in [str(s) for s in record.get("inputs") or record.get("images") or []]:  # done ones have a CSV
        csv_path = out / f"{stem}.csv"
        if not csv_path.is_file():
            continue
        read[stem] = _read_cells(csv_path)
        cells[stem] = read[stem][:2]
        _check_classes(csv_path, read[stem][2], len(names))
    known = [c for _, _, c in read.values() if c is not None and len(c)]
    k = max(len(names), 1 + max((int(c.max()) for c in known), default=-1))
    names += [f"class{i}" for i in range(len(names), k)]
    for stem, (points, confidence, classes) in read.items():
        size, mpp, sources[stem] = _extent(out, stem, record, slides)
        if size == (0, 0):
            size = (int(points[:, 0].max()) + 1, int(points[:, 1].max()) + 1) if len(points) else (1, 1)
        side = int(round(field_um / mpp)) if mpp else int(field_px or round(field_um / 0.5))
        fields += _grid_fields(stem, points, confidence, size, max(8, side), classes, k if classes is not None else 0)
    if not fields:
        raise FileNotFoundError(f"{out} holds no predicted cells to rank (no <image>.csv with cells).")
    chosen = rank_fields(fields, top, ranking=ranking)
    _write(out / FOLDER, chosen, sources, cells if picture else None, names)
    return chosen


def _write(folder: Path, chosen: Sequence[Field], sources: dict[str, Path | None],
           cells: dict[str, tuple[np.ndarray, np.ndarray]] | None, names: Sequence[str] = ()) -> None:
    """The suggestion files; the picture when ``cells`` (each image's points and confidences) are given.

    ``names`` are the classes, for the columns of each field's predicted cells per class.
    """
    planned = [folder / "suggestions.csv", *(folder / f"{s}.geojson" for s in sorted({f.image for f in chosen}))]
    planned += [folder / "suggestions.png"] if cells is not None else []
    kinds = {".csv": "suggestions-csv", ".geojson": "json", ".png": "png"}
    check_outputs("cellkit suggest", planned, ours=lambda p: written_by_cellkit(p, kinds[p.suffix]),
                  fix="move it away, or suggest from another predictions folder")
    make_folder(folder)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "image", "x", "y", "width", "height", "score", "cells", "uncertain_cells",
                     "mean_confidence", "reason", *(f"cells_{n}" for n in names)])
    for f in chosen:
        writer.writerow([f.rank, f.image, f.x, f.y, f.width, f.height, f.score, f.cells, f.uncertain,
                         f.mean_confidence, f.reason, *(f.mix[i] if i < len(f.mix) else "" for i in range(len(names)))])
    write_text_atomic(folder / "suggestions.csv", buf.getvalue())
    for stem in sorted({f.image for f in chosen}):
        features = _geojson([f for f in chosen if f.image == stem], names)
        write_text_atomic(folder / f"{stem}.geojson", json.dumps(features))
    if cells is not None:
        _draw(folder / "suggestions.png", chosen, sources, cells)


def _geojson(fields: Sequence[Field], names: Sequence[str] = ()) -> dict[str, Any]:
    """QuPath annotation rectangles, one per field (their predicted cells per class of ``names`` measured)."""
    features = []
    for f in fields:
        per_class = {f"cells {n}": f.mix[i] for i, n in enumerate(names) if i < len(f.mix)}
        ring = [[f.x, f.y], [f.x + f.width, f.y], [f.x + f.width, f.y + f.height], [f.x, f.y + f.height], [f.x, f.y]]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"objectType": "annotation", "name": f"#{f.rank}: {f.reason}",
                                        "classification": {"name": "Suggested", "color": [255, 160, 0]},
                                        "measurements": {"rank": f.rank, "score": f.score, "cells": f.cells,
                                                         "uncertain cells": f.uncertain,
                                                         "mean confidence": f.mean_confidence,
                                                         **per_class}}})
    return {"type": "FeatureCollection", "features": features}


def _crop(field: Field, source: Path | None, side: int = 192) -> np.ndarray:
    """The field's pixels (at most ``side`` a side), grey where the image cannot be read."""
    try:
        if source is not None and source.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
            return read_image(source, warn=False)[field.y : field.y + field.height, field.x : field.x + field.width]
        if source is not None:
            with open_slide(source) as slide:
                scale = max(field.width, field.height) / side
                return slide.read(field.x, field.y, field.width, field.height, max(1.0, scale))
    except (OSError, ValueError):
        pass
    return np.full((side, side, 3), 200, np.uint8)


def _draw(path: Path, chosen: Sequence[Field], sources: dict[str, Path | None],
          cells: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """The fields in rank order, cropped, their cells coloured by confidence (red unsure, green sure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(5, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, field in zip(axes.ravel(), chosen):
        crop = _crop(field, sources.get(field.image))
        ax.imshow(crop)
        points, confidence = cells.get(field.image, (np.zeros((0, 2)), np.zeros(0)))
        inside = ((points[:, 0] >= field.x) & (points[:, 0] < field.x + field.width)
                  & (points[:, 1] >= field.y) & (points[:, 1] < field.y + field.height))
        scale = crop.shape[1] / max(field.width, 1)
        ax.scatter((points[inside, 0] - field.x) * scale, (points[inside, 1] - field.y) * scale, s=6,
                   c=confidence[inside], cmap="RdYlGn", vmin=0, vmax=1, linewidths=0)
        ax.set_title(f"#{field.rank} {field.image}\n{field.uncertain}/{field.cells} unsure, "
                     f"mean {field.mean_confidence:.2f}", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_png(path, buf.getvalue())
