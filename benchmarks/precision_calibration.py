"""What calibrating the peaks on int8 maps changes (issue 26): held-out F1 of ``cellkit predict``'s default.

Before issue 26, training calibrated the peak thresholds on float32 maps only, while
``cellkit predict`` runs int8 by default on the CPU. Now training also calibrates on the int8
maps that predict makes (``postprocess_int8`` in ``best.pt``). This takes finished
leave-one-range-out runs of ``benchmarks/accuracy.py`` (``--runs DIR/PRESET``, one run folder
per held-out range under ``fold<i>/run``), redoes their final calibration in int8 on the same
validation images the run used (the run's own split of its training folder), and scores the
held-out range three ways: the default predictor with the float32 thresholds (before), with
the int8 thresholds (now), and ``--precision fp32``. Prints JSON: pooled totalF1 per class over
the held-out ranges, each fold's, and the cells found on the bundled tile 391.

Usage::

    python benchmarks/precision_calibration.py --runs results/accuracy/endonuke-ranges/ours \\
        --folds results/accuracy/endonuke-ranges/folds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np


def _score(predictor, samples, names):  # noqa: ANN001, ANN202
    from cellkit.metrics import evaluate

    preds = [predictor.predict(s.image) for s in samples]
    report = evaluate(preds, [(s.points, s.classes) for s in samples], radius=6.0, num_classes=len(names),
                      class_names=names)
    return report.tp, report.fp, report.fn


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, names: list[str]) -> dict[str, float]:
    return {n: round(float(2 * tp[i] / max(1, 2 * tp[i] + fp[i] + fn[i])), 4) for i, n in enumerate(names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="DIR/PRESET of benchmarks/accuracy.py")
    parser.add_argument("--folds", type=Path, required=True, help="its folds/ folder (fold<i>/train, test)")
    parser.add_argument("--out", type=Path, default=Path("results/precision"))
    args = parser.parse_args()

    import torch

    from cellkit.data import bundled_endonuke, load_dataset
    from cellkit.data.io import read_image
    from cellkit.engine import plan as plan_module
    from cellkit.engine import validation as validation_module
    from cellkit.engine.checkpoint import load_model, save_checkpoint
    from cellkit.engine.predict import Predictor

    t0 = time.perf_counter()
    totals: dict[str, list[np.ndarray]] = {}
    per_fold: dict[str, dict[str, dict[str, float]]] = {}
    tile = read_image(bundled_endonuke() / "images" / "391.png", warn=False)
    cells_391: dict[str, list[int]] = {}
    names: list[str] = []
    for fold in sorted(p for p in args.folds.iterdir() if p.name.startswith("fold")):
        run = args.runs / fold.name / "run"
        if not (run / "best.pt").is_file():
            continue
        model, cfg, ckpt = load_model(run / "best.pt")  # its config is the run's config.yaml
        cmap = plan_module._class_map(cfg)  # EndoNuke read as the run read it: epithelium against the rest
        split = plan_module._split(list(load_dataset(fold / "train", "endonuke", class_map=cmap)), cfg)
        names = list(ckpt.get("class_names") or cfg.data.class_names)
        truths = [(s.points, s.classes) for s in split["val"]]
        d0 = cfg.postprocess.kwargs.get("min_distance")
        grid = sorted({max(1, int(round(f * d0))) for f in (0.67, 1.0, 1.33)}) if isinstance(d0, int) else None
        cal8 = validation_module._int8_calibration(cfg, model, ckpt, split["val"], truths, names,
                                              dict(ckpt["postprocess"]), grid)
        if cal8 is None:
            raise SystemExit("this machine's PyTorch has no x86 int8 engine: nothing to compare")
        new = args.out / fold.name / "best.pt"
        new.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in ckpt.items() if k not in ("path", "format")}
        save_checkpoint(new, {**state, "postprocess_int8": cal8.kwargs})
        test = list(load_dataset(fold / "test", "endonuke", class_map=cmap))
        variants = {
            "int8, fp32 thresholds (before)": Predictor.from_checkpoint(run / "best.pt", device="cpu",
                                                                        precision="auto"),
            "int8, int8 thresholds (now)": Predictor.from_checkpoint(new, device="cpu", precision="auto"),
            "fp32": Predictor.from_checkpoint(run / "best.pt", device="cpu", precision="fp32"),
        }
        per_fold[fold.name] = {}
        for label, predictor in variants.items():
            tp, fp, fn = _score(predictor, test, names)
            acc = totals.setdefault(label, [np.zeros(len(names))] * 3)
            totals[label] = [acc[0] + tp, acc[1] + fp, acc[2] + fn]
            per_fold[fold.name][label] = _f1(tp, fp, fn, names)
            cells_391.setdefault(label, []).append(len(predictor.predict(tile).points))
        per_fold[fold.name]["thresholds"] = {"fp32": ckpt["postprocess"].get("threshold"),
                                             "int8": cal8.kwargs.get("threshold")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "pooled_total_f1": {label: _f1(*acc, names) for label, acc in totals.items()},
        "per_fold": per_fold,
        "cells_on_tile_391_per_fold_model": cells_391,
        "split": "leave-one-range-out EndoNuke (across regions), radius 6 px",
        "commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_average": [round(v, 2) for v in os.getloadavg()], "seconds": round(time.perf_counter() - t0, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
