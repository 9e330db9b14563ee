"""Reproduce the paper's Table 1, Fig. 2 and Fig. 3 on real IHC data.

Trains and evaluates the five rows of Table 1 (FCRN, EstimateMask, Ours, Ours+, Ours++)
over several seeds, on the bundled EndoNuke sample by default (class of interest:
epithelium; other cells: stroma and other), with a split by tile-id group::

    python examples/reproduce_paper.py                      # quick preset, 3 seeds, bundled EndoNuke
    python examples/reproduce_paper.py --data ../shared/data/bcdata_sample --format bcdata
    python examples/reproduce_paper.py --preset paper --device cuda
    python examples/reproduce_paper.py --smoke              # a few steps: checks the pipeline

Writes into ``--out`` (default ``results/reproduce-<dataset>-<preset>``): ``table1.md``,
``table1.csv``, ``fig2.png``, ``fig3.png``, ``fig3.csv``, ``split.json`` and ``runs/<row>/seed<k>/``
(the folders of ``cellkit train``: config, metrics log, checkpoints, test results). A run
that is interrupted and started again reuses the rows already finished.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import cellkit
from cellkit.data import FORMATS, bundled_endonuke, get_format, load_dataset, split_by_group
from cellkit.data.io import write_text_atomic
from cellkit.engine.predict import Predictor
from cellkit.engine.train import fit
from cellkit.metrics import evaluate, f1_vs_radius

ROWS = {  # Table 1 row label -> preset name
    "FCRN": "fcrn",
    "EstimateMask": "estimate_mask",
    "Ours": "ours",
    "Ours+": "ours_plus",
    "Ours++": "ours_plus_plus",
}
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="dataset folder (default: the bundled EndoNuke sample)")
    p.add_argument("--format", default="endonuke", choices=sorted(FORMATS),
                   help="annotation format of --data (default: endonuke)")
    p.add_argument("--split", default=None, help="BCData split folder to read (default: all found)")
    p.add_argument("--preset", default="default", choices=["default", "quick", "paper"],
                   help="default: cellkit train's defaults (cpu size); quick: 150 steps; paper: ResNet-101")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (default: 3)")
    p.add_argument("--radius", type=float, default=None,
                   help="matching radius r in pixels for Table 1 (default: 6 for EndoNuke, 10 for BCData, "
                   "else 3/4 of the estimated cell diameter)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of rows to run")
    p.add_argument("--smoke", action="store_true", help="a few steps, few images, one seed (for tests)")
    return p.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def group_key(fmt: str):
    """Images of one group (neighbouring EndoNuke tile ids, one BCData image) stay in one split."""
    return get_format(fmt).group or (lambda key: key)


def row_config(row: str, schedule: dict[str, Any], seed: int, num_classes: int) -> cellkit.CellkitConfig:
    """The preset of ``row`` with cellkit's defaults, changed only by the schedule's entries."""
    preset = cellkit.presets.PRESETS[ROWS[row]]
    kwargs: dict[str, Any] = {"size": schedule["size"], "num_classes": num_classes}
    if "steps" in schedule:
        kwargs["steps"] = schedule["steps"]
    cfg = preset(**kwargs)
    for stage in (cfg, cfg.pretrain):
        if stage is None:
            continue
        t = stage.train
        for key in ("batch_size", "crop_size", "val_every_steps"):
            if key in schedule:
                setattr(t, key, schedule[key])
        t.seed = seed
    return cfg


def run_row(row: str, seed: int, cfg: cellkit.CellkitConfig, splits: dict[str, list], run_dir: Path,
            eval_radius: float, num_classes: int, class_names: list[str], device: str | None,
            max_steps: int | None) -> dict[str, Any]:
    result_path = run_dir / "test_result.json"
    if result_path.is_file():
        log(f"[{row} seed {seed}] finished earlier: reusing {result_path}")
        return json.loads(result_path.read_text())
    started = time.time()
    resume = (run_dir / "config.yaml").is_file()  # fit marks a run folder with it first
    log(f"[{row} seed {seed}] training into {run_dir}" + (" (resuming)" if resume else ""))
    trained = fit(cfg, run_dir, splits=splits, resume=resume, device=device, max_steps=max_steps)
    predictor = Predictor.from_checkpoint(trained.best_path, device=device)
    test = splits["test"]
    predictions = [predictor.predict(s.image) for s in test]
    truths = [(s.points, s.classes) for s in test]
    report = evaluate(predictions, truths, radius=eval_radius, num_classes=num_classes, class_names=class_names)
    curve = f1_vs_radius(predictions, truths, RADII, num_classes=num_classes)
    result = {
        "row": row,
        "seed": seed,
        "radius": eval_radius,
        "report": report.to_dict(),
        "f1_vs_radius": _plain(curve),
        "best_checkpoint": str(trained.best_path),
        "train_seconds": round(time.time() - started, 1),
    }
    write_text_atomic(result_path, json.dumps(result, indent=2))
    return result


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def class_metric(result: dict[str, Any], metric: str, class_index: int) -> float:
    per_class = result["report"]["classes"]  # class name -> metrics, in class-index order
    value = list(per_class.values())[class_index][metric]
    return math.nan if value is None else float(value)


def table_rows(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of the four Table 1 columns."""
    columns = [("totalF1(N)", "total_f1", 0), ("totalF1(P)", "total_f1", 1),
               ("meanF1(N)", "mean_f1", 0), ("meanF1(P)", "mean_f1", 1)]
    rows = []
    for row, seed_results in results.items():
        entry: dict[str, Any] = {"Method": row, "seeds": len(seed_results)}
        for label, metric, c in columns:
            values = np.array([class_metric(r, metric, c) for r in seed_results], dtype=float)
            entry[label] = (float(values.mean()), float(values.std(ddof=0)))
        rows.append(entry)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["Method", "totalF1(N)", "totalF1(P)", "meanF1(N)", "meanF1(P)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in rows:
        cells = [entry["Method"]] + [f"{entry[h][0]:.3f} ± {entry[h][1]:.3f}" for h in header[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(rows: list[dict[str, Any]], out: Path) -> str:
    text = format_table(rows)
    write_text_atomic(out / "table1.md", text + "\n")
    header = ["Method", "seeds"] + [f"{h}_{s}" for h in ("totalF1(N)", "totalF1(P)", "meanF1(N)", "meanF1(P)")
                                    for s in ("mean", "std")]
    lines = [",".join(header)]
    for e in rows:
        vals = [e["Method"], str(e["seeds"])]
        for h in ("totalF1(N)", "totalF1(P)", "meanF1(N)", "meanF1(P)"):
            vals += [f"{e[h][0]:.4f}", f"{e[h][1]:.4f}"]
        lines.append(",".join(vals))
    write_text_atomic(out / "table1.csv", "\n".join(lines) + "\n")
    return text


def write_fig3(results: dict[str, list[dict[str, Any]]], out: Path) -> None:
    """totalF1(P) and meanF1(P) against r, mean over seeds, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines = ["row,radius,totalF1_P_mean,totalF1_P_std,meanF1_P_mean,meanF1_P_std"]
    for row, seed_results in results.items():
        # Class 1 (P, the class of interest); curves are keyed by class name in index order.
        total = np.array([list(r["f1_vs_radius"]["total_f1"].values())[1] for r in seed_results], dtype=float)
        mean = np.array([list(r["f1_vs_radius"]["mean_f1"].values())[1] for r in seed_results], dtype=float)
        radii = seed_results[0]["f1_vs_radius"]["radii"]
        axes[0].plot(radii, total.mean(0), marker="o", ms=3, label=row)
        axes[1].plot(radii, mean.mean(0), marker="o", ms=3, label=row)
        for i, r in enumerate(radii):
            lines.append(f"{row},{r},{total.mean(0)[i]:.4f},{total.std(0)[i]:.4f},"
                         f"{mean.mean(0)[i]:.4f},{mean.std(0)[i]:.4f}")
    for ax, title in zip(axes, ("totalF1 (P)", "meanF1 (P)")):
        ax.set_xlabel("radius r (pixels)")
        ax.set_ylabel(title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(f"{title} against r")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "fig3.png", dpi=120)
    plt.close(fig)
    write_text_atomic(out / "fig3.csv", "\n".join(lines) + "\n")


def write_fig2(results: dict[str, list[dict[str, Any]]], test: list, out: Path, class_names: list[str],
               device: str | None, n_crops: int = 3) -> None:
    """Test crops side by side: Ours, Ours++, ground truth (points coloured by class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellkit.viz import draw_points

    columns = [row for row in ("Ours", "Ours++") if row in results]
    predictors = {row: Predictor.from_checkpoint(results[row][0]["best_checkpoint"], device=device)
                  for row in columns}
    # The crops with most cells of the class of interest show the difference best.
    chosen = sorted(test, key=lambda s: -int((s.classes == 1).sum()))[:n_crops]
    # Markers scale with the tile so they stay visible when a 640 px tile is shown 3 inches wide.
    radius = max(3, round(max(chosen[0].image.shape[:2]) / 60)) if chosen else 3
    fig, axes = plt.subplots(len(chosen), len(columns) + 1, figsize=(3.2 * (len(columns) + 1), 3.2 * len(chosen)),
                             squeeze=False)
    for i, sample in enumerate(chosen):
        for j, row in enumerate(columns):
            det = predictors[row].predict(sample.image)
            axes[i, j].imshow(draw_points(sample.image, det.points, det.classes, num_classes=len(class_names),
                                         radius=radius))
            axes[i, j].set_title(f"{row}: {len(det)} cells" if i == 0 else f"{len(det)} cells", fontsize=9)
        axes[i, -1].imshow(draw_points(sample.image, sample.points, sample.classes, num_classes=len(class_names),
                                      radius=radius))
        axes[i, -1].set_title(("Ground truth: " if i == 0 else "") + f"{len(sample.points)} cells", fontsize=9)
        axes[i, 0].set_ylabel(sample.key, fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("(a) Ours   (b) Ours++   (c) Ground truth    colours: " +
                 ", ".join(f"{c}={n}" for c, n in enumerate(class_names)), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fig2.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    commit = _commit()  # the code the runs use: read at the start, not when the table is written
    data = args.data if args.data is not None else bundled_endonuke()
    fmt = args.format
    schedule = SCHEDULES["smoke" if args.smoke else args.preset]
    seeds = 1 if args.smoke else args.seeds
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"reproduce_paper.py: error: unknown rows {unknown}; choose from {list(ROWS)}")
    dataset_name = Path(data).name if args.data is not None else "endonuke"
    out = args.out or Path("results") / f"reproduce-{dataset_name}-{'smoke' if args.smoke else args.preset}"
    out.mkdir(parents=True, exist_ok=True)

    class_map = get_format(fmt).class_map(2)
    samples = load_dataset(data, fmt, class_map=class_map, split=args.split)
    class_names = list(class_map.names) if class_map is not None else [str(c) for c in range(2)]
    num_classes = len(class_names)
    if args.smoke:
        samples = samples[:4]
        splits = {"train": samples[:2], "val": samples[2:4], "test": samples[2:4]}
    else:
        splits = split_by_group(samples, group_key(fmt), fractions=(0.7, 0.15, 0.15), seed=0)
    if args.radius is not None:
        eval_radius = float(args.radius)
    elif fmt in EVAL_RADIUS:
        eval_radius = EVAL_RADIUS[fmt]
    else:
        from cellkit.geometry import Geometry, estimate_cell_diameter

        eval_radius = Geometry(estimate_cell_diameter(splits["train"])[0]).match_radius
    split_info = {name: [s.key for s in part] for name, part in splits.items()}
    write_text_atomic(out / "split.json", json.dumps(split_info, indent=1))
    log(f"data: {data} ({fmt}), classes {class_names}; split by group: " +
        ", ".join(f"{k} {len(v)} images" for k, v in splits.items()))
    for name, keys in split_info.items():
        log(f"  {name}: {' '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}")

    results: dict[str, list[dict[str, Any]]] = {}
    total_runs = len(rows) * seeds
    done = 0
    for row in rows:
        results[row] = []
        for seed in range(seeds):
            done += 1
            log(f"=== row {row} ({ROWS[row]}), seed {seed + 1}/{seeds}, run {done}/{total_runs} ===")
            cfg = row_config(row, schedule, seed, num_classes)
            cfg.data.class_names = tuple(class_names)
            run_dir = out / "runs" / ROWS[row] / f"seed{seed}"
            results[row].append(run_row(row, seed, cfg, splits, run_dir, eval_radius, num_classes,
                                        class_names, args.device, None))

    table = write_table(table_rows(results), out)
    write_fig3(results, out)
    write_fig2(results, splits["test"], out, class_names, args.device)
    wall = time.time() - started
    meta = {
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, python "
                   f"{platform.python_version()}",
        "wall_seconds": round(wall, 1),
        "radius": eval_radius,
        "schedule": schedule,
        "seeds": seeds,
        "class_names": class_names,
    }
    write_text_atomic(out / "run_info.json", json.dumps(meta, indent=2))
    print(f"\nTable 1 on {dataset_name} (r = {eval_radius:g} px, mean ± std over {seeds} seed(s); "
          f"N = {class_names[0]}, P = {class_names[1]}):\n")
    print(table)
    print(f"\nResults in {out}/ (table1.md, table1.csv, fig2.png, fig3.png, fig3.csv, runs/); "
          f"wall time {wall / 60:.1f} min")
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
