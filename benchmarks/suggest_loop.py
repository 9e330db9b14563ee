"""The annotation loop, simulated: do the fields ``cellkit suggest`` picks teach more than random ones?

A user has a model trained elsewhere and a new region. Here the region is one held-out range of
the bundled EndoNuke sample (``--fold``: a fold of a leave-one-range-out variant of
``benchmarks/accuracy.py``, whose ``run/best.pt`` never saw that range: the start model). The
range's tiles are split once, by id, into an evaluation third (every third tile, never
annotated) and a pool. Then, for each N and seed:

* **suggested**: the start model predicts the pool (``write_predictions``, as ``cellkit
  predict``), ``suggest_folder`` picks N 100-um fields (one bundled tile each; ``cellkit suggest
  --top N``, its default ranking) and they are "annotated" (their true points revealed);
* **random**: N pool tiles drawn with the seed;

and the start model is fine-tuned on those N tiles (``train.init_from``, ``--steps`` steps, the
start model's recipe; the same tiles calibrate its thresholds), then scored on the evaluation
tiles (r = 6 px, per-class totalF1). ``before`` is the start model unchanged; ``full`` is the
same fine-tuning on the whole pool (the ceiling of annotating the region). It prints JSON:
F1 per run, means over seeds, the share of the gap ``full - before`` each closes, and the paired
bootstrap (evaluation images, seeds) of suggested - random per N.

Usage::

    python benchmarks/suggest_loop.py --start results/accuracy/endonuke-ranges/ours-lite0-aug-s800 \\
        --fold 0 --n 5,10,20 --seeds 2 --steps 100 --out results/suggest-loop \\
        --json-out benchmarks/results-suggest-loop-cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import emit, load_average, provenance  # noqa: E402

from cellkit.config import CellkitConfig  # noqa: E402
from cellkit.data import ENDONUKE_EPITHELIUM, load_dataset  # noqa: E402
from cellkit.data.bundled import bundled_endonuke  # noqa: E402
from cellkit.engine.checkpoint import load_checkpoint, load_model  # noqa: E402
from cellkit.engine.outputs import write_predictions  # noqa: E402
from cellkit.engine.predict import Predictor, _stored_calibration  # noqa: E402
from cellkit.engine.suggest import suggest_folder  # noqa: E402
from cellkit.engine.train import fit  # noqa: E402
from cellkit.imaging import image_to_tensor  # noqa: E402
from cellkit.metrics import detection_counts  # noqa: E402
from cellkit.models.model import pad_to_stride  # noqa: E402

RADIUS = 6.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--start", type=Path, help="a leave-one-range-out variant of accuracy.py (required)")
    p.add_argument("--fold", type=int, default=0, help="the held-out range (its fold's run is the start)")
    p.add_argument("--n", default="5,10,20", help="fields annotated, comma-separated")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (training's is 1e-3)")
    p.add_argument("--strategies", default="suggested,random",
                   help="of suggested (cellkit suggest's default ranking: one field per stratum of the class "
                        "mix, most doubtful first), doubt (its --ranking doubt: the most doubtful fields, the "
                        "default before session 14), diverse (the most doubtful field per cluster of colour and "
                        "predictions), novel (the doubt times how unlike the training crops a field looks to "
                        "the encoder), medoids (the field nearest each of N k-means centres of the encoder's "
                        "features, no doubt), random; strata is suggested's former name")
    p.add_argument("--reuse", action="store_true",
                   help="score a run folder's best.pt again instead of fine-tuning, where its picks.json "
                        "holds the same picks (fine-tuning is deterministic on the CPU)")
    p.add_argument("--no-full", action="store_true", help="skip the fine-tuning on the whole pool")
    p.add_argument("--out", type=Path, help="work folder (runs, predictions; required)")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--png", type=Path, help="draw F1 against fields annotated here (with --plot-only: from a JSON)")
    p.add_argument("--plot-only", type=Path, nargs="+", metavar="JSON",
                   help="only draw --png from recorded results (one row of panels per held-out range)")
    return p.parse_args(argv)


def draw(results: list[dict[str, Any]], path: Path) -> None:
    """F1 against fields annotated, suggested and random (mean and each seed), before and the whole pool.

    One row of panels (one per class) per held-out range: records of the same start model
    (e.g. a later run of more N) are drawn together, ``before`` and ``full`` from the first that has them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged: dict[str, dict[str, Any]] = {}
    for result in results:
        row = merged.setdefault(result["start"], {**result, "runs": []})
        row["runs"] = row["runs"] + list(result["runs"])
        row["full"] = row.get("full") or result.get("full")
    results = list(merged.values())
    names = list(results[0]["before"])
    fig, grid = plt.subplots(len(results), len(names), figsize=(5 * len(names), 3.8 * len(results)),
                             squeeze=False)
    for result, axes in zip(results, grid):
        _draw_range(result, names, axes)
        axes[0].legend(fontsize=8)  # each row's pool size
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _range_of(result: dict[str, Any]) -> str:
    """The held-out range's tile ids, ``"321-784"`` (from the start model's fold record), else ``"fold K"``."""
    record = Path(result["start"]).parent.parent / "result.json"
    if not record.is_file():
        return f"fold {result['fold']}"
    ids = sorted(int(k) for k in json.loads(record.read_text())["test_images"])
    return f"{ids[0]}-{ids[-1]}"


def _draw_range(result: dict[str, Any], names: list[str], axes: Any) -> None:
    for ax, name in zip(axes, names):
        for strategy, color in (("suggested", "tab:red"), ("random", "tab:blue")):
            runs = [r for r in result["runs"] if r["strategy"] == strategy]
            ns = sorted({r["n"] for r in runs})
            means = [np.mean([r["f1"][name] for r in runs if r["n"] == n]) for n in ns]
            ax.plot(ns, means, "o-", color=color, label=f"{strategy} fields")
            ax.scatter([r["n"] for r in runs], [r["f1"][name] for r in runs], color=color, s=10, alpha=0.5)
        ax.axhline(result["before"][name], color="0.5", ls="--", label="before (no fine-tuning)")
        if result.get("full"):
            ax.axhline(result["full"][name], color="k", ls=":", label=f"whole pool ({result['pool_images']} tiles)")
        ax.set_title(f"{name}: held-out range {_range_of(result)}")
        ax.set_xlabel("fields annotated (one 100-um tile each)")
        ax.set_ylabel("totalF1 on the held-out evaluation tiles")


def counts(predictor: Predictor, samples: list[Any], k: int) -> np.ndarray:
    """Per evaluation image: tp, fp, fn per class, ``(images, 3, classes)``."""
    rows = []
    for s in samples:
        det = predictor.predict(s.image)
        rows.append(np.stack(detection_counts(det.points, det.classes, s.points, s.classes, RADIUS, k)))
    return np.asarray(rows, np.int64)


def f1(table: np.ndarray) -> list[float]:
    tp, fp, fn = table.sum(0)
    return [round(float(2 * t / max(2 * t + p + n, 1)), 4) for t, p, n in zip(tp, fp, fn)]


def fine_tune(start: Path, picks: list[Any], steps: int, seed: int, out: Path, lr: float) -> Predictor:
    cfg = CellkitConfig.from_dict(load_checkpoint(start)["config"])
    cfg.pretrain = None
    cfg.train.steps, cfg.train.init_from, cfg.train.seed, cfg.train.lr = steps, str(start), seed, lr
    cfg.train.val_every_steps = steps
    keys = sorted((s.key for s in picks), key=int)
    record = out / "picks.json"
    if REUSE and (out / "best.pt").is_file() and record.is_file() and json.loads(record.read_text()) == keys:
        return Predictor.from_checkpoint(out / "best.pt", device="cpu")
    if out.exists():
        shutil.rmtree(out)
    fit(cfg, out, splits={"train": picks, "val": picks}, device="cpu", progress=False)
    record.write_text(json.dumps(keys))
    return Predictor.from_checkpoint(out / "best.pt", device="cpu")


REUSE = False


TIMES: dict[str, float] = {}


def ranked_fields(start: Path, pool: list[Any], work: Path, top: int | None = None,
                  ranking: str = "doubt") -> list[Any]:
    """The top fields of the pool (all by default), as cellkit suggest ranks them (the pool predicted once).

    Predicting the pool and the first ranking (with its picture) are timed.
    """
    folder, pred = work / "pool", work / "pool-pred"
    if "predict_pool_s" not in TIMES:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for s in pool:
            shutil.copyfile(s.path, folder / Path(s.path).name)
        shutil.rmtree(pred, ignore_errors=True)
        t0 = time.perf_counter()
        write_predictions(Predictor.from_checkpoint(start, device="cpu"), [folder], pred, overlay=False, mpp=0.5)
        TIMES["predict_pool_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    fields = suggest_folder(pred, top=top or len(pool), ranking=ranking)
    TIMES.setdefault("suggest_s", round(time.perf_counter() - t0, 2))
    return fields


def suggested(start: Path, pool: list[Any], n: int, work: Path, ranking: str = "mix") -> list[str]:
    """The keys of the ``n`` fields of the pool that cellkit suggest (``--top n --ranking ranking``) picks."""
    return [f.image for f in ranked_fields(start, pool, work, n, ranking)]


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 100) -> np.ndarray:
    """Cluster labels of the rows of ``x`` (k-means++ start, then Lloyd's steps)."""
    centres = [x[rng.integers(len(x))]]
    while len(centres) < k:
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    c = np.asarray(centres)
    for _ in range(iters):
        labels = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        new = np.asarray([x[labels == j].mean(0) if np.any(labels == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return labels


def diverse(start: Path, pool: list[Any], n: int, work: Path) -> list[str]:
    """Doubt with variety: the most doubtful field of each of ``n`` clusters of the pool's fields.

    The fields (one tile each) are clustered by their look (mean and spread of each colour
    channel) and what the model predicts in them (cells, mean confidence), standardised;
    each cluster gives its field of highest ``suggest`` score.
    """
    fields = {f.image: f for f in ranked_fields(start, pool, work)}
    keys = [s.key for s in pool if s.key in fields]
    images = {s.key: np.asarray(s.image, np.float64).reshape(-1, 3) for s in pool}
    x = np.asarray([[*images[k].mean(0), *images[k].std(0), fields[k].cells, fields[k].mean_confidence]
                    for k in keys])
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    labels = kmeans(x, min(n, len(keys)), np.random.default_rng(0))
    return [max((k for k, lab in zip(keys, labels) if lab == j), key=lambda k: fields[k].score)
            for j in sorted(set(labels.tolist()))]


def encoder_features(model: Any, images: list[np.ndarray]) -> np.ndarray:
    """Mean and spread over space of each image's deepest encoder features (the model's own view)."""
    model.eval()
    out = []
    with torch.inference_mode():
        for image in images:
            feats = model.encoder(pad_to_stride(image_to_tensor(image)[None], model.output_stride))
            deep = feats[-1] if isinstance(feats, (list, tuple)) else feats
            out.append(torch.cat([deep.mean((2, 3)), deep.std((2, 3))], 1)[0].numpy())
    return np.asarray(out, np.float64)


def novelty(start: Path, pool: list[Any]) -> dict[str, float]:
    """How unlike the start model's training data each pool tile looks, to the model itself.

    The distance of a tile's deepest encoder features (standardised by the training crops'
    spread) to the nearest of the training crops that ``cellkit train`` stores in ``best.pt``
    (16 central crops of its training images), divided by the median over the pool.
    """
    model, _, ckpt = load_model(start)
    crops = _stored_calibration(ckpt)
    if not crops:
        raise SystemExit(f"{start} holds no training crops (int8_calibration): the novelty needs them")
    ref = encoder_features(model, crops)
    x = encoder_features(model, [s.image for s in pool])
    mu, sd = ref.mean(0), ref.std(0) + 1e-6
    ref, x = (ref - mu) / sd, (x - mu) / sd
    d = np.sqrt(((x[:, None, :] - ref[None]) ** 2).sum(-1)).min(1)
    d = d / max(float(np.median(d)), 1e-12)
    return {s.key: float(v) for s, v in zip(pool, d)}


def novel(start: Path, pool: list[Any], n: int, work: Path) -> list[str]:
    """Doubt on unfamiliar ground: the ``suggest`` score times the tile's [`novelty`][]."""
    if "novelty" not in TIMES:
        t0 = time.perf_counter()
        NOVELTY.update(novelty(start, pool))
        TIMES["novelty"] = round(time.perf_counter() - t0, 2)
    fields = {f.image: f for f in ranked_fields(start, pool, work)}
    keys = [s.key for s in pool if s.key in fields]
    return sorted(keys, key=lambda k: -fields[k].score * NOVELTY[k])[:n]


NOVELTY: dict[str, float] = {}


def medoids(start: Path, pool: list[Any], n: int, work: Path) -> list[str]:
    """The range's typical fields: the tile nearest each of ``n`` k-means centres of encoder features.

    No doubt at all (the representative arm): the start model's deepest encoder features per
    tile (mean and spread over space), standardised over the pool.
    """
    if "medoid_features" not in FEATURES:
        model, _, _ = load_model(start)
        x = encoder_features(model, [s.image for s in pool])
        FEATURES["medoid_features"] = (x - x.mean(0)) / (x.std(0) + 1e-6)
    x = FEATURES["medoid_features"]
    labels = kmeans(x, min(n, len(pool)), np.random.default_rng(0))
    picks = []
    for j in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == j)
        centre = x[members].mean(0)
        picks.append(pool[int(members[np.argmin(((x[members] - centre) ** 2).sum(1))])].key)
    return picks


FEATURES: dict[str, np.ndarray] = {}


def bootstrap(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, reps: int = 2000) -> list[list[float]]:
    """95 % interval of per-class totalF1 b - a, images (with their seeds) resampled together."""
    diffs = []
    for _ in range(reps):
        i = rng.integers(0, a.shape[0], a.shape[0])
        diffs.append(np.subtract(f1(b[i]), f1(a[i])))
    lo, hi = np.percentile(np.asarray(diffs), [2.5, 97.5], axis=0)
    return [[round(float(x), 4), round(float(y), 4)] for x, y in zip(lo, hi)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global REUSE
    REUSE = args.reuse
    if args.plot_only:
        draw([json.loads(path.read_text()) for path in args.plot_only], args.png or Path("suggest-loop.png"))
        return 0
    if args.start is None or args.out is None:
        raise SystemExit("suggest_loop.py: error: --start and --out are required (or --plot-only JSON --png FILE)")
    load_start, started = load_average(), time.perf_counter()
    fold = args.start / f"fold{args.fold}"
    start = fold / "run" / "best.pt"
    held = [str(k) for k in json.loads((fold / "result.json").read_text())["test_images"]]
    by_key = {s.key: s for s in load_dataset(bundled_endonuke(), "endonuke", class_map=ENDONUKE_EPITHELIUM)}
    ordered = sorted(held, key=int)
    evaluation = [by_key[k] for k in ordered[::3]]
    pool = [by_key[k] for k in ordered if k not in set(ordered[::3])]
    names = list(ENDONUKE_EPITHELIUM.names)
    k = len(names)
    base = counts(Predictor.from_checkpoint(start, device="cpu"), evaluation, k)
    runs: list[dict[str, Any]] = []
    tables: dict[tuple[str, int], list[np.ndarray]] = {}
    sizes = [int(v) for v in args.n.split(",")]
    plans = [(s, n) for n in sizes for s in args.strategies.split(",")] + ([] if args.no_full else [("full", len(pool))])
    for strategy, n in plans:
        for seed in range(args.seeds):
            if strategy in ("suggested", "strata"):
                keys = set(suggested(start, pool, n, args.out))
            elif strategy == "doubt":
                keys = set(suggested(start, pool, n, args.out, "doubt"))
            elif strategy == "diverse":
                keys = set(diverse(start, pool, n, args.out))
            elif strategy == "novel":
                keys = set(novel(start, pool, n, args.out))
            elif strategy == "medoids":
                keys = set(medoids(start, pool, n, args.out))
            elif strategy == "random":
                keys = {s.key for s in np.random.default_rng(1000 + seed).permutation(np.array(pool, dtype=object))[:n]}
            else:
                keys = {s.key for s in pool}
            picks = [s for s in pool if s.key in keys]
            t0 = time.perf_counter()
            tuned = fine_tune(start, picks, args.steps, seed, args.out / f"{strategy}-n{n}-seed{seed}", args.lr)
            table = counts(tuned, evaluation, k)
            tables.setdefault((strategy, n), []).append(table)
            runs.append({"strategy": strategy, "n": n, "seed": seed, "f1": dict(zip(names, f1(table))),
                         "picks": sorted(keys, key=int), "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    before = dict(zip(names, f1(base)))
    summary: dict[str, Any] = {}
    full = tables.get(("full", len(pool)))
    full_f1 = dict(zip(names, np.mean([f1(t) for t in full], 0).round(4).tolist())) if full else None
    rng = np.random.default_rng(0)
    for (strategy, n), tabs in tables.items():
        mean = dict(zip(names, np.mean([f1(t) for t in tabs], 0).round(4).tolist()))
        row: dict[str, Any] = {"f1_mean": mean, "f1_std": dict(zip(names, np.std([f1(t) for t in tabs], 0).round(4)
                                                                      .tolist()))}
        if full_f1:
            row["gap_closed"] = {c: round((mean[c] - before[c]) / (full_f1[c] - before[c]), 3)
                                 if abs(full_f1[c] - before[c]) > 1e-6 else None for c in names}
        if strategy not in ("random", "full") and ("random", n) in tables:
            a, b = np.concatenate(tables[("random", n)]), np.concatenate(tabs)
            row[f"{strategy}_minus_random_95ci"] = dict(zip(names, bootstrap(a, b, rng)))
        summary[f"{strategy}-n{n}"] = row
    result = {"benchmark": "suggest_loop", "start": str(start), "fold": args.fold,
              "evaluation_images": len(evaluation), "pool_images": len(pool), "steps": args.steps, "lr": args.lr,
              "seeds": args.seeds, "before": before, "full": full_f1, "summary": summary, "runs": runs,
              "seconds": round(time.perf_counter() - started, 1), "times": TIMES,
              **provenance("benchmarks/suggest_loop.py", argv, load_start, HERE.parent)}
    emit(result, args.json_out)
    if args.png:
        draw([result], args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
