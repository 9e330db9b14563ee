"""Score a folder of predictions (``cellkit predict``'s output) against an annotated dataset.

Predictions are ``<stem>.csv`` files (columns ``x,y,class,score``) and are matched to the
ground-truth images by file stem. Every ground-truth image needs a prediction file, or
``allow_missing=True`` counts it as an image where nothing was found:

```python
from cellkit.engine.evaluate import evaluate_folder

result = evaluate_folder("out/", "data/test", "endonuke", radius=6)
print(result.report)  # precision, recall, totalF1, meanF1 per class
curve = result.curve([2, 4, 6, 8])  # F1 against the matching radius
```
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellkit.data.classes import ClassMap
from cellkit.data.formats import resolve_class_map
from cellkit.data.guard import plain_name
from cellkit.data.io import (
    DataWarning,
    jsonable,  # defined with the other file helpers; part of this module's API
    write_text_atomic,
)
from cellkit.data.readers import load_dataset, read_csv_points
from cellkit.metrics import evaluate, f1_vs_radius
from cellkit.points import Detections

__all__ = [
    "EvaluationResult",
    "OUTPUT_STEMS",
    "PREDICT_META",
    "evaluate_folder",
    "jsonable",
    "parse_radii",
    "read_prediction_csv",
    "read_prediction_record",
    "write_curve_csv",
]

#: File that ``cellkit predict`` writes beside its outputs: the class names and class map
#: of the model, so ``cellkit evaluate`` reads the data with the classes the model predicts.
PREDICT_META = "predict.json"

#: Stems of the files ``cellkit predict`` and ``cellkit evaluate`` write besides the
#: per-image ones; images may not use them.
OUTPUT_STEMS = ("counts", "predict", "evaluation", "f1_vs_radius", "cohort")


def parse_radii(spec: str) -> list[float]:
    """Radii from ``"start:stop"`` (step 1), ``"start:stop:step"`` (``stop`` included) or ``"2,4,8"``.

    Raises:
        ValueError: for a malformed spec, a step <= 0, a radius <= 0, or start > stop.

    Examples:
        >>> parse_radii("2:6:2"), parse_radii("2:4"), parse_radii("3,5")
        ([2.0, 4.0, 6.0], [2.0, 3.0, 4.0], [3.0, 5.0])
    """
    text = str(spec).strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            start, stop = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else 1.0
            if step <= 0 or start > stop:
                raise ValueError
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            radii = [round(start + i * step, 10) for i in range(n)]
        else:
            radii = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(
            f"radii {spec!r} is not 'start:stop', 'start:stop:step' (stop included, step > 0) or a "
            "comma-separated list; e.g. '2:20' or '2:20:2'."
        ) from None
    if not radii or min(radii) <= 0 or not all(math.isfinite(r) for r in radii):
        raise ValueError(f"radii {spec!r} must be positive numbers, got {radii}.")
    return radii


def read_prediction_csv(path: str | Path) -> Detections:
    """Detections from a ``cellkit predict`` CSV (``x,y,class`` and an optional ``score``).

    Raises:
        FileNotFoundError: for a missing file.
        DataError: naming the file and line of a malformed row.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such prediction file.")
    rec = read_csv_points(p)
    scores = rec.scores if rec.scores is not None else np.ones(len(rec.points), np.float32)
    return Detections(rec.points, rec.classes, scores)


def _stem(sample: Any) -> str:
    path = getattr(sample, "path", None)
    return Path(path).stem if path else Path(str(sample.key)).name


def read_prediction_record(folder: str | Path, fix: str) -> dict[str, Any] | None:
    """``FOLDER/predict.json`` as ``cellkit predict`` wrote it, or ``None`` when there is none.

    The one reader of the record (``cellkit predict`` before it writes into a folder,
    ``cellkit evaluate`` before it scores one). The names it lists decide which files a
    later ``--overwrite`` may delete, so each must be a plain file name
    ([`plain_name`][cellkit.data.guard.plain_name]).

    Args:
        folder: the predictions folder.
        fix: what the user can do when the record is unreadable, for the message.

    Raises:
        ValueError: for a file that is not readable JSON, not a JSON object with ``inputs``,
            or names something outside the folder.
    """
    path = Path(folder) / PREDICT_META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"{path} is not the record of a cellkit prediction run ({err}); {fix}.") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("inputs", meta.get("images")), list):
        raise ValueError(
            f"{path} is not the record of a cellkit prediction run (expected a JSON object with 'inputs'); {fix}."
        )
    for key in ("inputs", "images"):  # the names decide what --overwrite deletes
        for name in meta.get(key) or []:
            plain_name(name, path)
    return meta


def _read_meta(pred_dir: Path) -> dict[str, Any]:
    meta = read_prediction_record(pred_dir, "it should be the record cellkit predict wrote. Predict the images "
                                  "again into a new folder, or delete that file to score the .csv files without it")
    if meta is not None and meta.get("status") == "running":
        raise ValueError(
            f"The predictions in {pred_dir} are unfinished ({pred_dir / PREDICT_META} says the run was "
            "interrupted): finish them with the same `cellkit predict` command plus --resume, then evaluate."
        )
    return meta or {}


def _default_names(format: str, num_classes: int) -> list[str] | None:
    cmap = resolve_class_map(format, num_classes)
    return list(cmap.names) if cmap is not None else None


@dataclass
class EvaluationResult:
    """Predictions matched to ground truth, and their scores at one radius.

    Attributes:
        report: a [`cellkit.metrics.EvaluationReport`][] (per class tp, fp, fn,
            precision, recall, total_f1, mean_f1).
        keys: the image stems, in order.
        predictions: a [`Detections`][] per image.
        truths: ``(points, classes)`` per image.
        class_names: a name per class.
        missing: stems of images without a prediction file (counted as empty).
        unmatched: prediction files without a ground-truth image (ignored).
        image_paths: the image file of each image, in order (`None` where unknown), for
            pictures of the errors ([`cellkit.engine.plots.plot_errors`][]).
    """

    report: Any
    keys: list[str]
    predictions: list[Detections]
    truths: list[tuple[np.ndarray, np.ndarray]]
    class_names: list[str]
    missing: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    image_paths: list[str | None] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return len(self.class_names)

    def curve(self, radii: Sequence[float]) -> dict[str, Any]:
        """totalF1 and meanF1 per class at each radius ([`cellkit.metrics.f1_vs_radius`][])."""
        return f1_vs_radius(self.predictions, self.truths, radii, self.num_classes, self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-ready dict: the report plus the images, missing and unmatched stems."""
        out = dict(self.report.to_dict())
        out.update(
            num_images=len(self.keys),
            num_predicted=int(sum(len(d) for d in self.predictions)),
            num_true=int(sum(len(t[0]) for t in self.truths)),
            missing=list(self.missing),
            unmatched=list(self.unmatched),
        )
        return jsonable(out)

    def table(self, digits: int = 3) -> str:
        """A plain-text table, one row per class."""
        r = self.report
        head = ["class", "tp", "fp", "fn", "precision", "recall", "totalF1", "meanF1"]
        rows = [
            [
                name,
                str(int(r.tp[c])),
                str(int(r.fp[c])),
                str(int(r.fn[c])),
                *(f"{float(v[c]):.{digits}f}" for v in (r.precision, r.recall, r.total_f1, r.mean_f1)),
            ]
            for c, name in enumerate(self.class_names)
        ]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        fmt = lambda row: "  ".join(  # noqa: E731
            (cell.ljust(w) if i == 0 else cell.rjust(w)) for i, (cell, w) in enumerate(zip(row, widths))
        )
        lines = [f"radius {float(r.radius):g} px, {len(self.keys)} images", fmt(head)]
        lines += [fmt(row) for row in rows]
        return "\n".join(lines)


def evaluate_folder(
    pred_dir: str | Path,
    data_root: str | Path,
    format: str,
    radius: float,
    class_map: Any = None,
    split: str | None = None,
    allow_missing: bool = False,
    method: str = "hungarian",
    only: Collection[str] | None = None,
) -> EvaluationResult:
    """Score the ``<stem>.csv`` predictions of ``pred_dir`` against a dataset.

    Args:
        pred_dir: the output folder of ``cellkit predict``.
        data_root: the annotated dataset folder.
        format: its format (``csv``, ``bcdata``, ``endonuke``, ``geojson``).
        radius: matching radius in pixels.
        class_map: how the data's labels map to the model's classes (see
            [`cellkit.data.classes.ClassMap.parse`][]). Default: the class map recorded by
            ``cellkit predict`` (the model's training data), else the format's default.
        split: a split (subfolder) of the dataset.
        allow_missing: count images without a prediction file as empty instead of failing.
        method: ``"hungarian"`` or ``"greedy"`` matching.
        only: score only the images with these keys (a training run's held-out images:
            [`read_split`][cellkit.engine.runs.read_split]); predictions of other images
            are left aside, not counted as unmatched.

    Raises:
        FileNotFoundError: for a missing folder.
        ValueError: when images have no prediction file (listing them), two images share a
            stem, or predicted classes do not fit the data's classes.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: no such predictions folder; pass the --out folder of cellkit predict.")
    meta = _read_meta(pred_dir)
    cmap = _class_map_of(class_map, meta)
    recorded_names = meta.get("class_names") if isinstance(meta.get("class_names"), list) else None
    if class_map is not None and cmap is not None and recorded_names and cmap.num_classes != len(recorded_names):
        raise ValueError(
            f"--class-map {class_map} maps the data onto {cmap.num_classes} classes {list(cmap.names)}, but the "
            f"model that made {pred_dir} predicts {len(recorded_names)} ({', '.join(map(str, recorded_names))}; "
            f"see {pred_dir / PREDICT_META}); give a class map onto those classes."
        )
    samples = load_dataset(data_root, format, class_map=cmap, split=split, require_cells=False)
    if only is not None:
        wanted = set(only)
        kept = [s for s in samples if str(s.key) in wanted]
        if not kept:
            raise ValueError(
                f"none of the {len(wanted)} images asked for is in {data_root} ({len(samples)} images, e.g. "
                f"{', '.join(str(s.key) for s in samples[:3])}); is it the data folder the run was trained on?"
            )
        samples = kept
    if samples and not any(len(s.points) for s in samples):
        warnings.warn(f"{data_root}: no image has an annotated cell, so every prediction counts as a false "
                      "positive and recall is undefined.", DataWarning, stacklevel=2)

    by_stem = _by_stem(samples)
    files = {p.stem: p for p in sorted(pred_dir.glob("*.csv")) if p.stem not in OUTPUT_STEMS}
    missing = [k for k in by_stem if k not in files]
    if missing and not allow_missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        raise ValueError(
            f"{len(missing)} of {len(by_stem)} ground-truth images have no prediction file in {pred_dir} "
            f"(<stem>.csv): {shown}. Predict them, or pass --allow-missing to count them as empty."
        )
    unmatched = sorted(k for k in files if k not in by_stem) if only is None else []

    keys = list(by_stem)
    predictions = [read_prediction_csv(files[k]) if k in files else Detections() for k in keys]
    for k, det in zip(keys, predictions):
        _check_inside_image(det, by_stem[k], files.get(k))
    truths = [(np.asarray(by_stem[k].points), np.asarray(by_stem[k].classes)) for k in keys]

    names = _evaluation_names(cmap, meta, format, truths, predictions)
    report = evaluate(predictions, truths, radius, len(names), names, method)
    paths = [str(by_stem[k].path) if getattr(by_stem[k], "path", None) else None for k in keys]
    return EvaluationResult(report, keys, predictions, truths, names, missing, unmatched, paths)


def _by_stem(samples: list[Any]) -> dict[str, Any]:
    """The ground-truth samples by the stem their predictions are named after (one each)."""
    by_stem: dict[str, Any] = {}
    for s in samples:
        stem = _stem(s)
        if stem in by_stem:
            raise ValueError(
                f"Two ground-truth images share the name {stem!r} ({by_stem[stem].key} and {s.key}); "
                "pick one with --split."
            )
        by_stem[stem] = s
    return by_stem


def _evaluation_names(cmap: Any, meta: Mapping[str, Any], format: str, truths: list[Any],
                      predictions: list[Any]) -> list[str]:
    """The class names scored: the class map's, the prediction run's, else the format's or numbered."""
    names: list[str] | None = None
    if cmap is not None:
        names = list(cmap.names)
    elif meta.get("class_names"):
        names = [str(n) for n in meta["class_names"]]
    top = max(
        [int(t[1].max()) for t in truths if len(t[1])] + [int(p.classes.max()) for p in predictions if len(p)],
        default=0,
    )
    if names is None:
        num_classes = max(top + 1, 2)
        names = _default_names(format, num_classes) or [f"class{i}" for i in range(num_classes)]
    if top >= len(names):
        raise ValueError(
            f"Class {top} occurs in the predictions or the data, but there are {len(names)} classes "
            f"{names}; pass --class-map mapping the data's labels to the model's classes "
            "(e.g. endonuke_epithelium, or '0=0,1=1,2=0')."
        )
    return names


def _check_inside_image(det: Any, sample: Any, path: Path | None) -> None:
    """A prediction outside its image is not a cell: an error naming the file and the point."""
    if not len(det) or getattr(sample, "image", None) is None:
        return
    h, w = sample.image.shape[:2]
    x, y = det.points[:, 0], det.points[:, 1]
    outside = (x < 0) | (y < 0) | (x > w) | (y > h)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"{path}: row {i + 1} (x={x[i]:g}, y={y[i]:g}) lies outside its {h}x{w} (HxW) image "
            f"{getattr(sample, 'path', None) or sample.key}; expected 0 <= x <= {w} and 0 <= y <= {h}. Is it the "
            "prediction file of another image?"
        )


def _class_map_of(class_map: Any, meta: Mapping[str, Any]) -> Any:
    """The class map given, else the one ``cellkit predict`` recorded in predict.json, else None."""
    if class_map is not None:
        return ClassMap.parse(class_map)
    if isinstance(meta.get("class_map"), Mapping):
        recorded = meta["class_map"]
        return ClassMap(dict(recorded), list(meta.get("class_names") or []) or [
            f"class{i}" for i in range(max(recorded.values()) + 1)
        ])
    return None


def write_curve_csv(path: str | Path, curve: Mapping[str, Any]) -> Path:
    """Write an F1-against-radius curve: columns ``radius``, ``totalF1_<class>``, ``meanF1_<class>``."""
    names = list(curve["classes"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["radius", *(f"totalF1_{n}" for n in names), *(f"meanF1_{n}" for n in names)])
    for i, r in enumerate(curve["radii"]):
        row = [f"{float(r):g}"]
        row += [_fmt(curve["total_f1"][n][i]) for n in names]
        row += [_fmt(curve["mean_f1"][n][i]) for n in names]
        writer.writerow(row)
    write_text_atomic(path, buf.getvalue())
    return Path(path)


def _fmt(value: Any) -> str:
    v = float(value)
    return "" if not math.isfinite(v) else f"{v:.6g}"
