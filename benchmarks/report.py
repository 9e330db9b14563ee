"""Markdown tables from a results file of ``benchmarks/run.py``, for docs/performance.md.

Usage::

    python benchmarks/report.py benchmarks/results-cpu.json > /tmp/tables.md

Prints the machine, the command, one table per stage that the file holds, and the targets.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table.

    Example:
        >>> print(table(["a", "b"], [[1, 2.5]]))
        | a | b |
        |---|---|
        | 1 | 2.50 |
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_num(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _variant(r: dict[str, Any]) -> str:
    return ("amp" if r["amp"] else "fp32") + ("+channels_last" if r["channels_last"] else "")


def _training(runs: list[dict[str, Any]]) -> str:
    gpu = any(r["device"].startswith("cuda") for r in runs)
    head = ["preset", "size", "variant", "s/step (median)", "min", "max", "images/s"]
    head += ["peak CUDA MB"] if gpu else ["peak RSS MB", "added MB"]
    head += ["targets ms/batch"]
    rows = []
    for r in runs:
        row = [
            r["preset"],
            r["size"],
            _variant(r),
            r["step_s"],
            r["step"]["min_ms"] / 1e3,
            r["step"]["max_ms"] / 1e3,
            r["images_per_s"],
        ]
        row += [r["peak_cuda_allocated_mb"]] if gpu else [r["peak_rss_mb"], r["added_rss_mb"]]
        row += [r["targets_ms"]]
        rows.append(row)
    return table(head, rows)


def _inference(runs: list[dict[str, Any]]) -> str:
    gpu = any(r["device"].startswith("cuda") for r in runs)
    head = [
        "size",
        "variant",
        "image",
        "tiles",
        "s/image (median)",
        "min",
        "max",
        "MP/s",
        "model GFLOP/s",
        "mm GFLOP/s (fp32)",
        "share of fp32 mm",
    ]
    head += ["share of fp16 mm"] if gpu else []
    head += ["model share of time", "peak CUDA MB" if gpu else "peak RSS MB"]
    rows = []
    for r in runs:
        row = [
            r["size"],
            _variant(r),
            f"{r['image_size']}²",
            r["tiles"],
            r["seconds_per_image"],
            r["predict"]["min_ms"] / 1e3,
            r["predict"]["max_ms"] / 1e3,
            r["megapixels_per_s"],
            r["gflops_per_s"],
            r["matmul"]["float32"]["gflops_per_s"],
            r["share_of_matmul"],
        ]
        row += [r.get("share_of_matmul_float16")] if gpu else []
        row += [r["model_share_of_time"], r["peak_cuda_allocated_mb"] if gpu else r["peak_rss_mb"]]
        rows.append(row)
    return table(head, rows)


def render(report: dict[str, Any]) -> str:
    """The Markdown of one results file."""
    m = report["machine"]
    out = [f"Command: `{report['command']}` ({report['duration_s'] / 60:.1f} min)", ""]
    machine = [
        ["date", m["date"]],
        ["CPU", f"{m['cpu_model']}, {m['usable_cpus']} usable of {m['logical_cpus']}"],
        ["memory", f"{m['memory_gb']} GB"],
        ["OS", m["os"]],
        ["Python", m["python"]],
        ["torch", f"{m['torch']}, {m['torch_threads']} threads ({m['torch_cpu_capability']})"],
        ["numpy / scipy / scikit-image", f"{m['numpy']} / {m['scipy']} / {m['scikit_image']}"],
        ["git commit", m.get("git_commit")],
        [
            "load average (1 min)",
            f"{m['load_average_1min']} at the start, {m['load_average_1min_end']} at the end",
        ],
    ]
    if m.get("cuda"):
        c = m["cuda"]
        machine.append(
            [
                "GPU",
                f"{c['device']} ({c['memory_gb']} GB), CUDA {c['cuda_version']}, cuDNN {c['cudnn']}, "
                f"cuDNN TF32 {c['cudnn_allow_tf32']}, matmul TF32 {c['matmul_allow_tf32']}",
            ]
        )
    out += [table(["", ""], machine), ""]
    stages = report["stages"]
    if "targets" in stages:
        s = stages["targets"]
        rows = [
            [
                name,
                g["ms_per_image"],
                g["timing"]["min_ms"],
                g["timing"]["max_ms"],
                g["timing"]["repeats"],
                "every iteration" if not g["per_image"] else "once per image (cached)",
            ]
            for name, g in s["generators"].items()
            if name != "random_polygon_batch"
        ]
        b = s["generators"]["random_polygon_batch"]
        rows.append(
            [
                f"random_polygon, one batch ({b['batch_size']} x {b['crop']}²)",
                b["ms_per_batch"],
                b["timing"]["min_ms"],
                b["timing"]["max_ms"],
                b["timing"]["repeats"],
                "every iteration",
            ]
        )
        out += [
            f"### 1. Targets ({s['image_size']}² image, {s['cells']} cells)",
            "",
            table(["target", "ms (median)", "min", "max", "repeats", "computed"], rows),
            "",
        ]
        if "reference_step" in s:
            ref = s["reference_step"]
            out += [
                f"Reference: `{ref['preset']}` `{ref['size']}` training step, {ref['step_ms']:.0f} ms; "
                f"random_polygon costs {100 * ref['random_polygon_image_share']:.2f} % of it per "
                f"{s['image_size']}² image, {100 * ref['random_polygon_batch_share']:.2f} % per batch.",
                "",
            ]
    if "peaks" in stages:
        rows = [
            [
                "x".join(map(str, e["shape"])),
                e["cellkit_ms"],
                e["cellkit_exclusive_ms"],
                e["skimage_ms"],
                e["speedup"],
                e["points_cellkit"],
                e["same_points"],
            ]
            for e in stages["peaks"]["maps"]
        ]
        out += [
            "### 2. Peaks",
            "",
            table(
                [
                    "maps",
                    "cellkit ms",
                    "cellkit exclusive ms",
                    "peak_local_max ms",
                    "speedup",
                    "points",
                    "same points",
                ],
                rows,
            ),
            "",
        ]
    if "matching" in stages:
        a, b = stages["matching"]["single_image"], stages["matching"]["many_images"]
        rows = [
            [
                f"{a['pred_points']} vs {a['true_points']} points, one image",
                a["cellkit_hungarian_ms"],
                a["cellkit_greedy_ms"],
                a["scipy_dense_ms"],
                a["speedup"],
                a["tp_cellkit"],
                a["same_tp"],
            ],
            [
                f"{b['images']} images x {b['points_per_image']} points, evaluate()",
                b["cellkit_evaluate_ms"],
                None,
                b["scipy_dense_ms"],
                b["speedup"],
                sum(b["tp_cellkit"]),
                b["same_tp"],
            ],
        ]
        out += [
            "### 3. Matching and metrics",
            "",
            table(
                [
                    "case",
                    "cellkit hungarian ms",
                    "cellkit greedy ms",
                    "scipy dense ms",
                    "speedup",
                    "tp",
                    "same tp",
                ],
                rows,
            ),
            "",
        ]
    if "training" in stages:
        out += ["### 4. Training step", "", _training(stages["training"]["runs"]), ""]
    if "inference" in stages:
        out += ["### 5. Inference", "", _inference(stages["inference"]["runs"]), ""]
    if "gpu" in stages and not stages["gpu"].get("skipped"):
        g = stages["gpu"]
        out += [
            f"### 6. GPU: {g['device_name']}",
            "",
            _training(g["training"]),
            "",
            _inference(g["inference"]),
            "",
        ]
    if report.get("checks"):
        rows = [[c["check"], c["value"], c["target"], c["met"]] for c in report["checks"]]
        out += ["### Targets", "", table(["check", "value", "target", "met"], rows), ""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the Markdown of each results file given."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="JSON files written by benchmarks/run.py --json")
    args = p.parse_args(argv)
    for path in args.results:
        sys.stdout.write(render(json.loads(path.read_text())) + "\n")


if __name__ == "__main__":
    main()
