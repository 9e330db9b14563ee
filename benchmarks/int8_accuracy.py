"""int8 against float32: the totalF1 of trained models on their held-out images, both ways.

For every run of one row of an ``examples/reproduce_paper.py`` results folder (its
``runs/<row>/fold<k>/seed<s>/best.pt`` and ``split.json``), predicts the fold's held-out
images with the checkpoint in float32 (BatchNorm folded, as ``cellkit predict --precision
fp32``) and in int8 calibrated two ways: on the bundled EndoNuke tiles (the fallback) and on
16 central crops of the fold's training images (what ``cellkit train`` stores in ``best.pt``
since int8 became the CPU's default), and prints JSON: totalF1 per class at the dataset's
radius for each, and int8 minus float32 averaged over the runs.

Usage::

    python benchmarks/int8_accuracy.py --results results/reproduce-endonuke-default
    python benchmarks/int8_accuracy.py --results results/reproduce-bcdata-default \\
        --data ../shared/data/bcdata_sample --format bcdata
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import machine_info  # noqa: E402

RADIUS = {"endonuke": 6.0, "bcdata": 10.0}


def central_crops(images: list[np.ndarray], n: int = 16, side: int = 192) -> list[np.ndarray]:
    """The crops ``cellkit train`` keeps: one per evenly spaced image, at most ``side`` px."""
    step = max(1, len(images) // n)
    out = []
    for image in images[::step][:n]:
        h, w = image.shape[:2]
        ch, cw = min(h, side), min(w, side)
        y, x = (h - ch) // 2, (w - cw) // 2
        out.append(image[y : y + ch, x : x + cw])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, required=True, help="a reproduce_paper.py output folder")
    p.add_argument("--row", default="ours", help="the row's folder under runs/ (default: ours)")
    p.add_argument("--data", type=Path, default=None, help="the dataset (default: the bundled EndoNuke)")
    p.add_argument("--format", default="endonuke")
    args = p.parse_args(argv)

    from cellkit.data import bundled_endonuke, get_format, load_dataset
    from cellkit.engine.inference import InferenceModel
    from cellkit.engine.predict import Predictor
    from cellkit.metrics import detection_counts
    from cellkit.models.quantize import Int8Model, quantize_int8

    split = json.loads((args.results / "split.json").read_text())
    class_map = get_format(args.format).class_map(2)
    samples = {s.key: s for s in load_dataset(args.data or bundled_endonuke(), args.format, class_map=class_map)}
    radius = RADIUS.get(args.format, 6.0)
    runs = {}
    for ckpt in sorted((args.results / "runs" / args.row).glob("fold*/seed*/best.pt")):
        fold = int(ckpt.parent.parent.name[len("fold"):])
        test = [samples[k] for k in split[fold]["test"]]
        predictor = Predictor.from_checkpoint(ckpt, device="cpu", fold_bn=True)
        own = central_crops([samples[k].image for k in split[fold]["train"]])
        models = {"fp32": predictor.inference_model, "int8_bundled": quantize_int8(predictor.model),
                  "int8_own_crops": quantize_int8(predictor.model, calibration=own)}
        scores = {}
        for name, model in models.items():
            predictor.runner = InferenceModel(model, "cpu", "int8" if isinstance(model, Int8Model) else "fp32")
            total = np.zeros((3, 2), np.int64)
            for s in test:
                det = predictor.predict(s.image)
                total += np.stack(detection_counts(det.points, det.classes, s.points, s.classes, radius, 2))
            tp, fp, fn = total
            scores[name] = (2 * tp / np.maximum(2 * tp + fp + fn, 1)).round(4).tolist()
        runs[str(ckpt.relative_to(args.results))] = scores
        print(ckpt, scores, file=sys.stderr, flush=True)
    delta = {name: np.mean([np.subtract(r[name], r["fp32"]) for r in runs.values()], axis=0).round(4).tolist()
             for name in ("int8_bundled", "int8_own_crops")}
    worst = {name: float(np.max([np.abs(np.subtract(r[name], r["fp32"])) for r in runs.values()]).round(4))
             for name in ("int8_bundled", "int8_own_crops")}
    out = {"benchmark": "int8_accuracy", "results": str(args.results), "row": args.row, "format": args.format,
           "radius": radius, "class_names": list(class_map.names) if class_map is not None else None,
           "total_f1": runs, "int8_minus_fp32_mean": delta, "int8_minus_fp32_max_abs": worst,
           "machine": machine_info(HERE.parent)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
