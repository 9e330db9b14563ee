"""Reproduce the paper's Table 1, Fig. 2 and Fig. 3 on real IHC data, with intervals.

Trains and evaluates the rows of Table 1 (FCRN, EstimateMask, Ours, Ours+, Ours++) and
the component ablations the paper does not show, over several seeds, with cellkit's
default recipe (what ``cellkit train`` does with no option), and answers the paper's
claims with paired differences per image and bootstrap 95 % intervals::

    # BCData: 3-fold cross-validation over all images, 3 seeds per fold
    python examples/reproduce_paper.py --data ../shared/data/bcdata_sample --format bcdata
    # the bundled EndoNuke sample, leave-one-range-out (3 folds: each run of tile ids held
    # out in turn, so every held-out tile comes from a place the models never saw), 3 seeds
    python examples/reproduce_paper.py
    # the earlier within-region split (15 % of tile-id blocks of 10; the shipped model's before)
    python examples/reproduce_paper.py --holdout blocks
    python examples/reproduce_paper.py --rows table1     # the five rows of Table 1 only
    python examples/reproduce_paper.py --preset quick    # 150 steps: a short look
    python examples/reproduce_paper.py --preset paper --device cuda   # ResNet-101
    python examples/reproduce_paper.py --smoke           # a few steps: checks the pipeline

Every held-out image is predicted by the model of the fold that did not train on it, so
each image is counted once per seed. Writes into ``--out`` (default
``results/reproduce-<dataset>-<preset>``):

* ``table1.md`` / ``table1.csv``: per row the pooled totalF1 and meanF1 of both classes
  (mean +- standard deviation over seeds), the Ki-67 / positivity index error (MAE and RMSE
  of the share of class 1 per image), and the paired difference to ``Ours``;
* ``comparisons.md`` / ``comparisons.csv``: every claim (a row against its reference) with
  the paired difference and its bootstrap 95 % interval, and the share of bootstrap
  draws in which the row is better;
* ``fig3.png`` / ``fig3.csv``: F1 of class 1 against the matching radius r, mean over seeds
  with the seeds' range as a band; ``fig2.png``: Ours, Ours++ and the truth on the
  held-out images where the two differ most;
* ``per_image.json``: the per-image counts every figure is computed from (small; keep it
  as the record of the run), ``run_info.json`` (command, commit, machine, wall time) and
  ``runs/<row>/fold<k>/seed<s>/`` (the folders of ``cellkit train``).

A run that is interrupted and started again reuses the (row, fold, seed) runs already
finished and resumes the one in progress. ``--reuse per_image.json`` (repeatable) takes
finished runs from the record of an earlier run instead (for example the records kept in
``docs/images/``, when the run folders are gone): a run is taken only where its row, fold,
seed, radii and held-out images all match this run's; the others are trained. Fig. 2
needs the checkpoints, so it is drawn only where they are still there::

    python examples/reproduce_paper.py --reuse docs/images/results-endonuke-default/per_image.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import cellkit
from cellkit.data import FORMATS, bundled_endonuke, get_format, load_dataset, split_by_group
from cellkit.data.io import write_text_atomic
from cellkit.engine.predict import Predictor
from cellkit.engine.train import fit
from cellkit.metrics import detection_counts
from cellkit.presets import set_pretrain_fraction

# --------------------------------------------------------------------------- rows


def _drop_consistency(cfg: cellkit.CellkitConfig) -> cellkit.CellkitConfig:
    cfg.losses = [spec for spec in cfg.losses if spec.name != "consistency"]
    return cfg


def _fixed_dynamic_target(cfg: cellkit.CellkitConfig) -> cellkit.CellkitConfig:
    # The second decoder learns the same fixed circles as the main one: Lc without the
    # randomness of the polygons.
    cfg.targets["dynamic"] = cellkit.TargetSpec("circle", dict(cfg.targets["circle"].kwargs))
    return cfg


def _prior_only(cfg: cellkit.CellkitConfig) -> cellkit.CellkitConfig:
    cfg.model.heads = ("main", "prior")
    cfg.targets.pop("dynamic", None)
    cfg.losses = [spec for spec in cfg.losses if spec.name not in ("dynamic", "consistency")]
    return cfg


def _prior_at(fraction: float) -> Callable[[cellkit.CellkitConfig], cellkit.CellkitConfig]:
    def change(cfg: cellkit.CellkitConfig) -> cellkit.CellkitConfig:
        set_pretrain_fraction(cfg, fraction)
        return cfg

    return change


def _init_from(name: str) -> Callable[[cellkit.CellkitConfig], cellkit.CellkitConfig]:
    def change(cfg: cellkit.CellkitConfig) -> cellkit.CellkitConfig:
        cfg.train.init_from = name  # as cellkit train --init-from NAME
        return cfg

    return change


@dataclass(frozen=True)
class Row:
    """One row of the table: a preset, changed by ``change``; compared with ``against``."""

    preset: str
    slug: str  # its folder under runs/
    change: Callable[[cellkit.CellkitConfig], cellkit.CellkitConfig] | None = None
    against: tuple[str, ...] = ("Ours",)
    ablation: bool = False
    what: str = ""
    in_all: bool = True  # run by --rows all (else only when named)


ROWS: dict[str, Row] = {
    "FCRN": Row("fcrn", "fcrn", what="Gaussian density regression (baseline)"),
    "EstimateMask": Row("estimate_mask", "estimate_mask", what="estimated masks (baseline)"),
    "Ours": Row("ours", "ours", against=(), what="fixed circles, Lm"),
    "Ours+": Row("ours_plus", "ours_plus", what="+ dynamic decoder (Ld) and consistency (Lc)"),
    "Ours++": Row("ours_plus_plus", "ours_plus_plus", against=("Ours", "Ours+"),
                  what="+ prior decoder (Lp) from an early-stopped model"),
    # Component ablations (not in the paper).
    "Ours+ no Lc": Row("ours_plus", "ablation_dynamic_no_consistency", _drop_consistency,
                       ("Ours", "Ours+"), True, "dynamic decoder without the consistency loss"),
    "Ours+ fixed target": Row("ours_plus", "ablation_consistency_fixed_target", _fixed_dynamic_target,
                              ("Ours", "Ours+"), True, "consistency with a second decoder on fixed circles"),
    "Ours + prior": Row("ours_plus_plus", "ablation_prior_only", _prior_only, ("Ours",), True,
                        "the prior decoder alone (no dynamic decoder, no Lc)"),
    "Ours++ prior@10%": Row("ours_plus_plus", "ablation_prior_at_10", _prior_at(0.10), ("Ours", "Ours++"),
                            True, "stage 1 stopped at 10 % of stage 2's steps (default 25 %)"),
    "Ours++ prior@50%": Row("ours_plus_plus", "ablation_prior_at_50", _prior_at(0.50), ("Ours", "Ours++"),
                            True, "stage 1 stopped at 50 % of stage 2's steps"),
    # Not a method of the paper: the shipped model fine-tuned (by name only, not in 'all').
    "Ours fine-tuned": Row("ours", "ours_finetuned", _init_from("endonuke-epithelium"), ("Ours",), True,
                           "Ours started from the shipped endonuke-epithelium weights", in_all=False),
}
TABLE1 = ["FCRN", "EstimateMask", "Ours", "Ours+", "Ours++"]
#: ``--rows all``: Table 1 and the five component ablations.
ALL = [row for row, spec in ROWS.items() if spec.in_all]
#: Matching radius r of Table 1 per format (each dataset's convention). Everything else
#: (circle radius, peaks, validation radius) cellkit derives from the points, as for any user.
EVAL_RADIUS = {"endonuke": 6.0, "bcdata": 10.0}
#: Training schedules. ``default`` is what ``cellkit train`` does with no option (the
#: preset's steps; the numbers that go in the docs); ``quick`` a short look (150 steps);
#: ``paper`` the paper's model for a GPU; ``smoke`` a pipeline check.
SCHEDULES: dict[str, dict[str, Any]] = {
    "default": {"size": "cpu"},
    "quick": {"size": "cpu", "steps": 150},
    "paper": {"size": "paper"},
    "smoke": {"size": "cpu", "steps": 2, "val_every_steps": 2, "batch_size": 2, "crop_size": 64},
}
RADII = list(range(2, 21))
BOOTSTRAP_DRAWS = 2000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="dataset folder (default: the bundled EndoNuke sample)")
    p.add_argument("--format", default="endonuke", choices=sorted(FORMATS),
                   help="annotation format of --data (default: endonuke)")
    p.add_argument("--split", default=None, help="BCData split folder to read (default: all found)")
    p.add_argument("--preset", default="default", choices=["default", "quick", "paper"],
                   help="default: cellkit train's defaults (cpu size); quick: 150 steps; paper: ResNet-101")
    p.add_argument("--folds", type=int, default=None,
                   help="cross-validation folds over all images, split by group (default: 3 for bcdata; "
                   "1 = the dataset's held-out split, 15 %% of the groups, as for the shipped model)")
    p.add_argument("--holdout", choices=("ranges", "blocks"), default=None,
                   help="EndoNuke: ranges = leave-one-range-out, 3 folds across regions (default); blocks = "
                   "the earlier within-region split (held-out tiles beside training tiles)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row and fold (default: 3)")
    p.add_argument("--radius", type=float, default=None,
                   help="matching radius r in pixels for Table 1 (default: 6 for EndoNuke, 10 for BCData, "
                   "else 3/4 of the estimated cell diameter)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--rows", default=None,
                   help="comma-separated rows, or 'table1' (the paper's five) or 'all' (with the ablations). "
                   "Default: 'all' on one held-out split, 'table1' with cross-validation (k folds cost k "
                   f"times as much). Rows: {', '.join(ROWS).replace('%', '%%')}")
    p.add_argument("--reuse", type=Path, action="append", default=[], metavar="PER_IMAGE_JSON",
                   help="take finished (row, fold, seed) runs from the per_image.json of an earlier run "
                   "instead of training them again (repeatable; a run is taken only where row, fold, seed, "
                   "radii and held-out images match)")
    p.add_argument("--smoke", action="store_true", help="a few steps, few images, one seed (for tests)")
    return p.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_rows(n_folds: int) -> str:
    """The rows run without ``--rows``: every row on one held-out split; the paper's five
    with cross-validation, whose ``n_folds`` trainings per (row, seed) would take the ten
    rows past 3 hours on 2 cores (BCData: about 2.5-2.8 hours for Table 1, 6 for all ten)."""
    return "all" if n_folds <= 1 else "table1"


def choose_rows(spec: str) -> list[str]:
    if spec.strip() == "all":
        return list(ALL)
    if spec.strip() == "table1":
        return list(TABLE1)
    rows = [r.strip() for r in spec.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"reproduce_paper.py: error: unknown rows {unknown}; choose from {list(ROWS)}, "
                         "'table1' or 'all'")
    return rows


def row_config(row: str, schedule: dict[str, Any], seed: int, num_classes: int) -> cellkit.CellkitConfig:
    """The preset of ``row`` with cellkit's defaults, changed only by the row and the schedule."""
    spec = ROWS[row]
    kwargs: dict[str, Any] = {"size": schedule["size"], "num_classes": num_classes}
    if "steps" in schedule:
        kwargs["steps"] = schedule["steps"]
    cfg = cellkit.presets.PRESETS[spec.preset](**kwargs)
    if spec.change is not None:
        cfg = spec.change(cfg)
        cfg.name = f"{cfg.name}/{spec.slug}"
    for stage in (cfg, cfg.pretrain):
        if stage is None:
            continue
        t = stage.train
        for key in ("batch_size", "crop_size", "val_every_steps"):
            if key in schedule:
                setattr(t, key, schedule[key])
        t.seed = seed
    return cfg


# --------------------------------------------------------------------------- folds


def _natural(key: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(key))]


def make_folds(samples: list, fmt: str, folds: int, seed: int = 0, holdout: str = "blocks"
               ) -> list[tuple[list, list]]:
    """``(training images, held-out images)`` per fold; every image is held out exactly once.

    ``holdout="ranges"`` (EndoNuke): leave-one-range-out, one fold per run of tile ids
    (``cellkit.data.id_runs``, gap 100), ``folds`` is not used. Otherwise (``"blocks"``):
    ``folds == 1``: the dataset's split (15 % of the groups held out, ``split_by_group`` with
    seed 0; for EndoNuke tile-id blocks of 10, the shipped model's held-out tiles before
    issue 24). ``folds > 1``: the groups (EndoNuke tile blocks of 10; BCData images) in natural
    key order, permuted with ``default_rng(seed)`` and dealt round-robin (for BCData the folds
    of ``benchmarks/accuracy.py``).
    """
    if holdout == "ranges" and fmt == "endonuke":
        from cellkit.data import group_folds, id_runs

        return [(train, sorted(test, key=lambda s: _natural(s.key)))
                for _, train, test in group_folds(samples, id_runs(samples, gap=100))]
    if fmt == "endonuke":
        from cellkit.data import endonuke_group as group
    else:
        group = get_format(fmt).group or (lambda key: key)
    if folds == 1:
        parts = split_by_group(samples, group, fractions=(0.85, 0.0, 0.15), seed=0, names=("train", "val", "test"))
        return [(parts["train"], parts["test"])]
    groups = sorted({group(s.key) for s in samples}, key=_natural)
    if folds > len(groups):
        raise SystemExit(f"reproduce_paper.py: error: --folds {folds} needs at least {folds} groups of images, "
                         f"the data has {len(groups)}")
    order = np.random.default_rng(seed).permutation(len(groups))
    out = []
    for k in range(folds):
        held = {groups[i] for i in order[k::folds]}
        test = sorted((s for s in samples if group(s.key) in held), key=lambda s: _natural(s.key))
        train = [s for s in samples if group(s.key) not in held]
        out.append((train, test))
    return out


# --------------------------------------------------------------------------- one run


def load_records(paths: list[Path]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """Finished runs recorded in ``per_image.json`` files, by ``(row, fold, seed)``.

    A record is plain JSON (reading it runs nothing): ``{row: [run, ...]}`` where each run
    has ``row``, ``fold``, ``seed``, ``radius``, ``radii`` and ``images``, as
    [`run_one`][] writes them. A later file wins over an earlier one for the same run.
    """
    found: dict[tuple[str, int, int], dict[str, Any]] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise SystemExit(f"reproduce_paper.py: error: --reuse {path}: cannot read it ({exc.strerror}); "
                             "give the per_image.json of an earlier run") from None
        except json.JSONDecodeError as exc:
            raise SystemExit(f"reproduce_paper.py: error: --reuse {path} is not JSON ({exc}); give the "
                             "per_image.json of an earlier run") from None
        needed = ("row", "fold", "seed", "radius", "radii", "images")
        runs = [r for rs in data.values() for r in rs] if isinstance(data, dict) and all(
            isinstance(rs, list) for rs in data.values()) else None
        if runs is None or not all(isinstance(r, dict) and all(k in r for k in needed) for r in runs):
            raise SystemExit(f"reproduce_paper.py: error: --reuse {path} is not a per_image.json record: "
                             f"expected {{row: [run, ...]}} with runs holding {', '.join(needed)}; give the "
                             "per_image.json that reproduce_paper.py wrote")
        for r in runs:
            found[(r["row"], int(r["fold"]), int(r["seed"]))] = {**r, "reused_from": str(path)}
    return found


def take_record(record: dict[str, Any] | None, splits: dict[str, list], eval_radius: float,
                result_path: Path) -> dict[str, Any] | None:
    """``record`` as this run's result when it measured the same images at the same radii."""
    if record is None:
        return None
    keys = [s.key for s in splits["test"]]
    if ([i["key"] for i in record["images"]] != keys or float(record["radius"]) != float(eval_radius)
            or [float(r) for r in record["radii"]] != [float(r) for r in RADII]):
        log(f"[{record['row']} fold {record['fold']} seed {record['seed']}] the record in "
            f"{record['reused_from']} holds other images or radii: training it")
        return None
    write_text_atomic(result_path, json.dumps(record))
    log(f"[{record['row']} fold {record['fold']} seed {record['seed']}] taken from {record['reused_from']}")
    return record


def image_counts(pred: Any, truth_points: np.ndarray, truth_classes: np.ndarray, radii: list[float],
                 num_classes: int) -> np.ndarray:
    """``(len(radii), 3, C)``: tp, fp, fn per class at each matching radius, for one image."""
    out = np.zeros((len(radii), 3, num_classes), np.int64)
    for j, r in enumerate(radii):
        out[j] = np.stack(detection_counts(pred.points, pred.classes, truth_points, truth_classes, r, num_classes))
    return out


def run_one(row: str, fold: int, seed: int, cfg: cellkit.CellkitConfig, splits: dict[str, list], run_dir: Path,
            eval_radius: float, num_classes: int, device: str | None,
            record: dict[str, Any] | None = None, commit: str = "unknown") -> dict[str, Any]:
    """Train one (row, fold, seed) and count its held-out images; reuses a finished run.

    ``record``: the same run from an earlier run's ``per_image.json`` (``--reuse``), taken
    instead of training where it measured the same images at the same radii. ``commit``
    (the code that trains it) is kept in the result, so a reused run keeps its provenance.
    """
    result_path = run_dir / "test_result.json"
    if result_path.is_file():
        log(f"[{row} fold {fold} seed {seed}] finished earlier: reusing {result_path}")
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    taken = None if (run_dir / "config.yaml").is_file() else take_record(record, splits, eval_radius, result_path)
    if taken is not None:
        return taken
    started = time.time()
    resume = (run_dir / "config.yaml").is_file()  # fit marks a run folder with it first
    log(f"[{row} fold {fold} seed {seed}] training into {run_dir}" + (" (resuming)" if resume else ""))
    trained = fit(cfg, run_dir, splits=splits, resume=resume, device=device)
    train_seconds = time.time() - started
    predictor = Predictor.from_checkpoint(trained.best_path, device=device)
    radii = [float(eval_radius)] + [float(r) for r in RADII]
    images = []
    for s in splits["test"]:
        det = predictor.predict(s.image)
        counts = image_counts(det, s.points, s.classes, radii, num_classes)
        images.append({
            "key": s.key,
            "true": np.bincount(s.classes, minlength=num_classes)[:num_classes].tolist(),
            "pred": np.bincount(det.classes, minlength=num_classes)[:num_classes].tolist(),
            "counts": counts[0].tolist(),            # (3, C) at the table's radius
            "counts_vs_radius": counts[1:].tolist(),  # (len(RADII), 3, C)
        })
    result = {
        "row": row, "fold": fold, "seed": seed, "radius": float(eval_radius), "radii": RADII,
        "images": images, "best_checkpoint": str(trained.best_path),
        "train_seconds": round(train_seconds, 1), "seconds": round(time.time() - started, 1),
        "commit": commit,
    }
    write_text_atomic(result_path, json.dumps(result))
    return result


# --------------------------------------------------------------------------- statistics


@dataclass
class RowCounts:
    """One row's held-out counts: ``counts[seed, image, 3, C]`` at the table's radius."""

    keys: list[str]
    counts: np.ndarray            # (S, I, 3, C) tp, fp, fn
    counts_vs_radius: np.ndarray  # (S, I, R, 3, C)
    true: np.ndarray              # (I, C) true cells per class
    pred: np.ndarray              # (S, I, C) predicted cells per class
    seconds: list[float]


def gather(results: list[dict[str, Any]]) -> RowCounts:
    """Stack one row's runs (all folds and seeds) into arrays over the held-out images."""
    seeds = sorted({r["seed"] for r in results})
    by_seed: dict[int, dict[str, dict[str, Any]]] = {s: {} for s in seeds}
    for r in results:
        for image in r["images"]:
            by_seed[r["seed"]][image["key"]] = image
    keys = sorted(by_seed[seeds[0]], key=_natural)
    for s in seeds:
        if sorted(by_seed[s], key=_natural) != keys:
            raise ValueError(f"seed {s} covers other images than seed {seeds[0]}: a run is missing")
    counts = np.array([[by_seed[s][k]["counts"] for k in keys] for s in seeds], dtype=np.int64)
    vs_r = np.array([[by_seed[s][k]["counts_vs_radius"] for k in keys] for s in seeds], dtype=np.int64)
    true = np.array([by_seed[seeds[0]][k]["true"] for k in keys], dtype=np.int64)
    pred = np.array([[by_seed[s][k]["pred"] for k in keys] for s in seeds], dtype=np.int64)
    return RowCounts(keys, counts, vs_r, true, pred, [r["seconds"] for r in results])


def total_f1(counts: np.ndarray) -> np.ndarray:
    """Pooled F1 from ``(..., I, 3, C)`` counts: ``(..., C)`` (NaN for a class never seen)."""
    tp, fp, fn = (counts[..., k, :].sum(axis=-2) for k in range(3))
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)


def image_f1(counts: np.ndarray) -> np.ndarray:
    """Per-image F1 from ``(..., 3, C)`` counts (NaN where an image has no cell of the class)."""
    tp, fp, fn = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)


def index_error(rc: RowCounts, index: np.ndarray | None = None) -> np.ndarray:
    """``(S, I)`` absolute error of the share of class 1 per image (images with no cell: skipped)."""
    true, pred = rc.true, rc.pred
    if index is not None:
        true, pred = true[index], pred[:, index]
    n_true, n_pred = true.sum(-1), pred.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share_true = np.where(n_true > 0, true[..., 1] / np.maximum(n_true, 1), np.nan)
        share_pred = np.where(n_pred > 0, pred[..., 1] / np.maximum(n_pred, 1), 0.0)
    return np.abs(share_pred - share_true)


def _statistics(rc: RowCounts, images: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """``[totalF1(C) ..., meanF1(C) ..., index MAE]`` over the given images and seeds."""
    counts = rc.counts[seeds][:, images]                        # (S, I, 3, C)
    with warnings.catch_warnings():  # a class absent from the drawn images is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        pooled = np.nanmean(total_f1(counts), axis=0)            # (C,)
        per_image = np.nanmean(image_f1(counts), axis=1)         # (S, C): mean over images
        mean = np.nanmean(per_image, axis=0)
        err = index_error(rc, images)[seeds]
        return np.concatenate([pooled, mean, [np.nanmean(err)]])


def paired_bootstrap(a: RowCounts, b: RowCounts, draws: int = BOOTSTRAP_DRAWS,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Row ``a`` minus row ``b`` on the same images, with a bootstrap 95 % interval.

    Each draw resamples the held-out images with replacement (the same images for both rows:
    the pairing) and, independently for each row, its seeds with replacement (so the interval
    also holds the training's own randomness). The statistics are the pooled totalF1 and
    the per-image meanF1 of each class and the index MAE, averaged over the drawn seeds.

    Returns:
        ``{"diff": (K,), "low": (K,), "high": (K,), "better": (K,)}`` for the ``K = 2C + 1``
        statistics; ``better`` is the share of draws in which ``a`` is better (a higher F1, a
        lower index error).
    """
    if a.keys != b.keys:
        raise ValueError("paired_bootstrap needs both rows on the same held-out images")
    n_images, sa, sb = len(a.keys), a.counts.shape[0], b.counts.shape[0]
    everything = np.arange(n_images)
    diff = _statistics(a, everything, np.arange(sa)) - _statistics(b, everything, np.arange(sb))
    rng = np.random.default_rng(seed)
    samples = np.empty((draws, diff.size))
    for d in range(draws):
        images = rng.integers(0, n_images, n_images)
        samples[d] = (_statistics(a, images, rng.integers(0, sa, sa))
                      - _statistics(b, images, rng.integers(0, sb, sb)))
    low, high = np.nanpercentile(samples, [2.5, 97.5], axis=0)
    sign = np.ones(diff.size)
    sign[-1] = -1.0  # a lower index error is better
    better = np.mean(sign * samples > 0, axis=0)
    return {"diff": diff, "low": low, "high": high, "better": better}


def seed_spread(rc: RowCounts) -> dict[str, np.ndarray]:
    """Per seed: pooled totalF1 ``(S, C)``, meanF1 ``(S, C)``, index MAE and RMSE ``(S,)``."""
    err = index_error(rc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "total_f1": total_f1(rc.counts),
            "mean_f1": np.nanmean(image_f1(rc.counts), axis=1),
            "index_mae": np.nanmean(err, axis=1),
            "index_rmse": np.sqrt(np.nanmean(err ** 2, axis=1)),
        }


# --------------------------------------------------------------------------- tables


def _ms(values: np.ndarray) -> str:
    values = np.asarray(values, dtype=float)
    return f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}"


def _ci(result: dict[str, np.ndarray], k: int) -> str:
    return f"{result['diff'][k]:+.3f} [{result['low'][k]:+.3f}, {result['high'][k]:+.3f}]"


def comparisons(counts: dict[str, RowCounts]) -> list[dict[str, Any]]:
    """Every (row, reference) pair of the rows present, with its paired bootstrap."""
    out = []
    for row, rc in counts.items():
        for ref in ROWS[row].against:
            if ref in counts:
                out.append({"row": row, "against": ref, "result": paired_bootstrap(rc, counts[ref])})
    return out


def write_tables(counts: dict[str, RowCounts], pairs: list[dict[str, Any]], class_names: list[str],
                 out: Path) -> str:
    n, p = class_names[0], class_names[1]
    vs_ours = {c["row"]: c["result"] for c in pairs if c["against"] == "Ours"}
    header = ["Method", "runs", f"totalF1({n})", f"totalF1({p})", f"meanF1({n})", f"meanF1({p})",
              "index MAE", "index RMSE", f"Δ totalF1({p}) vs Ours [95% CI]", f"Δ totalF1({n}) vs Ours [95% CI]"]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv = [("method,ablation,seeds,images,total_f1_n_mean,total_f1_n_std,total_f1_p_mean,total_f1_p_std,"
            "mean_f1_n_mean,mean_f1_p_mean,index_mae,index_rmse,minutes_per_run")]
    for row, rc in counts.items():
        s = seed_spread(rc)
        delta = vs_ours.get(row)
        folds = len(rc.seconds) // rc.counts.shape[0]
        cells = [row, f"{folds} fold{'s' if folds != 1 else ''} × {rc.counts.shape[0]} seeds",
                 _ms(s["total_f1"][:, 0]), _ms(s["total_f1"][:, 1]), _ms(s["mean_f1"][:, 0]),
                 _ms(s["mean_f1"][:, 1]), _ms(s["index_mae"]), _ms(s["index_rmse"]),
                 _ci(delta, 1) if delta else "—", _ci(delta, 0) if delta else "—"]
        md.append("| " + " | ".join(cells) + " |")
        csv.append(",".join([row, str(ROWS[row].ablation).lower(), str(rc.counts.shape[0]), str(len(rc.keys)),
                             f"{np.nanmean(s['total_f1'][:, 0]):.4f}", f"{np.nanstd(s['total_f1'][:, 0]):.4f}",
                             f"{np.nanmean(s['total_f1'][:, 1]):.4f}", f"{np.nanstd(s['total_f1'][:, 1]):.4f}",
                             f"{np.nanmean(s['mean_f1'][:, 0]):.4f}", f"{np.nanmean(s['mean_f1'][:, 1]):.4f}",
                             f"{np.nanmean(s['index_mae']):.4f}", f"{np.nanmean(s['index_rmse']):.4f}",
                             f"{np.mean(rc.seconds) / 60:.2f}"]))
    table = "\n".join(md)
    write_text_atomic(out / "table1.md", table + "\n")
    write_text_atomic(out / "table1.csv", "\n".join(csv) + "\n")

    labels = [f"totalF1({c})" for c in class_names] + [f"meanF1({c})" for c in class_names] + ["index MAE"]
    cmd = ["| Claim | " + " | ".join(f"Δ {x} [95% CI]" for x in labels) + f" | P(better), totalF1({p}) |",
           "|" + "---|" * (len(labels) + 2)]
    ccsv = ["row,against," + ",".join(f"{x}_{s}" for x in labels for s in ("diff", "low", "high", "better"))]
    for c in pairs:
        r = c["result"]
        cmd.append(f"| {c['row']} − {c['against']} | " + " | ".join(_ci(r, k) for k in range(len(labels)))
                   + f" | {r['better'][1]:.2f} |")
        ccsv.append(f"{c['row']},{c['against']}," + ",".join(
            f"{r[s][k]:.4f}" for k in range(len(labels)) for s in ("diff", "low", "high", "better")))
    write_text_atomic(out / "comparisons.md", "\n".join(cmd) + "\n")
    write_text_atomic(out / "comparisons.csv", "\n".join(ccsv) + "\n")
    return table + "\n\n" + "\n".join(cmd)


# --------------------------------------------------------------------------- figures


def write_fig3(counts: dict[str, RowCounts], out: Path, class_name: str) -> None:
    """totalF1 and meanF1 of class 1 against r: mean over seeds, the seeds' range as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in counts if not ROWS[r].ablation] or list(counts)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines = ["row,radius,totalF1_P_mean,totalF1_P_min,totalF1_P_max,meanF1_P_mean,meanF1_P_min,meanF1_P_max"]
    # Rows that coincide stay visible: each has its own marker and dash pattern.
    markers, dashes = "os^Dv<>PX*", ("-", "--", "-.", ":")
    for k, row in enumerate(rows):
        rc = counts[row]
        vs_r = np.moveaxis(rc.counts_vs_radius, 2, 0)                 # (R, S, I, 3, C)
        total = total_f1(vs_r)[..., 1]                                 # (R, S)
        mean = np.nanmean(image_f1(vs_r)[..., 1], axis=2)              # (R, S)
        for ax, values in zip(axes, (total, mean)):
            (line,) = ax.plot(RADII, values.mean(1), marker=markers[k % len(markers)], ms=4,
                              ls=dashes[k % len(dashes)], label=row)
            ax.fill_between(RADII, values.min(1), values.max(1), color=line.get_color(), alpha=0.2, lw=0)
        for i, r in enumerate(RADII):
            lines.append(f"{row},{r},{total[i].mean():.4f},{total[i].min():.4f},{total[i].max():.4f},"
                         f"{mean[i].mean():.4f},{mean[i].min():.4f},{mean[i].max():.4f}")
    seeds = max(c.counts.shape[0] for c in counts.values())
    for ax, title in zip(axes, (f"totalF1 ({class_name})", f"meanF1 ({class_name})")):
        ax.set_xlabel("matching radius r (pixels)")
        ax.set_ylabel(title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(f"{title} against r (band: range over {seeds} seed{'s' if seeds != 1 else ''})", fontsize=10)
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "fig3.png", dpi=110)
    plt.close(fig)
    write_text_atomic(out / "fig3.csv", "\n".join(lines) + "\n")


def write_fig2(counts: dict[str, RowCounts], results: dict[str, list[dict[str, Any]]], samples: dict[str, Any],
               out: Path, class_names: list[str], device: str | None, n_images: int = 3) -> Path | None:
    """Ours, Ours++ and the truth on the held-out images where the two rows differ most."""
    columns = [r for r in ("Ours", "Ours++") if r in counts]
    if not columns:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellkit.viz import draw_points

    keys = counts[columns[0]].keys
    if len(columns) == 2:  # per-image F1 of class 1, mean over seeds: the largest differences
        with warnings.catch_warnings():  # an image without epithelium has no F1 of it
            warnings.simplefilter("ignore", RuntimeWarning)
            f1 = [np.nanmean(image_f1(counts[c].counts)[..., 1], axis=0) for c in columns]
        gap = np.nan_to_num(np.abs(f1[1] - f1[0]), nan=-1.0)
        order = np.argsort(-gap)
    else:
        order = np.argsort(-counts[columns[0]].true[:, 1])
    chosen = [keys[i] for i in order[:n_images]]

    def checkpoint(row: str, key: str) -> str:  # seed 0 of the fold that held ``key`` out
        for r in results[row]:
            if r["seed"] == min(x["seed"] for x in results[row]) and any(i["key"] == key for i in r["images"]):
                if not r.get("best_checkpoint"):
                    raise FileNotFoundError(f"{row} fold {r['fold']} was taken from {r.get('reused_from')}, "
                                            "which keeps no checkpoint")
                return r["best_checkpoint"]
        raise KeyError(key)

    try:
        predictors: dict[str, Predictor] = {}
        fig, axes = plt.subplots(len(chosen), len(columns) + 1, squeeze=False,
                                 figsize=(3.2 * (len(columns) + 1), 3.2 * len(chosen)))
        for i, key in enumerate(chosen):
            sample = samples[key]
            radius = max(3, round(max(sample.image.shape[:2]) / 60))
            for j, row in enumerate(columns):
                path = checkpoint(row, key)
                predictors.setdefault(path, Predictor.from_checkpoint(path, device=device))
                det = predictors[path].predict(sample.image)
                axes[i, j].imshow(draw_points(sample.image, det.points, det.classes, num_classes=len(class_names),
                                             radius=radius))
                axes[i, j].set_title(f"{row}: {len(det)} cells", fontsize=9)
            axes[i, -1].imshow(draw_points(sample.image, sample.points, sample.classes,
                                          num_classes=len(class_names), radius=radius))
            axes[i, -1].set_title(f"truth: {len(sample.points)} cells", fontsize=9)
            axes[i, 0].set_ylabel(key, fontsize=8)
            for ax in axes[i]:
                ax.set_xticks([])
                ax.set_yticks([])
    except (FileNotFoundError, KeyError) as exc:  # checkpoints removed: the record alone remains
        log(f"fig2.png not drawn: a checkpoint is missing ({exc})")
        return None
    fig.suptitle("held-out images where Ours and Ours++ differ most (seed 0)   colours: "
                 + ", ".join(f"{c}={n}" for c, n in enumerate(class_names)), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fig2.png", dpi=100)
    plt.close(fig)
    return out / "fig2.png"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    commit = _commit()  # the code the runs use: read at the start, not when the table is written
    data = args.data if args.data is not None else bundled_endonuke()
    fmt = args.format
    schedule = SCHEDULES["smoke" if args.smoke else args.preset]
    seeds = 1 if args.smoke else args.seeds
    holdout = args.holdout or ("ranges" if fmt == "endonuke" and args.folds is None else "blocks")
    if fmt == "endonuke" and holdout == "ranges" and args.folds is not None:
        raise SystemExit("reproduce_paper.py: error: --folds is for --holdout blocks; leave-one-range-out has one "
                         "fold per range of tile ids")
    planned_folds = 1 if args.smoke else (args.folds if args.folds is not None
                                          else (3 if fmt == "bcdata" or holdout == "ranges" else 1))
    if args.rows is None:
        args.rows = default_rows(planned_folds)
        log(f"rows: {args.rows} (the default with {planned_folds} fold(s)"
            + ("; --rows all adds the five component ablations)" if args.rows == "table1" else ")"))
    rows = choose_rows(args.rows)
    records = load_records(args.reuse)
    if "Ours" not in rows:
        rows = ["Ours", *rows]  # every claim is measured against it
    dataset_name = Path(data).name if args.data is not None else "endonuke"
    if fmt == "endonuke" and holdout == "ranges":
        dataset_name += "-ranges"
    out = args.out or Path("results") / f"reproduce-{dataset_name}-{'smoke' if args.smoke else args.preset}"
    out.mkdir(parents=True, exist_ok=True)

    class_map = get_format(fmt).class_map(2)
    samples = load_dataset(data, fmt, class_map=class_map, split=args.split)
    class_names = list(class_map.names) if class_map is not None else [str(c) for c in range(2)]
    num_classes = len(class_names)
    if args.smoke:
        samples = samples[:6]
        folds = [(samples[:4], samples[4:6])]
    else:
        if planned_folds < 1:
            raise SystemExit(f"reproduce_paper.py: error: --folds must be >= 1, got {planned_folds}")
        folds = make_folds(samples, fmt, planned_folds, holdout=holdout)
    if args.radius is not None:
        eval_radius = float(args.radius)
    elif fmt in EVAL_RADIUS:
        eval_radius = EVAL_RADIUS[fmt]
    else:
        from cellkit.geometry import Geometry, estimate_cell_diameter

        eval_radius = Geometry(estimate_cell_diameter(folds[0][0])[0]).match_radius
    group = get_format(fmt).group or (lambda key: key)
    fold_splits = []
    for train, test in folds:
        if args.smoke:
            parts = {"train": train[:2], "val": train[2:4]}
        else:  # validation images from the training part, as cellkit train picks them
            parts = split_by_group(train, group, fractions=(0.85, 0.15), seed=0, names=("train", "val"))
        fold_splits.append({**parts, "test": test})
    split_info = [{name: [s.key for s in part] for name, part in sp.items()} for sp in fold_splits]
    write_text_atomic(out / "split.json", json.dumps(split_info, indent=1))
    log(f"data: {data} ({fmt}), classes {class_names}, {len(samples)} images; {len(folds)} fold(s): "
        + "; ".join(f"{len(sp['train'])} train, {len(sp['val'])} val, {len(sp['test'])} held out"
                    for sp in fold_splits))

    results: dict[str, list[dict[str, Any]]] = {}
    plan = [(row, fold, seed) for row in rows for fold in range(len(fold_splits)) for seed in range(seeds)]

    def run_dir_of(row: str, fold: int, seed: int) -> Path:
        return out / "runs" / ROWS[row].slug / f"fold{fold}" / f"seed{seed}"

    def to_train(key: tuple[str, int, int]) -> bool:  # neither finished earlier nor in a --reuse record
        return key not in records and not (run_dir_of(*key) / "test_result.json").is_file()

    trained_runs, trained_seconds = 0, 0.0
    for done, (row, fold, seed) in enumerate(plan, start=1):
        results.setdefault(row, [])
        elapsed = time.time() - started
        left = sum(to_train(key) for key in plan[done - 1:])
        eta = (f", about {left * trained_seconds / trained_runs / 60:.0f} min left ({left} runs to train)"
               if trained_runs and left else "")
        log(f"=== {row} ({ROWS[row].what}), fold {fold + 1}/{len(fold_splits)}, seed {seed + 1}/{seeds}: "
            f"run {done}/{len(plan)}, {elapsed / 60:.0f} min so far{eta} ===")
        cfg = row_config(row, schedule, seed, num_classes)
        cfg.data.class_names = tuple(class_names)
        trains, run_started = to_train((row, fold, seed)), time.time()
        results[row].append(run_one(row, fold, seed, cfg, fold_splits[fold], run_dir_of(row, fold, seed),
                                    eval_radius, num_classes, args.device, records.get((row, fold, seed)), commit))
        if trains:
            trained_runs, trained_seconds = trained_runs + 1, trained_seconds + time.time() - run_started

    counts = {row: gather(res) for row, res in results.items()}
    pairs = comparisons(counts)
    text = write_tables(counts, pairs, class_names, out)
    write_fig3(counts, out, class_names[1])
    by_key = {s.key: s for sp in fold_splits for s in sp["test"]}
    fig2 = write_fig2(counts, results, by_key, out, class_names, args.device)
    write_text_atomic(out / "per_image.json", json.dumps(
        {row: [{k: v for k, v in r.items() if k not in ("best_checkpoint", "reused_from")} for r in res]
         for row, res in results.items()}))
    wall = time.time() - started
    meta = {
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, python "
                   f"{platform.python_version()}, torch {_torch_version()}",
        "wall_seconds": round(wall, 1),
        "run_minutes": {row: round(float(np.mean(c.seconds)) / 60, 2) for row, c in counts.items()},
        "radius": eval_radius,
        "schedule": schedule,
        "folds": len(fold_splits),
        "seeds": seeds,
        "held_out_images": len(by_key),
        "class_names": class_names,
        "bootstrap_draws": BOOTSTRAP_DRAWS,
        "reused": {row: sum("reused_from" in r for r in res) for row, res in results.items()
                   if any("reused_from" in r for r in res)},
    }
    write_text_atomic(out / "run_info.json", json.dumps(meta, indent=2))
    print(f"\nTable 1 on {dataset_name} (r = {eval_radius:g} px; {len(by_key)} held-out images, "
          f"{len(fold_splits)} fold(s) x {seeds} seed(s); mean ± std over seeds; "
          f"N = {class_names[0]}, P = {class_names[1]}):\n")
    print(text)
    written = "table1.md, comparisons.md, " + ("fig2.png, " if fig2 is not None else "") + "fig3.png, per_image.json"
    print(f"\nResults in {out}/ ({written}, runs/); "
          f"wall time {wall / 60:.1f} min")
    return 0


def _torch_version() -> str:
    import torch

    return torch.__version__


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
