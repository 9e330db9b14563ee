"""Held-out accuracy of the command a new user types: ``cellkit train`` with the defaults.

For each dataset and preset, every training run is exactly::

    cellkit train --preset P --data FOLD_TRAIN --format F --out RUN
    cellkit predict --checkpoint RUN/best.pt --out PRED FOLD_TEST/images...
    cellkit evaluate --pred PRED --data FOLD_TEST --format F --radius R

(subprocesses, nothing else set), where ``FOLD_TRAIN`` and ``FOLD_TEST`` are folders of links
to the fold's images and label files in the dataset's own layout. Datasets:

* ``bcdata``: the 20-image BCData sample (``--bcdata``), k-fold cross-validation over all
  images (``--folds``, default 3, so 6-7 held-out images per fold and every image held out
  once); scored at r = 10 px.
* ``endonuke``: the bundled EndoNuke sample, held-out tiles = the 15 % test part of the
  group split (tile-id blocks of 10, seed 0; the rest is what ``cellkit train`` gets); r = 6 px.

Prints one JSON object (also written to ``--out/accuracy.json``, or ``accuracy-TAG.json``
for a ``--tag`` variant; earlier invocations' datasets and presets are kept in it) with, per dataset and
preset: per fold and pooled over all held-out images, totalF1 / meanF1 / precision / recall
per class, the class-of-interest index error (Ki-67 index for BCData: per image
``|predicted - true positive share|``, mean and RMSE), steps and wall time of training.
Finished runs are reused when started again (``--out`` keeps them), so an interrupted
benchmark resumes.

Usage::

    python benchmarks/accuracy.py                                  # both datasets, fcrn, ours, ours_plus_plus
    python benchmarks/accuracy.py --datasets bcdata --presets ours_plus_plus --folds 5
    python benchmarks/accuracy.py --quick                          # 6 steps per run: checks the pipeline
    python benchmarks/accuracy.py --datasets endonuke --presets ours --tag no-balance \
        --train-args=--no-balance-classes                          # a variant (note the =)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RADIUS = {"bcdata": 10.0, "endonuke": 6.0}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="endonuke,bcdata", help="comma-separated: bcdata, endonuke")
    p.add_argument("--presets", default="ours_plus_plus,fcrn,ours", help="comma-separated preset names")
    p.add_argument("--folds", type=int, default=3, help="BCData cross-validation folds")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    p.add_argument("--bcdata", type=Path, default=ROOT.parent / "shared" / "data" / "bcdata_sample")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "accuracy")
    p.add_argument("--quick", action="store_true", help="6 training steps per run (a pipeline check)")
    p.add_argument("--train-args", default="", help="extra cellkit train options (default: none)")
    p.add_argument("--plot", type=Path, default=None,
                   help="only draw validation F1 against step of the finished runs in --out into this PNG")
    p.add_argument("--table", action="store_true",
                   help="only print a Markdown table of the results recorded in --out (accuracy*.json)")
    p.add_argument("--tag", default="", help="name of a variant run with --train-args (results in PRESET-TAG/)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- folds


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src.resolve(), dst)


def bcdata_subset(root: Path, stems: list[str], dst: Path) -> None:
    """``dst`` in BCData's layout holding links to the images ``stems`` of split ``test``."""
    for stem in stems:
        _link(root / "images" / "test" / f"{stem}.png", dst / "images" / "test" / f"{stem}.png")
        for label in ("positive", "negative"):
            _link(root / "annotations" / "test" / label / f"{stem}.h5",
                  dst / "annotations" / "test" / label / f"{stem}.h5")


def endonuke_subset(root: Path, stems: list[str], dst: Path) -> None:
    for stem in stems:
        _link(root / "images" / f"{stem}.png", dst / "images" / f"{stem}.png")
        _link(root / "labels" / f"{stem}.txt", dst / "labels" / f"{stem}.txt")


def folds_for(dataset: str, args: argparse.Namespace) -> tuple[Path, list[tuple[list[str], list[str]]]]:
    """The dataset root and ``(train stems, test stems)`` per fold."""
    from cellkit.data import bundled_endonuke, load_dataset, split_by_group
    from cellkit.data.formats import get_format

    if dataset == "bcdata":
        root = args.bcdata
        stems = sorted((p.stem for p in (root / "images" / "test").glob("*.png")), key=int)
        order = np.random.default_rng(args.seed).permutation(len(stems))
        folds = []
        for k in range(args.folds):
            test = sorted((stems[i] for i in order[k :: args.folds]), key=int)
            folds.append(([s for s in stems if s not in test], test))
        return root, folds
    root = Path(bundled_endonuke())
    samples = load_dataset(root, "endonuke")
    parts = split_by_group(samples, get_format("endonuke").group, fractions=(0.85, 0.0, 0.15), seed=0,
                           names=("train", "val", "test"))
    stem = lambda s: Path(s.path).stem
    return root, [([stem(s) for s in parts["train"]], [stem(s) for s in parts["test"]])]


# --------------------------------------------------------------------------- one run


def cellkit(*argv: str, log_path: Path) -> float:
    """Run ``cellkit ARGV`` in a subprocess (its output to ``log_path``); returns seconds."""
    started = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write("$ cellkit " + " ".join(argv) + "\n")
        fh.flush()
        proc = subprocess.run([sys.executable, "-m", "cellkit.cli", *argv], stdout=fh, stderr=subprocess.STDOUT,
                              cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"cellkit {' '.join(argv)} failed (status {proc.returncode}); see {log_path}")
    return time.perf_counter() - started


def index_errors(pred_dir: Path, test_root: Path, dataset: str) -> list[float]:
    """Per image ``|predicted - true share of class 1|`` (images with no cell at all are skipped)."""
    from cellkit.data import load_dataset
    from cellkit.engine.evaluate import read_prediction_csv

    errors = []
    for s in load_dataset(test_root, dataset):
        det = read_prediction_csv(pred_dir / f"{Path(s.path).stem}.csv")
        true_n, pred_n = len(s.classes), len(det.classes)
        if true_n == 0 or pred_n == 0:
            if true_n or pred_n:
                errors.append(1.0 if (true_n and (s.classes == 1).any()) or (pred_n and (det.classes == 1).any())
                              else 0.0)
            continue
        errors.append(abs(float(np.mean(det.classes == 1)) - float(np.mean(s.classes == 1))))
    return errors


def run_one(dataset: str, preset: str, fold: int, root: Path, train: list[str], test: list[str],
            args: argparse.Namespace) -> dict[str, Any]:
    base = args.out / dataset / (f"{preset}-{args.tag}" if args.tag else preset) / f"fold{fold}"
    result_path = base / "result.json"
    if result_path.is_file():
        log(f"[{dataset} {preset} fold {fold}] finished earlier: {result_path}")
        return json.loads(result_path.read_text())
    subset = bcdata_subset if dataset == "bcdata" else endonuke_subset
    train_dir, test_dir = args.out / dataset / "folds" / f"fold{fold}" / "train", \
        args.out / dataset / "folds" / f"fold{fold}" / "test"
    subset(root, train, train_dir)
    subset(root, test, test_dir)
    base.mkdir(parents=True, exist_ok=True)
    run, pred, log_path = base / "run", base / "pred", base / "log.txt"
    extra = args.train_args.split() if args.train_args else []
    if args.quick:
        extra += ["--steps", "6", "--val-every-steps", "3"]
    resume = ["--resume"] if (run / "config.yaml").exists() else []
    log(f"[{dataset} {preset} fold {fold}] cellkit train ({len(train)} images) -> {run}")
    train_s = cellkit("train", "--preset", preset, "--data", str(train_dir), "--format", dataset,
                      "--out", str(run), *extra, *resume, log_path=log_path)
    images = sorted(str(p) for p in (test_dir / "images").rglob("*.png"))
    cellkit("predict", "--checkpoint", str(run / "best.pt"), "--out", str(pred), "--no-overlay", *images,
            log_path=log_path)
    cellkit("evaluate", "--pred", str(pred), "--data", str(test_dir), "--format", dataset,
            "--radius", str(RADIUS[dataset]), "--json", str(base / "evaluation.json"), log_path=log_path)
    evaluation = json.loads((base / "evaluation.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cal_path = run / "calibration.json"
    result = {
        "dataset": dataset, "preset": preset, "fold": fold, "train_images": len(train), "test_images": test,
        "radius": RADIUS[dataset], "evaluation": evaluation, "index_errors": index_errors(pred, test_dir, dataset),
        "train_seconds": round(train_s, 1), "steps": int(sum(m["steps"] for m in metrics)),
        "validation": [{"step": m.get("step"), "f1": m.get("f1"), "score": m.get("score")} for m in metrics],
        "calibration": json.loads(cal_path.read_text()) if cal_path.is_file() else None,
    }
    result_path.write_text(json.dumps(result, indent=2))
    return result


# --------------------------------------------------------------------------- summary


def _classes(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return evaluation["classes"] if "classes" in evaluation else evaluation["report"]["classes"]


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per class: mean and std over folds of totalF1 and meanF1, and pooled counts."""
    names = list(_classes(results[0]["evaluation"]))
    out: dict[str, Any] = {"folds": len(results), "classes": {}}
    for name in names:
        per = [_classes(r["evaluation"])[name] for r in results]
        tp, fp, fn = (sum(int(c[k]) for c in per) for k in ("tp", "fp", "fn"))
        prec = tp / (tp + fp) if tp + fp else 1.0
        rec = tp / (tp + fn) if tp + fn else 1.0
        f1s = np.array([float(c["total_f1"]) for c in per])
        means = np.array([float(c["mean_f1"]) if c["mean_f1"] is not None else np.nan for c in per])
        out["classes"][name] = {
            "total_f1_pooled": round(2 * prec * rec / (prec + rec) if prec + rec else 0.0, 4),
            "precision_pooled": round(prec, 4), "recall_pooled": round(rec, 4),
            "total_f1_mean": round(float(f1s.mean()), 4), "total_f1_std": round(float(f1s.std()), 4),
            "mean_f1_mean": round(float(np.nanmean(means)), 4),
            "total_f1_per_fold": [round(float(v), 4) for v in f1s],
        }
    errors = np.array([e for r in results for e in r["index_errors"]], dtype=float)
    out["index_error_mae"] = round(float(errors.mean()), 4) if len(errors) else None
    out["index_error_rmse"] = round(float(np.sqrt((errors**2).mean())), 4) if len(errors) else None
    out["held_out_images"] = len(errors)
    out["steps"] = [r["steps"] for r in results]
    out["train_minutes"] = [round(r["train_seconds"] / 60, 2) for r in results]
    return out


def machine() -> dict[str, Any]:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "cellkit"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = "unknown", False
    return {"commit": commit + ("+dirty" if dirty else ""), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def plot_curves(out: Path, png: Path) -> Path:
    """Validation F1 (calibrated, each run's own validation images) against the step.

    One panel per dataset, one colour per preset, one line style per class; the line is the
    mean over folds and the band its range. Variant runs (``PRESET-TAG``) are drawn too.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(d.name for d in out.iterdir() if d.is_dir() and (d.name in RADIUS))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        runs = sorted(p for p in (out / dataset).iterdir() if p.is_dir() and p.name != "folds")
        for colour, preset_dir in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs):
            curves: dict[str, list[tuple[list[int], list[float]]]] = {}
            for result in sorted(preset_dir.glob("fold*/result.json")):
                validation = json.loads(result.read_text())["validation"]
                for name in (validation[-1]["f1"] or {}):
                    pts = [(v["step"], v["f1"][name]) for v in validation if v["f1"] and v["f1"].get(name) is not None]
                    curves.setdefault(name, []).append(([p[0] for p in pts], [p[1] for p in pts]))
            for style, (name, folds) in zip(("-", "--", ":"), sorted(curves.items())):
                n = min(len(f[0]) for f in folds)
                steps = folds[0][0][:n]
                values = np.array([f[1][:n] for f in folds])
                ax.plot(steps, values.mean(0), style, color=colour, label=f"{preset_dir.name}: {name}")
                if len(folds) > 1:
                    ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.12)
        ax.set_title(f"{dataset}: validation F1 against step")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("total F1 (validation, calibrated)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def table(out: Path) -> str:
    """A Markdown table of every recorded summary: per class pooled totalF1 (mean ± std over folds)."""
    lines = ["| dataset | preset | class | totalF1 (pooled) | totalF1 per fold: mean ± std | precision | recall "
             "| index error MAE | steps | train min |", "|" + "---|" * 10]
    for path in sorted(out.glob("accuracy*.json")):
        report = json.loads(path.read_text())
        for dataset, entry in report["datasets"].items():
            for preset, summary in entry["presets"].items():
                for i, (name, c) in enumerate(summary["classes"].items()):
                    first = i == 0
                    lines.append(
                        f"| {dataset if first else ''} | {preset if first else ''} | {name} | {c['total_f1_pooled']:.3f} "
                        f"| {c['total_f1_mean']:.3f} ± {c['total_f1_std']:.3f} | {c['precision_pooled']:.3f} "
                        f"| {c['recall_pooled']:.3f} | {summary['index_error_mae'] if first else ''} "
                        f"| {','.join(map(str, summary['steps'])) if first else ''} "
                        f"| {','.join(map(str, summary['train_minutes'])) if first else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    if args.plot is not None:
        print(plot_curves(args.out, args.plot))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (f"accuracy-{args.tag}.json" if args.tag else "accuracy.json")
    # Runs of earlier invocations (other datasets or presets) are kept beside this one's.
    report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
    report.setdefault("runs", []).append({"machine": machine(), "command": " ".join(sys.argv)})
    for dataset in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if dataset not in RADIUS:
            raise SystemExit(f"unknown dataset {dataset!r}; expected one of {sorted(RADIUS)}")
        root, folds = folds_for(dataset, args)
        entry = report["datasets"].setdefault(dataset, {"presets": {}})
        entry.update({"radius": RADIUS[dataset], "folds": [f[1] for f in folds]})
        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            results = [run_one(dataset, preset, k, root, train, test, args) for k, (train, test) in enumerate(folds)]
            summary = summarise(results)
            if args.train_args:
                summary["train_args"] = args.train_args
            entry["presets"][f"{preset}-{args.tag}" if args.tag else preset] = summary
            log(f"[{dataset} {preset}] " + json.dumps(summary))
            path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    path.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
