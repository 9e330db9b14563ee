"""What every benchmark shares: timing, isolated runs, the machine's description, tables.

* :func:`measure` runs a function after warm-up calls and reports the median of the timed
  calls (with min and max, so the spread is visible on a shared machine).
* :func:`run_isolated` runs a measurement in a fresh ``spawn`` subprocess, so its peak
  resident memory (the process's high-water mark, see :func:`peak_rss_mb`) belongs to that
  measurement alone; tracemalloc cannot see torch's allocations.
* :func:`machine_info` describes the CPU, the libraries, the threads and the GPU.
* :func:`matmul_rate` measures what this machine's ``torch.mm`` reaches, the yardstick of
  the model efficiency figures.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Measurement",
    "call_all",
    "format_table",
    "machine_info",
    "contention",
    "load_average",
    "matmul_rate",
    "measure",
    "peak_rss_mb",
    "run_isolated",
    "synchronize",
]

Measurement = dict[str, Any]


def synchronize(device: Any = None) -> None:
    """Wait for queued GPU work (a no-op on the CPU), so wall-clock times cover the work."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any],
    *,
    repeats: int,
    warmup: int = 1,
    device: Any = None,
) -> tuple[Measurement, Any]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Args:
        fn: the work, called without arguments.
        repeats: timed calls (>= 1); the figure is their median.
        warmup: untimed calls first (caches, allocators, lazy initialisation).
        device: a CUDA device to synchronise after each call (``None`` or ``"cpu"``: none).

    Returns:
        ``({"median_ms", "min_ms", "max_ms", "repeats", "warmup"}, result of the last call)``.

    Raises:
        ValueError: for ``repeats < 1`` or ``warmup < 0``.

    Example:
        >>> stats, value = measure(lambda: sum(range(10)), repeats=3)
        >>> stats["repeats"], value
        (3, 45)
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    result = None
    for _ in range(warmup):
        result = fn()
        synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    stats = {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "repeats": repeats,
        "warmup": warmup,
    }
    return stats, result


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark so far, in MiB.

    On Linux this is ``VmHWM`` of ``/proc/self/status``, the peak of the running program
    alone. ``getrusage(RUSAGE_SELF).ru_maxrss`` is not: Linux carries it over ``execve``, so a
    ``spawn`` child starts with its parent's peak (a parent holding 800 MB makes every
    child's ``ru_maxrss`` at least 800 MB). Elsewhere ``ru_maxrss`` is the fallback.

    Recent kernels count resident memory per CPU and read the sum approximately, so a
    ``VmHWM`` read can come out a fraction of a MiB below an earlier one (seen: 443.39 after
    443.57); the value returned is the largest read so far, so it never goes down.
    """
    global _HIGHEST
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    _HIGHEST = max(_HIGHEST, int(line.split()[1]) / 1024.0)  # kB
                    return _HIGHEST
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    _HIGHEST = max(_HIGHEST, peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0)
    return _HIGHEST


_HIGHEST = 0.0


def run_isolated(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` in a fresh ``spawn`` subprocess; its return value comes back.

    Each call gets its own process, so a memory high-water mark read inside ``fn`` with
    :func:`peak_rss_mb` is that measurement's alone. ``fn`` must be a module-level function
    and ``kwargs`` picklable. Errors raised inside are raised again here.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, **kwargs).result()


def call_all(calls: Sequence[tuple[Callable[..., Any], dict[str, Any]]]) -> list[Any]:
    """``[fn(**kwargs) for fn, kwargs in calls]``: several measurements in one process.

    Used through :func:`run_isolated` by ``--quick`` runs, where one process per stage is
    enough (their memory figures are then cumulative, and not meant to be read).
    """
    return [fn(**kwargs) for fn, kwargs in calls]


def matmul_rate(
    device: str = "cpu", dtype: Any = None, size: int | None = None, repeats: int = 5
) -> dict[str, Any]:
    """The rate of a large square ``torch.mm`` on ``device``, in FLOP/s (2 n^3 per product).

    Args:
        device: ``"cpu"`` or a CUDA device.
        dtype: a torch dtype (default float32). On CUDA float32 runs as PyTorch is set
            (``torch.backends.cuda.matmul.allow_tf32``, off by default: true float32).
        size: the side ``n`` (default 2048 on the CPU, 8192 on a GPU).
        repeats: timed products (median), after two warm-up ones.

    Returns:
        ``{"flops_per_s", "gflops_per_s", "size", "dtype", "median_ms"}``.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    on_gpu = str(device).startswith("cuda")
    n = int(size or (8192 if on_gpu else 2048))
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    stats, _ = measure(lambda: torch.mm(a, b), repeats=repeats, warmup=2, device=device if on_gpu else None)
    rate = 2.0 * n**3 / (stats["median_ms"] / 1e3)
    return {
        "flops_per_s": rate,
        "gflops_per_s": rate / 1e9,
        "size": n,
        "dtype": str(dtype).replace("torch.", ""),
        "median_ms": stats["median_ms"],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return None


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(root: Path | None = None) -> dict[str, Any]:
    """The machine and software a run measured: CPU, cores, memory, library versions, threads, GPU."""
    import numpy
    import scipy
    import skimage
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gb": None if _memory_gb() is None else round(_memory_gb(), 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "scikit_image": skimage.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cuda": None,
    }
    if root is not None:
        info["git_commit"] = _git_commit(root)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = {
            "device": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "memory_gb": round(props.total_memory / 1024**3, 1),
            "cuda_version": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            # "float32" convolutions run as TF32 on Ampere and later when this is on (PyTorch's default).
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        }
    return info


def contention(load_start: float | None, load_end: float | None, cores: int | None = None) -> str | None:
    """A loud note when a timing was taken while other work shared the cores, else ``None``.

    The 1-minute load average counts the benchmark itself (about one per busy thread), so a
    load above the cores in use means something else ran too: two torch processes on two
    cores each run many times slower than alone (threads spin-waiting for each other), and
    such a timing says nothing about the code. ``cores``: the CPUs this process may use.

    Examples:
        >>> contention(1.9, 2.0, cores=2) is None
        True
        >>> contention(0.5, 4.2, cores=2)[:40]
        'WARNING: the load average reached 4.2 on'
    """
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
    loads = [v for v in (load_start, load_end) if v is not None]
    if not loads or max(loads) <= cores + 0.5:
        return None
    return (f"WARNING: the load average reached {max(loads):.1f} on {cores} cores: other work shared the "
            "cores, so these timings are not the code's (run it again alone)")


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the platform has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def format_table(title: str, columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: ``columns`` are ``(key, header)`` pairs read from each row dict.

    Example:
        >>> print(format_table("t", [("a", "A"), ("b", "B")], [{"a": 1, "b": 2.5}]))
        t
        A | B
        --+-----
        1 | 2.50
    """
    cells = [[header for _, header in columns]]
    cells += [[_fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [title]
    for n, r in enumerate(cells):
        lines.append(" | ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def provenance(script: str, argv: Sequence[str] | None, load_start: float | None, root: Path,
               cores: int | None = None, end_counts: bool = True) -> dict[str, Any]:
    """The record's tail every benchmark writes: load averages, the contention note, the machine, the command.

    ``end_counts=False`` when the benchmark's own workers load the cores at its end (only the
    load at the start then says whether other work ran).
    """
    load_end = load_average()
    return {"load_average": {"start": load_start, "end": load_end},
            "contention": contention(load_start, load_end if end_counts else None, cores),
            "machine": machine_info(root),
            "command": " ".join([script, *(argv if argv is not None else sys.argv[1:])])}


def emit(result: dict[str, Any], json_out: Path | None) -> None:
    """Print ``result`` as JSON, and write it to ``json_out`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_out:
        json_out.write_text(text + "\n", encoding="utf-8")
