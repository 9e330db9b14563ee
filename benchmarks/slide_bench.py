"""Whole-slide throughput: megapixels of tissue per second, end to end.

Times :func:`cellkit.wsi.predict_slide` as ``cellkit predict slide --checkpoint ...`` runs it:
opening the slide, the thumbnail and tissue mask, reading chunks (worker threads), the
network, blending, peaks, and writing the CSV, GeoJSON, summary and thumbnail. The model is a
cellkit preset at ``--size`` (``cpu`` or ``paper``) with random weights whose BatchNorm
statistics are set from real tiles (``model_bench.calibrate_batchnorm``; timing does not
depend on the weights' values). The slide is a tiled pyramidal TIFF written from the bundled
EndoNuke tiles (real IHC tissue, 0.5 um/px) as a mosaic of ``--side`` pixels with a white
border, or a slide file given with ``--slide`` (e.g. ``../shared/data/wsi/CMU-1-Small-Region.svs``).

The figure is ``tissue_mp_per_s``: the level-0 megapixels the tissue mask covers divided by
the wall time of the whole call (after one untimed warm-up on a small slide; with
``--repeat N``, the median of N calls, all of them listed in ``seconds_all``).
Issue targets: CPU ``cpu`` size >= 2 MP/s; GPU ``paper`` size >= 300 MP/s end to end.

``--model NAME`` times a shipped model (``endonuke-epithelium``: real weights, its own
thresholds, its int8 calibration) instead of random weights. ``--command`` also times the
command a user types, ``cellkit predict SLIDE --model NAME --out DIR`` in a new process, from
its start to its exit (Python and torch start-up, loading and quantizing the model, the slide,
every file): ``command_seconds`` (median; all in ``command_seconds_all``) and
``command_tissue_mp_per_s``. The difference to ``seconds`` is what one process pays once,
however many slides it is given.

Usage::

    python benchmarks/slide_bench.py --size cpu                          # the mosaic, as cellkit predict runs
    python benchmarks/slide_bench.py --size paper --device cuda --precision auto --fold-bn --side 16384
    python benchmarks/slide_bench.py --slide ../shared/data/wsi/CMU-1-Small-Region.svs
    python benchmarks/slide_bench.py --model endonuke-epithelium --command --repeat 3
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import cellkit  # noqa: E402
from harness import machine_info  # noqa: E402
from model_bench import calibrate_batchnorm  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("cpu", "paper"), default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--side", type=int, default=4096, help="side of the mosaic slide, pixels")
    p.add_argument("--slide", type=Path, help="a slide file instead of the mosaic")
    p.add_argument("--tile-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="auto",
                   help="fp32, bf16, fp16, int8 or auto (as cellkit predict: the default; int8 on the CPU)")
    p.add_argument("--fold-bn", action="store_true", default=True,
                   help="fold BatchNorm into convolutions (as cellkit predict: the default)")
    p.add_argument("--no-fold-bn", dest="fold_bn", action="store_false", help="keep BatchNorm layers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=1,
                   help="timed calls (the figure is their median; all are listed: this machine's runs vary)")
    p.add_argument("--json", type=Path, help="also write the JSON here")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="a shipped model (e.g. endonuke-epithelium) instead of random weights at --size")
    p.add_argument("--command", action="store_true",
                   help="also time 'cellkit predict SLIDE --model NAME --out DIR' as a new process (needs --model)")
    args = p.parse_args(argv)
    if args.command and not args.model:
        p.error("--command times 'cellkit predict --model NAME': give --model too (e.g. --model endonuke-epithelium)")
    return args


def write_mosaic(path: Path, side: int) -> Path:
    """A pyramidal TIFF of real IHC tiles (0.5 um/px): tissue in the middle, white around it."""
    import tifffile

    from cellkit.data.bundled import bundled_endonuke

    tiles = [np.asarray(Image.open(f).convert("RGB")) for f in sorted((bundled_endonuke() / "images").glob("*.png"))]
    image = np.full((side, side, 3), 255, np.uint8)
    border = side // 8
    rng = np.random.default_rng(0)
    for y in range(border, side - border - 200 + 1, 200):
        for x in range(border, side - border - 200 + 1, 200):
            image[y : y + 200, x : x + 200] = tiles[int(rng.integers(len(tiles)))]
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level, down = image, 1
        while True:
            res = 1e4 / (0.5 * down)
            tif.write(level, tile=(256, 256), photometric="rgb", compression="deflate",
                      resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=0 if down == 1 else 1)
            if max(level.shape[:2]) <= 1024:
                break
            level, down = level[::2, ::2], down * 2
    return path


def build_predictor(args: argparse.Namespace) -> Any:
    from cellkit.engine.predict import Predictor

    if args.model:  # a shipped model, as cellkit predict --model loads it
        extra = {"precision": args.precision, "fold_bn": args.fold_bn}
        from cellkit.zoo import pretrained

        return pretrained(args.model, device=args.device, tile_size=args.tile_size,
                          batch_size=args.batch_size, **extra), extra
    from cellkit.imaging import image_to_tensor
    from cellkit.data.bundled import bundled_endonuke
    import cellkit.postprocess  # noqa: F401
    from cellkit.registry import POSTPROCESSORS

    torch.manual_seed(0)
    cfg = cellkit.presets.ours(size=args.size, num_classes=2)
    cfg.data.mpp = 0.5
    model = cellkit.build_model(cfg)
    files = sorted((bundled_endonuke() / "images").glob("*.png"))[:4]
    calibrate_batchnorm(model, torch.stack([image_to_tensor(np.asarray(Image.open(f).convert("RGB"))) for f in files]))
    extra = {}
    params = inspect.signature(Predictor.__init__).parameters
    if args.precision and "precision" in params:
        extra["precision"] = args.precision
    if args.fold_bn and "fold_bn" in params:
        extra["fold_bn"] = True
    post = POSTPROCESSORS.build("peaks", threshold=0.5, min_distance=3)
    return Predictor(model.eval(), post, 2, ["negative", "positive"], tile_size=args.tile_size, overlap=64,
                     batch_size=args.batch_size, device=args.device, config=cfg, **extra), extra


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from cellkit.wsi import open_slide
    from cellkit.wsi.pipeline import predict_slide

    predictor, extra = build_predictor(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        slide = args.slide or write_mosaic(tmpdir / "mosaic.tif", args.side)
        warm = write_mosaic(tmpdir / "warm.tif", 1024)
        predict_slide(predictor, warm, tmpdir / "warm", progress=False, workers=args.workers)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times = []
        for k in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            result = predict_slide(predictor, slide, tmpdir / f"out{k}", progress=False, workers=args.workers,
                                   chunk_size=args.chunk_size)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        seconds = float(np.median(times))
        command_runs = [time_command(args, slide, tmpdir / f"cmd{k}") for k in range(max(1, args.repeat))
                        ] if args.command else []
        command_times = [t for t, _ in command_runs]
        with open_slide(slide) as s:
            level0_mp = s.dimensions[0] * s.dimensions[1] / 1e6
        tissue_mm2 = result.summary.get("tissue_area_mm2")
        mpp = result.summary.get("mpp") or 0.5
        tissue_mp = tissue_mm2 * 1e6 / (mpp * mpp) / 1e6 if tissue_mm2 else None
    out = {
        "benchmark": "slide",
        "size": None if args.model else args.size,
        "device": args.device,
        "options": {"tile_size": args.tile_size, "batch_size": args.batch_size, "chunk_size": args.chunk_size,
                    "workers": args.workers, **extra},
        "precision": predictor.precision,  # what "auto" resolved to (int8 on the CPU)
        "slide": str(args.slide) if args.slide else f"mosaic {args.side} x {args.side} (pyramidal deflate TIFF)",
        "slide_mp": round(level0_mp, 2),
        "tissue_mp": round(tissue_mp, 2) if tissue_mp else None,
        "chunks": result.chunks,
        "cells": int(len(result.detections)),
        "seconds": round(seconds, 2),
        "seconds_all": [round(t, 2) for t in times],
        "tissue_mp_per_s": round(tissue_mp / seconds, 3) if tissue_mp else None,
        "slide_mp_per_s": round(level0_mp / seconds, 3),
        "model": args.model or f"random weights, {args.size} size",
        "machine": machine_info(HERE.parent),
    }
    if command_times:
        command_seconds = float(np.median(command_times))
        out["command"] = (f"cellkit predict {out['slide'] if args.slide else 'mosaic.tif'} --model {args.model} "
                          f"--out DIR --device {args.device} --precision {args.precision}")
        out["command_seconds"] = round(command_seconds, 2)
        out["command_seconds_all"] = [round(t, 2) for t in command_times]
        out["command_tissue_mp_per_s"] = round(tissue_mp / command_seconds, 3) if tissue_mp else None
        out["command_cells"] = command_runs[0][1]  # the command finds the cells the call found
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


def time_command(args: argparse.Namespace, slide: Path, out: Path) -> tuple[float, int]:
    """Wall seconds of ``cellkit predict SLIDE --model NAME --out OUT`` in a new process, and
    the cells its summary counts."""
    cmd = [sys.executable, "-m", "cellkit", "predict", str(slide), "--model", args.model, "--out", str(out),
           "--device", args.device, "--precision", args.precision, "--tile-size", str(args.tile_size),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if not args.fold_bn:
        cmd.append("--no-fold-bn")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"slide_bench: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    (summary,) = out.glob("*.summary.json")
    return seconds, int(json.loads(summary.read_text(encoding="utf-8"))["cells"])


if __name__ == "__main__":
    raise SystemExit(main())
