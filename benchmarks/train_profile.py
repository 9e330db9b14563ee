"""Where a training's time goes: the real ``cellkit train`` of each preset on each dataset, per phase.

Runs ``cellkit train --preset P --data D --format F --out OUT/<dataset>-<preset>-<arm>`` in a
subprocess, one run at a time, and reads the ``timings.json`` that every stage writes
(``steps``, ``data loading``, ``validation``, ``checkpoints``, ``target preparation`` (the
prior's stage-1 maps), ``calibration``, ``calibration (int8)``, ``other``). Two arms:

* ``native``: what ``cellkit train`` does by default: bfloat16 autocast on a CPU that computes
  it natively (AVX512-BF16 / AMX), float32 elsewhere;
* ``fp32``: float32 forced (``CELLKIT_CPU_BF16=0``), the baseline of the speed-up.

On a CPU without native bfloat16 the two arms run the same arithmetic (the JSON says
``cpu_bf16_native: false``), and ``--arms native`` is enough. Each run records the load
average before and after it; a run that shared the cores with other work is flagged
``contended`` (its timings say nothing about the code: run it again alone).

Prints one JSON document (machine, then one record per run); ``--json FILE`` writes it too.
Resumable: a finished run (its ``timings.json`` present) is read, not run again.

Examples::

    python benchmarks/train_profile.py --presets ours --datasets endonuke --arms native
    python benchmarks/train_profile.py --presets ours ours_plus_plus --datasets endonuke bcdata \\
        --arms native fp32 --out results/profile --json benchmarks/results-train-profile-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import contention, load_average, machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FORMAT = {"endonuke": "endonuke", "bcdata": "bcdata"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["ours", "ours_plus_plus"])
    p.add_argument("--datasets", nargs="+", choices=sorted(FORMAT), default=["endonuke", "bcdata"])
    p.add_argument("--arms", nargs="+", choices=("native", "fp32"), default=["native", "fp32"])
    p.add_argument("--bcdata", type=Path, default=ROOT.parent / "shared" / "data" / "bcdata_sample",
                   help="the BCData sample (default: ../shared/data/bcdata_sample)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "profile", help="where the runs go")
    p.add_argument("--train-args", default="", help="more arguments for cellkit train (e.g. '--steps 40')")
    p.add_argument("--json", type=Path, default=None, help="write the JSON here too")
    return p.parse_args(argv)


def data_args(dataset: str, args: argparse.Namespace) -> list[str]:
    """``--data``/``--format`` of a dataset; the bundled EndoNuke sample needs no ``--data``."""
    if dataset == "bcdata":
        if not args.bcdata.is_dir():
            raise SystemExit(f"--bcdata {args.bcdata}: no such folder; give the BCData sample's folder.")
        return ["--data", str(args.bcdata), "--format", "bcdata"]
    return ["--format", "endonuke"]


def one_run(dataset: str, preset: str, arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train (unless done), then read its timings."""
    run = args.out / f"{dataset}-{preset}-{arm}"
    stages = {"train": run / "timings.json", "pretrain": run / "pretrain" / "timings.json"}
    record: dict[str, Any] = {"dataset": dataset, "preset": preset, "arm": arm, "run": str(run)}
    if not stages["train"].is_file():
        env = dict(os.environ)
        if arm == "fp32":
            env["CELLKIT_CPU_BF16"] = "0"
        resume = ["--resume"] if (run / "config.yaml").exists() else []
        command = [sys.executable, "-m", "cellkit.cli", "train", "--preset", preset, *data_args(dataset, args),
                   "--out", str(run), *args.train_args.split(), *resume]
        print(f"[{dataset} {preset} {arm}] {' '.join(command[2:])}", file=sys.stderr, flush=True)
        run.parent.mkdir(parents=True, exist_ok=True)
        load_start, started = load_average(), time.perf_counter()
        with open(args.out / f"{run.name}.log", "a", encoding="utf-8") as log:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"cellkit train failed (status {proc.returncode}); see {args.out / (run.name + '.log')}")
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        record["load_average_1min"] = {"start": load_start, "end": load_average()}
        warning = contention(load_start, record["load_average_1min"]["end"])
        record["contended"] = warning is not None
        if warning:
            print(f"[{dataset} {preset} {arm}] {warning}", file=sys.stderr, flush=True)
    record["stages"] = {name: json.loads(path.read_text()) for name, path in stages.items() if path.is_file()}
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from cellkit.engine.inference import cpu_bf16_native

    report: dict[str, Any] = {
        "command": "python benchmarks/train_profile.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(ROOT), "cpu_bf16_native": cpu_bf16_native(), "runs": [],
    }
    for dataset in args.datasets:
        for preset in args.presets:
            for arm in args.arms:
                report["runs"].append(one_run(dataset, preset, arm, args))
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
