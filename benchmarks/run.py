"""cellkit's benchmarks: what each stage costs, against a plain baseline measured in the same run.

Usage::

    python benchmarks/run.py                          # every stage (6-7 min on 2 idle CPU cores)
    python benchmarks/run.py --quick                  # each stage once at a small size (< 1 min)
    python benchmarks/run.py --stages peaks,matching  # some stages (names or numbers 1-6)
    python benchmarks/run.py --sizes cpu --json results.json

Stages (see benchmarks/README.md):

1. ``targets``: ``circle``, ``random_polygon``, ``gaussian``, ``estimated`` on a 640 x 640 image
   with 150 cells; ``random_polygon`` against a ``cpu`` training step.
2. ``peaks``: :func:`cellkit.postprocess.peaks.peaks` against ``skimage.feature.peak_local_max``.
3. ``matching``: :func:`cellkit.metrics.match_points` / :func:`cellkit.metrics.evaluate` against
   a dense ``scipy.optimize.linear_sum_assignment``.
4. ``training``: seconds per step (batch 4, 256 x 256) and peak memory, each preset and size.
5. ``inference``: tiled prediction of a 4096 x 4096 image (``--inference-size``, and
   ``--paper-inference-size`` for the ``paper`` size on the CPU): megapixels/s, peak memory, and
   the share of the machine's measured float32 ``torch.mm`` rate the model reaches.
6. ``gpu``: stages 4 and 5 on CUDA, float32 and mixed precision with ``channels_last``.

The JSON (stdout, or ``--json FILE``) holds every figure with the machine's description;
a readable table of each stage goes to stderr. Every figure is the median of several timed
repeats after warm-up; ``min_ms``/``max_ms`` show the spread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402

import model_bench  # noqa: E402
import synthetic  # noqa: E402
from harness import call_all, contention, format_table, machine_info, measure, run_isolated  # noqa: E402

STAGES = ("targets", "peaks", "matching", "training", "inference", "gpu")
SIZES = ("cpu", "paper")
PRESETS = ("fcrn", "estimate_mask", "ours", "ours_plus", "ours_plus_plus")

#: The issue's targets.
RANDOM_POLYGON_MAX_SHARE = 0.10  # of a cpu-preset training step
PEAKS_MIN_SPEEDUP = 3.0  # against skimage.feature.peak_local_max on the CPU

#: The preset whose cpu step is the yardstick of random_polygon (the first preset that uses it).
REFERENCE_PRESET = "ours_plus"


def log(message: str) -> None:
    """Progress on stderr (the JSON on stdout stays clean)."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes and repeat counts of this run (full or ``--quick``)."""
    quick = args.quick
    rep = args.repeats

    def r(full: int, small: int = 1) -> int:
        return int(rep) if rep is not None else (small if quick else full)

    s: dict[str, Any] = {
        "quick": quick,
        "targets": {
            "image_size": 160 if quick else 640,
            "cells": synthetic.cell_count(160, 160) if quick else synthetic.BCDATA_CELLS_PER_TILE,
            "batch_crop": 64 if quick else 256,
            "batch_size": 2 if quick else 4,
            "repeats": r(30),
            "repeats_estimated": r(7),
            "warmup": 1 if quick else 3,
            "radius": 4.0,
        },
        "peaks": {
            "map_sizes": [64, 256] if quick else [640, 4096],
            "threshold": 0.5,
            "min_distance": 3,
            "repeats_small": r(15),
            "repeats_large": r(5),
            "repeats_skimage_large": r(3),
            "warmup": 1,
        },
        "matching": {
            "single_points": 200 if quick else 2000,
            "images": 10 if quick else 400,
            "points_per_image": 30 if quick else 150,
            "radius": 6.0,
            "repeats": r(5),
            "repeats_dense": r(3),
            "warmup": 1,
        },
        "training": {
            "batch_size": 2 if quick else 4,
            "crop": 64 if quick else 256,
            # (warmup, repeats) per size on the CPU, and on CUDA; the paper size (ResNet-101)
            # takes seconds per step on a CPU.
            "cpu": (1 if quick else 2, r(5)),
            "paper": (1, r(2)),
            "cuda": (1 if quick else 3, r(10)),
        },
        "inference": {
            "image_size": 256 if quick else args.inference_size,
            "paper_image_size": 256 if quick else (args.paper_inference_size or args.inference_size),
            "tile_size": 128 if quick else 512,
            "overlap": 16 if quick else 64,
            "batch_size": 4,
            # (warm-up forward passes of one batch of tiles, timed whole images).
            "cpu": (1, r(3)),
            "paper": (1, r(2)),
            "cuda": (1 if quick else 2, r(5)),
        },
        "sizes": list(args.sizes),
        "presets": list(args.presets),
        # --quick: one thread, so a smoke test on a busy shared machine does not stall on
        # oversubscribed OpenMP threads; and one process per stage instead of per measurement.
        "threads": args.threads or (1 if quick else None),
        "isolation": "stage" if quick else "measurement",
        # Stages 4-5 on the CPU: plain float32 NCHW, and also channels_last when asked (the
        # training engine's default memory format, TrainConfig.channels_last).
        "cpu_variants": [(False, False)] + ([(False, True)] if args.cpu_channels_last else []),
    }
    return s


# --------------------------------------------------------------------------------------------
# Stage 1: targets
# --------------------------------------------------------------------------------------------


def stage_targets(cfg: dict[str, Any]) -> dict[str, Any]:
    """Milliseconds per image for each mask generator on a BCData-like tile."""
    import cellkit

    c = cfg["targets"]
    n = c["image_size"]
    points, classes = synthetic.cell_points((n, n), count=c["cells"], rng=0)
    image = synthetic.ihc_image((n, n), points, classes, rng=0)
    radius = c["radius"]
    # The presets' own settings of each generator.
    specs = {
        "circle": {"radius": radius},
        "random_polygon": {"base_radius": radius},
        "gaussian": dict(cellkit.presets.fcrn().targets["density"].kwargs),
        "estimated": {"radius": radius},
    }
    rows = []
    results: dict[str, Any] = {}
    for name, kwargs in specs.items():
        gen = cellkit.MASKS.build(name, **kwargs)
        rng = np.random.default_rng(0)
        repeats = c["repeats_estimated"] if name == "estimated" else c["repeats"]

        def call(gen: Any = gen, rng: Any = rng) -> np.ndarray:
            return gen(points, classes, shape=(n, n), num_classes=2, image=image, rng=rng)

        stats, mask = measure(call, repeats=repeats, warmup=c["warmup"])
        entry = {
            "kwargs": kwargs,
            "per_image": bool(gen.per_image),
            "ms_per_image": stats["median_ms"],
            "timing": stats,
            "output_shape": list(mask.shape),
        }
        results[name] = entry
        rows.append(
            {
                "target": name,
                "ms": stats["median_ms"],
                "min": stats["min_ms"],
                "max": stats["max_ms"],
                "repeats": repeats,
                "every_iteration": not gen.per_image,
            }
        )

    # random_polygon for one training batch: batch_size crops at the same density.
    crop, bs = c["batch_crop"], c["batch_size"]
    crops = [synthetic.cell_points((crop, crop), rng=i) for i in range(bs)]
    gen = cellkit.MASKS.build("random_polygon", base_radius=radius)
    rng = np.random.default_rng(0)

    def batch() -> list[np.ndarray]:
        return [gen(p, k, shape=(crop, crop), num_classes=2, rng=rng) for p, k in crops]

    stats, _ = measure(batch, repeats=c["repeats"], warmup=c["warmup"])
    results["random_polygon_batch"] = {
        "batch_size": bs,
        "crop": crop,
        "cells": int(sum(len(p) for p, _ in crops)),
        "ms_per_batch": stats["median_ms"],
        "timing": stats,
    }
    rows.append(
        {
            "target": f"random_polygon ({bs}x{crop}^2 batch)",
            "ms": stats["median_ms"],
            "min": stats["min_ms"],
            "max": stats["max_ms"],
            "repeats": c["repeats"],
            "every_iteration": True,
        }
    )
    return {
        "image_size": n,
        "cells": int(len(points)),
        "num_classes": 2,
        "generators": results,
        "table": format_table(
            f"1. Targets on a {n}x{n} image with {len(points)} cells (ms per image, median)",
            [
                ("target", "target"),
                ("ms", "ms"),
                ("min", "min"),
                ("max", "max"),
                ("repeats", "repeats"),
                ("every_iteration", "every iteration"),
            ],
            rows,
        ),
    }


# --------------------------------------------------------------------------------------------
# Stage 2: peaks
# --------------------------------------------------------------------------------------------


def _point_set(classes: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> set[tuple[int, int, int]]:
    return set(zip(classes.astype(int).tolist(), rows.astype(int).tolist(), cols.astype(int).tolist()))


def stage_peaks(cfg: dict[str, Any]) -> dict[str, Any]:
    """cellkit's peaks against skimage's peak_local_max on the same maps and settings."""
    from skimage.feature import peak_local_max

    from cellkit.postprocess.peaks import peaks

    c = cfg["peaks"]
    thr, dist = c["threshold"], c["min_distance"]
    rows, results = [], []
    for i, size in enumerate(c["map_sizes"]):
        maps = synthetic.probability_maps(size, rng=i)
        large = i == len(c["map_sizes"]) - 1 and len(c["map_sizes"]) > 1
        repeats = c["repeats_large"] if large else c["repeats_small"]
        repeats_sk = c["repeats_skimage_large"] if large else c["repeats_small"]

        def ours(maps: np.ndarray = maps) -> Any:
            # exclusive=False: classes independent, as peak_local_max on each channel.
            return peaks(maps, threshold=thr, min_distance=dist, exclusive=False)

        def theirs(maps: np.ndarray = maps) -> list[np.ndarray]:
            return [
                peak_local_max(m, min_distance=dist, threshold_abs=thr, exclude_border=False) for m in maps
            ]

        def ours_exclusive(maps: np.ndarray = maps) -> Any:
            return peaks(maps, threshold=thr, min_distance=dist, exclusive=True)

        ours_stats, det = measure(ours, repeats=repeats, warmup=c["warmup"])
        excl_stats, _ = measure(ours_exclusive, repeats=repeats, warmup=c["warmup"])
        sk_stats, found = measure(theirs, repeats=repeats_sk, warmup=c["warmup"])
        a = _point_set(det.classes, det.points[:, 1], det.points[:, 0])
        b = set()
        for cls, rc in enumerate(found):
            b |= _point_set(np.full(len(rc), cls), rc[:, 0], rc[:, 1])
        speedup = sk_stats["median_ms"] / ours_stats["median_ms"]
        entry = {
            "shape": list(maps.shape),
            "threshold": thr,
            "min_distance": dist,
            "cellkit_ms": ours_stats["median_ms"],
            "cellkit_exclusive_ms": excl_stats["median_ms"],
            "skimage_ms": sk_stats["median_ms"],
            "speedup": speedup,
            "points_cellkit": len(a),
            "points_skimage": len(b),
            "same_points": a == b,
            "timing": {"cellkit": ours_stats, "cellkit_exclusive": excl_stats, "skimage": sk_stats},
        }
        results.append(entry)
        rows.append(
            {
                "map": "x".join(map(str, maps.shape)),
                "ours": ours_stats["median_ms"],
                "excl": excl_stats["median_ms"],
                "sk": sk_stats["median_ms"],
                "speedup": speedup,
                "points": len(a),
                "same": a == b,
            }
        )
    return {
        "maps": results,
        "table": format_table(
            f"2. Peaks (threshold {thr}, min_distance {dist}; ms, median)",
            [
                ("map", "map"),
                ("ours", "cellkit"),
                ("excl", "cellkit exclusive"),
                ("sk", "peak_local_max"),
                ("speedup", "speedup"),
                ("points", "points"),
                ("same", "same points"),
            ],
            rows,
        ),
    }


# --------------------------------------------------------------------------------------------
# Stage 3: matching and metrics
# --------------------------------------------------------------------------------------------


def dense_match_count(pred: np.ndarray, true: np.ndarray, radius: float) -> int:
    """Matches of a plain dense assignment: ``linear_sum_assignment`` on the full distance matrix.

    Pairs farther than ``radius`` get a cost larger than any sum of allowed ones, so the
    assignment has the most pairs within the radius (as cellkit's ``hungarian``); the pairs
    within the radius are the matches.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    if len(pred) == 0 or len(true) == 0:
        return 0
    d = cdist(pred, true)
    big = radius * min(d.shape) + 1.0
    r, c = linear_sum_assignment(np.where(d <= radius, d, big))
    return int(np.count_nonzero(d[r, c] <= radius))


def stage_matching(cfg: dict[str, Any]) -> dict[str, Any]:
    """cellkit's sparse matching and evaluate against a dense linear_sum_assignment."""
    from cellkit.metrics import evaluate, match_points
    from cellkit.points import Detections

    c = cfg["matching"]
    radius = c["radius"]
    rows, out = [], {}

    # One image with many points.
    n = c["single_points"]
    side = int(round(synthetic.BCDATA_TILE * math.sqrt(n / synthetic.BCDATA_CELLS_PER_TILE)))
    true, _ = synthetic.cell_points((side, side), count=n, rng=1)
    pred = synthetic.matched_predictions(true, (side, side), rng=2)
    hung, (p_idx, _) = measure(
        lambda: match_points(pred, true, radius), repeats=c["repeats"], warmup=c["warmup"]
    )
    greedy, (g_idx, _) = measure(
        lambda: match_points(pred, true, radius, method="greedy"), repeats=c["repeats"], warmup=c["warmup"]
    )
    dense, dense_tp = measure(
        lambda: dense_match_count(pred, true, radius), repeats=c["repeats_dense"], warmup=c["warmup"]
    )
    out["single_image"] = {
        "pred_points": int(len(pred)),
        "true_points": int(len(true)),
        "image_size": side,
        "radius": radius,
        "cellkit_hungarian_ms": hung["median_ms"],
        "cellkit_greedy_ms": greedy["median_ms"],
        "scipy_dense_ms": dense["median_ms"],
        "speedup": dense["median_ms"] / hung["median_ms"],
        "tp_cellkit": int(len(p_idx)),
        "tp_greedy": int(len(g_idx)),
        "tp_scipy": dense_tp,
        "same_tp": int(len(p_idx)) == dense_tp,
        "timing": {"hungarian": hung, "greedy": greedy, "scipy_dense": dense},
    }
    rows.append(
        {
            "case": f"{len(pred)} vs {len(true)} points, 1 image",
            "ours": hung["median_ms"],
            "greedy": greedy["median_ms"],
            "dense": dense["median_ms"],
            "speedup": dense["median_ms"] / hung["median_ms"],
            "tp": len(p_idx),
            "same": len(p_idx) == dense_tp,
        }
    )

    # Many images of BCData size, two classes: the full evaluate() against a dense loop.
    images, per = c["images"], c["points_per_image"]
    rng = np.random.default_rng(3)
    truths, predictions = [], []
    for _ in range(images):
        pts, cls = synthetic.cell_points((640, 640), count=per, rng=rng)
        # 90 % of the cells found, moved by ~2 px, 5 % of them in the wrong class; 10 % extras.
        keep = rng.random(len(pts)) < 0.9
        found = np.clip(pts[keep] + rng.normal(0.0, 2.0, (int(keep.sum()), 2)), 0, 639)
        found_cls = np.where(rng.random(len(found)) < 0.05, 1 - cls[keep], cls[keep])
        extra = int(round(0.1 * per))
        p_pts = np.vstack([found, rng.uniform(0, 639, (extra, 2))])
        p_cls = np.concatenate([found_cls, rng.integers(0, 2, extra)])
        truths.append((pts, cls))
        predictions.append(
            Detections(
                points=p_pts.astype(np.float32),
                classes=p_cls,
                scores=rng.random(len(p_pts)).astype(np.float32),
            )
        )

    def ours() -> Any:
        return evaluate(predictions, truths, radius=radius, num_classes=2)

    def dense_loop() -> np.ndarray:
        tp = np.zeros(2, np.int64)
        for det, (pts, cls) in zip(predictions, truths):
            for k in range(2):
                tp[k] += dense_match_count(
                    det.points[det.classes == k].astype(np.float64), pts[cls == k], radius
                )
        return tp

    ev, report = measure(ours, repeats=c["repeats"], warmup=c["warmup"])
    dl, dense_tp_all = measure(dense_loop, repeats=c["repeats_dense"], warmup=c["warmup"])
    same = bool(np.array_equal(report.tp, dense_tp_all))
    out["many_images"] = {
        "images": images,
        "points_per_image": per,
        "num_classes": 2,
        "radius": radius,
        "cellkit_evaluate_ms": ev["median_ms"],
        "scipy_dense_ms": dl["median_ms"],
        "speedup": dl["median_ms"] / ev["median_ms"],
        "tp_cellkit": report.tp.tolist(),
        "tp_scipy": dense_tp_all.tolist(),
        "same_tp": same,
        "total_f1": report.total_f1.tolist(),
        "mean_f1": report.mean_f1.tolist(),
        "timing": {"evaluate": ev, "scipy_dense": dl},
    }
    rows.append(
        {
            "case": f"{images} images x {per} points (evaluate)",
            "ours": ev["median_ms"],
            "greedy": None,
            "dense": dl["median_ms"],
            "speedup": dl["median_ms"] / ev["median_ms"],
            "tp": int(report.tp.sum()),
            "same": same,
        }
    )
    out["table"] = format_table(
        f"3. Matching within {radius:g} px (ms, median)",
        [
            ("case", "case"),
            ("ours", "cellkit hungarian"),
            ("greedy", "cellkit greedy"),
            ("dense", "scipy dense LSA"),
            ("speedup", "speedup"),
            ("tp", "tp"),
            ("same", "same tp"),
        ],
        rows,
    )
    return out


# --------------------------------------------------------------------------------------------
# Stages 4-6: models
# --------------------------------------------------------------------------------------------

_TRAIN_COLUMNS = [
    ("preset", "preset"),
    ("size", "size"),
    ("variant", "variant"),
    ("step_s", "s/step"),
    ("min_s", "min"),
    ("max_s", "max"),
    ("images_per_s", "images/s"),
    ("peak_mb", "peak MB"),
    ("added_mb", "added MB"),
    ("targets_ms", "targets ms/batch"),
]
_INFER_COLUMNS = [
    ("size", "size"),
    ("variant", "variant"),
    ("image", "image"),
    ("tiles", "tiles"),
    ("seconds", "s/image"),
    ("min_s", "min"),
    ("max_s", "max"),
    ("mpix", "MP/s"),
    ("gflops", "GFLOP/s"),
    ("mm", "mm GFLOP/s"),
    ("share", "share of mm"),
    ("model_share", "model time"),
    ("peak_mb", "peak MB"),
]


def _variant(r: dict[str, Any]) -> str:
    parts = ["amp" if r["amp"] else "fp32"]
    if r["channels_last"]:
        parts.append("channels_last")
    return "+".join(parts)


def _train_row(r: dict[str, Any]) -> dict[str, Any]:
    peak = r.get("peak_cuda_allocated_mb", r["peak_rss_mb"])
    added = r.get("peak_cuda_allocated_mb", r["added_rss_mb"])
    return {
        "preset": r["preset"],
        "size": r["size"],
        "variant": _variant(r),
        "step_s": r["step_s"],
        "min_s": r["step"]["min_ms"] / 1e3,
        "max_s": r["step"]["max_ms"] / 1e3,
        "images_per_s": r["images_per_s"],
        "peak_mb": peak,
        "added_mb": added,
        "targets_ms": r["targets_ms"],
    }


def _infer_row(r: dict[str, Any]) -> dict[str, Any]:
    mm = r["matmul"]["float16" if r["amp"] else "float32"]["gflops_per_s"]
    share = r["share_of_matmul_float16"] if r["amp"] else r["share_of_matmul"]
    return {
        "size": r["size"],
        "variant": _variant(r),
        "image": f"{r['image_size']}^2",
        "tiles": r["tiles"],
        "seconds": r["seconds_per_image"],
        "min_s": r["predict"]["min_ms"] / 1e3,
        "max_s": r["predict"]["max_ms"] / 1e3,
        "mpix": r["megapixels_per_s"],
        "gflops": r["gflops_per_s"],
        "mm": mm,
        "share": share,
        "model_share": r["model_share_of_time"],
        "peak_mb": r.get("peak_cuda_allocated_mb", r["peak_rss_mb"]),
    }


def _isolated_runs(
    cfg: dict[str, Any], fn: Callable[..., dict[str, Any]], calls: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``fn(**kwargs)`` for each of ``calls``, each in a fresh process (one process in all for --quick)."""
    if cfg["isolation"] == "stage":
        return run_isolated(call_all, calls=[(fn, kwargs) for kwargs in calls])
    return [run_isolated(fn, **kwargs) for kwargs in calls]


def _train_runs(
    cfg: dict[str, Any], device: str, variants: Sequence[tuple[bool, bool]]
) -> list[dict[str, Any]]:
    t = cfg["training"]
    calls = []
    for size in cfg["sizes"]:
        for preset in cfg["presets"]:
            for amp, channels_last in variants:
                warmup, repeats = t["cuda"] if device.startswith("cuda") else t[size]
                log(f"  training step: {preset} {size} {device} amp={amp} channels_last={channels_last}")
                calls.append(
                    dict(
                        preset=preset,
                        size=size,
                        batch_size=t["batch_size"],
                        crop=t["crop"],
                        warmup=warmup,
                        repeats=repeats,
                        device=device,
                        amp=amp,
                        channels_last=channels_last,
                        threads=cfg["threads"],
                    )
                )
    return _isolated_runs(cfg, model_bench.train_step, calls)


def _inference_runs(
    cfg: dict[str, Any], device: str, variants: Sequence[tuple[bool, bool]]
) -> list[dict[str, Any]]:
    c = cfg["inference"]
    calls = []
    for size in cfg["sizes"]:
        on_cpu = not device.startswith("cuda")
        image_size = c["paper_image_size"] if size == "paper" and on_cpu else c["image_size"]
        warmup, repeats = c[size] if on_cpu else c["cuda"]
        for amp, channels_last in variants:
            log(f"  inference: {size} {image_size}^2 {device} amp={amp} channels_last={channels_last}")
            calls.append(
                dict(
                    size=size,
                    image_size=image_size,
                    tile_size=c["tile_size"],
                    overlap=c["overlap"],
                    batch_size=c["batch_size"],
                    warmup=warmup,
                    repeats=repeats,
                    device=device,
                    amp=amp,
                    channels_last=channels_last,
                    threads=cfg["threads"],
                )
            )
    return _isolated_runs(cfg, model_bench.inference, calls)


def stage_training(cfg: dict[str, Any]) -> dict[str, Any]:
    """Seconds per training step and peak memory for each preset and size, on the CPU."""
    runs = _train_runs(cfg, "cpu", cfg["cpu_variants"])
    t = cfg["training"]
    return {
        "device": "cpu",
        "runs": runs,
        "table": format_table(
            f"4. Training step on the CPU (batch {t['batch_size']}, {t['crop']}x{t['crop']}; "
            "peak = process RSS)",
            _TRAIN_COLUMNS,
            [_train_row(r) for r in runs],
        ),
    }


def stage_inference(cfg: dict[str, Any]) -> dict[str, Any]:
    """Tiled prediction speed, memory and share of the measured matmul rate, on the CPU."""
    runs = _inference_runs(cfg, "cpu", cfg["cpu_variants"])
    c = cfg["inference"]
    return {
        "device": "cpu",
        "runs": runs,
        "table": format_table(
            f"5. Inference on the CPU (tiles {c['tile_size']}, overlap {c['overlap']}, "
            f"batch {c['batch_size']};"
            " peak = process RSS)",
            _INFER_COLUMNS,
            [_infer_row(r) for r in runs],
        ),
    }


def stage_gpu(cfg: dict[str, Any], device: str | None) -> dict[str, Any]:
    """Stages 4 and 5 on CUDA: float32, then mixed precision with channels_last."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        reason = "--device cpu" if device == "cpu" else "CUDA is not available"
        return {"skipped": reason, "table": f"6. GPU: skipped ({reason})"}
    dev = device or "cuda"
    variants = [(False, False), (True, True)]
    train = _train_runs(cfg, dev, variants)
    infer = _inference_runs(cfg, dev, variants)
    name = torch.cuda.get_device_name(torch.device(dev))
    return {
        "device": dev,
        "device_name": name,
        "training": train,
        "inference": infer,
        "table": "\n\n".join(
            [
                format_table(
                    f"6a. Training step on {name} (peak = torch.cuda.max_memory_allocated)",
                    _TRAIN_COLUMNS,
                    [_train_row(r) for r in train],
                ),
                format_table(f"6b. Inference on {name}", _INFER_COLUMNS, [_infer_row(r) for r in infer]),
            ]
        ),
    }


# --------------------------------------------------------------------------------------------
# Targets of the issue
# --------------------------------------------------------------------------------------------


def reference_step(results: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``cpu``-size CPU training step random_polygon is compared with (measured if needed)."""
    for run in results.get("training", {}).get("runs", []):
        if run["preset"] == REFERENCE_PRESET and run["size"] == "cpu":
            return run
    t = cfg["training"]
    warmup, repeats = t["cpu"]
    log(f"  reference training step: {REFERENCE_PRESET} cpu")
    return run_isolated(
        model_bench.train_step,
        preset=REFERENCE_PRESET,
        size="cpu",
        batch_size=t["batch_size"],
        crop=t["crop"],
        warmup=warmup,
        repeats=repeats,
        threads=cfg["threads"],
    )


def checks(results: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue: its value, the threshold and whether it is met."""
    out = []
    if "targets" in results:
        step = reference_step(results, cfg)
        gens = results["targets"]["generators"]
        step_ms = step["step_s"] * 1e3
        image_share = gens["random_polygon"]["ms_per_image"] / step_ms
        batch_share = gens["random_polygon_batch"]["ms_per_batch"] / step_ms
        results["targets"]["reference_step"] = {
            "preset": step["preset"],
            "size": step["size"],
            "batch_size": step["batch_size"],
            "crop": step["crop"],
            "step_ms": step_ms,
            "random_polygon_image_share": image_share,
            "random_polygon_batch_share": batch_share,
        }
        out.append(
            {
                "check": f"random_polygon, one {results['targets']['image_size']}^2 image / "
                f"{REFERENCE_PRESET} cpu step",
                "value": image_share,
                "target": f"< {RANDOM_POLYGON_MAX_SHARE:g}",
                "met": image_share < RANDOM_POLYGON_MAX_SHARE,
            }
        )
        out.append(
            {
                "check": f"random_polygon, one batch / {REFERENCE_PRESET} cpu step",
                "value": batch_share,
                "target": f"< {RANDOM_POLYGON_MAX_SHARE:g}",
                "met": batch_share < RANDOM_POLYGON_MAX_SHARE,
            }
        )
    if "peaks" in results:
        for m in results["peaks"]["maps"]:
            shape = "x".join(map(str, m["shape"]))
            out.append(
                {
                    "check": f"peaks speedup over peak_local_max, {shape}",
                    "value": m["speedup"],
                    "target": f">= {PEAKS_MIN_SPEEDUP:g}",
                    "met": m["speedup"] >= PEAKS_MIN_SPEEDUP,
                }
            )
            out.append(
                {
                    "check": f"peaks finds the same points, {shape}",
                    "value": m["same_points"],
                    "target": "true",
                    "met": bool(m["same_points"]),
                }
            )
    if "matching" in results:
        for key in ("single_image", "many_images"):
            m = results["matching"][key]
            out.append(
                {
                    "check": f"matching {key.replace('_', ' ')}: same tp as dense",
                    "value": m["same_tp"],
                    "target": "true",
                    "met": bool(m["same_tp"]),
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _choices(text: str, names: Sequence[str], what: str, numbered: bool = False) -> list[str]:
    picked = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if numbered and item.isdigit() and 1 <= int(item) <= len(names):
            item = names[int(item) - 1]
        if item == "all":
            picked.extend(names)
            continue
        if item not in names:
            import difflib

            close = difflib.get_close_matches(item, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise argparse.ArgumentTypeError(
                f"unknown {what} {item!r}.{hint} Choose from {', '.join(names)}."
            )
        picked.append(item)
    return [n for n in names if n in picked]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(
        description="Benchmark cellkit against plain baselines. "
        "JSON on stdout (or --json FILE), tables on stderr.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="each stage once at a small size (a smoke test, under a minute; not for figures)",
    )
    p.add_argument(
        "--stages",
        default="all",
        type=lambda s: _choices(s, STAGES, "stage", numbered=True),
        help=f"comma-separated stages, by name or number: {', '.join(STAGES)} (default all)",
    )
    p.add_argument(
        "--sizes",
        default=None,
        type=lambda s: _choices(s, SIZES, "size"),
        help="model sizes of stages 4-6: cpu,paper (default both; --quick: cpu)",
    )
    p.add_argument(
        "--presets",
        default="all",
        type=lambda s: _choices(s, PRESETS, "preset"),
        help=f"presets of the training step: {', '.join(PRESETS)} (default all)",
    )
    p.add_argument(
        "--device",
        default=None,
        choices=["cpu", "cuda"],
        help="stage 6 runs on CUDA when available; --device cpu skips it, --device cuda requires it",
    )
    p.add_argument(
        "--inference-size", type=int, default=4096, help="side of the square image of stage 5 (default 4096)"
    )
    p.add_argument(
        "--paper-inference-size",
        type=int,
        default=None,
        help="side for the paper size on the CPU, where ResNet-101 takes about 100 s per 4096^2 image on "
        "2 cores (default: --inference-size; the JSON's estimated_seconds_at_4096 scales the time per "
        "tile of a smaller image to a 4096^2 one; CUDA always uses --inference-size)",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats of every measurement (default per stage)"
    )
    p.add_argument(
        "--cpu-channels-last",
        action="store_true",
        help="stages 4-5 on the CPU also in channels_last (as the training engine does by default)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the JSON here instead of stdout")
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = ["cpu"] if args.quick else list(SIZES)
    if args.inference_size < 16 or (args.paper_inference_size or 16) < 16:
        p.error("--inference-size and --paper-inference-size must be at least 16 pixels")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected stages; print the tables on stderr and the JSON; return the results."""
    import torch

    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine.")
    cfg = settings(args)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    started = time.perf_counter()
    machine = machine_info(ROOT)
    log(
        f"cellkit benchmarks on {machine['cpu_model']} ({machine['usable_cpus']} CPUs, "
        f"torch {machine['torch']}, "
        f"{machine['torch_threads']} threads){' [quick]' if args.quick else ''}"
    )
    stage_fns: dict[str, Callable[[], dict[str, Any]]] = {
        "targets": lambda: stage_targets(cfg),
        "peaks": lambda: stage_peaks(cfg),
        "matching": lambda: stage_matching(cfg),
        "training": lambda: stage_training(cfg),
        "inference": lambda: stage_inference(cfg),
        "gpu": lambda: stage_gpu(cfg, args.device),
    }
    results: dict[str, Any] = {}
    for number, name in enumerate(STAGES, 1):
        if name not in args.stages:
            continue
        log(f"stage {number}: {name}")
        t0 = time.perf_counter()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        results[name] = stage_fns[name]()
        table = results[name].pop("table")
        results[name]["stage_seconds"] = time.perf_counter() - t0
        results[name]["load_average_1min"] = {
            "start": load,
            "end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }
        loads = results[name]["load_average_1min"]
        if loads["start"] is not None:
            table += f"\n(load average {loads['start']:.1f} at the start, {loads['end']:.1f} at the end)"
        warning = contention(loads["start"], loads["end"], machine["usable_cpus"])
        results[name]["contended"] = warning is not None
        if warning:
            table += "\n" + warning
        log(table + "\n")
    check_rows = checks(results, cfg)
    if check_rows:
        title = "Targets (a --quick run's sizes are too small to judge them)" if args.quick else "Targets"
        log(
            format_table(
                title,
                [("check", "check"), ("value", "value"), ("target", "target"), ("met", "met")],
                check_rows,
            )
        )
    machine["load_average_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    report = {
        "schema": 1,
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "machine": machine,
        "settings": cfg,
        "stages": results,
        "checks": check_rows,
        "duration_s": time.perf_counter() - started,
    }
    text = json.dumps(report, indent=2, default=_json_default, allow_nan=False)
    if args.json:
        Path(args.json).write_text(text + "\n")
        log(f"wrote {args.json} ({report['duration_s']:.0f} s)")
    else:
        print(text)
        log(f"done in {report['duration_s']:.0f} s")
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    main()
