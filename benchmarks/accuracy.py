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
* ``endonuke``: the bundled EndoNuke sample; r = 6 px. ``--split ranges`` (the default):
  **leave-one-range-out** over the sample's three runs of tile ids (321-784, 1010-1081,
  4560-4787; ``cellkit.data.id_runs`` with a gap of 100), so every held-out tile comes from a
  place the model never saw: the figure that stands for new slides. ``--split blocks``: the
  earlier split, the 15 % test part of the group split by tile-id blocks of 10 (seed 0), whose
  held-out tiles sit beside training tiles of their own region (a within-region figure).

Prints one JSON object (also written to ``--out/accuracy.json``, or ``accuracy-TAG.json``
for a ``--tag`` variant; earlier invocations' datasets and presets are kept in it) with, per dataset and
preset: per fold and pooled over all held-out images, totalF1 / meanF1 / precision / recall
per class, the class-of-interest index error (Ki-67 index for BCData: per image
``|predicted - true positive share|``, mean and RMSE), steps and wall time of training.
``--seeds N`` trains every fold with seeds 0..N-1 (``cellkit train --seed``); the summary pools
all folds and seeds, and gives the spread over seeds, the figures per held-out fold, and
per-image counts (``per_image`` in each ``result.json``) for paired comparisons
(``--compare A B``: the paired bootstrap of B - A over the held-out images and seeds).
Finished runs are reused when started again (``--out`` keeps them), so an interrupted
benchmark resumes.

Usage::

    python benchmarks/accuracy.py                                  # both datasets, fcrn, ours, ours_plus_plus
    python benchmarks/accuracy.py --datasets bcdata --presets ours_plus_plus --folds 5
    python benchmarks/accuracy.py --quick                          # 6 steps per run: checks the pipeline
    python benchmarks/accuracy.py --datasets endonuke --presets ours --seeds 2   # leave-one-range-out
    python benchmarks/accuracy.py --datasets endonuke --split blocks --presets ours   # within-region
    python benchmarks/accuracy.py --compare endonuke-ranges/ours endonuke-ranges/ours-aug   # paired
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import contention, load_average  # noqa: E402

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
    p.add_argument("--split", choices=("ranges", "blocks"), default="ranges",
                   help="EndoNuke: leave-one-range-out (across regions) or the 15%% held-out blocks of 10 ids "
                   "(within a region)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per fold (0..N-1)")
    p.add_argument("--predict-args", default="", help="extra cellkit predict options (e.g. --tta 8)")
    p.add_argument("--checkpoints-of", default=None, metavar="PRESET[-TAG]",
                   help="train nothing: predict with the finished runs of this variant (for --predict-args)")
    p.add_argument("--transfer-table", metavar="DATASET", default=None,
                   help="only print a Markdown table of every variant under --out/DATASET (e.g. endonuke-ranges): "
                   "pooled totalF1 per class (mean +- std over seeds), per held-out fold, and the paired "
                   "bootstrap difference to --baseline")
    p.add_argument("--baseline", default="ours", help="the variant --transfer-table compares against")
    p.add_argument("--transfer-plot", nargs=2, metavar=("DATASET", "PNG"), default=None,
                   help="only draw the variants under --out/DATASET: pooled totalF1 per class (bars: mean over "
                   "seeds) and each held-out fold (dots), into PNG")
    p.add_argument("--within", default=None, metavar="DATASET/VARIANT=LABEL",
                   help="with --transfer-plot: also mark a within-region run's pooled totalF1 (dashed line)")
    p.add_argument("--steps-curve", nargs=2, metavar=("DATASET", "PNG"), default=None,
                   help="only draw pooled totalF1 per class against training steps of the --variants under "
                   "--out/DATASET (one dot per seed whose folds are all finished, a line through the means)")
    p.add_argument("--variants", default="ours,ours-s800,ours-s1600",
                   help="with --steps-curve: the variants (one schedule length each), comma-separated")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                   help="only print the paired bootstrap of B - A (folders DATASET/PRESET[-TAG] under --out)")
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
    stem = lambda s: Path(s.path).stem
    if getattr(args, "split", "blocks") == "ranges":
        from cellkit.data import group_folds, id_runs

        return root, [([stem(s) for s in train], [stem(s) for s in test])
                      for _, train, test in group_folds(samples, id_runs(samples, gap=100))]
    from cellkit.data import endonuke_group

    parts = split_by_group(samples, endonuke_group, fractions=(0.85, 0.0, 0.15), seed=0,
                           names=("train", "val", "test"))
    return root, [([stem(s) for s in parts["train"]], [stem(s) for s in parts["test"]])]


def dataset_label(dataset: str, args: argparse.Namespace) -> str:
    """The results folder of a dataset: ``endonuke-ranges`` for the leave-one-range-out split."""
    return f"{dataset}-ranges" if dataset == "endonuke" and getattr(args, "split", "blocks") == "ranges" else dataset


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


def per_image_counts(pred_dir: Path, test_root: Path, dataset: str) -> dict[str, Any]:
    """Per held-out image: ``tp``, ``fp``, ``fn`` per class at the dataset's radius (for paired tests)."""
    from cellkit.engine.evaluate import evaluate_folder
    from cellkit.metrics import detection_counts

    result = evaluate_folder(pred_dir, test_root, dataset, radius=RADIUS[dataset])
    out: dict[str, Any] = {"classes": list(result.class_names), "images": {}}
    for key, det, (points, classes) in zip(result.keys, result.predictions, result.truths):
        tp, fp, fn = detection_counts(det.points, det.classes, points, classes, RADIUS[dataset],
                                      result.num_classes)
        out["images"][key] = {"tp": [int(v) for v in tp], "fp": [int(v) for v in fp], "fn": [int(v) for v in fn]}
    return out


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
            args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    label = dataset_label(dataset, args)
    name = f"fold{fold}" + (f"-seed{seed}" if seed else "")
    base = args.out / label / (f"{preset}-{args.tag}" if args.tag else preset) / name
    result_path = base / "result.json"
    if result_path.is_file():
        log(f"[{label} {preset} fold {fold} seed {seed}] finished earlier: {result_path}")
        return json.loads(result_path.read_text())
    subset = bcdata_subset if dataset == "bcdata" else endonuke_subset
    train_dir, test_dir = args.out / label / "folds" / f"fold{fold}" / "train", \
        args.out / label / "folds" / f"fold{fold}" / "test"
    subset(root, train, train_dir)
    subset(root, test, test_dir)
    base.mkdir(parents=True, exist_ok=True)
    run, pred, log_path = base / "run", base / "pred", base / "log.txt"
    extra = args.train_args.split() if args.train_args else []
    if seed:
        extra += ["--seed", str(seed)]
    if args.quick:
        extra += ["--steps", "6", "--val-every-steps", "3"]
    load_start = None  # the load average before training (none when the checkpoints come from another variant)
    if getattr(args, "checkpoints_of", None):
        run = args.out / label / args.checkpoints_of / name / "run"
        if not (run / "best.pt").is_file():
            raise SystemExit(f"--checkpoints-of {args.checkpoints_of}: {run / 'best.pt'} is missing; train it first")
        train_s = json.loads((run.parent / "result.json").read_text())["train_seconds"]
    else:
        resume = ["--resume"] if (run / "config.yaml").exists() else []
        log(f"[{label} {preset} fold {fold} seed {seed}] cellkit train ({len(train)} images) -> {run}")
        load_start = load_average()
        train_s = cellkit("train", "--preset", preset, "--data", str(train_dir), "--format", dataset,
                          "--out", str(run), *extra, *resume, log_path=log_path)
    images = sorted(str(p) for p in (test_dir / "images").rglob("*.png"))
    predict_extra = args.predict_args.split() if getattr(args, "predict_args", "") else []
    overwrite = ["--overwrite"] if pred.exists() else []
    predict_s = cellkit("predict", "--checkpoint", str(run / "best.pt"), "--out", str(pred), "--no-overlay",
                        *predict_extra, *overwrite, *images, log_path=log_path)
    cellkit("evaluate", "--pred", str(pred), "--data", str(test_dir), "--format", dataset,
            "--radius", str(RADIUS[dataset]), "--json", str(base / "evaluation.json"), log_path=log_path)
    evaluation = json.loads((base / "evaluation.json").read_text())
    loads = {"start": load_start, "end": load_average()}
    warning = contention(loads["start"], loads["end"])
    if warning:
        log(f"[{label} {preset} fold {fold} seed {seed}] {warning}")
    timings = {stage: json.loads(p.read_text()) for stage, p in (("train", run / "timings.json"),
                                                                   ("pretrain", run / "pretrain" / "timings.json"))
               if p.is_file()}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cal_path = run / "calibration.json"
    result = {
        "dataset": dataset, "preset": preset, "fold": fold, "seed": seed, "train_images": len(train),
        "test_images": test, "train_args": args.train_args, "predict_args": getattr(args, "predict_args", ""),
        "predict_seconds": round(predict_s, 1), "per_image": per_image_counts(pred, test_dir, dataset),
        "radius": RADIUS[dataset], "evaluation": evaluation, "index_errors": index_errors(pred, test_dir, dataset),
        "train_seconds": round(train_s, 1), "steps": int(sum(m["steps"] for m in metrics)),
        "validation": [{"step": m.get("step"), "f1": m.get("f1"), "score": m.get("score")} for m in metrics],
        "calibration": json.loads(cal_path.read_text()) if cal_path.is_file() else None,
        "timings": timings, "load_average_1min": loads, "contended": warning is not None,
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


def _pooled_f1(counts: np.ndarray) -> np.ndarray:
    """totalF1 per class of summed ``(..., 3, C)`` counts (tp, fp, fn)."""
    tp, fp, fn = counts[0], counts[1], counts[2]
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def compare(a: Path, b: Path, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of pooled totalF1, B - A, over held-out images (with their seeds).

    Runs are paired by (fold, seed) and image; a resample draws images with replacement and
    recomputes each side's pooled totalF1 from the per-image counts.
    """
    def load(folder: Path) -> dict[tuple[str, str], np.ndarray]:
        out = {}
        for result in sorted(folder.glob("fold*/result.json")):
            r = json.loads(result.read_text())
            for key, c in r["per_image"]["images"].items():
                out[(result.parent.name, key)] = np.array([c["tp"], c["fp"], c["fn"]], dtype=float)
            classes = r["per_image"]["classes"]
        return out, classes

    ca, names = load(a)
    cb, _ = load(b)
    keys = sorted(set(ca) & set(cb))
    if not keys:
        raise SystemExit(f"no (run, image) pair in common between {a} and {b}")
    xa, xb = np.stack([ca[k] for k in keys]), np.stack([cb[k] for k in keys])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), size=(n_boot, len(keys)))
    diffs = np.stack([_pooled_f1(xb[i].sum(0)) - _pooled_f1(xa[i].sum(0)) for i in idx])
    point = _pooled_f1(xb.sum(0)) - _pooled_f1(xa.sum(0))
    out = {"a": str(a), "b": str(b), "pairs": len(keys), "classes": {}}
    for c, name in enumerate(names):
        lo, hi = np.nanpercentile(diffs[:, c], [2.5, 97.5])
        out["classes"][name] = {"a": round(float(_pooled_f1(xa.sum(0))[c]), 4),
                                "b": round(float(_pooled_f1(xb.sum(0))[c]), 4),
                                "b_minus_a": round(float(point[c]), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]}
    return out


def _variants(folder: Path, baseline: str) -> list[str]:
    """The variant folders under ``folder`` with finished runs, ``baseline`` first."""
    variants = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "folds"
                      and any(p.glob("fold*/result.json")))
    return [baseline] + [v for v in variants if v != baseline] if baseline in variants else variants


def transfer_table(folder: Path, baseline: str = "ours") -> str:
    """Markdown: per variant, pooled totalF1 per class over all folds (mean +- std over seeds),
    per held-out fold (pooled over seeds), and B - baseline with its paired bootstrap 95 % interval."""
    lines: list[str] = []
    for name in _variants(folder, baseline):
        classes, per_seed, per_fold = _variant_scores(folder / name)
        cells = [f"{per_seed[:, c].mean():.3f} ± {per_seed[:, c].std():.3f}" for c in range(len(classes))]
        fold_text = [" / ".join(f"{f[c]:.2f}" for f in per_fold.values()) for c in range(len(classes))]
        diff = ["" for _ in classes]
        if name != baseline and (folder / baseline).is_dir():
            cmp = compare(folder / baseline, folder / name)
            diff = [f"{cmp['classes'][c]['b_minus_a']:+.3f} [{cmp['classes'][c]['ci95'][0]:+.3f}, "
                    f"{cmp['classes'][c]['ci95'][1]:+.3f}]" for c in classes]
        if not lines:
            head = " | ".join(f"{c} totalF1 | {c} per fold | {c} vs {baseline}" for c in classes)
            lines = [f"| variant | runs | {head} |", "|---|---|" + "---|" * (3 * len(classes))]
        body = " | ".join(f"{cells[c]} | {fold_text[c]} | {diff[c]}" for c in range(len(classes)))
        lines.append(f"| {name} | {len(per_fold)} folds x {len(per_seed)} seeds | {body} |")
    return "\n".join(lines)


def _variant_scores(folder: Path) -> tuple[list[str], np.ndarray, dict[int, np.ndarray]]:
    """Class names, pooled totalF1 per seed ``(S, C)`` and per held-out fold ``{fold: (C,)}`` (pooled over seeds)."""
    results = [json.loads(r.read_text()) for r in sorted(folder.glob("fold*/result.json"))]
    classes = results[0]["per_image"]["classes"]

    def pooled(rs: list[dict[str, Any]]) -> np.ndarray:
        return _pooled_f1(sum(np.array([[c["tp"], c["fp"], c["fn"]] for c in r["per_image"]["images"].values()])
                              .sum(0) for r in rs))

    seeds = sorted({r.get("seed", 0) for r in results})
    per_seed = np.array([pooled([r for r in results if r.get("seed", 0) == s]) for s in seeds])
    per_fold = {k: pooled([r for r in results if r["fold"] == k]) for k in sorted({r["fold"] for r in results})}
    return classes, per_seed, per_fold


def transfer_plot(folder: Path, png: Path, baseline: str = "ours", within: tuple[Path, str] | None = None) -> Path:
    """Bars: each variant's pooled totalF1 per class (mean over seeds; whiskers: the seeds' range);
    dots: each held-out fold. A dashed line: a within-region run's pooled totalF1, when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = _variants(folder, baseline)
    scores = {v: _variant_scores(folder / v) for v in variants}
    classes = scores[variants[0]][0]
    fig, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 3.4), squeeze=False)
    markers = "os^Dv"
    for c, (ax, name) in enumerate(zip(axes[0], classes)):
        for i, v in enumerate(variants):
            _, per_seed, per_fold = scores[v]
            mean = per_seed[:, c].mean()
            ax.bar(i, mean, color="#9ecae1" if v == baseline else "#3182bd", width=0.6)
            if len(per_seed) > 1:
                ax.plot([i, i], [per_seed[:, c].min(), per_seed[:, c].max()], color="k", lw=1)
            for k, f in per_fold.items():
                ax.plot(i + 0.18, f[c], markers[k % len(markers)], color="#e6550d", ms=4,
                        label=f"held-out fold {k}" if i == 0 else None)
            ax.text(i, 0.02, f"{mean:.2f}", ha="center", va="bottom", fontsize=8, color="white")
        if within is not None:
            out, spec = within
            path, _, label = spec.partition("=")
            _, w_seed, _ = _variant_scores(out / path)
            ax.axhline(w_seed[:, c].mean(), ls="--", color="#636363", lw=1, label=label or "within region")
        ax.set_xticks(range(len(variants)), variants, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("totalF1, held-out range (pooled)")
        ax.set_title(f"{name}: across regions")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def steps_points(folder: Path, variants: list[str]) -> tuple[list[str], list[tuple[int, int, np.ndarray]]]:
    """``(classes, [(steps, seed, pooled totalF1 per class)])`` of each seed of each variant that
    finished every fold of its variant (a seed still running would be pooled over fewer ranges)."""
    classes: list[str] = []
    points = []
    for v in variants:
        results = [json.loads(r.read_text()) for r in sorted((folder / v).glob("fold*/result.json"))]
        if not results:
            raise SystemExit(f"--steps-curve: no finished runs in {folder / v}")
        classes = results[0]["per_image"]["classes"]
        folds = {r["fold"] for r in results}
        for seed in sorted({r.get("seed", 0) for r in results}):
            mine = [r for r in results if r.get("seed", 0) == seed]
            if {r["fold"] for r in mine} != folds:
                continue
            counts = sum(np.array([[c["tp"], c["fp"], c["fn"]] for c in r["per_image"]["images"].values()]).sum(0)
                         for r in mine)
            points.append((int(mine[0]["steps"]), seed, _pooled_f1(counts)))
    return classes, points


def steps_curve(folder: Path, png: Path, variants: list[str]) -> Path:
    """Pooled totalF1 per class against the training steps: a dot per seed, a line through the means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes, points = steps_points(folder, variants)
    steps = sorted({p[0] for p in points})
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for c, (name, color) in enumerate(zip(classes, ("#3182bd", "#e6550d", "#31a354"))):
        means = [np.mean([p[2][c] for p in points if p[0] == n]) for n in steps]
        ax.plot(steps, means, "-", color=color, label=name)
        ax.plot([p[0] for p in points], [p[2][c] for p in points], "o", color=color, ms=4, alpha=0.7)
        for n, m in zip(steps, means):
            ax.annotate(f"{m:.3f}", (n, m), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(n) for n in steps])
    ax.set_xlabel("training steps (batches of 8 crops)")
    ax.set_ylabel("totalF1, held-out (pooled)")
    ax.set_title(f"{folder.name}: {', '.join(variants)}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


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
    if args.transfer_plot is not None:
        print(transfer_plot(args.out / args.transfer_plot[0], Path(args.transfer_plot[1]), args.baseline,
                            args.within and (args.out, args.within)))
        return 0
    if args.transfer_table is not None:
        print(transfer_table(args.out / args.transfer_table, args.baseline))
        return 0
    if args.steps_curve is not None:
        print(steps_curve(args.out / args.steps_curve[0], Path(args.steps_curve[1]),
                          [v.strip() for v in args.variants.split(",") if v.strip()]))
        return 0
    if args.compare is not None:
        print(json.dumps(compare(args.out / args.compare[0], args.out / args.compare[1]), indent=2))
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
        label = dataset_label(dataset, args)
        entry = report["datasets"].setdefault(label, {"presets": {}})
        entry.update({"radius": RADIUS[dataset], "folds": [f[1] for f in folds]})
        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            results = [run_one(dataset, preset, k, root, train, test, args, seed)
                       for seed in range(args.seeds) for k, (train, test) in enumerate(folds)]
            summary = summarise(results)
            if args.seeds > 1:
                summary["per_seed"] = {str(seed): summarise([r for r in results if r.get("seed", 0) == seed])["classes"]
                                       for seed in range(args.seeds)}
                for name, c in summary["classes"].items():
                    pooled = [summary["per_seed"][str(seed)][name]["total_f1_pooled"] for seed in range(args.seeds)]
                    c["total_f1_seed_std"] = round(float(np.std(pooled)), 4)
            summary["per_fold"] = {str(k): summarise([r for r in results if r["fold"] == k])["classes"]
                                   for k in range(len(folds))}
            if args.train_args:
                summary["train_args"] = args.train_args
            if args.predict_args:
                summary["predict_args"] = args.predict_args
            entry["presets"][f"{preset}-{args.tag}" if args.tag else preset] = summary
            log(f"[{label} {preset}] " + json.dumps(summary["classes"]))
            path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    path.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
