"""torch.compile against eager for one training step of the cpu-size ``ours`` model (issue 27 item 5).

Runs [`model_bench.train_step`] three times, eager, compiled, eager again (the repeat shows
how much of the first arm was warm-up), and prints JSON. Run it alone on the machine::

    python benchmarks/compile_probe.py > benchmarks/results-compile-cpu.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import model_bench  # noqa: E402
from harness import load_average  # noqa: E402


def main() -> int:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE.parent).stdout.strip()
    out: dict = {"load_start": load_average(), "commit": commit}
    for key, compiled in (("eager", False), ("compiled", True), ("eager_again", False)):
        started = time.perf_counter()
        r = model_bench.train_step("ours", "cpu", batch_size=8, crop=192, warmup=2, repeats=8,
                                   channels_last=True, compile_model=compiled)
        out[key] = {"step_s": round(r["step_s"], 4), "min_ms": r["step"].get("min_ms"),
                    "max_ms": r["step"].get("max_ms"), "compile_s": r["compile_s"] and round(r["compile_s"], 1),
                    "wall_s": round(time.perf_counter() - started, 1)}
        print(key, out[key], file=sys.stderr, flush=True)
    out["load_end"] = load_average()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
