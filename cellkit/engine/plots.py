"""Pictures of a training run and of an evaluation: the curves, and the errors on the worst images.

* [`plot_training`][] draws `RUN_DIR/curves.png` from the run's `metrics.jsonl`: every loss
  term against the steps (training solid, validation dashed) and the validation F1 of each
  class, with the best round marked; stage 1 of `ours_plus_plus` (`RUN_DIR/pretrain/`) gets
  its own row. `cellkit train` draws it when the run ends, `cellkit plot RUN_DIR` at any time
  (also while the run trains).
* [`plot_errors`][] draws the images of an evaluation with the most false positives and misses,
  each cell marked as a true positive, a false positive or a miss; `cellkit evaluate` writes it
  as `OUT_DIR/errors.png`.

Both draw on matplotlib's Agg canvas (a `matplotlib.figure.Figure`, never `pyplot`), so
nothing depends on a display or on global figure state, and write the PNG atomically.

```python
from cellkit.engine.plots import plot_training

plot_training("runs/ours")          # -> runs/ours/curves.png
```
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellkit.data.guard import check_outputs, write_png
from cellkit.data.io import read_image
from cellkit.metrics import detection_counts, match_points
from cellkit.viz import class_colors

__all__ = ["CLASS_MARKERS", "ERROR_COLORS", "plot_errors", "plot_training", "read_metrics"]

ERROR_COLORS: dict[str, str] = {"tp": "#00d000", "fp": "#ff2020", "fn": "#ffd400"}
"""Colours of [`plot_errors`][]: true positives green, false positives red, misses (false
negatives, the annotated cells nobody found) yellow, which stays visible on haematoxylin blue."""

CLASS_MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*")
"""Matplotlib markers of the classes in [`plot_errors`][] (class 0 a circle, 1 a square, ...; repeated
after the eighth)."""

_METRICS = "metrics.jsonl"


# --------------------------------------------------------------------------- training curves


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    r"""The records of a `metrics.jsonl` file, one dict per validated round, in order.

    A last line without its newline is a record being written (the run is training) and is
    left out when it is not complete JSON.

    Args:
        path: a `metrics.jsonl` file, or the run folder that holds one.

    Raises:
        FileNotFoundError: when the file does not exist, naming it.
        ValueError: for a line that is not a JSON object (naming the file and the line).

    Examples:
        >>> import tempfile, os
        >>> run = tempfile.mkdtemp()
        >>> with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        ...     _ = f.write('{"step": 2, "train": {"total": 0.5}}\n')
        >>> read_metrics(run)
        [{'step': 2, 'train': {'total': 0.5}}]
    """
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / _METRICS
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: expected the metrics of a run, which cellkit train writes into its "
            "--out folder (RUN_DIR/metrics.jsonl, one line per validation). Pass the run folder of cellkit "
            "train."
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{file} cannot be read as text ({err}); expected the JSON lines cellkit train writes."
        ) from err
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            if number == len(lines) and not isinstance(err, RecursionError):  # a round being written now
                break
            raise ValueError(
                f"{file}, line {number}: not JSON ({getattr(err, 'msg', 'nested too deeply')}); expected one JSON object per line as cellkit "
                "train writes them. Restore the file (the checkpoints hold the same history) or train again."
            ) from err
        if not isinstance(record, dict):
            raise ValueError(
                f"{file}, line {number}: expected a JSON object (a round's record), got "
                f"{type(record).__name__}."
            )
        records.append(record)
    return records


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("nan")
    return float(value)


def _steps(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """The x of each record: its optimizer step (the round's number in older logs)."""
    out = []
    for i, r in enumerate(records):
        step = _number(r.get("step"))
        out.append(step if math.isfinite(step) else _number(r.get("epoch", i + 1)))
    return out


def _keys(records: Sequence[Mapping[str, Any]], field: str) -> list[str]:
    keys: list[str] = []
    for r in records:
        part = r.get(field)
        if isinstance(part, Mapping):
            keys += [str(k) for k in part if str(k) not in keys]
    return keys


def _series(records: Sequence[Mapping[str, Any]], field: str, key: str) -> np.ndarray:
    values = []
    for r in records:
        part = r.get(field)
        values.append(_number(part.get(key)) if isinstance(part, Mapping) else float("nan"))
    return np.asarray(values, dtype=np.float64)


def _draw_losses(ax: Any, records: Sequence[Mapping[str, Any]], title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    x = _steps(records)
    keys = _keys(records, "train")
    keys = (["total"] if "total" in keys else []) + [k for k in keys if k != "total"]
    drawn = []
    for i, key in enumerate(keys):
        colour = "black" if key == "total" else f"C{i % 10}"
        width = 2.0 if key == "total" else 1.3
        train = _series(records, "train", key)
        val = _series(records, "val", key)
        ax.plot(x, train, "-", color=colour, lw=width, marker="o", markersize=3, label=f"{key}")
        if np.isfinite(val).any():
            ax.plot(x, val, "--", color=colour, lw=width, marker="o", markersize=3, label=f"{key} (val)")
        drawn += [v for v in (train, val) if np.isfinite(v).any()]
    values = np.concatenate(drawn) if drawn else np.zeros(0)
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() / values.min() > 20:
        ax.set_yscale("log")  # terms of very different sizes: each stays readable
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}losses: training solid, validation dashed", fontsize="medium")
    ax.grid(True, alpha=0.3)
    if keys:
        ax.legend(fontsize="x-small", loc="best", ncol=2 if len(keys) > 3 else 1)


def _draw_f1(ax: Any, records: Sequence[Mapping[str, Any]], title: str) -> None:
    from matplotlib.ticker import MaxNLocator
    x = _steps(records)
    names = _keys(records, "f1")
    colours = class_colors(len(names)) / 255.0
    any_value = False
    for c, name in enumerate(names):
        f1 = _series(records, "f1", name)
        if np.isfinite(f1).any():
            any_value = True
            ax.plot(x, f1, "-", color=colours[c], lw=1.6, marker="o", markersize=3, label=f"F1 {name}")
    score = np.asarray([_number(r.get("score")) for r in records])
    if np.isfinite(score).sum() and len(names) > 1:
        ax.plot(x, score, ":", color="black", lw=1.2, label="score (mean over classes)")
    best = [i for i, r in enumerate(records) if r.get("best")]
    if best and any_value:
        i = best[-1]
        text = f"best: step {x[i]:g}" + (f", score {score[i]:.3f}" if math.isfinite(score[i]) else "")
        ax.axvline(x[i], color="grey", ls="--", lw=1.0, label=None if math.isfinite(score[i]) else text)
        if math.isfinite(score[i]):
            ax.plot([x[i]], [score[i]], marker="*", markersize=12, color="gold", markeredgecolor="black",
                    linestyle="none", label=text)
    if not any_value:
        ax.text(0.5, 0.5, "no validation F1 (no validation images)", ha="center", va="center",
                transform=ax.transAxes, color="dimgrey")
    ax.set_ylim(0.0, 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation total F1")
    ax.set_title(f"{title}validation F1 per class", fontsize="medium")
    ax.grid(True, alpha=0.3)
    if any_value:
        ax.legend(fontsize="x-small", loc="best")


def plot_training(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Draw the training curves of a run into a PNG (default `RUN_DIR/curves.png`).

    Left: every loss term of the weighted loss and its total against the optimizer step,
    the training mean of each round solid, the validation value dashed (a log scale when
    the terms differ by more than 20 times). Right: the validation total F1 of each class
    (the colours of the overlays), the score that picks `best.pt` (dotted) and the best
    round (a star and a dashed line). A run with a stage 1 (`RUN_DIR/pretrain/metrics.jsonl`,
    `ours_plus_plus`) gets a first row for it, whose steps count from its own start.

    Args:
        run_dir: the run folder of `cellkit train` (or its `metrics.jsonl`).
        out: the PNG to write; default `RUN_DIR/curves.png`.

    Returns:
        The path of the PNG.

    Raises:
        FileNotFoundError: when the run has no `metrics.jsonl` (naming the file).
        ValueError: for a corrupt `metrics.jsonl` (naming the file and line), or one
            without any round yet.

    Examples:
        >>> plot_training("runs/ours")  # doctest: +SKIP
        PosixPath('runs/ours/curves.png')
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    run = Path(run_dir).expanduser()
    if run.name == _METRICS and run.is_file():
        run = run.parent
    target = Path(out) if out is not None else run / "curves.png"
    if target.suffix.lower() != ".png":
        raise ValueError(f"The training curves are a PNG picture: expected a file name ending in .png, got "
                         f"{target}; e.g. --out {target.with_suffix('.png').name}.")
    check_outputs("cellkit plot", [target], fix="give a new file name ending in .png (a picture cellkit drew "
                  "before is replaced; any other file is not)")
    main_file, pre_file = run / _METRICS, run / "pretrain" / _METRICS
    stages: list[tuple[str, list[dict[str, Any]]]] = []
    if pre_file.is_file():
        stages.append(("stage 1 (pretrain): ", read_metrics(pre_file)))
    if main_file.is_file() or not stages:  # read_metrics names the missing file
        stages.append(("stage 2: " if stages else "", read_metrics(main_file)))
    stages = [(title, records) for title, records in stages if records]
    if not stages:
        raise ValueError(
            f"{main_file} holds no round yet: the curves need at least one validated round (cellkit train "
            "writes a line at the end of each). Try again later."
        )
    fig = Figure(figsize=(12, 4.2 * len(stages)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(stages), 2, squeeze=False)
    for row, (title, records) in enumerate(stages):
        _draw_losses(axes[row][0], records, title)
        _draw_f1(axes[row][1], records, title)
    fig.suptitle(f"Training of {run.resolve().name}", fontsize="large")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_png(target, buf.getvalue())


# --------------------------------------------------------------------------- evaluation errors


def _classify(pred: Any, truth: tuple[np.ndarray, np.ndarray], radius: float, num_classes: int,
              method: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"tp", "fp", "fn"}`` -> ``(points (K, 2), classes (K,))`` of one image, matched per class.

    The matching of `cellkit.metrics.detection_counts` (one to one within each class), so the
    counts are the evaluation's; a true positive is drawn at its annotated point.
    """
    pp = np.asarray(pred.points, np.float64).reshape(-1, 2)
    pc = np.asarray(pred.classes, np.int64).reshape(-1)
    scores = np.asarray(pred.scores, np.float64).reshape(-1) if pred.scores is not None else None
    tpts = np.asarray(truth[0], np.float64).reshape(-1, 2)
    tc = np.asarray(truth[1], np.int64).reshape(-1)
    kinds: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"tp": [], "fp": [], "fn": []}
    for c in range(num_classes):
        p_idx, t_idx = np.flatnonzero(pc == c), np.flatnonzero(tc == c)
        matched_p = matched_t = np.zeros(0, np.int64)
        if len(p_idx) and len(t_idx):
            mp, mt = match_points(pp[p_idx], tpts[t_idx], radius, method,
                                  None if scores is None else scores[p_idx])
            matched_p, matched_t = p_idx[mp], t_idx[mt]
        kinds["tp"].append((tpts[matched_t], tc[matched_t]))
        fp = np.setdiff1d(p_idx, matched_p)
        fn = np.setdiff1d(t_idx, matched_t)
        kinds["fp"].append((pp[fp], pc[fp]))
        kinds["fn"].append((tpts[fn], tc[fn]))
    return {k: (np.concatenate([p for p, _ in v]).reshape(-1, 2), np.concatenate([c for _, c in v]))
            for k, v in kinds.items()}


def plot_errors(result: Any, out: str | os.PathLike[str], *, count: int = 4) -> Path:
    """Draw the `count` images of an evaluation with the most errors, every cell marked.

    The images with the most false positives plus misses (false negatives) are drawn with
    each true positive in green (at its annotated point), each false positive in red and
    each miss in yellow ([`ERROR_COLORS`][]); the marker's shape is the class
    ([`CLASS_MARKERS`][]), so a cell found with the wrong class shows as a red marker of one
    shape over a yellow one of another. Points are matched exactly as the evaluation
    matched them (its radius and method).

    Args:
        result: an [`EvaluationResult`][cellkit.engine.evaluate.EvaluationResult] of
            [`evaluate_folder`][cellkit.engine.evaluate.evaluate_folder], which knows each
            image's file.
        out: the PNG to write (`cellkit evaluate` writes `OUT_DIR/errors.png`).
        count: how many images, at most.

    Returns:
        The path of the PNG.

    Raises:
        ValueError: when the result does not know the images' files, or `count < 1`.
        OSError: when an image cannot be read (as [`cellkit.data.io.read_image`][] raises).

    Examples:
        Not run here (it needs a folder of predictions and writes ``out/``):

        >>> from cellkit.engine.evaluate import evaluate_folder
        >>> result = evaluate_folder("out/", "data/test", "endonuke",
        ...                          radius=6)  # doctest: +SKIP
        >>> plot_errors(result, "out/errors.png")  # doctest: +SKIP
        PosixPath('out/errors.png')
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1 (the number of images drawn), got {count!r}.")
    paths = list(getattr(result, "image_paths", None) or [])
    keys = list(result.keys)
    if len(paths) != len(keys) or not keys:
        raise ValueError(
            f"the evaluation knows the files of {len(paths)} of its {len(keys)} images; expected one per "
            "image, as evaluate_folder records them."
        )
    radius, method = float(result.report.radius), str(result.report.method)
    names = [str(n) for n in result.class_names]
    chosen = _worst_images(result, paths, keys, radius, method, count)
    cols = 1 if len(chosen) == 1 else 2
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(6.0 * cols, 6.0 * rows + 1.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[6.0] * rows + [0.45])
    axes = [fig.add_subplot(grid[r, c]) for r in range(rows) for c in range(cols)]
    for ax in axes[len(chosen):]:
        ax.set_axis_off()
    for ax, i in zip(axes, chosen):
        _draw_errors(ax, read_image(paths[i], warn=False), result.predictions[i], result.truths[i], keys[i],
                     radius, len(names), method)
    handles = _error_legend(names)
    legend = fig.add_subplot(grid[rows, :])
    legend.set_axis_off()
    legend.legend(handles=handles, loc="center", ncol=min(len(handles), 6), fontsize="small", frameon=False)
    images = f"{len(chosen)} image{'s' if len(chosen) > 1 else ''}"
    fig.suptitle(f"The {images} with the most errors, of {len(keys)} evaluated "
                 f"(matching radius {radius:g} px, {method})", fontsize="large")
    target = Path(out)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_png(target, buf.getvalue())

def _worst_images(result: Any, paths: list[Any], keys: list[str], radius: float, method: str,
                  count: int) -> list[int]:
    """The indices of the ``count`` images with the most errors (false positives + misses)."""
    k = len(result.class_names)
    errors = []
    for pred, truth in zip(result.predictions, result.truths):
        _, fp, fn = detection_counts(pred.points, pred.classes, truth[0], truth[1], radius, k, method,
                                     pred.scores)
        errors.append(int(fp.sum() + fn.sum()))
    chosen = sorted(range(len(keys)), key=lambda i: -errors[i])[:count]
    missing_files = [keys[i] for i in chosen if paths[i] is None]
    if missing_files:
        raise ValueError(f"the image files of {', '.join(missing_files)} are not known to the evaluation.")
    return chosen


def _draw_errors(ax: Any, image: np.ndarray, prediction: Any, truth: Any, key: str, radius: float, k: int,
                 method: str) -> None:
    """One image with its true positives, false positives and misses as coloured rings."""
    parts = _classify(prediction, truth, radius, k, method)
    ax.imshow(image, interpolation="nearest")
    for kind in ("fn", "fp", "tp"):
        points, classes = parts[kind]
        for c in np.unique(classes):
            sel = classes == c
            ax.scatter(points[sel, 0], points[sel, 1], s=46, marker=CLASS_MARKERS[int(c) % len(CLASS_MARKERS)],
                       facecolors="none", edgecolors=ERROR_COLORS[kind], linewidths=1.4)
    n = {kind: len(parts[kind][1]) for kind in parts}
    ax.set_title(f"{key}: {n['tp']} TP, {n['fp']} FP, {n['fn']} missed", fontsize="medium")
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _error_legend(names: list[str]) -> list[Any]:
    """The legend's entries: the three kinds of ring, then each class's marker."""
    from matplotlib.lines import Line2D

    rings = (("tp", "true positive"), ("fp", "false positive"), ("fn", "missed (false negative)"))
    return [Line2D([], [], ls="none", marker="o", markerfacecolor="none", markeredgecolor=ERROR_COLORS[kind],
                   markeredgewidth=1.6, markersize=9, label=label) for kind, label in rings] + [
        Line2D([], [], ls="none", marker=CLASS_MARKERS[c % len(CLASS_MARKERS)], markerfacecolor="none",
               markeredgecolor="black", markersize=9, label=f"class {name}")
        for c, name in enumerate(names)
    ]

