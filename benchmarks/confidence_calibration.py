"""Is a cell's confidence what it says? Reliability of per-cell scores on held-out regions.

For every training run of a leave-one-range-out variant of ``benchmarks/accuracy.py``
(``--runs results/accuracy/endonuke-ranges/ours-lite0-aug-s800``: each fold's ``run/best.pt``
and the tiles of the range it never saw, ``result.json``'s ``test_images``), predicts the
held-out tiles as ``cellkit predict`` does (the checkpoint's thresholds, ``--precision auto``)
and matches every predicted cell to the annotated cells (one to one, within the dataset's
radius, classes ignored). A prediction is **right** when it is matched to a cell of its own
class. For each candidate score it bins the predictions (10 equal-width bins on [0, 1]) and
reports the share right per bin against the mean score (the reliability diagram) and the
expected calibration error (ECE: the bins' |right - score| weighted by their share of cells):

* ``score``: the cell's own map value at its peak (what the CSV's ``score`` is);
* ``share``: its own class's probability over the sum of every class's (``probs``);
* ``confidence`` = ``score`` x ``share``: a cell there, and of that class
  ([`Detections.confidence`][cellkit.points.Detections.confidence]).

Usage::

    python benchmarks/confidence_calibration.py \\
        --runs results/accuracy/endonuke-ranges/ours-lite0-aug-s800 \\
        --json-out benchmarks/results-confidence-cpu.json --png docs/images/confidence-reliability.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import emit, load_average, provenance  # noqa: E402

from cellkit.data import load_dataset  # noqa: E402
from cellkit.data.bundled import bundled_endonuke  # noqa: E402
from cellkit.engine.predict import Predictor  # noqa: E402
from cellkit.metrics import match_points  # noqa: E402

CANDIDATES = ("score", "share", "confidence")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="a variant folder of benchmarks/accuracy.py")
    p.add_argument("--bins", type=int, default=10)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--png", type=Path, help="write the reliability diagram here")
    return p.parse_args(argv)


def fold_cells(fold: Path, samples: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every held-out prediction of one fold's run: its candidate scores and whether it is right."""
    result = json.loads((fold / "result.json").read_text())
    predictor = Predictor.from_checkpoint(fold / "run" / "best.pt", device="cpu")
    radius = float(result.get("radius", 6.0))
    rows: dict[str, list[np.ndarray]] = {k: [] for k in (*CANDIDATES, "right", "matched")}
    for key in result["test_images"]:
        sample = samples[str(key)]
        det = predictor.predict(sample.image)
        p_idx, t_idx = match_points(det.points, sample.points, radius)
        matched = np.zeros(len(det), bool)
        right = np.zeros(len(det), bool)
        matched[p_idx] = True
        right[p_idx] = sample.classes[t_idx] == det.classes[p_idx]
        rows["score"].append(det.scores)
        rows["share"].append(det.class_share)
        rows["confidence"].append(det.confidence)
        rows["right"].append(right)
        rows["matched"].append(matched)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in rows.items()}


def reliability(score: np.ndarray, right: np.ndarray, bins: int) -> dict[str, Any]:
    """Per bin: cells, mean score, share right; and the ECE."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(score, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        if not n:
            continue
        mean, acc = float(score[inside].mean()), float(right[inside].mean())
        ece += n / len(score) * abs(acc - mean)
        table.append({"bin": [round(edges[b], 2), round(edges[b + 1], 2)], "cells": n, "mean_score": round(mean, 4),
                      "share_right": round(acc, 4)})
    return {"ece": round(ece, 4), "bins": table}


def draw(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CANDIDATES), figsize=(4 * len(CANDIDATES), 4), sharey=True)
    for ax, name in zip(axes, CANDIDATES):
        rel = result["pooled"][name]
        xs = [b["mean_score"] for b in rel["bins"]]
        ys = [b["share_right"] for b in rel["bins"]]
        sizes = [max(8, 400 * b["cells"] / result["cells"]) for b in rel["bins"]]
        ax.plot([0, 1], [0, 1], color="0.7", lw=1)
        ax.plot(xs, ys, color="tab:blue", lw=1)
        ax.scatter(xs, ys, s=sizes, color="tab:blue")
        ax.set_title(f"{name} (ECE {rel['ece']:.3f})")
        ax.set_xlabel("mean score in the bin")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share of cells right (matched, right class)")
    fig.suptitle(f"held-out ranges, {result['cells']} predicted cells, {len(result['folds'])} runs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = load_average()
    first = json.loads(next(args.runs.glob("fold*/result.json")).read_text())
    if first.get("dataset") != "endonuke":
        raise SystemExit("only the EndoNuke variants (benchmarks/accuracy.py --datasets endonuke) are read here")
    from cellkit.data import ENDONUKE_EPITHELIUM

    samples = {s.key: s for s in load_dataset(bundled_endonuke(), "endonuke", class_map=ENDONUKE_EPITHELIUM)}
    per_fold, pooled = {}, {k: [] for k in (*CANDIDATES, "right", "matched")}
    for fold in sorted(p for p in args.runs.glob("fold*") if (p / "run" / "best.pt").is_file()):
        cells = fold_cells(fold, samples)
        per_fold[fold.name] = {name: reliability(cells[name], cells["right"], args.bins)["ece"] for name in CANDIDATES}
        per_fold[fold.name]["cells"] = int(len(cells["right"]))
        for k, v in cells.items():
            pooled[k].append(v)
        print(json.dumps({fold.name: per_fold[fold.name]}), file=sys.stderr, flush=True)
    cells = {k: np.concatenate(v) for k, v in pooled.items()}
    result = {
        "benchmark": "confidence_calibration", "runs": str(args.runs), "cells": int(len(cells["right"])),
        "share_right": round(float(cells["right"].mean()), 4), "share_matched": round(float(cells["matched"].mean()), 4),
        "pooled": {name: reliability(cells[name], cells["right"], args.bins) for name in CANDIDATES},
        "folds": per_fold,
        "ece_over_runs": {name: {"mean": round(float(np.mean([f[name] for f in per_fold.values()])), 4),
                                 "std": round(float(np.std([f[name] for f in per_fold.values()])), 4)}
                          for name in CANDIDATES},
        **provenance("benchmarks/confidence_calibration.py", argv, load_start, HERE.parent),
    }
    emit(result, args.json_out)
    if args.png:
        draw(result, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
