"""Turn a training run into a model shipped inside cellkit (``cellkit/weights/NAME.pt``).

Keeps what prediction needs (config, weights, class names, calibrated peaks, geometry; not the
optimizer, history or random state), stores the weights in half precision when that keeps every
class's held-out F1 within ``--tolerance`` (0.005) of the float32 model's, and prints the
held-out scores of both as JSON for the model card. The held-out images must be ones the run
neither trained nor validated on; for a model trained on every image (``--trained-on-all``),
``--test`` only checks half against full precision, and the card's figures come from the
benchmark that chose the recipe (``benchmarks/accuracy.py``, leave-one-range-out).

Usage::

    python tools/ship_model.py --run results/accuracy/endonuke/ours-steps800/fold0/run \\
        --test results/accuracy/endonuke/folds/fold0/test --format endonuke --radius 6 \\
        --name endonuke-epithelium
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEEP = ("format", "cellkit_version", "config", "model", "class_names", "postprocess", "calibration", "stage",
        "best_score", "epoch", "geometry")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="the run folder (its best.pt is shipped)")
    p.add_argument("--test", type=Path, required=True, help="held-out images and labels, in the format's layout")
    p.add_argument("--format", required=True)
    p.add_argument("--class-map", default=None)
    p.add_argument("--radius", type=float, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--tolerance", type=float, default=0.005)
    p.add_argument("--trained-on-all", action="store_true",
                   help="the run trained on every annotated image: --test checks precision only (not held out)")
    p.add_argument("--out", type=Path, default=ROOT / "cellkit" / "weights")
    return p.parse_args(argv)


def held_out(checkpoint: Path, test: Path, fmt: str, radius: float, class_map: str | None) -> dict[str, Any]:
    """Pooled totalF1 / precision / recall per class of ``checkpoint`` on the held-out folder."""
    from cellkit.engine.evaluate import evaluate_folder
    from cellkit.engine.outputs import write_predictions
    from cellkit.engine.predict import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        images = test / "images" if (test / "images").is_dir() else test
        write_predictions(predictor, [images], tmp, overlay=False, progress=False)
        result = evaluate_folder(tmp, test, fmt, radius, class_map=class_map)
        return result.to_dict()


def main(argv: list[str] | None = None) -> int:
    from cellkit.engine.checkpoint import load_checkpoint, save_checkpoint

    args = parse_args(argv)
    state = load_checkpoint(args.run / "best.pt")
    slim = {k: v for k, v in state.items() if k in KEEP}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        full = save_checkpoint(Path(tmp) / "fp32.pt", slim)
        half = dict(slim, model={k: (v.half() if v.is_floating_point() else v) for k, v in slim["model"].items()})
        half_path = save_checkpoint(Path(tmp) / "fp16.pt", half)
        scores = {name: held_out(p, args.test, args.format, args.radius, args.class_map)
                  for name, p in (("fp32", full), ("fp16", half_path))}
        f32 = scores["fp32"]["classes"] if "classes" in scores["fp32"] else scores["fp32"]
        f16 = scores["fp16"]["classes"] if "classes" in scores["fp16"] else scores["fp16"]
        worst = max(abs(float(f32[c]["total_f1"]) - float(f16[c]["total_f1"])) for c in f32)
        use_half = worst <= args.tolerance
        target = args.out / f"{args.name}.pt"
        save_checkpoint(target, half if use_half else slim)
    print(json.dumps({"shipped": str(target), "half_precision": use_half, "max_f1_change": worst,
                      "bytes": target.stat().st_size,
                      ("precision_check_not_held_out" if args.trained_on_all else "held_out"): scores},
                     indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
