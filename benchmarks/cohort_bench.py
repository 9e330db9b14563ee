"""Cohort throughput: slides per hour with 1, 2, 3... ``cellkit predict`` workers on one folder.

Writes ``--slides`` pyramidal TIFF mosaics of the bundled EndoNuke tiles (``--side`` pixels at
0.5 um/px, as ``slide_bench.py`` does), then for each worker count N starts N real
``cellkit predict SLIDES --model NAME --out OUT --claim`` processes (or ``--shard K/N`` with
``--mode shard``) at once and times them from the first start to the last exit: Python and
torch start-up, loading the model, every slide and every file, as a cluster runs them. Each
worker gets ``max(1, cores // N)`` threads (``OMP_NUM_THREADS``). The figures are
``slides_per_hour`` (all workers) and ``slides_per_hour_per_worker``; ``speedup`` is against
N = 1. Every run's ``cohort.csv`` must equal the one-worker run's (checked: ``same_cohort``).

On a machine of C cores, N > C workers share cores: the figure then says what oversubscription
costs, not what more machines would give.

Usage::

    python benchmarks/cohort_bench.py --workers 1,2,3 --slides 6 --side 2048
    python benchmarks/cohort_bench.py --mode shard --json-out benchmarks/results-cohort-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import emit, load_average, provenance  # noqa: E402
from slide_bench import write_mosaic  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="1,2,3", help="worker counts to time, comma-separated")
    p.add_argument("--slides", type=int, default=6, help="slides in the cohort")
    p.add_argument("--side", type=int, default=2048, help="side of each slide, pixels at 0.5 um/px")
    p.add_argument("--mode", choices=("claim", "shard"), default="claim")
    p.add_argument("--model", default="endonuke-epithelium", help="a shipped model (cellkit.zoo)")
    p.add_argument("--checkpoint", help="a checkpoint instead of --model")
    p.add_argument("--cores", type=int, help="cores to share between workers (default: the affinity mask)")
    p.add_argument("--json-out", type=Path, help="also write the JSON here")
    return p.parse_args(argv)


def run_workers(args: argparse.Namespace, slides: Path, out: Path, n: int, cores: int) -> dict[str, Any]:
    """Start ``n`` workers on ``slides`` into ``out`` at once; their wall time and exit codes."""
    model = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model]
    threads = max(1, cores // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE.parent)}
    start = time.perf_counter()
    procs = []
    for k in range(n):
        share = ["--claim"] if args.mode == "claim" else ["--shard", f"{k + 1}/{n}"]
        procs.append(subprocess.Popen([sys.executable, "-m", "cellkit.cli", "predict", str(slides), *model,
                                       "--out", str(out), "--device", "cpu", *share],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - start
    failed = [e[-1500:] for p, e in zip(procs, errors) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"a worker failed: {failed[0]}")
    return {"workers": n, "threads_per_worker": threads, "seconds": round(seconds, 2),
            "slides_per_hour": round(args.slides / seconds * 3600, 1),
            "slides_per_hour_per_worker": round(args.slides / seconds * 3600 / n, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(v) for v in args.workers.split(",") if v.strip()]
    cores = args.cores or len(os.sched_getaffinity(0))
    root = Path(tempfile.mkdtemp(prefix="cellkit-cohort-"))
    load_start = load_average()
    try:
        slides = root / "slides"
        slides.mkdir()
        first = write_mosaic(slides / "slide-00.tif", args.side)
        for i in range(1, args.slides):
            shutil.copyfile(first, slides / f"slide-{i:02d}.tif")
        rows, reference = [], None
        for n in counts:
            out = root / f"out-{n}"
            row = run_workers(args, slides, out, n, cores)
            cohort = (out / "cohort.csv").read_text()
            reference = cohort if reference is None else reference
            row["same_cohort"] = cohort == reference
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for row in rows:
        row["speedup"] = round(rows[0]["seconds"] / row["seconds"], 2)
    result = {"benchmark": "cohort_bench", "mode": args.mode, "slides": args.slides, "side": args.side,
              "model": args.checkpoint or args.model, "cores": cores, "runs": rows,
              # the load at the end is the workers' own: only the start says whether others ran
              **provenance("benchmarks/cohort_bench.py", argv, load_start, HERE.parent, cores, end_counts=False)}
    emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
